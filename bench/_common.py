"""Shared helpers for the benchmarks: timing, machine description, the reference text path, output.

Every benchmark measures its baseline and its candidate side by side in one process, interleaving repetitions so that
load from other processes on a shared machine hits both alike. Times are reported as the median of the repetitions
(and the minimum, the best estimate of the unloaded cost when neighbours are noisy).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from coop_core.datasets.eurosat import EUROSAT_CLASSNAMES as _EUROSAT_NAMES

# CoOp's readable EuroSAT class names in label order (sorted class folders), from the dataset module itself.
EUROSAT_CLASSNAMES: tuple[str, ...] = tuple(_EUROSAT_NAMES[folder] for folder in sorted(_EUROSAT_NAMES))


# A tiny CLIP (2 layers per tower) for --quick smoke runs, written to a model-config JSON by ``tiny_clip_config``.
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


REPO = Path(__file__).resolve().parents[1]

# A fixed glibc mmap threshold (the default one adapts upwards as large blocks are freed, after which freed tensors
# stay in the heap and inflate the RSS at random): every block of 128 KiB or more is mapped and unmapped on its own, so
# the resident set follows the memory that is live. glibc reads these at start-up: they are for fresh subprocesses.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def worker_env() -> dict[str, str]:
    """Environment of a measuring subprocess: the repository importable, glibc's mmap threshold pinned."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.update(MALLOC_ENV)
    return env


def rss_kb(field: str) -> int:
    """A memory field of this process from ``/proc/self/status`` (``VmRSS``: now, ``VmHWM``: peak), in KiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def peak_rss_kb(reset: bool) -> int:
    """Peak RSS (KiB) since :func:`reset_peak_rss` returned ``reset``; without a reset, since the process started."""
    return rss_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


_FILL_CACHE = """
import sys
from platform.run_spec import RunSpec, load_splits
from coop_core.backbone import load_clip
from coop_core.config import TrainConfig
from coop_core.fewshot import build_few_shot
from coop_core.pipeline import prepare_features
data_root, cache_dir, max_test, shots, epochs, n_views, backbone = sys.argv[1:]
spec = RunSpec(dataset="eurosat", data_root=data_root, cache_dir=cache_dir, max_test_items=int(max_test),
               train=TrainConfig(shots=int(shots), epochs=int(epochs), n_views=int(n_views)))
splits = load_splits(spec)
fewshot = build_few_shot(splits, spec.train.shots, spec.train.seed, spec.cache_dir)
prepare_features(load_clip(backbone, "none"), splits, fewshot, spec.train, cache_dir=spec.cache_dir)
"""


def fill_eurosat_feature_cache(data_root: str | Path, cache_dir: str | Path, *, max_test_items: int, shots: int,
                               epochs: int, n_views: int, backbone: str, timeout: float) -> None:
    """Compute a EuroSAT sweep's image features (random-weight ``backbone``) into the disk cache once, in a child
    process where ``platform`` is ours, so that neither side of a sweep benchmark pays the one-time extraction."""
    subprocess.run([sys.executable, "-c", _FILL_CACHE, str(data_root), str(cache_dir), str(max_test_items),
                    str(shots), str(epochs), str(n_views), backbone], cwd=REPO, check=True, timeout=timeout)


def imagenet_subset(n: int, tokenizer) -> list[str]:
    """``n`` ImageNet class names spread over the list, always including the longest one (in tokens)."""
    import open_clip

    names = list(open_clip.IMAGENET_CLASSNAMES)
    if n >= len(names):
        return names[:n] if n == len(names) else names + [f"class name {i}" for i in range(len(names), n)]
    longest = int(tokenizer(names).argmax(dim=-1).argmax())
    step = len(names) / n
    picked = [int(i * step) for i in range(n)]
    if longest not in picked:
        picked[-1] = longest
    return [names[i] for i in picked]


def tiny_clip_config(directory: str | Path) -> str:
    """Write the tiny CLIP's model-config JSON into ``directory``; returns its path (usable as an architecture)."""
    path = Path(directory) / "bench-tiny.json"
    path.write_text(json.dumps(TINY_CLIP_CONFIG))
    return str(path)


