"""A disk that fills up mid-write: the feature cache, the few-shot manifest and a checkpoint each fail with one clear
line, leave no partial file behind, and the next run (with room again) rebuilds what is missing; a checkpoint cut
short is refused when read.

The full disk is a size-limited file: a child process runs with ``RLIMIT_FSIZE`` set, so its writes past the limit
fail in the middle of the file (EFBIG, as a full disk fails with ENOSPC) -- on any machine, without root or mounts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIMIT_BYTES = 64 * 1024  # every entry below is larger than this

CHILD = """
import json, resource, signal, sys
from pathlib import Path
import torch
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails (EFBIG) instead of killing the process
out = {}

def attempt(name, fn):
    resource.setrlimit(resource.RLIMIT_FSIZE, (__LIMIT_BYTES__, resource.RLIM_INFINITY))
    try:
        fn()
        out[name] = {"ok": True}
    except Exception as err:
        out[name] = {"type": type(err).__name__, "message": str(err), "bases": [c.__name__ for c in type(err).__mro__]}
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

root = Path(sys.argv[1])
from coop_core.features import FeatureCache
big = {"features": torch.randn(256, 128), "labels": torch.arange(256)}  # 128 KiB of features
attempt("features", lambda: FeatureCache(root / "cache").get_or_compute({"k": 1}, lambda: big))

from coop_core.datasets import DatasetSplits, Item
from coop_core.fewshot import build_few_shot
import secrets
items = tuple(Item(f"c{label}/{secrets.token_hex(200)}.jpg", label, f"class {label}")  # incompressible: 400 B each
              for label in range(4) for i in range(200))
splits = DatasetSplits("toy", root / "images", ("class 0", "class 1", "class 2", "class 3"), "a {}.", items, items,
                       items)
attempt("manifest", lambda: build_few_shot(splits, 150, 1, root / "cache"))

from platform import artifacts
from coop_core.engine import TrainState
state = TrainState(3, torch.randn(64, 512), {"state": {}, "param_groups": []}, {}, None, torch.get_rng_state())
(root / "ckpt").mkdir()
attempt("checkpoint", lambda: artifacts.write_checkpoint(root / "ckpt", state, [], {}))
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory) -> tuple[Path, dict]:
    """Run the three writes in a child whose files may not grow past ``LIMIT_BYTES``; returns its folder and what
    each write raised."""
    root = tmp_path_factory.mktemp("full")
    script = textwrap.dedent(CHILD).replace("__LIMIT_BYTES__", str(LIMIT_BYTES))
    proc = subprocess.run([sys.executable, "-c", script, str(root)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, json.loads(proc.stdout.strip().splitlines()[-1])


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_a_feature_cache_write_that_runs_out_of_space_keeps_nothing_and_is_rebuilt(full_disk):
    import torch

    from coop_core.features import FeatureCache

    root, outcome = full_disk
    failed = outcome["features"]
    assert failed["type"] == "CacheWriteError" and "OSError" in failed["bases"]
    assert failed["message"].startswith(f"cannot write the feature cache under {root / 'cache'} (")
    assert "free space there or pass another --cache-dir (nothing partial was kept)" in failed["message"]
    assert "\n" not in failed["message"]
    entries = [f for f in _files(root / "cache") if f.startswith("features/") and not f.endswith(".lock")]
    assert entries == []  # no entry, no temporary file
    # The next run, with room again, computes the entry and writes it whole.
    calls = []
    tensors = FeatureCache(root / "cache").get_or_compute({"k": 1}, lambda: calls.append(1) or {
        "features": torch.ones(256, 128), "labels": torch.arange(256)})
    assert calls == [1] and tensors["features"].shape == (256, 128)
    assert FeatureCache(root / "cache").get_or_compute({"k": 1}, lambda: pytest.fail("recomputed"))["labels"].shape \
        == (256,)


def test_a_manifest_write_that_runs_out_of_space_keeps_nothing(full_disk):
    root, outcome = full_disk
    failed = outcome["manifest"]
    assert failed["type"] == "CacheWriteError"
    assert failed["message"].startswith(f"cannot write the few-shot manifest under {root / 'cache'} (")
    assert not [f for f in _files(root / "cache") if "fewshot" in f and not f.endswith(".lock")]


def test_a_checkpoint_cut_short_fails_in_one_line_and_is_refused_when_read(full_disk, tmp_path):
    from platform import artifacts

    import torch

    from coop_core.engine import TrainState

    root, outcome = full_disk
    failed = outcome["checkpoint"]
    assert failed["type"] == "CheckpointError"
    assert failed["message"].startswith(f"cannot write the checkpoint in {root / 'ckpt'} (")
    with pytest.raises(artifacts.CheckpointError, match=r"is incomplete \(no readable manifest.json"):
        artifacts.verify(root / "ckpt")  # what the failed write left is never used
    # A sealed checkpoint reads back; one whose state file was cut short afterwards is refused.
    d = tmp_path / "ok"
    d.mkdir()
    state = TrainState(3, torch.randn(4, 8), {"state": {}, "param_groups": []}, {}, None, torch.get_rng_state())
    artifacts.write_checkpoint(d, state, [{"epoch": 3}], {"n": 1})
    artifacts.seal(d)
    artifacts.verify(d)
    assert artifacts.read_train_state(d).epoch == 3
    data = (d / artifacts.TRAIN_STATE_FILE).read_bytes()
    (d / artifacts.TRAIN_STATE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(artifacts.CheckpointError, match=r"is damaged: state.pt is missing or does not match its "
                                                        r"sha256"):
        artifacts.verify(d)
