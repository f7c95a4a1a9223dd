"""The run's artifact format: one owner for the files in a checkpoint and the metric keys a run reports.

Every checkpoint of a run (Ray Train's or a Tune trial's) is a folder with the resumable state and the metric
history; the final one also holds the learned prompts, the nearest-words table and the final metrics. Its manifest,
written last, holds the sha256 of every file, and every reader verifies it first (:func:`verify`): a checkpoint cut
short by a full disk or a killed process is refused, never half-used. The writer
(``platform/worker.py``) and every reader (tracking, the sweep's MLflow callback, the registry, the tune CLI, the
dashboards) import the names from here, so a renamed file or key changes in one place.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from coop_core.engine import TrainState

# -- files in a checkpoint folder ---------------------------------------------------------------------------------
TRAIN_STATE_FILE = "state.pt"  # coop_core.engine.TrainState.to_dict(): context, optimiser, scheduler, RNG
HISTORY_FILE = "history.json"  # the per-epoch metric rows so far
CONFIG_FILE = "config.json"  # the run's resolved configuration (RunSpec.resolved_config() + what the data decided)
METRICS_FILE = "metrics.json"  # final checkpoint only: the last epoch's metrics with test and zero-shot accuracy
PROMPTS_FILE = "prompts.safetensors"  # final checkpoint only: coop_core.prompts_io.save_prompts
PROMPTS_META_FILE = PROMPTS_FILE + ".json"  # its human-readable metadata (written by save_prompts)
NEAREST_WORDS_FILE = "nearest_words.txt"  # final checkpoint only: the context's nearest vocabulary words
FAILURE_FILE = "failure.json"  # a diverged run's last checkpoint: the reason (no state: nothing to resume from)
MANIFEST_FILE = "manifest.json"  # written last: the sha256 of every other file, checked whenever a checkpoint is read
# Checkpoints a run or trial keeps (each holds the whole metric history): the last is enough to resume, one more
# covers a failure while the newest is being written.
CHECKPOINTS_KEPT = 2

# -- how the files are logged to MLflow ---------------------------------------------------------------------------
PROMPTS_ARTIFACT_DIR = "prompts"  # PROMPTS_FILE and PROMPTS_META_FILE go under this artifact folder
PROMPT_ARTIFACT_FILES = (PROMPTS_FILE, PROMPTS_META_FILE)
ROOT_ARTIFACT_FILES = (CONFIG_FILE, NEAREST_WORDS_FILE, HISTORY_FILE, METRICS_FILE, FAILURE_FILE)
DASHBOARDS_ARTIFACT_DIR = "dashboards"  # a sweep's pictures (dashboards/), logged to its parent run

# -- metric keys ----------------------------------------------------------------------------------------------------
SELECTION_METRIC = "val_acc"  # what chooses: ASHA, the best trial, the registry's champion rule (never test accuracy)
TEST_METRIC = "test_acc"  # measured on the test split after the last epoch, only reported
ZEROSHOT_TEST_METRIC = "zeroshot_test_acc"  # the hand-crafted prompt's test accuracy, the baseline CoOp must beat
# The accuracies a person compares runs by: the columns of the MLflow runs table and the registry's version tags.
ACCURACY_KEYS = (SELECTION_METRIC, TEST_METRIC, ZEROSHOT_TEST_METRIC)
# Reported every epoch (coop_core.engine.train; val_* on validation epochs), logged with step = epoch.
EPOCH_KEYS = ("epoch", "train_loss", "train_acc", "lr", "val_acc", "val_macro_f1", "epoch_time_s", "val_time_s")
# Added to the last epoch's report (the test split is only measured, never used to choose).
FINAL_KEYS = ("test_acc", "test_macro_f1", "zeroshot_test_acc", "zeroshot_test_macro_f1", "registry_acc")
# The registry's champion rule compares runs by their accuracy on the dataset's registry evaluation set (the same
# images for every run of the dataset: coop_core.fewshot.registry_eval_items), reported with the last epoch, and only
# between runs whose config.json holds the same digests of that set's items and of the CLIP weights.
REGISTRY_METRIC = "registry_acc"
REGISTRY_SET_KEY = "registry_set"  # config.json: coop_core.features.items_digest of the registry evaluation set
WEIGHTS_DIGEST_KEY = "weights_digest"  # config.json: coop_core.backbone.weights_digest of the run's CLIP
# Added to the last epoch's report for each of the run's evaluation targets (RunSpec.eval_targets: another dataset, or
# the other half of the classes): the learned prompts' and zero-shot CLIP's accuracy on the target's test split, under
# target_key(label, key), e.g. "target/imagenet_sketch/test_acc", "target/eurosat.new/zeroshot_test_acc".
TARGET_PREFIX = "target/"
TARGET_KEYS = ("test_acc", "test_macro_f1", "zeroshot_test_acc", "zeroshot_test_macro_f1", "n_test")
# Where a run's time went, measured inside the worker and reported (cumulative) with every epoch, in seconds:
# loading CLIP, preparing the few-shot split and image features, the training steps, validation + test + zero-shot
# evaluation, writing and reporting checkpoints, and the worker's whole time in the run.
WORKER_TIMING_KEYS = ("time_model_s", "time_features_s", "time_train_loop_s", "time_eval_s", "time_report_s",
                      "time_worker_s")
# Measured by the sweep driver per trial: waiting for resources and Ray's own start-up work before the trial's code
# ran, the fresh process's start-up (0 when a warm process was reused), the driver's MLflow logging, the trial's wall
# time from creation to end, and the overhead (wall minus training loop and evaluation) with its share of the wall.
TRIAL_TIMING_KEYS = ("time_queue_s", "time_process_start_s", "time_tracking_s", "time_trial_wall_s",
                     "time_overhead_s", "overhead_share")
# Bookkeeping values a worker reports that are not metrics of the model.
N_CTX_EFFECTIVE_KEY = "n_ctx_effective"  # the context length actually trained (ctx_init's word count wins)
TEXT_SHARDING_USED_KEY = "text_sharding_used"  # "data" or "class": what train.text_sharding resolved to
# What the worker decided that the driver logs as params once: report key -> MLflow param.
RESOLVED_PARAMS = {N_CTX_EFFECTIVE_KEY: f"prompt.{N_CTX_EFFECTIVE_KEY}",
                   TEXT_SHARDING_USED_KEY: f"train.{TEXT_SHARDING_USED_KEY}"}
ENTERED_AT_KEY = "entered_at"  # wall-clock time the worker's code started (time.time())
PROCESS_CREATED_AT_KEY = "process_created_at"  # wall-clock start of a fresh worker process; absent when reused
WARM_HITS_KEY = "warm_cache_hits"  # how many of (model, data, features) came from the process's warm cache
# A run that diverged (coop_core.engine.NonFiniteLossError) reports once more, with this key holding the reason and
# "epoch" the last epoch it completed, and ends: the run is FAILED (a retry from its checkpoint would diverge again).
FAILURE_KEY = "failure"
EPOCHS_TOTAL_KEY = "epochs_total"  # the run's own number of epochs (a study's trials differ: CoOp's epochs by shots)
NOT_LOGGED_KEYS = (ENTERED_AT_KEY, PROCESS_CREATED_AT_KEY, FAILURE_KEY)


def target_key(label: str, key: str) -> str:
    """The report key of ``key`` (one of :data:`TARGET_KEYS`) measured on the evaluation target ``label``."""
    return f"{TARGET_PREFIX}{label}/{key}"


def target_results(metrics: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """The evaluation targets' results in a report or MLflow metrics: ``{label: {key: value}}``."""
    out: dict[str, dict[str, float]] = {}
    for k, v in metrics.items():
        if k.startswith(TARGET_PREFIX):
            label, _, key = k[len(TARGET_PREFIX):].rpartition("/")
            if label and key in TARGET_KEYS:
                out.setdefault(label, {})[key] = v
    return out