@dataclass
class Timing:
    """Wall times (seconds) of the repetitions of one measured callable."""

    name: str
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    def as_dict(self) -> dict[str, float | int]:
        return {"median_s": self.median, "min_s": self.min, "reps": len(self.times)}


def time_once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                inner: dict[str, int] | None = None) -> dict[str, Timing]:
    """Time several callables side by side: ``warmup`` untimed rounds, then ``reps`` rounds of each in turn.

    ``inner[name] = k`` runs that callable ``k`` times per round and records each call (cheap callables get more
    samples without making the expensive ones take longer).
    """
    inner = inner or {}
    out = {name: Timing(name) for name in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(reps):
        for name, fn in fns.items():
            for _ in range(inner.get(name, 1)):
                out[name].times.append(time_once(fn))
    return out


def paired_ratio(num: Timing, den: Timing, num_per_round: int = 1, den_per_round: int = 1,
                 den_scale: float = 1.0) -> float:
    """Median over rounds of ``median(num in round) / (den_scale * median(den in round))``.

    Calls of the same round ran back to back, so they saw the same load from other processes: the per-round ratio
    cancels most of that noise, and the median over rounds discards the rounds it did not.
    """
    rounds = min(len(num.times) // num_per_round, len(den.times) // den_per_round)
    ratios = []
    for r in range(rounds):
        n = statistics.median(num.times[r * num_per_round:(r + 1) * num_per_round])
        d = statistics.median(den.times[r * den_per_round:(r + 1) * den_per_round])
        ratios.append(n / (den_scale * d))
    return statistics.median(ratios)


def set_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (default: torch's default, all cores); returns the number in use."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine() -> dict[str, object]:
    """What the numbers were measured on, including the load from other processes (noise indicator)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "loadavg_1m": round(load[0], 2),
    }


def machine_line(info: dict[str, object]) -> str:
    line = (f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} with {info['torch_threads']} "
            f"threads, load average {info['loadavg_1m']}")
    if info["loadavg_1m"] > (info["cores"] or 1) + 1:  # this benchmark's own threads count in the load too
        line += (" -- WARNING: other processes compete for these cores; multi-threaded small kernels suffer most "
                 "(ours more than the reference): rerun when idle, or compare with --threads 1")
    return line


def reference_text_features(model: torch.nn.Module, truncate: bool = False) -> torch.Tensor:
    """Normalised class text features the way the reference CoOp computes them, through open_clip's own modules.

    Reference CoOp's ``TextEncoder``: prompts + positional embedding -> CLIP's text transformer with its causal mask
    over the full context length (77) -> ``ln_final`` -> feature at the end-of-text token -> projection. It calls
    open_clip's modules directly, so it stays the baseline whatever ``coop_core.text_encoder`` does. ``truncate``
    cuts the sequence after the longest end-of-text position but still runs open_clip's blocks (the stock path).
    """
    te = model.text_encoder
    prompts = model.prompt_learner()  # (n_cls, 77, width)
    eot = model.prompt_learner.eot_idx
    seq = int(eot.max()) + 1 if truncate else prompts.shape[1]
    x = prompts[:, :seq] + te.positional_embedding[:seq].to(prompts.dtype)  # (n_cls, seq, width)
    x = te.transformer(x, attn_mask=te.attn_mask[:seq, :seq])  # (n_cls, seq, width)
    x = te.ln_final(x)
    x = x[torch.arange(x.shape[0]), eot]  # (n_cls, width)
    x = x @ te.text_projection if not isinstance(te.text_projection, torch.nn.Linear) else te.text_projection(x)
    return F.normalize(x, dim=-1)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain fixed-width table on stdout."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for j, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
        return f"{value:.2e}"
    return str(value)


def emit_json(obj: dict) -> None:
    """The machine-readable result: one JSON object on the last line of stdout."""
    print(json.dumps(obj, sort_keys=True, default=float), flush=True)
