"""``python -m platform`` keeps the standard library's behaviour: print the platform string.

Scripts and bug-report templates run ``python -m platform``; from the repository root they now reach this package,
so it answers exactly as the standard library would. The CoOp commands are ``python -m platform.train`` and
``python -m platform.tune``.
"""

import platform
import sys

if hasattr(platform, "_main"):  # Python >= 3.13: argparse-based CLI
    platform._main()
else:  # Python <= 3.12: the module's ``if __name__ == "__main__"`` block
    terse = "terse" in sys.argv or "--terse" in sys.argv
    aliased = "nonaliased" not in sys.argv and "--nonaliased" not in sys.argv
    print(platform.platform(aliased, terse))
sys.exit(0)
