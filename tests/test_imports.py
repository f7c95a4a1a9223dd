"""The import boundaries, each checked in a fresh interpreter: ``coop_core`` is the method only (no distributed,
tuning or tracking framework), ``run_format`` is the standard library only, and the dashboards import nothing of
``platform`` (platform calls them when a sweep or study ends: the arrows point one way)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("ray", "mlflow", "optuna")


def test_import_coop_core_loads_no_ray_mlflow_or_optuna():
    code = (
        "import json, sys\n"
        "import coop_core\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(json.dumps({'bad': bad, 'all': sorted(coop_core.__all__)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bad"] == []
    assert {"CoOpModel", "PromptLearner", "TextEncoder", "train", "run_coop", "load_clip"} <= set(result["all"])


def test_every_public_name_of_coop_core_exists():
    import coop_core

    missing = [name for name in coop_core.__all__ if not hasattr(coop_core, name)]
    assert missing == []


def _imported(modules: tuple[str, ...]) -> list[str]:
    """Every module in ``sys.modules`` of a fresh interpreter (run from the repository root) after importing
    ``modules``."""
    code = "import json, sys\n" + "".join(f"import {m}\n" for m in modules) + "print(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_run_format_imports_only_the_standard_library():
    at_start = set(_imported(()))  # what the interpreter loads before any import (site's .pth hooks)
    loaded = _imported(("run_format",))
    outside = sorted({m.split(".")[0] for m in set(loaded) - at_start} - set(sys.stdlib_module_names) - {"run_format"})
    assert outside == []
    assert [m for m in loaded if m.startswith("platform.")] == []  # "platform" itself is the stdlib's name too


DASHBOARD_MODULES = ("dashboards.__main__", "dashboards.report", "dashboards.study", "dashboards.sweep",
                     "dashboards.curves", "dashboards.search", "dashboards.shots", "dashboards.words")


def test_dashboards_import_no_platform_module_and_no_ray():
    # ``platform`` alone may be the standard library's module (mlflow imports it); our package's modules are
    # ``platform.<name>``, and importing any of them would load one.
    loaded = _imported(DASHBOARD_MODULES)
    assert set(DASHBOARD_MODULES) <= set(loaded)
    assert [m for m in loaded if m.startswith("platform.")] == []
    assert [m for m in loaded if m.split(".")[0] == "ray"] == []
    assert "run_format" in loaded
