"""``ray_cluster.yaml`` passes Ray's own checks as ``ray up`` makes them, and holds the cluster path the README
describes: a tracking server on the head's private address with artifacts in S3, the checkout and data on every node.

``ray up`` (``ray.autoscaler._private.commands._bootstrap_config``) fills in the defaults (``prepare_config``) and
validates the result against the autoscaler's schema (``validate_config``) before it talks to the cloud; the test
makes the same two calls (Ray's private autoscaler API: on a Ray upgrade, check that ``_bootstrap_config`` still
calls them) and stops before the AWS calls, which need credentials.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_ray_up_accepts_the_config_after_filling_its_defaults(config):
    import ray
    from ray.autoscaler._private.commands import _NODE_PROVIDERS
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)  # raises on any schema violation
    assert "aws" in _NODE_PROVIDERS and prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert prepared["available_node_types"]["head"]["max_workers"] == 0  # filled in: the head runs no trials
    assert all(t.get("resources", {}).get("GPU") for name, t in prepared["available_node_types"].items()
               if name != "head")
    # The image's Ray is the Ray of every machine that talks to the cluster, this one included.
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    assert f'"ray[default,train,tune]=={ray.__version__}"' in " ".join(config["setup_commands"])


def test_a_broken_config_is_refused_by_the_same_check(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(config)
    broken["available_node_types"]["head"]["resources"] = "eight CPUs"
    with pytest.raises(Exception, match="resources|not of type"):
        validate_config(prepare_config(broken))


def test_the_head_runs_the_tracking_server_every_node_reaches(config):
    commands = " ".join(config["head_start_ray_commands"])
    server = re.search(r"mlflow server (.*?)>", commands, re.S)
    assert server, commands
    flags = server.group(1).split()
    assert flags[flags.index("--host") + 1] == '$(hostname' and '-d" " -f1)' in server.group(1)  # private address
    assert "0.0.0.0" not in server.group(1)
    assert flags[flags.index("--artifacts-destination") + 1] == "$MLFLOW_ARTIFACTS"
    assert re.search(r"MLFLOW_ARTIFACTS=s3://", commands)  # shared by all nodes, served through the head
    assert flags[flags.index("--backend-store-uri") + 1].startswith("sqlite:///$HOME/")
    assert "boto3" in " ".join(config["head_setup_commands"])  # S3 from the head
    assert config["file_mounts"]["~/coop"] == "."  # the checkout on every node


def test_the_readme_cluster_path_uses_this_config(config):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## On a cluster", 1)[1].split("\n## ", 1)[0]
    for step in ("ray up ray_cluster.yaml", "ray exec ray_cluster.yaml", "--ray-address auto",
                 "--tracking-uri http://", "--storage-path s3://", "ray dashboard ray_cluster.yaml",
                 "ssh -N -L 5000:", "ray down ray_cluster.yaml"):
        assert step in section, step
    port = re.search(r"--port (\d+)", " ".join(config["head_start_ray_commands"])).group(1)
    assert f":{port}" in section
