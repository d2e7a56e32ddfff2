"""One candidate: genome → compressed deployable artifact → measured :class:`Result`.

    baseline weights → structured pruning (channels removed) → low-rank factorization
    → unstructured masks (per layer, or global) → [multi-fidelity probe] → [QAT prepare]
    → fine-tune (+ regularizer, masks held; [rung: stop if it cannot reach the front])
    → [QAT finalize] → ONNX → quantization scheme → artifact bytes
    → measured on the artifact: val accuracy, bytes, latency vs. the dense baseline (interleaved;
      [stop after its first rounds if the candidate cannot reach the front])

The whole evaluation runs under the per-candidate memory limit (:mod:`petra.candidate.limits`). A candidate
that raises, produces non-finite weights or outputs, or allocates past the limit becomes a failed
:class:`Result` with its error; one stopped by its rung (:mod:`petra.engine.fidelity`) a pruned one.

An :class:`Evaluator` is built once per worker and reused for every candidate: the task, the
baseline weights and the baseline's ONNX Runtime session stay warm. Candidates are exported as
the dense model was (its artifact names the exporter where it is not the TorchScript one).
"""

from __future__ import annotations

import io
import itertools
import math
import os
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from petra.candidate import artifact
from petra.candidate.limits import memory_limit, peak_rss_mb, pin_to_core, reset_peak_rss
from petra.candidate.measure import InterleavedTimer, macs_and_params, session_accuracy
from petra.candidate.onnx_forms import EXPORTER_KEY, prefer
from petra.candidate.recipes import Recipe, layer_sparsity
from petra.engine.fidelity import ALL_ROUNDS, FIRST_ROUNDS, PROBE_BLOCK_S, PROBE_ROUNDS
from petra.errors import COMPLETE, FAILED, PRUNED, describe_error
from petra.registry import PRUNING, QUANTIZATION, REGULARIZERS
from petra.space import protected, prunable_layers
from petra.tasks import load_task
from petra.tasks.contract import copy_model

if TYPE_CHECKING:
    from torch import nn

    from petra.candidate.baseline import Baseline
    from petra.candidate.screen import Screen
    from petra.engine.fidelity import Rung
    from petra.schema import SearchConfig


# A compression is "effective" on bytes or latency only when it beats the baseline by more than
# this margin (and, for latency, by more than the measured spread of the ratio).
BYTES_MARGIN = 0.02
LATENCY_MARGIN = 0.03


@dataclass
class Result:
    """What a worker returns: plain data only (no torch objects), so any executor can carry it."""

    genome: dict[str, Any]
    genome_hash: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    artifact: bytes | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def objective_values(self, objectives: list[tuple[str, str]]) -> tuple[float, ...] | None:
        return objective_values(self.status, self.metrics, objectives)


def objective_values(
    status: str, metrics: Mapping[str, float], objectives: list[tuple[str, str]]
) -> tuple[float, ...] | None:
    """The objective metrics in ``objectives``' order; None for a failed candidate or when one
    is missing or NaN."""
    if status == FAILED:
        return None
    values = tuple(float(metrics.get(m, math.nan)) for m, _ in objectives)
    return None if any(math.isnan(v) for v in values) else values


