"""Across nodes, on one machine: a two-node Ray cluster (Ray's own ``cluster_utils.Cluster``: two raylets with one
CPU each) runs a 2-worker class-sharded DDP run with one worker on each node, which takes the one-process steps, and
a sweep whose
two trials land on both nodes; the workers import ``platform`` from the job's runtime environment (Ray's working_dir
copy), not from the repository. And what each node must share is checked before a run, with one line on failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from platform.cluster_check import TOKEN_NAME, check_shared_paths

import pytest
import torch
from numerics import TRAJECTORY, assert_reordered

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.long
@pytest.mark.numeric
@pytest.mark.ray
def test_ddp_run_and_sweep_span_two_nodes(small_eurosat_root, feature_cache, tiny_vit_config, tmp_path):
    from test_train_ddp import EPOCHS, _cli_argv, _reference_run

    common = ["--storage-path", str(tmp_path / "ray"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
              "--json"]
    train_args = [*_cli_argv(small_eurosat_root, feature_cache, tiny_vit_config, 2), "--placement-strategy",
                  "STRICT_SPREAD", "--text-sharding", "class", *common]
    tune_args = ["--dataset", "eurosat", "--data-root", str(small_eurosat_root), "--backbone", tiny_vit_config,
                 "--pretrained", "none", "--shots", "2", "--epochs", "2", "--n-views", "1", "--batch-size", "8",
                 "--max-test-items", "20", "--cache-dir", str(feature_cache), "--grid", "prompt.n_ctx=2,4",
                 "--max-concurrent", "2", "--sweep-name", "two-nodes", *common]
    out = tmp_path / "report.json"
    code = "import sys; sys.path.insert(0, 'tests/platform'); import multinode_child; multinode_child.main()"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, "-c", code, str(out), json.dumps(train_args), json.dumps(tune_args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    report = json.loads(out.read_text())
    assert len(report["nodes"]) == 2

    # DDP: one worker per node (STRICT_SPREAD), each encoding 5 of the 10 class prompts, equals the one-process run.
    assert report["train"]["text_sharding"] == "class"
    ranks = {r["rank"]: r for r in report["where"]["train"]}
    assert sorted(ranks) == [0, 1]
    assert {ranks[0]["node_id"], ranks[1]["node_id"]} == set(report["nodes"])
    ckpt = Path(report["train"]["checkpoint"])
    ctx = torch.load(ckpt / "state.pt", weights_only=True)["ctx"]
    reference = _reference_run(small_eurosat_root, feature_cache)
    assert_reordered(ctx, reference["ctx"], TRAJECTORY, "two nodes' DDP context vs one process")
    assert report["train"]["epochs"] == EPOCHS and report["train"]["num_workers"] == 2

    # The sweep's two one-CPU trials run at once, one on each node.
    assert report["tune"]["trials_finished"] == 2
    assert {r["node_id"] for r in report["where"]["tune"]} == set(report["nodes"])

    # Every worker imported our package from Ray's copy of the working directory, not from the repository.
    for record in report["where"]["train"] + report["where"]["tune"]:
        assert not record["platform_file"].startswith(str(REPO)), record
        assert "/runtime_resources/working_dir_files/" in record["platform_file"], record  # Ray's per-job copy


def test_shared_paths_are_checked_on_every_node(tmp_path):
    data, cache, storage = tmp_path / "data", tmp_path / "cache", tmp_path / "storage"
    data.mkdir()
    nodes = [{"NodeID": "a" * 8, "NodeManagerAddress": "10.0.0.1", "Alive": True},
             {"NodeID": "b" * 8, "NodeManagerAddress": "10.0.0.2", "Alive": True},
             {"NodeID": "c" * 8, "NodeManagerAddress": "10.0.0.3", "Alive": False}]
    asked = []

    def same_filesystem(node_id, address, checks):  # every node sees this machine's folders
        from platform.cluster_check import _check_here

        asked.append(address)
        return _check_here(checks)

    required, preferred = {"--storage-path": str(storage)}, {"--cache-dir": str(cache)}
    assert check_shared_paths(str(data), required, preferred, nodes=nodes, probe=same_filesystem) == []
    assert asked == ["10.0.0.1", "10.0.0.2"]  # dead nodes are not asked
    assert (cache / TOKEN_NAME).is_file() and (storage / TOKEN_NAME).is_file()

    def node_local(flag):  # node b has its own /tmp-style folder for this flag
        def probe(node_id, address, checks):
            from platform.cluster_check import _check_here

            if address == "10.0.0.2":
                checks = {**checks, flag: (checks[flag][0], "another token")}
            return _check_here(checks)

        return probe

    with pytest.raises(ValueError, match=r"^--storage-path .* not the driver's folder \(node-local, not shared\) on "
                                         r"Ray node 10\.0\.0\.2: every node must see"):
        check_shared_paths(str(data), required, preferred, nodes=nodes, probe=node_local("--storage-path"))
    # A node-local feature cache works (content-keyed), only slower: a warning, not an error.
    warnings = check_shared_paths(str(data), required, preferred, nodes=nodes, probe=node_local("--cache-dir"))
    assert len(warnings) == 1 and warnings[0].startswith(f"--cache-dir {cache} is not shared with Ray node 10.0.0.2")

    def no_data(node_id, address, checks):  # the data root is not mounted on any other node
        from platform.cluster_check import _check_here

        return _check_here({**checks, "--data-root": (str(tmp_path / "absent"), None)})

    with pytest.raises(ValueError, match=r"^--data-root \S+/data does not exist on Ray node 10\.0\.0\.1"):
        check_shared_paths(str(data), required, preferred, nodes=nodes, probe=no_data)
    # URIs are not checked, and a one-node cluster is not checked at all.
    asked.clear()
    assert check_shared_paths(str(data), {"--storage-path": "s3://bucket/ray"}, nodes=nodes,
                              probe=same_filesystem) == []
    assert asked == ["10.0.0.1", "10.0.0.2"]
    assert check_shared_paths(str(tmp_path / "absent"), required, nodes=nodes[:1], probe=no_data) == []
