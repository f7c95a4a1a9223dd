"""Two sweeps started at once on one feature cache and one SQLite tracking store: both finish, every cache entry is
built once, and SQLite never fails with "database is locked".

How: cache entries and few-shot manifests are built under a per-entry lock (the second process waits, then reads
what the first wrote); the SQLite store is created under a lock beside it, writers wait up to a minute for SQLite's
write lock instead of 5 s, and the champion rule runs under that lock too (``platform/tracking_store.py: open_store``).
Each sweep is the plain CLI in its own process with its own local Ray, as two users would start them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.long]  # two whole sweeps at once

REPO = Path(__file__).resolve().parents[2]


def test_two_sweeps_at_once_share_the_cache_and_the_store(small_eurosat_root, tiny_vit_config, tmp_path):
    from mlflow.tracking import MlflowClient

    cache, uri = tmp_path / "cache", f"sqlite:///{tmp_path / 'mlflow.db'}"  # both new: the two race to create them
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}

    def sweep(name: str, seed: str) -> list[str]:
        return [sys.executable, "-m", "platform.tune", "--dataset", "eurosat", "--data-root", str(small_eurosat_root),
                "--backbone", tiny_vit_config, "--pretrained", "none", "--shots", "1", "--epochs", "1",
                "--n-views", "2", "--batch-size", "8", "--max-test-items", "20", "--num-samples", "2",
                "--max-concurrent", "1", "--search-seed", seed, "--cache-dir", str(cache),
                "--storage-path", str(tmp_path / "ray"), "--tracking-uri", uri, "--sweep-name", name, "--json",
                "--verbose"]  # the workers' "cached features ..." lines, counted below, are INFO

    procs = [subprocess.Popen(sweep(name, seed), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for name, seed in (("first", "1"), ("second", "2"))]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    logs = "\n".join(out + err for out, err in outputs)
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, (out[-2000:], err[-4000:])
    # The drivers' own output (with --verbose Ray also forwards its workers' shutdown noise, "(... pid=N)" lines,
    # e.g. a SystemExit traceback from a trial actor's SIGTERM handler: not ours, and not a failure).
    own = "\n".join(line for line in logs.splitlines() if " pid=" not in line)
    assert "database is locked" not in own and "Traceback" not in own
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert [s["trials_completed"] for s in summaries] == [2, 2]

    # Every feature entry was computed by exactly one process, and the few-shot manifest written once.
    computed = Counter(re.findall(r"cached features ([0-9a-f]{64})\.safetensors", logs))
    on_disk = {p.stem for p in (cache / "features").rglob("*.safetensors")}
    assert computed and set(computed) == on_disk and set(computed.values()) == {1}, computed
    assert len(on_disk) == 2 + 1 + 1 + 1  # 2 training views, val, test and the registry evaluation set
    assert logs.count("wrote few-shot manifest") == 1
    assert not list(cache.rglob("*.tmp"))

    client = MlflowClient(uri, registry_uri=uri)
    for s in summaries:
        parent = client.get_run(s["parent_run_id"])
        assert parent.info.status == "FINISHED"
        children = client.search_runs([parent.info.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{s['parent_run_id']}'")
        assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    versions = client.search_model_versions("name = 'coop-eurosat'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert {v.tags["champion_rule_applied"] for v in versions} == {"true"}
    champion = client.get_model_version_by_alias("coop-eurosat", "champion")
    # The rule ran once per version, one after the other: the champion is the best on the same images with the
    # same CLIP (both sweeps: the same random weights, the same registry evaluation set), the first on a tie.
    assert len({(v.tags["weights_digest"], v.tags["registry_set"]) for v in versions}) == 1
    best = max(float(v.tags["registry_acc"]) for v in versions)
    first_best = min(int(v.version) for v in versions if float(v.tags["registry_acc"]) == best)
    assert int(champion.version) == first_best
