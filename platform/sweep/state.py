"""The sweep's state file (``coop_sweep.json`` in the sweep folder): what ``--resume`` needs to continue a sweep."""

from __future__ import annotations

import json
import os
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
