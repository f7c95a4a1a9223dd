"""Fixtures for the platform tests: one local Ray for the whole session, a small real-EuroSAT root, MLflow in tmp.

Ray start-up and Ray Train worker start-up dominate these tests on 2 cores, so every Ray test shares one
``ray_session`` (started through ``platform.ray_runtime.init_ray``, exactly as the CLIs start it) and one feature cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Per class: few-shot pools and a small test split; enough for 2-shot runs with global batches of 8.
SMALL_SPLIT_PER_CLASS = {"train": 8, "val": 4, "test": 6}


@pytest.fixture(scope="session")
def small_eurosat_root(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with the real EuroSAT images (symlinked) and a reduced CoOp split: 80 train / 40 val / 60 test."""
    root = tmp_path_factory.mktemp("data")
    (root / "eurosat").mkdir()
    os.symlink(shared_data / "eurosat" / "2750", root / "eurosat" / "2750")
    full = json.loads((shared_data / "eurosat" / "split_zhou_EuroSAT.json").read_text())
    small = {}
    for split, per_class in SMALL_SPLIT_PER_CLASS.items():
        counts: dict[int, int] = {}
        small[split] = []
        for entry in full[split]:
            if counts.get(entry[1], 0) < per_class:
                counts[entry[1]] = counts.get(entry[1], 0) + 1
                small[split].append(entry)
    (root / "eurosat" / "split_zhou_EuroSAT.json").write_text(json.dumps(small))
    return root


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One feature/few-shot cache for the session (all workers and runs share it, as on a real cluster)."""
    return tmp_path_factory.mktemp("coop-cache")


@pytest.fixture(scope="session")
def ray_session():
    """A local 2-CPU Ray, started like the CLIs start it (working_dir + the ``platform`` setup hook)."""
    ray = pytest.importorskip("ray")
    from platform.ray_runtime import init_ray

    init_ray(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path: Path) -> str:
    """A fresh MLflow SQLite store."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
