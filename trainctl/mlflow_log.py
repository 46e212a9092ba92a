"""MLflow tracking of a run (`logging.mlflow=true`), beside metrics.jsonl and TensorBoard.

One MLflow run per run directory, named after it: the flattened run spec as params (`optimizer.lr`), each
record of metrics.jsonl as metrics at its step (one `log_batch` call per record), and at the end of each
session the summary (its figures as `summary/...` metrics, the stop reason as a tag), `model.safetensors`,
`config.yaml` and `summary.json` as artifacts, and the status the session ended with (FINISHED, KILLED when
interrupted, FAILED otherwise). Only rank 0 logs. The MLflow run's id is kept in the run directory
(`mlflow_run.json`), so a resumed run continues the same MLflow run; the steps it already holds (logged by
a session killed after its last checkpoint) are not logged again.

The tracking URI is `logging.mlflow_tracking_uri`, else $MLFLOW_TRACKING_URI, else the SQLite database
`mlflow.db` in the directory trainctl is started from (MLflow 3's own default: its file store `mlruns/`
is deprecated), with the artifacts in `mlruns/` beside it. Importing this module does not import MLflow:
the client is set up at the first record, and that time is kept out of the training time.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from trainctl.errors import ConfigError

log = logging.getLogger("trainctl")

INSTALL = "pip install 'trainctl[mlflow]'"
RUN_FILE = "mlflow_run.json"
"""In the run directory: the tracking URI, experiment and run id that a resumed run continues."""
STATUS = {"completed": "FINISHED", "early_stopped": "FINISHED", "interrupted": "KILLED"}
"""MLflow's status for a stop reason; every other one (failed, diverged, checkpoint_failed) is FAILED."""
ARTIFACTS = ("model.safetensors", "config.yaml", "summary.json", "data_encoding.json")
DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
"""Tracking URI schemes of MLflow's SQLAlchemy store (which needs sqlalchemy and alembic)."""


