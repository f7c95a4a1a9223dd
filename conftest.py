"""Repository-root pytest set-up: make ``import platform.train`` work under pytest.

pytest imports the standard library's ``platform`` before any test runs, so our ``platform`` package (which also
re-exports the whole standard-library ``platform`` API) has to be installed explicitly; see ``platform/_compat.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_ROOT = Path(__file__).resolve().parent


def _install_platform_package() -> None:
    spec = importlib.util.spec_from_file_location("_coop_platform_compat", _ROOT / "platform" / "_compat.py")
    compat = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compat)
    compat.install(str(_ROOT))


_install_platform_package()
