"""A sweep's trials in MLflow: each trial's child run of the sweep's parent run -- found or opened, its epochs
logged, closed from its last result -- and the pieces that describe a trial (its searched values, its description,
its timing, where its checkpoint is).

:class:`TrialRuns` talks to MLflow and nothing else; ``platform/sweep_tracking.py``'s Ray Tune callback decides when
(on Tune's events, and not while the store is down). It keeps no state that matters across a driver restart: it
finds a trial's run by the ``coop.trial_id`` tag under the parent run, so a resumed sweep continues the same runs and
:meth:`TrialRuns.close` repairs the runs of trials that finished while no driver was watching (it logs only what is
missing).

Per trial run: the full resolved config as params (plus the effective context length), per-epoch metrics with
``step = epoch``, the final epoch's test and zero-shot accuracy, the final checkpoint's artifacts (prompts as
safetensors, config JSON, nearest-words table, history) and where the trial's time went
(``platform.artifacts.WORKER_TIMING_KEYS`` measured by the worker, ``TRIAL_TIMING_KEYS`` measured by the driver):
queue wait, process start-up, model and feature loading, the training loop, evaluation, reporting and MLflow logging.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from platform import artifacts, tracking
from platform.tracking import EARLY_STOPPED_TAG, SWEEP_TAG, TRIAL_TAG
from platform.trials import searched_overrides, trial_spec
from typing import Any

import pyarrow.fs
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from ray.train import Checkpoint

logger = logging.getLogger(__name__)

CHECKPOINT_PATH_KEY = "checkpoint_path"  # what ray.tune.integration.ray_train.TuneReportCallback reports


def describe_config(config: Mapping[str, Any]) -> str:
    """``n_ctx=8 ctx_init='a photo of a' position=end csc=False lr=0.0031`` for progress lines and tables."""
    parts = []
    for key, value in searched_overrides(config).items():
        name = key.split(".", 1)[1].replace("class_token_position", "position")
        if name == "ctx_init":
            value = repr(value) if value else "random"
        elif isinstance(value, float):
            value = f"{value:.3g}"
        parts.append(f"{name}={value}")
    return " ".join(parts)


def trial_checkpoint_path(trial_or_result: Any, metrics: Mapping[str, Any]) -> str | None:
    """Where a trial's latest checkpoint is: Tune's own (single-worker trials) or its Ray Train run's."""
    if metrics.get(CHECKPOINT_PATH_KEY):
        return metrics[CHECKPOINT_PATH_KEY]
    checkpoint = getattr(trial_or_result, "checkpoint", None)
    return checkpoint.path if checkpoint is not None else None


@contextmanager
def checkpoint_dir(path: str, storage_path: str) -> Iterator[Path]:
    """A local directory with the checkpoint at ``path`` (a path on ``storage_path``'s filesystem), verified against
    its manifest (``artifacts.verify``)."""
    if "://" in storage_path:
        fs, _ = pyarrow.fs.FileSystem.from_uri(storage_path)
        checkpoint = Checkpoint(path=path, filesystem=fs)
    else:
        checkpoint = Checkpoint(path=path)
    with checkpoint.as_directory() as d:
        artifacts.verify(d)
        yield Path(d)


def trial_description(trial_id: str, config: Mapping[str, Any], *, sweep_name: str, experiment_id: str,
                      parent_run_id: str, run_id: str, outcome: str | None = None,
                      last_result: Mapping[str, Any] | None = None, checkpoint: str | None = None) -> str:
    """The trial run's Markdown description: what it tried, how it ended, links to its config and checkpoint."""
    lines = [f"**Trial `{trial_id}`** of sweep [{sweep_name}]({tracking.run_link(experiment_id, parent_run_id)}): "
             f"`{describe_config(config) or 'no searched values'}`", ""]
    if outcome:
        result = last_result or {}
        accs = [f"{k} {result[k]:.2f} %" for k in artifacts.ACCURACY_KEYS if result.get(k) is not None]
        lines.append(f"- {outcome}" + (f": {', '.join(accs)}" if accs else ""))
    else:
        lines.append("- running")
    config_link = tracking.artifact_link(experiment_id, run_id, artifacts.CONFIG_FILE)
    lines.append(f"- config: [{artifacts.CONFIG_FILE}]({config_link}) (the resolved configuration; the same values "
                 "are this run's params)")
    if checkpoint:
        lines.append(f"- Ray checkpoint: `{checkpoint}`")
    return "\n".join(lines)