def tracking_for(spec: Any, run_dir: Path, base_dir: str) -> Optional["MlflowTracking"]:
    """The MLflow tracking of a run, or None when `logging.mlflow` is off. A missing package is a
    :class:`ConfigError` naming the extra, raised before anything is written."""
    import importlib.util

    settings = spec.logging
    if not settings.mlflow:
        return None
    default = f"sqlite:///{Path(base_dir).resolve() / 'mlflow.db'}"
    uri = settings.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default
    needed = ["mlflow"] + (["sqlalchemy", "alembic"] if uri.split(":")[0].split("+")[0] in DATABASES else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError("logging.mlflow", f"logging to MLflow ({uri}) needs {', '.join(missing)}, "
                          "which is not installed", INSTALL)
    artifacts = (Path(base_dir).resolve() / "mlruns").as_uri() if uri == default else None
    return MlflowTracking(uri, settings.mlflow_experiment, run_dir, spec, base_dir, artifacts)


class MlflowTracking:
    """Logs a run to MLflow; set up at the first :meth:`log` (or at :meth:`finish` when nothing was logged).

    Errors are raised to the caller (the metrics writer turns them into the run's logging error), except
    at :meth:`finish`, which reports them and returns.
    """

    def __init__(self, uri: str, experiment: str, run_dir: Path, spec: Any, base_dir: str,
                 artifact_location: Optional[str] = None) -> None:
        self.uri = uri
        self.where = f"the MLflow run at {uri}"
        self.experiment = experiment
        self.run_dir = run_dir
        self.spec = spec
        self.base_dir = base_dir
        self.artifact_location = artifact_location
        self.continuing = False
        """Set by the writer: this session continues the run directory's earlier sessions."""
        self.client: Any = None
        self.run_id: Optional[str] = None
        self.logged: Dict[str, int] = {}
        """The last step of each metric that the MLflow run already held when this session continued it."""
        self.failed = False

    # --- setup ---------------------------------------------------------------------------------------

    def open(self) -> float:
        """Connect, and start the MLflow run or continue the run directory's; returns the seconds taken."""
        tic = time.perf_counter()
        self.failed = True  # until the run is open
        for name in ("mlflow.store.db.utils", "alembic"):  # table creation and migrations: not the user's news
            logging.getLogger(name).setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id = self._continued() if self.continuing else None
        if self.run_id is None:
            self._start()
        self.failed = False
        return time.perf_counter() - tic

    def _continued(self) -> Optional[str]:
        """The run id saved by an earlier session, reopened, with the last step of each of its metrics."""
        try:
            saved = json.loads((self.run_dir / RUN_FILE).read_text())
        except (OSError, ValueError):
            return None
        if saved.get("tracking_uri") != self.uri:
            log.warning("the earlier sessions logged to MLflow at %s, this one logs to %s: a new MLflow run "
                        "starts there", saved.get("tracking_uri"), self.uri)
            return None
        run_id = saved["run_id"]
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            log.warning("MLflow run %s is gone from %s: a new MLflow run starts", run_id, self.uri)
            return None
        for key in run.data.metrics:
            self.logged[key] = max(m.step for m in self.client.get_metric_history(run_id, key))
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        self._log_params(set(run.data.params))
        return run_id

    def _start(self) -> None:
        from trainctl.files import write_json

        client = self.client
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(self.experiment, artifact_location=self.artifact_location)
            except Exception:  # created meanwhile by another run of a sweep
                experiment = client.get_experiment_by_name(self.experiment)
                if experiment is None:
                    raise
        if experiment is not None:
            if experiment.lifecycle_stage != "active":
                raise RuntimeError(f"MLflow experiment '{self.experiment}' is deleted: restore it, or choose "
                                   "another logging.mlflow_experiment")
            experiment_id = experiment.experiment_id
        run_dir = self.run_dir.resolve()
        try:
            name = str(run_dir.relative_to(Path(self.base_dir).resolve()))
        except ValueError:
            name = str(run_dir)
        run = client.create_run(experiment_id, run_name=name, tags={"trainctl.run_dir": str(run_dir)})
        self.run_id = run.info.run_id
        write_json(self.run_dir / RUN_FILE, {"tracking_uri": self.uri, "experiment_id": experiment_id,
                                              "run_id": self.run_id})
        self._log_params(set())

    def _log_params(self, present: set) -> None:
        """The flattened spec's params the MLflow run does not hold yet (MLflow's params never change: a
        value changed on resume is kept as a `changed_on_resume.<key>` tag)."""
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

        params = flat_params(self.spec)
        new = [Param(k, v) for k, v in params.items() if k not in present]
        tags = []
        if present:
            held = self.client.get_run(self.run_id).data.params
            tags = [RunTag(f"changed_on_resume.{k}", v[:5000]) for k, v in params.items() if k in held and held[k] != v]
        for i in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[i:i + MAX_PARAMS_TAGS_PER_BATCH])
        for i in range(0, len(tags), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=tags[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    # --- logging -------------------------------------------------------------------------------------

    def log(self, step: int, values: Dict[str, float]) -> float:
        """One record as metrics at ``step``, in one call; returns the setup seconds it took (the first)."""
        setup = self.open() if self.client is None else 0.0
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(key, float(value), stamp, step) for key, value in values.items()
                   if isinstance(value, (int, float)) and step > self.logged.get(key, -1)]
        if metrics:
            try:
                self.client.log_batch(self.run_id, metrics=metrics)
            except Exception:
                self.failed = True
                raise
        return setup

    def finish(self, run_dir: Path) -> None:
        """At the end of a session: the summary, the artifacts, and the status of its stop reason. A failure
        is reported, never raised (the run's own files are written by then)."""
        if self.failed:  # the store failed during the run: the runner has reported it
            return
        try:
            if self.client is None:
                self.open()
            summary = _read_summary(run_dir)
            reason = summary.get("stop_reason") or "failed"
            self._log_summary(summary)
            for name in ARTIFACTS:
                if (run_dir / name).is_file():
                    self.client.log_artifact(self.run_id, str(run_dir / name))
            self.client.set_terminated(self.run_id, STATUS.get(reason, "FAILED"))
        except Exception as exc:
            text = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            log.error("could not finish %s: %s", self.where, text)

    def _log_summary(self, summary: Dict[str, Any]) -> None:
        from mlflow.entities import Metric, RunTag

        step, stamp = int(summary.get("steps") or 0), int(time.time() * 1000)
        metrics = [Metric(f"summary/{k}", float(v), stamp, step) for k, v in summary.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        tags = [RunTag(f"trainctl.{k}", str(summary[k])) for k in ("stop_reason", "status", "monitor", "best_step")
                if summary.get(k) is not None]
        self.client.log_batch(self.run_id, metrics=metrics, tags=tags)


def _read_summary(run_dir: Path) -> Dict[str, Any]:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def flat_params(spec: Any) -> Dict[str, str]:
    """The resolved spec as MLflow params: one per leaf, keyed by its path (`optimizer.lr`), valued as in
    `config.yaml` (`null`, `true`, `[1, 2]`). A mapping whose keys MLflow does not accept as names (e.g.
    patterns such as `encoder.*`) stays one param, valued as JSON; values longer than MLflow allows are cut."""
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, validate_param_and_metric_name
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(OmegaConf.structured(spec), resolve=True)
    out: Dict[str, str] = {}

    def valid(name: str) -> bool:
        return len(name) <= MAX_ENTITY_KEY_LENGTH and bool(validate_param_and_metric_name(name))

    def visit(node: Any, path: List[str]) -> None:
        name = ".".join(path)
        if isinstance(node, dict) and node and all(valid(".".join([*path, str(k)])) for k in node):
            for key, value in node.items():
                visit(value, [*path, str(key)])
        elif valid(name):
            out[name] = (node if isinstance(node, str) else json.dumps(node, default=str))[:MAX_PARAM_VAL_LENGTH]
    visit(tree, [])
    return out
