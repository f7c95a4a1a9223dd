"""The names a tracked CoOp run is written and read under: checkpoint and artifact files, metric keys, MLflow run
tags, and the tracking store a command uses when given none. Standard library only.

One owner for the run's format, and the reason this is a package of its own: ``platform/`` writes runs (the worker's
checkpoints, the driver's MLflow logging) and ``dashboards/`` reads them back, and ``platform`` calls the dashboards
when a sweep or study ends. Were the names in ``platform`` (``platform/artifacts.py`` imports torch and
``coop_core.engine``), the dashboards would have to import ``platform`` back, and an installed ``dashboards`` would
even find the standard library's ``platform`` instead (``platform/`` is never installed, see ``pyproject.toml``).
Here both import the names and the arrows point one way: ``platform -> dashboards -> run_format`` and
``platform -> run_format``. The names are not ``coop_core``'s: the method reports metrics through a callback and
knows nothing of checkpoints on Ray storage or of MLflow tags. ``platform.artifacts`` and ``platform.tracking``
import them from here (so ``artifacts.SELECTION_METRIC`` still reads as before); a renamed file, key or tag changes
in this one place. ``tests/test_imports.py`` proves that importing this package loads nothing beyond the standard
library and that importing the dashboards loads no ``platform``, torch or Ray.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
# KgCoOp's and ProGrad's own loss terms (coop_core.methods: terms "kg" and "kl", reported as train_<term>) ride along.
EPOCH_KEYS = ("epoch", "train_loss", "train_acc", "lr", "val_acc", "val_macro_f1", "epoch_time_s", "val_time_s",
              "train_kg", "train_kl")
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

# -- MLflow run tags ------------------------------------------------------------------------------------------------
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow nests a run under this run in the runs table
# Our run tags (written by platform.tune / platform.sweep_tracking, read by dashboards/ and the tests).
TRIAL_TAG = "coop.trial_id"  # a trial run's Ray Tune trial id
SWEEP_TAG = "coop.sweep"  # the sweep's name, on its parent run and every trial run
EARLY_STOPPED_TAG = "coop.stopped_early"  # "true" on a trial ASHA stopped before its last epoch
BEST_TRIAL_TAG = "coop.best_trial_id"  # on a sweep's parent run: the trial registered as its best
CHECKPOINT_TAG = "coop.checkpoint"  # where a run's last Ray checkpoint is (a path or URI on the Ray storage)
FAILURE_TAG = "coop.failure"  # why a run failed (a diverged loss, or the error that ended it)
LOST_TAG = "coop.lost"  # why a trial run was deleted: its trial was lost with a killed driver


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


# -- where the runs are -------------------------------------------------------------------------------------------
def resolve_tracking_uri(arg: str | None = None) -> str:
    """The tracking URI: ``arg``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.

    A bare filesystem path is accepted and turned into a ``sqlite:///`` URI when it ends in ``.db``. Every command
    that writes runs and every one that reads them (``python -m dashboards``) resolves the store the same way, so
    with no flag a reader finds what a writer in the same folder wrote.
    """
    uri = arg or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if "://" not in uri and uri.endswith(".db"):
        return f"sqlite:///{Path(uri).expanduser().resolve()}"
    return uri
