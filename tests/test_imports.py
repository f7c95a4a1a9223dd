"""``coop_core`` is the method only: importing it pulls in no distributed, tuning or tracking framework."""

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
