"""The sweep's state file (``coop_sweep.json`` in the sweep folder): what ``--resume`` needs to continue a sweep."""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SWEEP_STATE_FILE = "coop_sweep.json"  # in the sweep folder: what --resume needs (parent run, base spec, tracking)


def sweep_folder(storage_path: str, name: str) -> str:
    return f"{storage_path.rstrip('/')}/{name}"


def write_sweep_state(sweep_dir: str, state: Mapping[str, Any]) -> None:
    """Write the sweep's state file atomically (a local folder)."""
    path = Path(sweep_dir) / SWEEP_STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_sweep_state(sweep_dir: str) -> dict[str, Any] | None:
    path = Path(sweep_dir) / SWEEP_STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def latest_sweep(storage_path: str, dataset: str, kind: str = "sweep") -> str | None:
    """The name of the most recently started sweep of ``dataset`` under ``storage_path`` (of ``kind``: a
    ``platform.tune`` sweep or a study)."""
    root = Path(storage_path)
    found = []
    for state_file in root.glob(f"*/{SWEEP_STATE_FILE}"):
        try:
            state = json.loads(state_file.read_text())
        except ValueError:
            continue
        if state.get("dataset") == dataset and state.get("kind", "sweep") == kind:
            found.append((state.get("started_at", 0.0), state_file.parent.name))
    return max(found)[1] if found else None


def resume_command(state: Mapping[str, Any], name: str, storage_path: str) -> str:
    """The command that finishes the sweep (or study) ``name`` whose state is ``state``: its CLI, the dataset as that
    CLI takes it (a built-in dataset's key and data root, or your folder's or manifest's path and name), the plan's own
    flags (a study's protocol and targets) and ``--resume``; quoted for a POSIX shell.

    ``--resume`` of a finished sweep runs nothing again: it logs what is missing and registers the best trial once.
    """
    spec = state["base_spec"]
    source = spec.get("source")
    dataset = (["--dataset", source["path"], "--dataset-name", source["name"]] if source
               else ["--dataset", spec["dataset"], "--data-root", spec["data_root"]])
    kind = state.get("kind", "sweep")
    argv = ["python", "-m", state.get("entry_point", "platform.tune"), *dataset, *state.get("resume_flags", ()),
            "--resume", f"--{'study' if kind == 'study' else 'sweep'}-name", name, "--storage-path", storage_path]
    return shlex.join(argv)