def final_keys(metrics: Mapping[str, Any]) -> list[str]:
    """The keys of a last-epoch report that are the run's final results: :data:`FINAL_KEYS` and the targets'."""
    return [k for k in metrics if k in FINAL_KEYS or k.startswith(TARGET_PREFIX)]


class CheckpointError(ValueError):
    """A checkpoint that cannot be written (a full disk) or fails its manifest when read. The message is one line."""


def write_checkpoint(d: Path, state: TrainState, history: Sequence[Mapping[str, Any]],
                     resolved: Mapping[str, Any]) -> None:
    """Write the resumable part of a checkpoint into the (empty) folder ``d`` (then :func:`seal` it).

    Raises:
        CheckpointError: the files could not be written (a full disk, an unwritable temporary folder).
    """
    try:
        torch.save(state.to_dict(), d / TRAIN_STATE_FILE)
        (d / HISTORY_FILE).write_text(json.dumps(list(history), indent=1))
        (d / CONFIG_FILE).write_text(json.dumps(resolved, indent=2, sort_keys=True))
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError from its writer
        raise CheckpointError(f"cannot write the checkpoint in {d} ({_reason(err)}); free space there (the "
                              "temporary folder, $TMPDIR) and resume the run") from None


def write_failure(d: Path, reason: str, history: Sequence[Mapping[str, Any]], resolved: Mapping[str, Any]) -> None:
    """The checkpoint a diverged run reports last: its reason, the epochs it completed and its config (then
    :func:`seal` it). Ray Train keeps a run's result with its checkpoint, so the failure travels as one."""
    (d / FAILURE_FILE).write_text(json.dumps({FAILURE_KEY: reason}, indent=2))
    (d / HISTORY_FILE).write_text(json.dumps(list(history), indent=1))
    (d / CONFIG_FILE).write_text(json.dumps(resolved, indent=2, sort_keys=True))


