"""The run's artifact format: one owner for the files in a checkpoint and the metric keys a run reports.

Every checkpoint of a run (Ray Train's or a Tune trial's) is a folder with the resumable state and the metric
history; the final one also holds the learned prompts, the nearest-words table and the final metrics. The writer
(``platform/worker.py``) and every reader (tracking, the sweep's MLflow callback, the registry, the tune CLI, the
dashboards) import the names from here, so a renamed file or key changes in one place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from coop_core.engine import TrainState

# -- files in a checkpoint folder ---------------------------------------------------------------------------------
STATE_FILE = "state.pt"  # coop_core.engine.TrainState.to_dict(): context, optimiser, scheduler, RNG
HISTORY_FILE = "history.json"  # the per-epoch metric rows so far
CONFIG_FILE = "config.json"  # the run's resolved configuration (RunSpec.resolved_config() + what the data decided)
METRICS_FILE = "metrics.json"  # final checkpoint only: the last epoch's metrics with test and zero-shot accuracy
PROMPTS_FILE = "prompts.safetensors"  # final checkpoint only: coop_core.prompts_io.save_prompts
PROMPTS_META_FILE = PROMPTS_FILE + ".json"  # its human-readable metadata (written by save_prompts)
NEAREST_WORDS_FILE = "nearest_words.txt"  # final checkpoint only: the context's nearest vocabulary words

# -- how the files are logged to MLflow ---------------------------------------------------------------------------
PROMPTS_ARTIFACT_DIR = "prompts"  # PROMPTS_FILE and PROMPTS_META_FILE go under this artifact folder
PROMPT_ARTIFACT_FILES = (PROMPTS_FILE, PROMPTS_META_FILE)
ROOT_ARTIFACT_FILES = (CONFIG_FILE, NEAREST_WORDS_FILE, HISTORY_FILE, METRICS_FILE)

# -- metric keys ----------------------------------------------------------------------------------------------------
SELECTION_METRIC = "val_acc"  # what chooses: ASHA, the best trial, the registry's champion rule (never test accuracy)
TEST_METRIC = "test_acc"  # measured on the test split after the last epoch, only reported
# Reported every epoch (coop_core.engine.train; val_* on validation epochs), logged with step = epoch.
EPOCH_KEYS = ("epoch", "train_loss", "train_acc", "lr", "val_acc", "val_macro_f1", "epoch_time_s", "val_time_s")
# Added to the last epoch's report (the test split is only measured, never used to choose).
FINAL_KEYS = ("test_acc", "test_macro_f1", "zeroshot_test_acc", "zeroshot_test_macro_f1")
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
ENTERED_AT_KEY = "entered_at"  # wall-clock time the worker's code started (time.time())
PROCESS_CREATED_AT_KEY = "process_created_at"  # wall-clock start of a fresh worker process; absent when reused
WARM_HITS_KEY = "warm_cache_hits"  # how many of (model, data, features) came from the process's warm cache
# A run that diverged (coop_core.engine.NonFiniteLossError) reports once more, with this key holding the reason and
# "epoch" the last epoch it completed, and ends: the run is FAILED (a retry from its checkpoint would diverge again).
FAILURE_KEY = "failure"
NOT_LOGGED_KEYS = (ENTERED_AT_KEY, PROCESS_CREATED_AT_KEY, FAILURE_KEY)


def write_checkpoint(d: Path, state: TrainState, history: Sequence[Mapping[str, Any]],
                     resolved: Mapping[str, Any]) -> None:
    """Write the resumable part of a checkpoint into the (empty) folder ``d``."""
    torch.save(state.to_dict(), d / STATE_FILE)
    (d / HISTORY_FILE).write_text(json.dumps(list(history), indent=1))
    (d / CONFIG_FILE).write_text(json.dumps(resolved, indent=2, sort_keys=True))


def read_state(d: str | Path) -> TrainState:
    return TrainState.from_dict(torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True))


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