def error_line(error: BaseException | str | None) -> str:
    """The last non-empty line of an error (a Ray error's message ends with the worker's exception), for one line."""
    if error is None:
        return "error (see the trial's Ray logs)"
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:500]


def trial_timing(last_result: Mapping[str, Any], *, created_at: float | None, ended_at: float,
                 tracking_s: float) -> dict[str, float]:
    """Where a trial's time went (``TRIAL_TIMING_KEYS``), from its last report and the driver's wall-clock stamps.

    Args:
        last_result: the trial's last report (``entered_at``, ``process_created_at`` and the worker's timings).
        created_at: when the driver first saw the trial (None after a driver restart: no queue or wall time).
        ended_at: when it ended.
        tracking_s: the driver's MLflow logging time for it.
    """
    out: dict[str, float] = {"time_tracking_s": tracking_s}
    entered = last_result.get(artifacts.ENTERED_AT_KEY)
    busy = last_result.get("time_train_loop_s", 0.0) + last_result.get("time_eval_s", 0.0)
    if created_at is None or entered is None:
        return out
    process = last_result.get(artifacts.PROCESS_CREATED_AT_KEY)
    process_start = max(0.0, entered - max(process, created_at)) if process is not None else 0.0
    wall = max(0.0, ended_at - created_at)
    out.update(time_queue_s=max(0.0, entered - created_at - process_start), time_process_start_s=process_start,
               time_trial_wall_s=wall, time_overhead_s=max(0.0, wall - busy),
               overhead_share=max(0.0, wall - busy) / wall if wall > 0 else 0.0)
    return out


