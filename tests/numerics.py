"""How the tests compare floating-point results: each comparison says what it compares and tolerates exactly that.

Three kinds of comparison, three rules:

1. **Bit-identical by construction** (same kernels on the same inputs in the same order: a resumed run against a
   straight one in the same process, a cached tensor read back): ``torch.equal``. No tolerance.
2. **The same float32 math in another summation order** (a class shard against the full batch, a truncated prompt
   against all 77 tokens, the prompt path against open_clip's ``encode_text``, DDP against one process):
   :func:`assert_reordered`. Which order a reduction runs in depends on the CPU's kernels (ATen's DEFAULT/AVX2/AVX512
   builds, MKL's SSE4.2/AVX2/AVX-512 paths, the thread count), so the rounding differs from machine to machine. The
   difference is measured *relative to the scale of what is compared* — ``max|a - b| / max|b|`` — in units of
   float32's machine epsilon (``EPS``), and held to a budget of ulps for that kind of computation (below). An
   elementwise relative tolerance is wrong here (a gradient element that sums to nearly zero has no relative
   precision at all), and a fixed absolute one is fitted to the magnitudes of one test on one CPU.
3. **Known rounding of a short computation** (a vector normalised, then its norm taken): a bound from the
   computation itself (:func:`assert_unit_norm`).

Why budgets of this size: rounding of a length-``n`` dot product taken in another order is ~``sqrt(n) * EPS`` of its
scale (``n * EPS`` at worst); a tower chains a few such reductions per layer through layer norms, softmaxes and a final
normalisation, and a backward pass runs the chain again. The constants below are set well above the worst
difference measured over every kernel set we could run (``scripts/kernel_matrix.sh`` prints it per comparison) and
far below what a real mistake gives: ``scripts/broken_copies.py`` breaks a copy of the code (a wrong row order, a
missing all-reduce, a dropped shard) and prints by how many ulps each guarding comparison then fails.

Set ``COOP_NUMERICS_LOG=FILE`` to append one JSON line per comparison (test, what, measured ulps, budget), which is
how ``scripts/kernel_matrix.sh`` reports the headroom left on a machine.
"""

from __future__ import annotations

import json
import math
import os

import torch

EPS = torch.finfo(torch.float32).eps  # 1.19e-7: float32's relative rounding unit

# The budgets, in ulps of the compared tensor's max-abs. Measured on the tests' tiny towers (width 64, 2-4 layers):
# at most 14 ulps on every kernel set this project has run (ATen DEFAULT and AVX2, MKL SSE4.2 and AVX2, MKL_CBWR
# COMPATIBLE; scripts/kernel_matrix.sh); the AVX-512 machine of issue #16, where a fixed elementwise 1e-5 failed,
# was off by 1.19e-5 on a gradient whose max-abs is 27.7: 3.6 ulps. Each budget leaves >= 10x over the worst
# measured, and a real mistake (a wrong row, a missing all-reduce, a dropped shard) lands 10^4-10^7 ulps off.
# One forward pass through a text or image tower in another order (shard against full batch, truncated against full
# length, prompt path against encode_text, other batch sizes): ~10 chained width-64 reductions.
ONE_PASS = 128
# The same with a backward pass through it (a context gradient): the chain runs back through every layer again, and
# a shared context's gradient sums every class's contribution (more cancellation against its max).
FORWARD_BACKWARD = 256
# A short SGD trajectory (4-12 steps) taken in another order (DDP shards, class shards, a process on another node):
# each step's rounding moves the next step's inputs, and momentum carries it on.
TRAJECTORY = 1024


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|actual - expected| / max|expected|``: the largest difference in units of the compared tensor's scale."""
    actual, expected = torch.as_tensor(actual).detach().double(), torch.as_tensor(expected).detach().double()
    if actual.shape != expected.shape:
        raise AssertionError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    scale = expected.abs().max().item()
    if scale == 0.0:
        raise AssertionError("the expected tensor is all zeros: a scaled comparison needs a scale (use torch.equal)")
    return (actual - expected).abs().max().item() / scale


def _log(what: str, ulps: float, budget: float) -> None:
    path = os.environ.get("COOP_NUMERICS_LOG")
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
    with open(path, "a") as f:
        f.write(json.dumps({"test": test, "what": what, "ulps": ulps, "budget": budget}) + "\n")


def assert_reordered(actual: torch.Tensor, expected: torch.Tensor, budget: float, what: str) -> None:
    """Assert that ``actual`` is ``expected`` computed in another summation order: within ``budget`` ulps of float32
    (``EPS``) of ``max|expected|``, the whole tensor at once.

    Args:
        budget: the computation's allowance in ulps: ``ONE_PASS``, ``FORWARD_BACKWARD`` or ``TRAJECTORY``.
        what: what is compared, for the failure message and the numerics log.
    """
    ulps = scaled_error(actual, expected) / EPS
    _log(what, ulps, budget)
    assert ulps <= budget, (f"{what}: differs by {ulps:.0f} ulps of its max-abs ({ulps * EPS:.3g} relative), over the "
                            f"{budget:.0f} that another summation order can explain")


def assert_reordered_scalar(actual: float, expected: float, budget: float, what: str) -> None:
    """:func:`assert_reordered` for one number (a mean loss over the same batch, reduced in another order)."""
    assert_reordered(torch.tensor([float(actual)]), torch.tensor([float(expected)]), budget, what)


def assert_unit_norm(x: torch.Tensor, what: str = "norms") -> None:
    """Assert that each row of ``x`` was L2-normalised: its norm is 1 within the rounding of normalising and measuring
    a ``d``-wide vector (a sum of ``d`` squares, a square root and a division, then the same again): ``(d + 4) * EPS``
    at worst, whatever the kernels."""
    d = x.shape[-1]
    budget = d + 4
    ulps = (x.detach().double().norm(dim=-1) - 1.0).abs().max().item() / EPS
    _log(what, ulps, budget)
    assert ulps <= budget, f"{what}: a norm is off 1 by {ulps:.1f} ulps, over the {budget} of normalising {d} values"


def assert_probabilities(probs, what: str = "class probabilities") -> None:
    """Assert that ``probs`` (one row's class probabilities from a float32 softmax) sum to 1 within its rounding: the
    softmax's sum of ``n`` exponentials (``n`` ulps at worst), each exponential and division (2 more), then summed
    here in float64: ``(2 n + 4) * EPS``."""
    n = len(probs)
    budget = 2 * n + 4
    ulps = abs(math.fsum(float(p) for p in probs) - 1.0) / EPS
    _log(what, ulps, budget)
    assert ulps <= budget, f"{what}: sum to 1 {ulps:+.1f} ulps off, over the {budget} of a {n}-class softmax"
    assert min(probs) >= 0.0, f"{what}: a negative probability {min(probs)}"