def _reason(err: BaseException) -> str:
    return getattr(err, "strerror", None) or (str(err).strip().splitlines() or [type(err).__name__])[-1][:200]


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def seal(d: Path) -> None:
    """Write the manifest (sha256 of every file of the checkpoint): the last file, so its presence means complete."""
    files = {p.name: _digest(p) for p in sorted(Path(d).iterdir()) if p.is_file() and p.name != MANIFEST_FILE}
    try:
        (Path(d) / MANIFEST_FILE).write_text(json.dumps(files, indent=1, sort_keys=True))
    except OSError as err:
        raise CheckpointError(f"cannot write the checkpoint in {d} ({_reason(err)}); free space there and resume "
                              "the run") from None


def verify(d: str | Path) -> None:
    """Check a checkpoint against its manifest before anything in it is used.

    Raises:
        CheckpointError: no manifest (an incomplete write), or a missing or changed file.
    """
    d = Path(d)
    try:
        files = json.loads((d / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"checkpoint {d} is incomplete (no readable {MANIFEST_FILE}: its write was cut short); "
                              "resume from an earlier checkpoint or start the run again") from None
    for name, digest in files.items():
        if not (d / name).is_file() or _digest(d / name) != digest:
            raise CheckpointError(f"checkpoint {d} is damaged: {name} is missing or does not match its sha256; resume "
                                  "from an earlier checkpoint or start the run again")


def read_train_state(d: str | Path) -> TrainState:
    return TrainState.from_dict(torch.load(Path(d) / TRAIN_STATE_FILE, map_location="cpu", weights_only=True))


def read_history(d: str | Path) -> list[dict[str, Any]]:
    """The per-epoch metric rows of a checkpoint (empty when it has none)."""
    path = Path(d) / HISTORY_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def read_config(d: str | Path) -> dict[str, Any]:
    return json.loads((Path(d) / CONFIG_FILE).read_text())


def read_final_metrics(d: str | Path) -> dict[str, Any]:
    """The final metrics of a last-epoch checkpoint; empty for an intermediate one."""
    path = Path(d) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_final_metrics(d: Path, metrics: Mapping[str, Any]) -> None:
    (d / METRICS_FILE).write_text(json.dumps(dict(metrics), indent=2, sort_keys=True))

