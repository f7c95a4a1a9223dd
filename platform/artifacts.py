"""A run's checkpoints: writing, sealing, verifying and reading the folder a run (Ray Train's or a Tune trial's)
reports.

Every checkpoint is a folder with the resumable state and the metric history; the final one also holds the learned
prompts, the nearest-words table and the final metrics. Its manifest, written last, holds the sha256 of every file,
and every reader verifies it first (:func:`verify`): a checkpoint cut short by a full disk or a killed process is
refused, never half-used. The writer (``platform/worker.py``) and every reader (tracking, the sweep's MLflow callback,
the registry, the tune CLI) use the functions here. The file names and metric keys are owned by ``run_format`` (the
dashboards read them too, without torch) and imported here, so ``artifacts.CONFIG_FILE`` and the others read as
before and a renamed file or key still changes in one place.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from coop_core import TrainState
from run_format import (  # noqa: F401 -- the run's names, owned by run_format, read here as artifacts.NAME
    ACCURACY_KEYS,
    CHECKPOINTS_KEPT,
    CONFIG_FILE,
    DASHBOARDS_ARTIFACT_DIR,
    ENTERED_AT_KEY,
    EPOCH_KEYS,
    EPOCHS_TOTAL_KEY,
    FAILURE_FILE,
    FAILURE_KEY,
    FINAL_KEYS,
    HISTORY_FILE,
    MANIFEST_FILE,
    METRICS_FILE,
    N_CTX_EFFECTIVE_KEY,
    NEAREST_WORDS_FILE,
    NOT_LOGGED_KEYS,
    PROCESS_CREATED_AT_KEY,
    PROMPT_ARTIFACT_FILES,
    PROMPTS_ARTIFACT_DIR,
    PROMPTS_FILE,
    PROMPTS_META_FILE,
    REGISTRY_METRIC,
    REGISTRY_SET_KEY,
    RESOLVED_PARAMS,
    ROOT_ARTIFACT_FILES,
    SELECTION_METRIC,
    TARGET_KEYS,
    TARGET_PREFIX,
    TEST_METRIC,
    TEXT_SHARDING_USED_KEY,
    TRAIN_STATE_FILE,
    TRIAL_TIMING_KEYS,
    WARM_HITS_KEY,
    WEIGHTS_DIGEST_KEY,
    WORKER_TIMING_KEYS,
    ZEROSHOT_TEST_METRIC,
    final_keys,
    target_key,
    target_results,
)


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
        (d / HISTORY_FILE).write_text(_history_json(history))
        (d / CONFIG_FILE).write_text(json.dumps(resolved, indent=2, sort_keys=True))
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError from its writer
        raise CheckpointError(f"cannot write the checkpoint in {d} ({_reason(err)}); free space there (the "
                              "temporary folder, $TMPDIR) and resume the run") from None


def write_failure(d: Path, reason: str, history: Sequence[Mapping[str, Any]], resolved: Mapping[str, Any]) -> None:
    """The checkpoint a diverged run reports last: its reason, the epochs it completed and its config (then
    :func:`seal` it). Ray Train keeps a run's result with its checkpoint, so the failure travels as one."""
    (d / FAILURE_FILE).write_text(json.dumps({FAILURE_KEY: reason}, indent=2))
    (d / HISTORY_FILE).write_text(_history_json(history))
    (d / CONFIG_FILE).write_text(json.dumps(resolved, indent=2, sort_keys=True))


def _history_json(history: Sequence[Mapping[str, Any]]) -> str:
    """The history as a JSON list with one epoch's row per line: as readable as an indented list, and written by
    json's C encoder (an indented dump runs its pure-Python one, and the history, growing with the epochs, is rewritten
    at every checkpoint)."""
    return "[\n" + ",\n".join(json.dumps(row) for row in history) + "\n]\n" if history else "[]\n"


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

