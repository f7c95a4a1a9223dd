"""MLflow tracking for CoOp runs, written from the driver only.

Ray workers never talk to MLflow: they ``ray.train.report`` metrics and write checkpoints, and the driver logs the
finished run from the final checkpoint (which carries the whole per-epoch history). One writer per process keeps the
default store -- a SQLite file -- safe, and a restarted worker cannot log an epoch twice.

Default store: ``sqlite:///<cwd>/mlflow.db`` (MLflow's own default, made absolute: ``resolve_tracking_uri``, owned by
``run_format`` with the run tags, since the dashboards read them too), so
``mlflow ui --host 127.0.0.1 --backend-store-uri sqlite:///mlflow.db`` run in the same directory shows the runs.
Artifacts of a SQLite store go to ``mlruns/`` beside the database file. Checking the store before a run (reachable,
writable, shareable between processes) is ``platform/tracking_store.py``'s.

Every function takes an explicit run id and tracking URI and uses an ``MlflowClient``: nothing here touches MLflow's
global "active run", so sweeps can log many runs from one process.

How the runs are made to read well in the MLflow UI (experiment kind, descriptions, the shared runs-table view)
is written up in ``docs/mlflow_ui.md``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from platform import artifacts
from platform.tracking_store import sqlite_path
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

# The run tags (and the store a command uses when given none) are the run format's, read by the dashboards too; they
# are imported here so the platform reads them as tracking.TRIAL_TAG and so on.
from run_format import (  # noqa: F401
    BEST_TRIAL_TAG,
    CHECKPOINT_TAG,
    EARLY_STOPPED_TAG,
    FAILURE_TAG,
    LOST_TAG,
    PARENT_RUN_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    resolve_tracking_uri,
)

logger = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
NOTE_TAG = "mlflow.note.content"  # the run's (or experiment's) Markdown description in the UI
# MLflow 3's UI reads this experiment tag to choose the experiment's landing page; "custom_model_development" is its
# "model training" kind (runs table first), instead of the GenAI overview of traces an untagged experiment may get.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# The prefix of the experiment tag that holds a shared view of the runs table. Not part of MLflow's documented API:
# it is what the UI's "Share" button writes and what ``?viewStateShareKey=`` reads (mlflow/server/js, the experiment
# page's shared view state). On an MLflow upgrade, check that a saved view still selects its columns
# (tests/platform/test_mlflow_ui.py does, in a browser).
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
DEFAULT_UI_URL = "http://127.0.0.1:5000"  # where ``mlflow ui`` serves by default
ML_WORKFLOW = "machine_learning"  # the UI's ``workflowType`` URL value of its "Model training" switch
MAX_TAG_LENGTH = 5000  # what we keep of a long tag value (MLflow's limit is 8000)
NOT_METRICS = frozenset({"epoch", "done", *artifacts.NOT_LOGGED_KEYS})


def ui_command(tracking_uri: str) -> str:
    """How to open the MLflow UI on ``tracking_uri``."""
    db = sqlite_path(tracking_uri)
    if db is not None:
        if db.is_absolute() and db.parent == Path.cwd():
            return f"mlflow ui --host 127.0.0.1 --backend-store-uri sqlite:///{db.name}"
        return f"mlflow ui --host 127.0.0.1 --backend-store-uri {tracking_uri}"
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --host 127.0.0.1 --backend-store-uri {tracking_uri}"


def ui_url(tracking_uri: str) -> str:
    """The address of the MLflow UI for ``tracking_uri``: the tracking server itself, or ``mlflow ui``'s default."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return DEFAULT_UI_URL


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The UI page of a run."""
    return f"{ui_url(tracking_uri)}/{run_link(experiment_id, run_id)}"


def run_link(experiment_id: str, run_id: str) -> str:
    """A link to a run's page, relative to the UI (in the UI's model-training mode)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?workflowType={ML_WORKFLOW}"


