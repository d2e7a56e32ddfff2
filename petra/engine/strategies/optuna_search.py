"""Optuna samplers (NSGA-II, multi-objective TPE) behind petra's ask/tell ``Strategy``.

Optuna stays inside this module, and is imported only when such a strategy is built. Each gene
maps to an Optuna distribution (:func:`distributions`); a batch is ``population`` calls of
``study.ask``, and every result is told with an explicit state: COMPLETE, FAIL or PRUNED. A
proposal whose genome hash was already proposed is redrawn (up to 20 times); the discarded
trial is told FAIL, so no trial is left RUNNING.

Reproducibility: the study's sampler is rebuilt at the start of every batch, seeded from
``(seed, generation)`` (each search reseeds its own sampler, optuna#3162). A study in memory is
not JSON-able, so :meth:`OptunaSearch.state_dict` keeps every trial (params, values, state,
system attributes) and :meth:`OptunaSearch.load_state_dict` re-adds them with
``study.add_trial``. Since the sampler's draws depend only on that history and the per-batch
seed, a resumed search proposes what an uninterrupted one would; should a future Optuna keep
sampler state outside the trials and study attributes, resumed proposals could differ.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from petra.engine.strategies.base import (
    MAX_TRIES,
    STRATEGIES,
    StrategyBase,
    Told,
    candidate_seed,
)
from petra.errors import FAILED, PRUNED
from petra.space import Categorical, Float, Genome, Int, SearchSpace

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

#: The seed of a batch's sampler is ``candidate_seed(seed, generation, SAMPLER_INDEX)``.
SAMPLER_INDEX = 0


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as e:  # pragma: no cover - optuna is a dependency
        raise ImportError("the optuna_* strategies need optuna: pip install 'optuna>=5'") from e
    return optuna


def distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    """One Optuna distribution per gene, keyed by gene name.

    Categorical genes become ``CategoricalDistribution``; Int genes ``IntDistribution``; Float
    genes ``FloatDistribution``, with the gene's ``step`` only when it is linear and
    ``high - low`` is a whole number of steps (otherwise continuous, and ``gene.clip`` rounds).
    """
    d = _optuna().distributions
    out: dict[str, BaseDistribution] = {}
    for gene in space.genes:
        if isinstance(gene, Categorical):
            out[gene.name] = d.CategoricalDistribution(list(gene.choices))
        elif isinstance(gene, Int):
            out[gene.name] = d.IntDistribution(int(gene.low), int(gene.high))
        elif isinstance(gene, Float):
            step = None
            if not gene.log and gene.step:
                n = (gene.high - gene.low) / gene.step
                if abs(n - round(n)) < 1e-8:
                    step = float(gene.step)
            out[gene.name] = d.FloatDistribution(
                float(gene.low), float(gene.high), log=gene.log, step=step
            )
        else:  # pragma: no cover - the space's genes are the three above
            raise TypeError(f"gene {gene.name}: no Optuna distribution for {type(gene).__name__}")
    return out


class OptunaSearch(StrategyBase):
    """An Optuna sampler in ask/tell form; subclasses choose the sampler.

    The first batch starts with the ``initial`` genomes (completed, deduplicated, at most
    ``population``), enqueued with ``study.enqueue_trial``. Results are matched to trials by
    genome hash, in any order. Complete results with finite values are told COMPLETE; failed
    ones, and complete ones with missing or non-finite values, FAIL; pruned ones PRUNED (their
    values are not told: Optuna takes none for a pruned trial). A pending trial left without a
    result is told FAIL; a result for a genome that was not pending is added as a finished trial.
    """

    name = "optuna"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._optuna = _optuna()
        self._optuna.logging.set_verbosity(self._optuna.logging.WARNING)
        self._distributions = distributions(self.space)
        self._study = self._new_study()
        self._pending_trials: dict[str, list[int]] = {}

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        raise NotImplementedError

    @property
    def study(self) -> optuna.Study:
        """The in-memory Optuna study (for inspection; the strategy drives it)."""
        return self._study

    # -- hooks ----------------------------------------------------------------------------------

    def _propose(self) -> list[Genome]:
        return self._batch()

    def _learn(self, results: Sequence[Told]) -> None:
        states = self._optuna.trial.TrialState
        for r in results:
            genome = self.space.complete(r.genome)
            h = self.space.genome_hash(genome)
            self._seen.add(h)
            state, values = self._outcome(r)
            numbers = self._pending_trials.get(h)
            if numbers:
                self._study.tell(numbers.pop(0), values, state=state)
            else:
                self._study.add_trial(self._optuna.trial.create_trial(
                    params=genome, distributions=self._distributions, values=values,
                    state=state))
        for numbers in self._pending_trials.values():
            for number in numbers:
                self._study.tell(number, state=states.FAIL)
        self._pending_trials = {}

    def _extra_state(self) -> dict[str, Any]:
        study_id = self._study._study_id
        return {
            "pending_trials": {h: list(n) for h, n in self._pending_trials.items()},
            "trials": [
                {
                    "params": dict(t.params),
                    "values": None if t.values is None else list(t.values),
                    "state": t.state.name,
                    "system_attrs": dict(t.system_attrs),
                    "user_attrs": dict(t.user_attrs),
                }
                for t in self._study.get_trials(deepcopy=False)
            ],
            "study_system_attrs": dict(self._study._storage.get_study_system_attrs(study_id)),
        }

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        states = self._optuna.trial.TrialState
        self._study = self._new_study()
        for t in state["trials"]:
            self._study.add_trial(self._optuna.trial.create_trial(
                params=dict(t["params"]),
                distributions={k: self._distributions[k] for k in t["params"]},
                values=t["values"], state=states[t["state"]],
                system_attrs=dict(t["system_attrs"]), user_attrs=dict(t["user_attrs"]),
            ))
        for key, value in state.get("study_system_attrs", {}).items():
            self._study._storage.set_study_system_attr(self._study._study_id, key, value)
        self._pending_trials = {
            h: [int(n) for n in numbers] for h, numbers in state.get("pending_trials", {}).items()
        }

    # -- internals ------------------------------------------------------------------------------

    def _new_study(self) -> optuna.Study:
        directions = ["maximize" if d == "max" else "minimize" for _, d in self.objectives]
        return self._optuna.create_study(
            directions=directions, sampler=self._sampler(self._sampler_seed(0))
        )

    def _sampler_seed(self, generation: int) -> int:
        return candidate_seed(self.seed, generation, SAMPLER_INDEX) % 2**32

    def _outcome(self, result: Told) -> tuple[Any, list[float] | None]:
        states = self._optuna.trial.TrialState
        if result.status == PRUNED:
            return states.PRUNED, None
        if result.status == FAILED or result.values is None:
            return states.FAIL, None
        if len(result.values) != len(self.objectives):
            raise ValueError(
                f"a result has {len(result.values)} values for {len(self.objectives)} objectives"
            )
        values = [float(v) for v in result.values]
        if not all(math.isfinite(v) for v in values):
            return states.FAIL, None
        return states.COMPLETE, values

    def _batch(self) -> list[Genome]:
        """``population`` new genomes, each from one kept trial; discarded trials told FAIL."""
        self._study.sampler = self._sampler(self._sampler_seed(self._generation))
        if self._generation == 0:
            for genome in self._initial_genomes():
                self._study.enqueue_trial(genome, skip_if_exists=False)
        fail = self._optuna.trial.TrialState.FAIL
        batch: list[Genome] = []
        self._pending_trials = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", self._optuna.exceptions.ExperimentalWarning)
            for _ in range(self.population if self._generation == 0 else self.offspring):
                for attempt in range(MAX_TRIES + 1):
                    trial = self._study.ask(self._distributions)
                    genome = {g.name: g.clip(trial.params[g.name]) for g in self.space.genes}
                    h = self.space.genome_hash(genome)
                    if h not in self._seen or attempt == MAX_TRIES:
                        break
                    self._study.tell(trial, state=fail)
                self._seen.add(h)
                self._pending_trials.setdefault(h, []).append(trial.number)
                batch.append(genome)
        return batch

    def _initial_genomes(self) -> list[Genome]:
        out: list[Genome] = []
        hashes: set[str] = set()
        for partial in self._initial:
            if len(out) == self.population:
                break
            genome = self.space.complete(partial)
            h = self.space.genome_hash(genome)
            if h not in hashes:
                hashes.add(h)
                out.append(genome)
        return out


@STRATEGIES.register("optuna_nsga2", description="Optuna's NSGAIISampler, ask/tell")
class OptunaNSGA2(OptunaSearch):
    """Optuna's ``NSGAIISampler(population_size=population)``; see :class:`OptunaSearch`."""

    name = "optuna_nsga2"

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        if self.population < 2:
            raise ValueError(f"population must be >= 2 for optuna_nsga2; got {self.population}")
        return self._optuna.samplers.NSGAIISampler(population_size=self.population, seed=seed)


@STRATEGIES.register("optuna_tpe", description="Optuna's multi-objective TPESampler, ask/tell")
class OptunaTPE(OptunaSearch):
    """Optuna's ``TPESampler(multivariate=True)``, multi-objective; see :class:`OptunaSearch`."""

    name = "optuna_tpe"

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", self._optuna.exceptions.ExperimentalWarning)
            return self._optuna.samplers.TPESampler(seed=seed, multivariate=True)
