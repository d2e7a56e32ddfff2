"""A candidate as an MLflow model in the Model Registry (``petra register``).

The candidate's artifact is logged as a pyfunc model "from code": the model's own code file and
petra's standalone loader (``load_petra.py``) travel with it, so loading it back, or serving it
with ``mlflow models serve``, needs mlflow, numpy, onnx and onnxruntime, and neither petra nor
torch. Its signature and input example are the task's example batch, by input name; its output
is the model's first output, exactly what ONNX Runtime returns for the artifact.

The model is logged into the search's experiment, with no run of its own (the candidate's child
run keeps its real start and end), and registered as a new version of ``name``, tagged with the
candidate's objectives, its recipe, and its search and candidate runs. ``alias`` (for example
``knee``) then names that version: ``models:/NAME@knee``.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from petra.candidate.artifact import loader_source
from petra.errors import ConfigError

#: The pyfunc model's code: it imports load_petra.py, a code path of the model.
MODEL_CODE = '''"""A petra artifact as an MLflow pyfunc model (numpy, onnx and onnxruntime only)."""

import mlflow
import numpy as np

_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
           "tensor(float16)": np.float16, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


class PetraModel(mlflow.pyfunc.PythonModel):
    # The logged signature checks the inputs; MLflow's type hints cannot name numpy arrays,
    # and without them it warns on every load.
    _skip_type_hint_validation = True

    def load_context(self, context):
        from load_petra import load

        self.session = load(context.artifacts["model"], threads=1)
        self.inputs = {i.name: _DTYPES.get(i.type) for i in self.session.get_inputs()}

    def predict(self, context, model_input, params=None):
        if hasattr(model_input, "to_dict") and not isinstance(model_input, dict):
            model_input = {k: np.stack(v.to_numpy()) for k, v in model_input.items()}
        if not isinstance(model_input, dict):
            model_input = {next(iter(self.inputs)): model_input}
        feed = {name: np.asarray(model_input[name], dtype=dtype)
                for name, dtype in self.inputs.items()}
        return self.session.run(None, feed)[0]


mlflow.models.set_model(PetraModel())
'''

#: Candidate metrics copied onto the registered version as tags.
OBJECTIVE_TAGS = ("val_accuracy", "test_accuracy", "size_ratio", "latency_ratio",
                  "artifact_bytes", "latency_ms")


@dataclass(frozen=True)
class Registered:
    """A registered model version: its name, version, alias (or None) and model URI."""

    name: str
    version: str
    alias: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else \
            f"models:/{self.name}/{self.version}"


def register_model(uri: str, name: str, *, artifact_bytes: bytes, example: Mapping[str, Any],
                   tags: Mapping[str, str], experiment_id: str, alias: str | None = None,
                   source_run_id: str | None = None) -> Registered:
    """Log ``artifact_bytes`` as a pyfunc model in ``experiment_id`` of the store at ``uri``
    (from run ``source_run_id``, which is left as it is), register it as a version of ``name``
    with ``tags`` and set ``alias`` on it."""
    import mlflow
    import numpy as np
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    from petra.candidate import artifact

    example = {k: np.asarray(v) for k, v in example.items()}
    session = artifact.load(artifact_bytes, threads=1)
    output = session.run(None, example)[0]
    model_input: Any = next(iter(example.values())) if len(example) == 1 else example
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with tempfile.TemporaryDirectory(prefix="petra-register-") as tmp:
        folder = Path(tmp)
        (folder / "model.petra").write_bytes(artifact_bytes)
        (folder / "load_petra.py").write_text(loader_source())
        (folder / "petra_pyfunc.py").write_text(MODEL_CODE)
        # a logged model created in the experiment, so that no global active experiment is set
        logged = mlflow.initialize_logged_model(name="model", source_run_id=source_run_id,
                                                experiment_id=experiment_id)
        with _quiet("mlflow.pyfunc"):
            info = mlflow.pyfunc.log_model(
                name="model", model_id=logged.model_id,
                python_model=str(folder / "petra_pyfunc.py"),
                code_paths=[str(folder / "load_petra.py")],
                artifacts={"model": str(folder / "model.petra")},
                signature=infer_signature(model_input, output), input_example=model_input,
                pip_requirements=["mlflow", "numpy", "onnx", "onnxruntime"])
    version = mlflow.register_model(info.model_uri, name, tags=dict(tags))
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return Registered(name, str(version.version), alias)


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """``logger``'s INFO lines left out (MLflow's "Validating input example ...")."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def register_candidate(uri: str, search_run_id: str, candidate_run_id: str, name: str,
                       alias: str | None = None) -> Registered:
    """Register candidate ``candidate_run_id`` of search ``search_run_id`` (``knee`` names the
    search's knee) as a version of ``name``; see the module docstring."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils import validation

    from petra.space import summarize
    from petra.tasks import load_task
    from petra.tasks.contract import feed
    from petra.tracking.runs import open_search
    from petra.tracking.store import Tracker

    for field, value, check in (("--name", name, validation._validate_model_name),
                                ("--alias", alias, validation._validate_model_alias_name)):
        try:  # before anything is logged: a refused name left a logged model on every try
            if value is not None:
                check(value)
        except MlflowException as exc:
            raise ConfigError(field, value, "", f"MLflow refuses {value!r}: {exc.message}"
                              ) from None

    search = open_search(uri, search_run_id)
    record = search.record(candidate_run_id)
    data = Tracker.fetch(uri, record["id"], "model.petra")
    if data is None:
        raise ConfigError("candidate", record["id"], "", (
            f"candidate {record['id']} has no artifact (its status is {record['status']}); "
            "register a complete candidate, e.g. one on the front"))
    task = load_task(search.config.task.name, search.config.task.params)
    tags = {f"petra.{k}": f"{float(record['metrics'][k]):.6g}" for k in OBJECTIVE_TAGS
            if k in record["metrics"]}
    tags.update({"petra.recipe": summarize(record["genome"], record.get("metrics"))[:5000],
                 "petra.search_run_id": search.run_id, "petra.candidate_run_id": record["id"],
                 "petra.task": search.config.task.name,
                 "petra.on_front": str(bool(record.get("on_front"))).lower()})
    return register_model(uri, name, artifact_bytes=data, alias=alias, tags=tags,
                          example=feed(task.example_input, task.input_names),
                          experiment_id=search.experiment_id, source_run_id=record["id"])