def artifact_link(experiment_id: str, run_id: str, path: str) -> str:
    """A link to one artifact of a run, relative to the UI (for run descriptions, which the UI renders in place)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}/artifacts/{path}?workflowType={ML_WORKFLOW}"


def runs_view_link(experiment_id: str, view_key: str | None = None) -> str:
    """A link (relative to the UI) that opens the experiment's runs table, with the view saved by
    :func:`save_runs_view` when ``view_key`` is given (see the module docstring for ``workflowType``)."""
    query = f"workflowType={ML_WORKFLOW}" + (f"&viewStateShareKey={view_key}" if view_key else "")
    return f"#/experiments/{experiment_id}/runs?{query}"


def runs_view_url(tracking_uri: str, experiment_id: str, view_key: str | None = None) -> str:
    """The full address of :func:`runs_view_link` on the UI of ``tracking_uri`` (``mlflow ui``'s default address
    for a local store)."""
    return f"{ui_url(tracking_uri)}/{runs_view_link(experiment_id, view_key)}"


def default_experiment(dataset: str) -> str:
    """``coop-<dataset>``."""
    return f"coop-{dataset}"


def _client(tracking_uri: str | None):
    return MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))


def flatten_params(spec: Any) -> dict[str, str]:
    """MLflow params from a ``RunSpec`` (its resolved config) or a nested mapping: ``{"prompt.n_ctx": "16", ...}``.

    Values are strings (``None`` -> ``"None"``), cut to MLflow's length limit.
    """
    data = spec.resolved_config() if hasattr(spec, "resolved_config") else spec
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            out[prefix] = text[:MAX_PARAM_LENGTH]

    walk("", data)
    return out


def experiment_description(name: str) -> str:
    """The experiment's description in the UI."""
    return (f"CoOp prompt learning for CLIP (`{name}`): each sweep (`platform.tune`) is a parent run with one child "
            "run per trial; single runs (`platform.train`) stand alone. Runs are compared by validation accuracy "
            "(`val_acc`); test and zero-shot accuracy are measured, never used to choose. The best prompt of each "
            "sweep is registered as a version of the model of the same name.")


def get_or_create_experiment(name: str, *, tracking_uri: str | None = None) -> str:
    """The id of experiment ``name``, created if needed as a model-training experiment with a description.

    A SQLite store keeps its artifacts beside the DB file. An existing experiment without the kind tag (made by an
    older version, or by hand) gets it, so the UI opens it on its runs too.
    """
    uri = resolve_tracking_uri(tracking_uri)
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        db = sqlite_path(uri)
        location = (db.resolve().parent / "mlruns").as_uri() if db is not None else None
        tags = {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND, NOTE_TAG: experiment_description(name)}
        try:
            return client.create_experiment(name, artifact_location=location, tags=tags)
        except Exception:  # created concurrently by another process
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    return exp.experiment_id


def save_runs_view(experiment_id: str, view_key: str, *, columns: Iterable[str],
                   tracking_uri: str | None = None) -> str:
    """Save a shared view of the experiment's runs table (see the module docstring); returns its key.

    Args:
        experiment_id: the experiment.
        view_key: the view's name (letters, digits, ``-`` and ``_``), used in :func:`runs_view_url`.
        columns: the columns to show, as MLflow names them: ``metrics.`val_acc```, ``params.`prompt.n_ctx```.
        tracking_uri: see :func:`resolve_tracking_uri`.
    """
    if not view_key or not all(c.isalnum() or c in "-_" for c in view_key):
        raise ValueError(f"view key {view_key!r}: use letters, digits, '-' and '_'")
    state = {"selectedColumns": list(columns)}
    _client(tracking_uri).set_experiment_tag(experiment_id, SHARED_VIEW_PREFIX + view_key, json.dumps(state))
    return view_key


def metric_column(key: str) -> str:
    """The runs-table column name of a metric, as the MLflow UI writes it."""
    return f"metrics.`{key}`"


def param_column(key: str) -> str:
    """The runs-table column name of a param."""
    return f"params.`{key}`"


def set_description(run_id: str, markdown: str, *, tracking_uri: str | None = None) -> None:
    """Set the run's description (Markdown, shown at the top of its page in the UI)."""
    _client(tracking_uri).set_tag(run_id, NOTE_TAG, markdown)


