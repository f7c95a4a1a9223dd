"""Our package is called ``platform``, like the standard-library module torch, ray, mlflow and uuid import.

Each place a process can meet the name is covered: ``python -m`` from the repository root, a plain import from the
root, pytest (which imported the standard library's module first), and Ray workers (same).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STDLIB_PLATFORM = os.path.join(sysconfig.get_paths()["stdlib"], "platform.py")
PROBE = """
import json, pickle, sys, uuid
import platform
import platform.train
import mlflow, ray, torch
u = platform.uname()
print(json.dumps({
    "file": platform.__file__, "system": platform.system(), "python_version": platform.python_version(),
    "machine": platform.machine(), "platform": platform.platform(), "uuid": str(uuid.uuid4()),
    "uname_roundtrip": pickle.loads(pickle.dumps(u)) == u, "has_private": hasattr(platform, "_syscmd_ver"),
    "torch_ok": torch.ones(2).sum().item() == 2.0, "train": platform.train.__name__,
}))
"""
STDLIB_PROBE = """
import json, platform
print(json.dumps({"file": platform.__file__, "system": platform.system(), "python_version": platform.python_version(),
                  "machine": platform.machine(), "platform": platform.platform()}))
"""


@dataclass
class Probe:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> dict[str, Probe]:
    """Fresh interpreters (each spends ~10 s importing torch & co.), from the repository root and from a directory
    without our package (the standard library's own answers)."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    commands = {
        "help:platform.train": (["-m", "platform.train", "--help"], REPO),
        "help:platform.tune": (["-m", "platform.tune", "--help"], REPO),
        "import": (["-c", PROBE], REPO),
        "stdlib": (["-c", STDLIB_PROBE], elsewhere),
        "-m platform (ours)": (["-m", "platform"], REPO),
        "-m platform (stdlib)": (["-m", "platform"], elsewhere),
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(item: tuple[str, tuple[list[str], Path]]) -> tuple[str, Probe]:
        name, (args, cwd) = item
        done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        return name, Probe(done.returncode, done.stdout, done.stderr)

    with ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: the tests run on 2 cores
        return dict(pool.map(run, commands.items()))


@pytest.fixture(scope="module")
def stdlib_answers(probes) -> dict:
    """What the real standard-library module answers."""
    assert probes["stdlib"].returncode == 0, probes["stdlib"].stderr
    answers = json.loads(probes["stdlib"].stdout)
    assert answers["file"] == STDLIB_PLATFORM
    return answers


@pytest.mark.parametrize("command", ["platform.train", "platform.tune"])
def test_cli_help_runs_from_repo_root(command, probes):
    if not (REPO / Path(*command.split("."))).with_suffix(".py").exists():
        pytest.skip(f"{command} is not written yet")
    out = probes[f"help:{command}"]
    assert out.returncode == 0, out.stderr
    assert "--dataset" in out.stdout and "--backbone" in out.stdout
    assert "Traceback" not in out.stderr


def test_import_from_repo_root_keeps_the_stdlib_api(probes, stdlib_answers):
    out = probes["import"]
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["file"] == str(REPO / "platform" / "__init__.py")  # our package won the name...
    for key in ("system", "python_version", "machine", "platform"):  # ...and answers like the standard library
        assert got[key] == stdlib_answers[key], key
    assert len(got["uuid"]) == 36
    assert got["uname_roundtrip"] and got["has_private"] and got["torch_ok"]
    assert got["train"] == "platform.train"


def test_python_m_platform_still_prints_the_platform_string(probes, stdlib_answers):
    ours, theirs = probes["-m platform (ours)"], probes["-m platform (stdlib)"]
    assert ours.returncode == theirs.returncode == 0, ours.stderr
    assert ours.stdout == theirs.stdout == stdlib_answers["platform"] + "\n"


def test_pytest_process_uses_our_package_with_the_stdlib_functions():
    import platform
    import platform.run_spec

    assert platform.__file__ == str(REPO / "platform" / "__init__.py")
    assert sys.modules["platform"] is platform
    assert platform.run_spec.RunSpec.__module__ == "platform.run_spec"
    # The stdlib module was imported before ours (by pytest): we re-export its very objects, caches included.
    assert platform.system.__code__.co_filename == STDLIB_PLATFORM
    assert platform._syscmd_ver.__code__.co_filename == STDLIB_PLATFORM
    assert platform.system() in ("Linux", "Darwin", "Windows")
    u = platform.uname()
    assert pickle.loads(pickle.dumps(u)) == u  # pickle resolves platform.uname_result to the same class


@pytest.mark.ray
def test_ray_task_and_actor_import_our_package(ray_session):
    ray = ray_session

    @ray.remote
    def task() -> dict:
        import platform
        import platform.run_spec

        return {"system": platform.system(), "file": platform.__file__, "spec": platform.run_spec.RunSpec.__name__,
                "uname": platform.uname()}

    @ray.remote
    class Probe:
        def ask(self) -> tuple[str, str]:
            import platform
            import platform.distributed

            return platform.system(), platform.distributed.TorchDistributed.__module__

    got = ray.get(task.remote())
    import platform

    assert got["system"] == platform.system()
    assert got["file"].endswith(os.path.join("platform", "__init__.py"))
    assert got["spec"] == "RunSpec"
    assert got["uname"] == platform.uname()  # a uname_result pickled by a worker unpickles here
    actor = Probe.remote()
    assert ray.get(actor.ask.remote()) == (platform.system(), "platform.distributed")
    ray.kill(actor)
