"""Security defaults: no unsafe deserialisation anywhere in the code (checked on the syntax tree of every module),
local binds in the README's commands, and prompt files verified by the served model."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ("coop_core", "platform", "tune_spaces", "dashboards", "bench")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_loads(source: str) -> list[str]:
    """The unsafe deserialisation calls in ``source``: ``torch.load`` without ``weights_only=True``, any
    pickle-family load, ``np.load(allow_pickle=True)``, ``yaml.load`` without a safe loader, ``pd.read_pickle``,
    ``torch.jit.load``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}
        owner, _, attr = name.rpartition(".")
        is_true = lambda v: isinstance(v, ast.Constant) and v.value is True  # noqa: E731
        if name == "torch.load" and not is_true(kwargs.get("weights_only")):
            found.append(f"line {node.lineno}: torch.load without weights_only=True")
        elif owner.split(".")[-1] in PICKLE_MODULES and attr in ("load", "loads", "Unpickler", "open"):
            found.append(f"line {node.lineno}: {name}")
        elif name in ("np.load", "numpy.load") and is_true(kwargs.get("allow_pickle")):
            found.append(f"line {node.lineno}: {name}(allow_pickle=True)")
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load") and "SafeLoader" not in ast.unparse(node):
            found.append(f"line {node.lineno}: {name} without yaml.SafeLoader")
        elif name.endswith("read_pickle") or name == "torch.jit.load":
            found.append(f"line {node.lineno}: {name}")
    return found


def test_the_scanner_finds_every_kind_of_unsafe_load():
    bad = """
import pickle, torch, numpy as np, yaml, pandas as pd, joblib
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
pickle.loads(b"")
joblib.load("m.pkl")
np.load("a.npy", allow_pickle=True)
yaml.load(open("c.yaml"))
pd.read_pickle("f.pkl")
torch.jit.load("m.pt")
"""
    assert len(unsafe_loads(bad)) == 8
    good = """
import torch, numpy as np, yaml
torch.load("x.pt", map_location="cpu", weights_only=True)
np.load("a.npy")
yaml.load(open("c.yaml"), Loader=yaml.SafeLoader)
"""
    assert unsafe_loads(good) == []


def test_no_module_deserialises_unsafely():
    files = [p for d in CODE_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 30  # the scan really covers the code
    problems = {str(p.relative_to(REPO)): found for p in files if (found := unsafe_loads(p.read_text()))}
    assert problems == {}


def test_readme_and_cluster_commands_bind_to_localhost():
    cluster = (REPO / "ray_cluster.yaml").read_text()
    # The one exception, by design (README "On a cluster"): the cluster's tracking server on the head node binds to
    # the head's *private* address, so the nodes and drivers inside the VPC reach it; never 0.0.0.0.
    head_server = re.search(r"nohup (mlflow server .*?)>", cluster, re.S)
    assert head_server and '--host $(hostname -I | cut -d" " -f1)' in head_server.group(1)
    text = (REPO / "README.md").read_text() + cluster.replace(head_server.group(1), "")
    assert "0.0.0.0" not in text
    servers = re.findall(r"(mlflow (?:ui|server|models serve)[^`'\n]*)", text)
    assert len(servers) >= 3
    for command in servers:
        assert "--host 127.0.0.1" in command, command
    assert "--dashboard-host=127.0.0.1" in text
    from platform import tracking

    assert tracking.ui_command("sqlite:////tmp/x/mlflow.db").startswith("mlflow ui --host 127.0.0.1 ")


def test_served_model_refuses_prompts_it_was_not_logged_with(tmp_path, tiny_vit_config):
    """The pyfunc checks the prompt file's own sha256 and the digest recorded when the model was logged."""
    from platform import pyfunc_model, registry
    from types import SimpleNamespace

    import numpy as np

    from coop_core.config import PromptConfig
    from coop_core.prompts_io import PromptFileError, PromptMeta, save_prompts, verified_digest

    assert registry.PROMPTS_SHA256_KEY == pyfunc_model.PROMPTS_SHA256_KEY  # the writer and the reader agree
    meta = PromptMeta(tiny_vit_config, "none", ("forest", "river"), PromptConfig(n_ctx=2))
    logged = save_prompts(tmp_path / "logged" / "prompts.safetensors", torch.randn(2, 64), meta)
    other = save_prompts(tmp_path / "other" / "prompts.safetensors", torch.randn(2, 64), meta)
    expected = verified_digest(logged)  # what log_prompt_model records in the model's config

    def load(prompts: Path):
        context = SimpleNamespace(artifacts={"prompts": str(prompts), "backbone_config": tiny_vit_config},
                                  model_config={"prompts_sha256": expected, "device": "cpu"})
        model = pyfunc_model.CoOpClassifier()
        model.load_context(context)
        return model

    served = load(logged)
    out = served.predict(None, np.zeros((1, 40, 40, 3), dtype=np.uint8))
    assert list(out["class_name"]) in (["forest"], ["river"])
    with pytest.raises(PromptFileError, match=r"not the one this model was logged with"):
        load(other)  # a valid prompt file, but not this model's
    data = bytearray(logged.read_bytes())
    data[-3] ^= 0x01
    logged.write_bytes(bytes(data))
    with pytest.raises(PromptFileError, match=r"fails its sha256 check") as info:
        load(logged)
    assert "\n" not in str(info.value)
    assert json.loads((logged.parent / "prompts.safetensors.json").read_text())["sha256"]  # the sidecar shows it
