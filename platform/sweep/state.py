"""The sweep's state file (``coop_sweep.json`` in the sweep folder): what ``--resume`` needs to continue a sweep."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from platform.run_spec import RunSpec
from typing import Any

SWEEP_STATE_FILE = "coop_sweep.json"  # in the sweep folder: what --resume needs (parent run, base spec, tracking)


def n_configurations(num_samples: int, grid: Mapping[str, Any]) -> int:
    """How many configurations a sweep trains: its samples, times the grid's combinations."""
    return num_samples * math.prod(len(v) for v in grid.values())


@dataclasses.dataclass(frozen=True)
class SweepState:
    """A started sweep, as its state file holds it: written once when the sweep's MLflow parent run is opened, read
    back by ``--resume`` (which continues the sweep with these values, whatever the flags say).

    dataset: the data's name (``RunSpec.dataset``). base_spec: ``RunSpec.to_dict()`` of every trial's base run.
    parent_run_id, tracking_uri, experiment, experiment_id, runs_url: the sweep's MLflow run, store, experiment and
    its trials-table link. started_at: ``time.time()`` at the start. num_samples: trials to sample (or times to run
    the grid). search_seed: TPE's seed. epochs: the most epochs a trial trains. trial_runner: ``in-process`` or
    ``ray-train``. gpus_per_trial: the GPU share a trial reserves (0 on CPUs). max_failures: recoveries per trial.
    grid: ``{field: values}`` of a grid sweep (empty: a search). kind, entry_point: ``sweep`` by ``platform.tune``,
    or ``study`` by ``platform.study``. early_stopping: ASHA on validation accuracy. register: register the best
    trial. resume_flags: the entry point's own flags its resume command repeats (:func:`resume_command`).
    pack_size: configurations trained together per trial (``platform/sweep/packs.py``; 1: a trial each).
    """

    dataset: str
    base_spec: dict[str, Any]
    parent_run_id: str
    tracking_uri: str
    experiment: str
    experiment_id: str
    started_at: float
    num_samples: int
    search_seed: int
    epochs: int
    trial_runner: str
    gpus_per_trial: float
    max_failures: int
    grid: dict[str, list[Any]] = dataclasses.field(default_factory=dict)
    runs_url: str | None = None
    kind: str = "sweep"
    entry_point: str = "platform.tune"
    early_stopping: bool = True
    register: bool = True
    resume_flags: tuple[str, ...] = ()
    pack_size: int = 1

    @property
    def spec(self) -> RunSpec:
        """The trials' base run."""
        return RunSpec.from_dict(self.base_spec)

    @property
    def n_trials(self) -> int:
        """How many trials the sweep runs: its samples, times the grid's combinations."""
        return n_configurations(self.num_samples, self.grid)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"resume_flags": list(self.resume_flags)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SweepState:
        """The state of a state file; keys an older file lacks take their defaults, keys this version does not know
        are ignored.

        Raises:
            ValueError: a key without a default is missing (not a sweep's state file).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            state = cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as err:
            raise ValueError(f"not a sweep state file ({err})") from None
        return dataclasses.replace(state, grid=dict(state.grid or {}), resume_flags=tuple(state.resume_flags))


def sweep_folder(storage_path: str, name: str) -> str:
    return f"{storage_path.rstrip('/')}/{name}"


def write_sweep_state(sweep_dir: str, state: SweepState) -> None:
    """Write the sweep's state file atomically (a local folder)."""
    path = Path(sweep_dir) / SWEEP_STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.to_dict(), indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_sweep_state(sweep_dir: str) -> SweepState | None:
    """The state in ``sweep_dir``; None when there is no state file.

    Raises:
        ValueError: the file is not a sweep's state (unreadable JSON, or keys missing).
    """
    path = Path(sweep_dir) / SWEEP_STATE_FILE
    if not path.is_file():
        return None
    try:
        return SweepState.from_dict(json.loads(path.read_text()))
    except ValueError as err:
        raise ValueError(f"--resume: {path} cannot be read as a sweep's state ({err}); is this a sweep folder?"
                         ) from None


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


def resume_command(state: SweepState, name: str, storage_path: str) -> str:
    """The command that finishes the sweep (or study) ``name`` whose state is ``state``: its CLI, the dataset as that
    CLI takes it (a built-in dataset's key and data root, or your folder's or manifest's path and name), the plan's own
    flags (a study's protocol and targets) and ``--resume``; quoted for a POSIX shell.

    ``--resume`` of a finished sweep runs nothing again: it logs what is missing and registers the best trial once.
    """
    spec = state.base_spec
    source = spec.get("source")
    dataset = (["--dataset", source["path"], "--dataset-name", source["name"]] if source
               else ["--dataset", spec["dataset"], "--data-root", spec["data_root"]])
    argv = ["python", "-m", state.entry_point, *dataset, *state.resume_flags, "--resume",
            f"--{'study' if state.kind == 'study' else 'sweep'}-name", name, "--storage-path", storage_path]
    return shlex.join(argv)