def create_run(experiment: str, *, run_name: str | None = None, tags: Mapping[str, str] | None = None,
               parent_run_id: str | None = None, tracking_uri: str | None = None) -> str:
    """Start a run (status RUNNING) in ``experiment`` (created if needed); returns its id.

    Args:
        experiment: experiment name.
        run_name: the run's display name.
        tags: extra tags.
        parent_run_id: nest the run under this one (sweeps).
        tracking_uri: see :func:`resolve_tracking_uri`.
    """
    exp_id = get_or_create_experiment(experiment, tracking_uri=tracking_uri)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags[PARENT_RUN_TAG] = parent_run_id
    run = _client(tracking_uri).create_run(exp_id, run_name=run_name, tags=all_tags)
    return run.info.run_id


def set_tag(run_id: str, key: str, value: str, *, tracking_uri: str | None = None) -> None:
    """Set one tag (cut to ``MAX_TAG_LENGTH``)."""
    _client(tracking_uri).set_tag(run_id, key, str(value)[:MAX_TAG_LENGTH])


def end_run(run_id: str, status: str = "FINISHED", *, tracking_uri: str | None = None) -> None:
    """Mark the run FINISHED, FAILED or KILLED."""
    _client(tracking_uri).set_terminated(run_id, status=status)


def log_params(run_id: str, spec_or_params: Any, *, tracking_uri: str | None = None) -> None:
    """Log a ``RunSpec``'s resolved config (or a nested mapping) as flattened params."""

    params = [Param(k, v) for k, v in sorted(flatten_params(spec_or_params).items())]
    client = _client(tracking_uri)
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])


def _metrics(row: Mapping[str, Any], step: int, timestamp: int) -> list:
    out = []
    for key, value in row.items():
        if key in NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out.append(Metric(key, float(value), timestamp, step))
    return out


def _log_metrics(run_id: str, metrics: list, tracking_uri: str | None) -> None:
    client = _client(tracking_uri)
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def log_epoch_metrics(run_id: str, rows: Iterable[Mapping[str, Any]], *, tracking_uri: str | None = None) -> None:
    """Log per-epoch metric rows (``{"epoch": 3, "train_loss": ..., "val_acc": ...}``) with ``step = epoch``.

    Rows repeated for the same epoch (a resumed run) keep the last one.
    """
    by_epoch: dict[int, Mapping[str, Any]] = {}
    for row in rows:
        by_epoch[int(row["epoch"])] = row
    now = int(time.time() * 1000)
    metrics = [m for epoch in sorted(by_epoch) for m in _metrics(by_epoch[epoch], epoch, now)]
    _log_metrics(run_id, metrics, tracking_uri)


def log_final_metrics(run_id: str, metrics: Mapping[str, Any], *, step: int | None = None,
                      tracking_uri: str | None = None) -> None:
    """Log end-of-run metrics (test accuracy, wall time...) at ``step`` (default 0)."""
    _log_metrics(run_id, _metrics(metrics, step or 0, int(time.time() * 1000)), tracking_uri)


def log_run_artifacts(run_id: str, checkpoint_dir: str | Path, *, tracking_uri: str | None = None) -> None:
    """Log a final checkpoint's artifacts: ``prompts/`` (safetensors + JSON), config, nearest words, history, metrics.

    Missing files are skipped (an intermediate checkpoint has no prompts yet).
    """
    client = _client(tracking_uri)
    d = Path(checkpoint_dir)
    for name in artifacts.PROMPT_ARTIFACT_FILES:
        if (d / name).is_file():
            client.log_artifact(run_id, str(d / name), artifact_path=artifacts.PROMPTS_ARTIFACT_DIR)
    for name in artifacts.ROOT_ARTIFACT_FILES:
        if (d / name).is_file():
            client.log_artifact(run_id, str(d / name))


def log_checkpoint(run_id: str, checkpoint_dir: str | Path, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """Log a finished run's final checkpoint: per-epoch metrics, final metrics and artifacts; returns the final metrics.
    """
    d = Path(checkpoint_dir)
    artifacts.verify(d)
    log_epoch_metrics(run_id, artifacts.read_history(d), tracking_uri=tracking_uri)
    final = artifacts.read_final_metrics(d)
    log_run_artifacts(run_id, d, tracking_uri=tracking_uri)
    return final