class Evaluator:
    """Evaluates genomes against one task and its baseline, inside one process.

    Args:
        task_name, task_params: the config's task, rebuilt here (workers receive names).
        baseline_state: ``torch.save`` bytes of the baseline state_dict.
        baseline_artifact: the dense baseline's artifact bytes.
        threads: torch and ONNX Runtime threads for this worker.
        calibration_batches: training batches used to calibrate static quantization.
        core: pin this process to the ``core``-th CPU it may use (modulo their count), so
            candidate and baseline are timed on the same core; None leaves affinity alone.
        memory_limit_mb: the most memory one candidate may add to this process
            (:func:`petra.candidate.limits.memory_limit`); None for no limit.
        shapley_permutations: the permutations a ``shapley`` criterion may sample per group.
        device: where fine-tunes and screens run (:func:`petra.candidate.device.resolve`).
        providers: the ONNX Runtime execution providers every candidate and the baseline are
            measured with.
    """

    def __init__(
        self, *, task_name: str, task_params: Mapping[str, Any], baseline_state: bytes,
        baseline_artifact: bytes, threads: int = 1, calibration_batches: int = 4,
        core: int | None = None, memory_limit_mb: int | None = None,
        shapley_permutations: int = 4, device: str = "auto",
        providers: Sequence[str] = ("CPUExecutionProvider",), layer_cache_mb: float = 256.0,
        layer_cache: Any = None,
    ) -> None:
        import torch

        from petra.candidate.device import check_providers, resolve
        from petra.compress.attention import attention_layers
        from petra.compress.blocks import skippable_blocks
        from petra.compress.layer_cache import configure
        from petra.compress.recurrent import gru_layers
        from petra.tasks.contract import feed

        self.core = pin_to_core(core) if core is not None and threads == 1 else None
        torch.set_num_threads(threads)
        self.threads = threads
        self.device = resolve(device)
        self.providers = check_providers(providers)
        self.layer_cache = configure(layer_cache_mb, layer_cache)
        self.memory_limit_mb = memory_limit_mb
        self.shapley_permutations = int(shapley_permutations)
        self.task = load_task(task_name, task_params)
        self.task.model.load_state_dict(torch.load(io.BytesIO(baseline_state), weights_only=True))
        self.task.model.eval()
        self.example = self.task.example_input
        self.baseline_bytes = len(baseline_artifact)
        self.baseline_session = self._session(baseline_artifact)
        if self.baseline_session.get_modelmeta().custom_metadata_map.get(EXPORTER_KEY):
            prefer(self.task.model, "dynamo")
        self.attention = attention_layers(self.task.model, self.example)
        self.recurrent = gru_layers(self.task.model, self.example)
        layers = prunable_layers(self.task.model, self.example, attention=self.attention,
                                 recurrent=self.recurrent)
        self.protected = protected(layers)
        self.residual = [layer.name for layer in layers if layer.residual]
        self.blocks = skippable_blocks(self.task.model, self.example)
        self._screen: Screen | None = None  # built on the first screen
        self._teacher: nn.Module | None = None  # the dense model on the device, for kd
        self.calibration = [feed(x, self.task.input_names)
                            for x, _ in _take(self.task.train, calibration_batches)]

    @staticmethod
    def options(cfg: SearchConfig, baseline: Baseline) -> dict[str, Any]:
        """The keyword arguments of an Evaluator for config ``cfg`` and its baseline: plain
        data, so executors can send them to workers."""
        return {"task_name": cfg.task.name, "task_params": dict(cfg.task.params),
                "baseline_state": baseline.state, "baseline_artifact": baseline.artifact,
                "memory_limit_mb": cfg.execution.memory_limit_mb,
                "shapley_permutations": cfg.space.shapley_permutations,
                "device": cfg.execution.device, "providers": list(cfg.measure.providers),
                "layer_cache_mb": cfg.execution.layer_cache_mb}

    @classmethod
    def from_config(cls, cfg: SearchConfig, baseline: Baseline, **overrides: Any) -> Evaluator:
        """The Evaluator of :meth:`options`, with ``overrides`` (``threads``, ``core``)."""
        return cls(**{**cls.options(cfg, baseline), **overrides})

    def _session(self, data: bytes) -> Any:
        return artifact.load(data, threads=self.threads, providers=self.providers)

    def teacher(self) -> nn.Module:
        """The dense model on :attr:`device` (itself on the CPU)."""
        if self._teacher is None:
            on_cpu = self.device.type == "cpu"
            self._teacher = self.task.model if on_cpu else copy_model(self.task.model).to(
                self.device)
        return self._teacher

    def evaluate(self, genome: Mapping[str, Any], *, genome_hash: str = "", seed: int = 0,
                 rung: Rung | None = None) -> Result:
        """Compress, fine-tune, export and measure one genome; never raises.

        Args:
            genome: the genes (a partial genome means no compression for the rest).
            genome_hash: carried into the Result.
            seed: seeds pruning and the fine-tune.
            rung: the multi-fidelity rule (see :mod:`petra.engine.fidelity`); None measures every
                candidate in full.
        """

        start = time.perf_counter()
        reset_peak_rss()
        try:
            with memory_limit(self.memory_limit_mb):
                result = self._evaluate(dict(genome), genome_hash, seed, rung)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a failed Result
            result = Result(
                genome=dict(genome), genome_hash=genome_hash, status=FAILED,
                error=describe_error(exc), info={"traceback": traceback.format_exc(limit=-12)},
            )
        result.metrics["eval_time_s"] = time.perf_counter() - start
        if (peak := peak_rss_mb()) is not None:
            result.metrics["peak_rss_mb"] = peak
        result.info.update(worker_pid=os.getpid(), core=self.core, device=self.device.type,
                           seed=seed)
        return result

    def _evaluate(self, genome: dict[str, Any], genome_hash: str, seed: int,
                  rung: Rung | None) -> Result:
        import torch

        from petra.compress.gates import remove_gated

        recipe = Recipe.from_genome(genome)
        model = copy_model(self.task.model)
        info, masks, gated = self.compress(model, recipe, seed)

        # Multi-fidelity (petra.engine.fidelity): a probe and a rung for a long enough fine-tune, and
        # the first rounds of the final latency for every candidate. Trained gates decide the
        # structure only after the fine-tune, so they have no probe.
        short = rung is not None and rung.applies(recipe.epochs) and not gated
        probe: dict[str, float] = {}
        if short:
            probe, _ = self._measure(self._artifact(model, recipe), model, accuracy=False,
                                     rounds=PROBE_ROUNDS, block_s=PROBE_BLOCK_S)
            reason = rung.stop_reason(probe, "probe")
            if reason:
                return self._pruned(genome, genome_hash, probe, reason, 0, None, info)

        at_rung = self.finetune(model, recipe, seed, masks, gated, rung if short else None, probe)
        rung_accuracy = at_rung.get("val_accuracy")
        if at_rung.get("reason"):
            return self._pruned(genome, genome_hash, {**probe, "val_accuracy": rung_accuracy},
                                at_rung["reason"], rung.epochs, rung_accuracy, info)
        if gated:
            info["channels"].update(remove_gated(model, self.example, gated, recipe.round_to,
                                                 _take(self.task.train, 16)))
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise FloatingPointError("fine-tuning produced non-finite weights")

        data = self._artifact(model, recipe)
        metrics, reason = self._measure(data, model, rung=rung)
        if reason:
            return self._pruned(genome, genome_hash, metrics, reason, recipe.epochs,
                                rung_accuracy, info)
        metrics["fidelity_epochs"] = float(recipe.epochs)
        if rung_accuracy is not None:
            metrics["rung_val_accuracy"] = rung_accuracy
        info["sparsity"] = layer_sparsity(recipe, model, self.task.model, masks)
        metrics.update({f"sparsity.{k}": v for k, v in info["sparsity"].items()})
        info["effective"] = _effective(metrics)
        return Result(genome=genome, genome_hash=genome_hash, status=COMPLETE, metrics=metrics,
                      artifact=data, info=info)

    def compress(self, model: nn.Module, recipe: Recipe, seed: int
                 ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Apply the recipe's structure to ``model`` in place: skipped blocks, heads, recurrent
        units, channel groups (trained gates are attached, not yet decided), low-rank factors,
        then the unstructured masks. Returns ``(info, masks, gated)``."""
        import torch

        from petra.compress.attention import prune_attention
        from petra.compress.blocks import skip_blocks
        from petra.compress.gates import ChannelGates
        from petra.compress.lowrank import factorize
        from petra.compress.prune import PruneContext, unstructured_masks
        from petra.compress.recurrent import gru_layers, prune_recurrent
        from petra.compress.structured import prune_channels

        skipped = skip_blocks(model, recipe.skip, self.blocks)
        ctx = PruneContext(
            model=model, batches=_take(self.task.train, 2), loss=self.task.loss,
            generator=torch.Generator().manual_seed(seed),
            val_batches=_take(self.task.val, 1), shapley_permutations=self.shapley_permutations,
        )
        gated: dict[str, ChannelGates] = {}

        def gate(name: str, method: str, members: Any, n: int) -> None:
            gated[name] = PRUNING.get(method).meta["gates"](members, n, recipe.params)

        rule = recipe.sparsity()
        heads = prune_attention(model, recipe.of_kind("heads"), self.attention)
        # A skipped block may have been a GRU's reader: its readers are then the layers after.
        plan = recipe.of_kind("recurrent")
        recurrent = gru_layers(model, self.example) if skipped and plan else self.recurrent
        units = prune_recurrent(model, plan, recurrent, round_to=recipe.round_to)
        channels = prune_channels(
            model, self.example, recipe.structured_plan(self.residual), round_to=recipe.round_to,
            protected=self.protected, ctx=ctx, sparsity_rule=rule, gate=gate,
        )
        ranks = factorize(model, {n: m for n, (m, _) in recipe.of_kind("lowrank").items()},
                          energy=recipe.energy, rule=recipe.rank_rule, ctx=ctx)
        masks = unstructured_masks(model, recipe.of_kind("unstructured"), ctx, rule)
        channels.update(units)
        info = {"channels": channels, "heads": heads, "ranks": ranks, "skipped": skipped}
        return info, masks, gated

    def finetune(self, model: nn.Module, recipe: Recipe, seed: int, masks: Mapping[str, Any],
                 gated: Mapping[str, Any], rung: Rung | None = None,
                 probe: Mapping[str, float] | None = None, batches: Any = None) -> dict[str, Any]:
        """The recipe's fine-tune of ``model`` (its regularizer, a QAT scheme's preparation,
        the masks kept, trained gates stepped) on the task's training batches, or ``batches``.
        With a ``rung``, validation accuracy is read after its epochs and the fine-tune stops if
        the rung says so: the returned dict then holds ``val_accuracy`` and ``reason``."""
        from petra.candidate.device import OnDevice
        from petra.candidate.train import evaluate_metric, train
        from petra.compress.regularize import RegContext

        if recipe.epochs <= 0:
            return {}
        penalty = REGULARIZERS.get(recipe.reg).fn(RegContext(
            strength=recipe.reg_strength, teacher=self.teacher(), loss=self.task.loss,
            params=recipe.params,
        ))
        model.to(self.device)  # masks follow their parameters in train
        prepare = QUANTIZATION.get(recipe.quant).meta.get("prepare")
        finalize = prepare(model) if prepare is not None else None
        at_rung: dict[str, Any] = {}

        def report(epoch: int, _loss: float) -> bool:
            if rung is None or epoch + 1 != rung.epochs:
                return False
            acc = evaluate_metric(model, OnDevice(self.task.val, self.device), self.task.metric)
            at_rung["val_accuracy"] = acc
            at_rung["reason"] = rung.stop_reason({**(probe or {}), "val_accuracy": acc}, "rung")
            return at_rung["reason"] is not None

        batches = self.task.train if batches is None else batches
        train(model, OnDevice(batches, self.device), epochs=recipe.epochs, lr=recipe.lr,
              loss_fn=self.task.loss, penalty=penalty, masks=masks, seed=seed, report=report,
              after_step=(lambda: [g.step() for g in gated.values()]) if gated else None)
        if at_rung.get("reason") is None and finalize is not None:
            finalize()
        model.to("cpu")
        return at_rung

    def _artifact(self, model: nn.Module, recipe: Recipe) -> bytes:
        """The deployable artifact of ``model``: ONNX, the recipe's quantization, packed."""
        from petra.compress.quantize import QuantContext, StaticOptions

        proto = artifact.export_onnx(model, self.example)
        proto = QUANTIZATION.get(recipe.quant).fn(
            proto, QuantContext(calibration=self.calibration,
                                static=StaticOptions(**recipe.static))
        )
        return artifact.pack(proto)

    def _measure(
        self, data: bytes, model: nn.Module, *, accuracy: bool = True, rounds: int = ALL_ROUNDS,
        block_s: float = 0.03, rung: Rung | None = None,
    ) -> tuple[dict[str, float], str | None]:
        """Bytes, MACs, (if ``accuracy``) val accuracy and latency against the baseline.

        With a ``rung``, the first :data:`~petra.engine.fidelity.FIRST_ROUNDS` rounds of the latency
        are read before the rest: a candidate the front dominates even so stops there, and the
        reason is returned with what was measured. Otherwise the reason is None.
        """

        session = self._session(data)
        metrics: dict[str, float] = {}
        if accuracy:
            metrics["val_accuracy"] = session_accuracy(session, self.task.val, self.task.metric)
        macs, params_dense, params = macs_and_params(model, self.example)
        metrics.update({
            "artifact_bytes": float(len(data)),
            "size_ratio": len(data) / self.baseline_bytes,
            "params": float(params),
            "params_dense": float(params_dense),
            "macs": float(macs),
        })
        timer = InterleavedTimer(session, self.baseline_session, self.example,
                                 block_s=block_s)
        if rung is not None and rounds > FIRST_ROUNDS:
            timer.run(FIRST_ROUNDS)
            partial = {**metrics, **_latency_metrics(timer.result())}
            reason = rung.stop_reason(partial, "measured")
            if reason:
                return partial, reason
        timer.run(rounds - timer.rounds)
        return {**metrics, **_latency_metrics(timer.result())}, None

    def _pruned(
        self, genome: dict[str, Any], genome_hash: str, metrics: dict[str, float], reason: str,
        epochs: int, rung_accuracy: float | None, info: dict[str, Any],
    ) -> Result:
        """A candidate that multi-fidelity stopped: what it measured up to there, no artifact.
        Stopped before its whole fine-tune it is a tier-1 result (``petra.tier``), after it a
        tier-2 one whose latency was cut short."""
        metrics = {**metrics, "fidelity_epochs": float(epochs)}
        if rung_accuracy is not None:
            metrics["rung_val_accuracy"] = rung_accuracy
        info = {**info, "effective": _effective(metrics), "pruned": reason,
                "tier": 2 if epochs >= Recipe.from_genome(genome).epochs else 1}
        return Result(genome=genome, genome_hash=genome_hash, status=PRUNED, metrics=metrics,
                      info=info)

    def screen(self, genome: Mapping[str, Any], *, genome_hash: str = "", seed: int = 0
               ) -> Result:
        """The tier-0 reading of a genome (:mod:`petra.candidate.screen`): compressed in
        torch and not fine-tuned, its latency from the per-layer table; never raises (a
        failure is a failed Result)."""
        from petra.candidate.latency_table import LatencyTable
        from petra.candidate.screen import Screen

        start = time.perf_counter()
        try:
            if self._screen is None:
                self._screen = Screen.build(self.task, table=LatencyTable(
                    threads=self.threads, providers=self.providers,
                    directory=self.layer_cache.directory))
            recipe = Recipe.from_genome(genome)
            model = copy_model(self.task.model)
            self.compress(model, recipe, seed)
            metrics = self._screen.read(model, recipe.quant, device=self.device, pruned=bool(
                recipe.layers or recipe.skip or recipe.width)).as_metrics()
            result = Result(dict(genome), genome_hash, COMPLETE, metrics=metrics)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a failed Result
            result = Result(dict(genome), genome_hash, FAILED, error=describe_error(exc))
        result.metrics["tier0_time_s"] = time.perf_counter() - start
        return result

    def measure(self, data: bytes) -> dict[str, float]:
        """An artifact made elsewhere (a reference recipe), measured as a candidate is: val
        accuracy, bytes against the baseline's, latency interleaved with the baseline's."""
        return self._measure(data, self.task.model)[0]

    def test_accuracy(self, artifact_bytes: bytes) -> float:
        """The task metric of an artifact on the held-out test split."""

        return session_accuracy(self._session(artifact_bytes), self.task.test, self.task.metric)


def _latency_metrics(latency: Any) -> dict[str, float]:
    return {
        "latency_ms": latency.candidate_ms,
        "latency_ratio": latency.ratio,
        "latency_ratio_iqr": latency.ratio_iqr,
        "baseline_latency_ms": latency.baseline_ms,
        "latency_rounds": float(latency.rounds),
    }


def _effective(metrics: Mapping[str, float]) -> dict[str, bool]:
    """Whether the compression changed bytes, and time, beyond the margins (and the noise)."""
    return {
        "bytes": metrics["size_ratio"] < 1 - BYTES_MARGIN,
        "latency": metrics["latency_ratio"]
        < 1 - max(LATENCY_MARGIN, metrics["latency_ratio_iqr"]),
    }


def _take(batches: Any, n: int) -> list[Any]:
    return list(itertools.islice(batches, n))
