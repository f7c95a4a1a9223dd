"""The distributed layer of CoOp (Ray Train, Ray Tune, MLflow) -- and, unavoidably, the standard library's ``platform``.

This package is named ``platform`` so that ``python -m platform.train`` and ``python -m platform.tune`` read naturally
from the repository root. The standard library also has a ``platform`` module, imported by torch, ray, mlflow and
uuid; whichever of the two Python finds first is *the* ``platform`` of the process. So this package *is* a complete
standard-library ``platform`` as well: on import it takes over every name of ``platform.py`` (public and private:
``system``, ``uname_result``, ``_syscmd_ver``, ``_Processor``...) and every library keeps working.

- Imported first (``python -m platform.train`` from the repository root): the standard library's ``platform.py`` is
  executed *in this package's namespace*, so its functions, caches and classes belong to a module named
  ``platform`` (pickling ``platform.uname_result`` keeps working).
- Imported after the standard library's module (pytest, Ray workers): ``platform._compat.install`` executes this file
  as a new module and puts it in ``sys.modules["platform"]``; it copies the already imported module's names, so old
  and new importers share the very same objects.

The package is deliberately not installed into site-packages (see pyproject.toml): it would shadow the standard
library for every program in the environment.
"""

import os as _os
import sys as _sys
import sysconfig as _sysconfig

# Module-identity names that must stay this package's own.
_OWN_DUNDERS = frozenset({
    "__name__", "__qualname__", "__file__", "__path__", "__package__", "__spec__", "__loader__", "__cached__",
    "__builtins__", "__doc__", "__all__",
})


def _stdlib_platform_path() -> str:
    return _os.path.join(_sysconfig.get_paths()["stdlib"], "platform.py")


def _adopt_stdlib_platform(namespace: dict) -> None:
    """Fill ``namespace`` with the standard library ``platform`` module's names."""
    prior = _sys.modules.get("platform")
    if prior is not None and vars(prior) is not namespace and not hasattr(prior, "__path__"):
        # The standard library module is already imported: share its objects (and its caches).
        namespace.update({k: v for k, v in vars(prior).items() if k not in _OWN_DUNDERS})
        return
    path = _stdlib_platform_path()
    with open(path, encoding="utf-8") as fh:
        code = compile(fh.read(), path, "exec")
    doc = namespace.get("__doc__")
    exec(code, namespace)  # the stdlib module's body, run as this module's body
    namespace["__doc__"] = doc


_adopt_stdlib_platform(globals())