class TrialRuns:
    """The MLflow child runs of one sweep's trials (see the module docstring).

    Args:
        parent_run_id: the sweep's run.
        experiment: MLflow experiment of the child runs.
        tracking_uri: the tracking store (a SQLite URI by default).
        base_spec: ``RunSpec.to_dict()`` of the sweep; a trial's spec is this with the trial's searched values.
        storage_path: where the trials' checkpoints live (to read their files).
        epochs: epochs per trial (for the early-stopped tag) when a trial's report does not say its own
            (``artifacts.EPOCHS_TOTAL_KEY``).
        sweep_name: tagged on every child run.
    """

    def __init__(self, *, parent_run_id: str, experiment: str, tracking_uri: str, base_spec: Mapping[str, Any],
                 storage_path: str, epochs: int, sweep_name: str) -> None:
        self.parent_run_id = parent_run_id
        self.experiment = experiment
        self.tracking_uri = tracking_uri
        self.base_spec = dict(base_spec)
        self.storage_path = storage_path
        self.epochs = epochs
        self.sweep_name = sweep_name
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._params_done: set[str] = set()  # trials whose resolved params are logged
        self._logged: dict[str, set[int]] = {}  # epochs in MLflow per trial
        self._experiment_id: str | None = None
        self._existing: dict[str, str] | None = None  # child runs in MLflow by trial id, searched once per driver
        self._created_now: set[str] = set()  # runs this driver just created (RUNNING)

    def __getstate__(self) -> dict[str, Any]:  # pickled into the Tuner's state (with the callback): no run caches
        state = self.__dict__.copy()
        for key in ("_runs", "_params_done", "_logged", "_experiment_id", "_existing", "_created_now"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_caches()

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)

    # -- finding and opening a trial's run ----------------------------------------------------------------------------

    def child_runs(self) -> dict[str, Any]:
        """The existing child runs of the parent, by trial id."""
        client = self.client()
        parent = client.get_run(self.parent_run_id)
        runs = client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            max_results=10_000,
        )
        return {r.data.tags[TRIAL_TAG]: r for r in runs if TRIAL_TAG in r.data.tags}

    def pick_up(self) -> None:
        """Know a resumed sweep's child runs, with the epochs they already logged."""
        client = self.client()
        runs = self.child_runs()
        self._existing = {tid: run.info.run_id for tid, run in runs.items()}
        for tid, run in runs.items():
            self._runs[tid] = run.info.run_id
            self._logged[tid] = {int(m.step) for m in client.get_metric_history(run.info.run_id, "train_loss")}

    def run_for(self, trial_id: str, config: Mapping[str, Any]) -> str:
        """The child run of ``trial_id``, created (with the trial's resolved config as params) if needed."""
        if trial_id in self._runs:
            return self._runs[trial_id]
        if self._existing is None:  # one search per driver: after it, only this driver creates the sweep's runs
            self._existing = {tid: run.info.run_id for tid, run in self.child_runs().items()}
        existing = self._existing.get(trial_id)
        if existing is not None:
            run_id = existing
            run = self.client().get_run(run_id)
            history = self.client().get_metric_history(run_id, "train_loss")
            self._logged.setdefault(trial_id, set()).update(int(m.step) for m in history)
            if all(param in run.data.params for param in artifacts.RESOLVED_PARAMS.values()):
                self._params_done.add(trial_id)
        else:
            tags = {TRIAL_TAG: trial_id, SWEEP_TAG: self.sweep_name, "coop.searched": describe_config(config)}
            run_id = tracking.create_run(self.experiment, run_name=f"trial-{trial_id}", tags=tags,
                                         parent_run_id=self.parent_run_id, tracking_uri=self.tracking_uri)
            params = tracking.flatten_params(trial_spec(self.base_spec, config)) | {"trial_id": trial_id}
            tracking.log_params(run_id, params, tracking_uri=self.tracking_uri)
            self._describe(trial_id, run_id, config)
            self._existing[trial_id] = run_id
            self._created_now.add(trial_id)
        self._runs[trial_id] = run_id
        return run_id

    def set_running(self, trial_id: str, config: Mapping[str, Any]) -> None:
        """Open the trial's run, or set a resumed trial's run RUNNING again."""
        run_id = self.run_for(trial_id, config)
        if trial_id in self._created_now:  # created RUNNING a moment ago
            self._created_now.discard(trial_id)
            return
        if self.client().get_run(run_id).info.status != "RUNNING":
            self.client().update_run(run_id, status="RUNNING")

    def _describe(self, trial_id: str, run_id: str, config: Mapping[str, Any], **outcome: Any) -> None:
        if self._experiment_id is None:
            self._experiment_id = self.client().get_run(self.parent_run_id).info.experiment_id
        text = trial_description(trial_id, config, sweep_name=self.sweep_name, experiment_id=self._experiment_id,
                                 parent_run_id=self.parent_run_id, run_id=run_id, **outcome)
        tracking.set_description(run_id, text, tracking_uri=self.tracking_uri)

    def _log_resolved_params(self, trial_id: str, run_id: str, result: Mapping[str, Any]) -> None:
        """Log what the worker decided (``artifacts.RESOLVED_PARAMS``: the effective context length, which
        ``ctx_init``'s word count decides, and the text sharding used) as params, once, from the trial's report."""
        if trial_id in self._params_done or not all(k in result for k in artifacts.RESOLVED_PARAMS):
            return
        params = [Param(param, str(result[key])) for key, param in artifacts.RESOLVED_PARAMS.items()]
        self.client().log_batch(run_id, params=params)
        self._params_done.add(trial_id)

    # -- logging an epoch ---------------------------------------------------------------------------------------------

    def epoch_logged(self, trial_id: str, epoch: int) -> bool:
        """Whether ``epoch`` of the trial is in MLflow (a retried trial that resumed from an earlier checkpoint
        reports some epochs again: each is logged once)."""
        return epoch in self._logged.get(trial_id, set())

    def log_epochs(self, trial_id: str, config: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> None:
        """Log epoch reports (``artifacts.EPOCH_KEYS``, ``step = epoch``) in one batch and, once, the resolved
        params."""
        run_id = self.run_for(trial_id, config)
        rows = [{k: result[k] for k in artifacts.EPOCH_KEYS if k in result} for result in results]
        tracking.log_epoch_metrics(run_id, rows, tracking_uri=self.tracking_uri)
        self._log_resolved_params(trial_id, run_id, results[-1])
        self._logged.setdefault(trial_id, set()).update(int(result["epoch"]) for result in results)

    # -- closing a trial's run ----------------------------------------------------------------------------------------

    def close(self, trial_id: str, config: Mapping[str, Any], last_result: Mapping[str, Any],
              checkpoint_path: str | None, timing: Callable[[], Mapping[str, float]]) -> dict[str, float]:
        """Close a trial's run from its last result: missing epochs, final metrics and the trial's timing, artifacts,
        tags, FINISHED (FAILED with the reason as the ``coop.failure`` tag when the trial reported a failure). Returns
        the final metrics logged. ``timing()`` is called just before the final metrics are logged, so the MLflow time
        of the close itself counts in the trial's ``time_tracking_s``.

        Idempotent: epochs already in MLflow are not logged again, so it also repairs the runs of trials that
        finished while the driver was down.
        """
        run_id = self.run_for(trial_id, config)
        client = self.client()
        last_epoch = int(last_result.get("epoch", 0))
        if checkpoint_path:
            with checkpoint_dir(checkpoint_path, self.storage_path) as d:
                logged = {m.step for m in client.get_metric_history(run_id, "train_loss")}
                missing = [row for row in artifacts.read_history(d) if int(row["epoch"]) not in logged]
                if missing:
                    tracking.log_epoch_metrics(run_id, missing, tracking_uri=self.tracking_uri)
                tracking.log_run_artifacts(run_id, d, tracking_uri=self.tracking_uri)
        self._log_resolved_params(trial_id, run_id, last_result)
        final = {k: last_result[k] for k in (*artifacts.final_keys(last_result), *artifacts.WORKER_TIMING_KEYS)
                 if k in last_result} | dict(timing())
        tracking.log_final_metrics(run_id, final, step=last_epoch, tracking_uri=self.tracking_uri)
        failure = last_result.get(artifacts.FAILURE_KEY)
        if failure:
            self.mark_failed(trial_id, config, str(failure))
            logger.warning("trial %s failed after epoch %d: %s (MLflow run %s marked FAILED)", trial_id, last_epoch,
                           failure, run_id)
            return final
        epochs = int(last_result.get(artifacts.EPOCHS_TOTAL_KEY, self.epochs))  # a study's trials differ by shots
        stopped_early = last_epoch < epochs
        client.set_tag(run_id, EARLY_STOPPED_TAG, str(stopped_early).lower())
        if checkpoint_path:
            client.set_tag(run_id, tracking.CHECKPOINT_TAG, checkpoint_path)
        how = f"stopped early by ASHA after epoch {last_epoch}" if stopped_early else "finished"
        self._describe(trial_id, run_id, config, last_result=last_result, checkpoint=checkpoint_path,
                       outcome=(f"{how} of {epochs}" if stopped_early else f"ran all {epochs} epochs"))
        tracking.end_run(run_id, "FINISHED", tracking_uri=self.tracking_uri)
        val = last_result.get("val_acc")
        logger.info("trial %s %s: val_acc %s%s", trial_id, how, f"{val:.2f}" if val is not None else "-",
                    f", test_acc {final['test_acc']:.2f}" if "test_acc" in final else "")
        return final

    def discard_lost(self, trial_id: str, run: Any) -> None:
        """Retire the run of a trial that a killed driver started but never saved in Tune's experiment state (so a
        resumed sweep does not have it): ended KILLED unless already ended, tagged ``coop.lost`` with the reason, and
        deleted (MLflow's trash: ``mlflow gc`` removes it for good, the UI's deleted runs view restores it)."""
        run_id = run.info.run_id
        client = self.client()
        reason = ("its trial was started after the sweep's last saved state and lost when the driver was killed; "
                  "--resume ran the sweep's trials without it")
        client.set_tag(run_id, tracking.LOST_TAG, reason)
        if run.info.status == "RUNNING":
            tracking.end_run(run_id, "KILLED", tracking_uri=self.tracking_uri)
        client.delete_run(run_id)
        self._runs.pop(trial_id, None)
        self._logged.pop(trial_id, None)
        logger.warning("MLflow run %s of trial %s deleted: %s", run_id, trial_id, reason)

    def mark_failed(self, trial_id: str, config: Mapping[str, Any], reason: str) -> str:
        """End a trial's run FAILED, with ``reason`` as its ``coop.failure`` tag; returns the run id."""
        run_id = self.run_for(trial_id, config)
        tracking.set_tag(run_id, tracking.FAILURE_TAG, reason, tracking_uri=self.tracking_uri)
        tracking.end_run(run_id, "FAILED", tracking_uri=self.tracking_uri)
        return run_id
