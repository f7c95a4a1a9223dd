"""Check that the numeric tests still catch real mistakes: break a copy of the code on purpose, run the tests that
guard it, and report by how much each comparison failed.

    .venv/bin/python scripts/broken_copies.py            # every mutation below
    .venv/bin/python scripts/broken_copies.py gather-order missing-ctx-all-reduce

Each mutation is one edit of one line in a copy of the working tree (this checkout is never touched). A mutation is
caught when its tests fail; for the comparisons of ``tests/numerics.py`` the report gives the measured difference
against the budget it broke (``ulps`` of the compared tensor's max-abs), so "by a wide margin" is a number.
Exit status 1 if any mutation goes uncaught.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation("subset-row-order", "a class subset's end-of-text positions in the wrong row order",
             "coop_core/model.py", "else pl.eot_idx[classes]  # (n,)", "else pl.eot_idx[classes].flip(0)  # (n,)",
             ("tests/test_distributed.py::test_a_class_subset_encodes_exactly_those_rows_of_the_full_text_step",)),
    Mutation("gather-order", "each gathered class shard put back in reversed row order",
             "coop_core/distributed.py", "out[classes.to(out.device)] = rows[: len(classes)]",
             "out[classes.to(out.device).flip(0)] = rows[: len(classes)]",
             ("tests/test_distributed.py::test_gather_puts_scattered_shards_into_class_order_and_returns_own_rows_of_"
              "the_summed_gradient", "tests/test_distributed.py::test_two_gloo_workers_class_sharded_take_the_one_"
              "process_steps")),
    Mutation("dropped-class-shard", "the last worker's class shard left out of the gathered features (zeros)",
             "coop_core/distributed.py",
             "out = local.new_empty(sum(sizes), local.shape[1])  # (n_cls, d)\n"
             "        for rows, classes in zip(gathered, shards):",
             "out = local.new_zeros(sum(sizes), local.shape[1])  # (n_cls, d)\n"
             "        for rows, classes in list(zip(gathered, shards))[:-1]:",
             ("tests/test_distributed.py::test_two_gloo_workers_class_sharded_take_the_one_process_steps",)),
    Mutation("missing-gather-all-reduce", "the class-sharded gather's backward without its all-reduce",
             "coop_core/distributed.py", "ctx.dist.all_reduce_sum_(grad)  # every worker's images",
             "pass  # every worker's images",
             ("tests/test_distributed.py::test_two_gloo_workers_class_sharded_take_the_one_process_steps",
              "tests/test_engine.py::test_sharded_training_takes_exactly_the_single_process_steps")),
    Mutation("missing-ctx-all-reduce", "DDP without the context gradient's all-reduce",
             "coop_core/engine.py", "                dist.all_reduce_sum_(grad)\n", "                pass\n",
             ("tests/test_engine.py::test_sharded_training_takes_exactly_the_single_process_steps",
              "tests/test_distributed.py::test_two_gloo_workers_class_sharded_take_the_one_process_steps")),
    Mutation("dropped-image-shard", "every third image of a global batch dropped from the workers' shards",
             "coop_core/engine.py", "shard = batch[dist.rank :: dist.world_size]",
             "shard = batch[dist.rank :: dist.world_size + 1]",
             ("tests/test_engine.py::test_sharded_training_takes_exactly_the_single_process_steps",)),
    Mutation("shared-prefix-off-by-one", "the shared prompt prefix one position too long (a class token shared)",
             "coop_core/model.py", "return 1 + (pl.n_ctx if pl.class_token_position", "return 2 + (pl.n_ctx if "
             "pl.class_token_position",
             ("tests/test_text_encoder.py::test_golden_prompt_with_photo_context_reproduces_encode_text",)),
)

ULPS = re.compile(r"(?P<what>[^\n:]*): differs by (?P<ulps>\d+) ulps of its max-abs \([^)]*\), "
                  r"over the (?P<budget>\d+)")


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    for rel in files:
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run(mutation: Mutation, python: str) -> bool:
    with tempfile.TemporaryDirectory(prefix=f"broken-{mutation.name}-") as tmp:
        copy = Path(tmp) / "repo"
        _copy_tree(copy)
        target = copy / mutation.path
        text = target.read_text()
        if text.count(mutation.old) != 1:
            raise SystemExit(f"{mutation.name}: the line to break is not (once) in {mutation.path}; update this script")
        target.write_text(text.replace(mutation.old, mutation.new))
        env = dict(os.environ, COOP_DATA_ROOT=os.environ.get("COOP_DATA_ROOT", str(REPO.parent / "shared" / "data")))
        env.pop("COOP_NUMERICS_LOG", None)
        # `python -m` puts the copy first on sys.path, ahead of the checkout's editable install: check that it is the
        # copy's coop_core the tests will import. -p no:cacheprovider: nothing written into the copy.
        where = subprocess.run([python, "-c", "import coop_core; print(coop_core.__file__)"], cwd=copy, env=env,
                               check=True, capture_output=True, text=True).stdout.strip()
        if not Path(where).is_relative_to(copy):
            raise SystemExit(f"the broken copy's tests would import {where}, not the copy's coop_core")
        proc = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *mutation.tests], cwd=copy,
                              env=env, capture_output=True, text=True)
        out = proc.stdout + proc.stderr
    summary = (re.findall(r"^=*\s*(\d+ (?:failed|passed).*?)\s*=*$", out, re.M) or [f"rc {proc.returncode}"])[-1]
    caught = proc.returncode == 1 and "failed" in summary
    print(f"{mutation.name}: {mutation.what}\n    {'caught' if caught else 'NOT CAUGHT'}: {summary}")
    failures: dict[str, list[tuple[int, int]]] = {}
    for m in ULPS.finditer(out):
        failures.setdefault(m["what"].strip(), []).append((int(m["ulps"]), int(m["budget"])))
    for what, found in failures.items():  # the smallest miss of each comparison is its margin
        ulps, budget = min(found)
        print(f"    {what}: failed {len(found)}x, by at least {ulps:,} ulps against a budget of {budget} "
              f"({ulps / budget:,.0f}x)")
    if caught and not failures:
        for line in re.findall(r"^E\s+(.*)$", out, re.M)[:2]:
            print(f"    {line[:150]}")
    return caught


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = ", ".join(m.name for m in MUTATIONS)
    parser.add_argument("names", nargs="*", help=f"mutations to run (default all: {names})")
    parser.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"))
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTATIONS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"unknown mutation(s) {unknown}; choose from {sorted(by_name)}")
    results = [run(by_name[n], args.python) for n in (args.names or by_name)]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
