"""Check that the numeric tests still catch real mistakes: break a copy of the code on purpose, run the tests that
guard it, and report by how much each comparison failed.

    .venv/bin/python scripts/broken_copies.py            # every mutation below
    .venv/bin/python scripts/broken_copies.py gather-order missing-ctx-all-reduce
    .venv/bin/python scripts/broken_copies.py --group checks          # issue 20's checks that could not fail
    .venv/bin/python scripts/broken_copies.py --group checks --long   # and the long tests that also guard them

Each mutation is one edit of one line in a copy of the working tree (this checkout is never touched). A mutation is
caught when its tests fail; for the comparisons of ``tests/numerics.py`` the report gives the measured difference
against the budget it broke (``ulps`` of the compared tensor's max-abs), so "by a wide margin" is a number.
Exit status 1 if any mutation goes uncaught.

Groups: ``numerics`` (the kernels' float comparisons) and ``checks`` (issue 20: the checks rewritten because they
could not fail -- overhead share, accuracies, published numbers, Ray not started, time bounds -- each broken the way
the old check would have let through). A mutation's ``long_tests`` (marked ``long``, minutes each) run only with
``--long``; one guarded by long tests alone is skipped without it. Not here: "real-data tests fail under CI when the
data root is missing" (``tests/real_data.py``'s ``missing``): no test runs that helper with the root missing and
``$CI`` set, and with the helper intact such a run fails by design, so there is nothing to catch a mutation with.
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
    long_tests: tuple[str, ...] = ()  # marked long: run with --long only


NUMERICS = (
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

# Issue 20's rewritten checks. Each edit keeps the broken value where the old check looked (a share in [0, 1], an
# accuracy in [0, 100], a published number in (10, 100), an accuracy that is not None, Ray "not started" once the
# suite's Ray is up, a load under 20 s), so only the rewritten check can catch it.
CHECKS = (
    Mutation("check-overhead-share", "a trial's overhead share taken over its busy time, clamped into [0, 1]",
             "platform/sweep/trial_runs.py", "overhead_share=max(0.0, wall - busy) / wall if wall > 0 else 0.0)",
             "overhead_share=min(1.0, max(0.0, wall - busy) / busy) if busy > 0 else 0.0)",
             ("tests/platform/test_trial_paths.py::test_trial_timing_splits_a_trials_wall_time",),
             ("tests/platform/test_trial_paths.py::test_a_killed_trial_process_is_retried_from_its_checkpoint",)),
    Mutation("check-macro-f1-confusion", "macro-F1's confusion matrix indexed by the target twice (always 100 %)",
             "coop_core/engine.py", "idx = target * n_cls + pred", "idx = target * n_cls + target",
             ("tests/test_learning.py::test_coop_improves_on_its_own_initial_prompt",)),
    Mutation("check-eval-acc-floor-division", "evaluation accuracy floor-divided to whole percents",
             "coop_core/engine.py", '"acc": 100.0 * int((pred == target).sum()) / max(len(target), 1),',
             '"acc": 100.0 * int((pred == target).sum()) // max(len(target), 1),',
             ("tests/test_learning.py::test_short_coop_run_on_real_eurosat",)),
    Mutation("check-train-acc-denominator", "training accuracy over the whole data set, not the epoch's items",
             "coop_core/engine.py", '"train_acc": 100.0 * float(stats[1]) / max(seen, 1),',
             '"train_acc": 100.0 * float(stats[1]) / max(n, 1),',
             ("tests/test_engine.py::test_report_and_validation_cadence",)),
    Mutation("check-published-b2n-digits", "CoOp's EuroSAT base-to-new new accuracy with two digits swapped",
             "coop_core/presets.py", '*_b2n("coop", "eurosat", 92.19, 54.74, 68.69),',
             '*_b2n("coop", "eurosat", 92.19, 45.74, 68.69),',
             ("tests/test_presets.py::test_published_results_reference_presets_and_agree_with_their_tables",)),
    Mutation("check-published-cross-digits", "CoOp's cross-dataset DTD accuracy with its last two digits swapped",
             "coop_core/presets.py", '"dtd": 41.92,', '"dtd": 41.29,',
             ("tests/test_presets.py::test_published_results_reference_presets_and_agree_with_their_tables",)),
    Mutation("check-sweep-test-acc", "a sweep summary giving the best trial's validation accuracy as its test accuracy",
             "platform/sweep/outcome.py", '"val_acc": best["val_acc"], "test_acc": best["test_acc"],',
             '"val_acc": best["val_acc"], "test_acc": best["val_acc"],',
             ("tests/platform/test_sweep.py::test_sweep_runs_every_trial_and_reports_the_best_by_validation",)),
    Mutation("check-run-test-acc", "a run's test accuracy logged from its test macro-F1",
             "platform/worker.py", '{"test_acc": done.test["acc"],', '{"test_acc": done.test["macro_f1"],', (),
             ("tests/platform/test_own_data.py::test_train_on_a_folder_logs_to_the_folders_experiment_with_its_"
              "classes",)),
    Mutation("check-ray-started", "--max-concurrent left to the tuner, which refuses it after Ray started",
             "platform/sweep/plan.py", "check_max_concurrent(self.max_concurrent)", "pass",
             ("tests/platform/test_bad_input.py::test_sweep_settings_out_of_range_are_refused_before_ray_starts",)),
    Mutation("check-load-decodes", "a folder dataset's existence check decoding every image (about 10 s on EuroSAT)",
             "coop_core/datasets/folder.py",
             "    missing = [p for p in paths if not (image_dir / p).is_file()]\n",
             "    from coop_core.datasets.base import read_rgb  # make sure each one is an image\n"
             "    missing = [p for p in paths if not (image_dir / p).is_file() or not read_rgb(image_dir / p)]\n",
             ("tests/test_folder_dataset.py::test_tree_with_coop_split_file",)),
    Mutation("check-real-data-skips-in-ci", "a missing real-data root skipped in CI as on a developer's machine",
             "tests/real_data.py", '    if os.environ.get("CI"):\n', "    if False:\n",
             ("tests/test_real_data.py::test_a_missing_data_root_fails_in_ci_and_skips_elsewhere",)),
)

# KgCoOp, ProGrad and CoCoOp against their references (tests/test_methods.py).
METHODS = (
    Mutation("kgcoop-sum-not-mean", "KgCoOp's text-feature term summed over classes instead of averaged",
             "coop_core/methods.py", "(1.0 - cos.mean())", "(1.0 - cos.sum())",
             ("tests/test_methods.py::test_kgcoop_step_equals_the_reference",)),
    Mutation("kgcoop-term-per-worker", "KgCoOp's class term added once per worker (not divided by their number)",
             "coop_core/methods.py", "(1.0 - cos.mean()) / world_size", "(1.0 - cos.mean())",
             ("tests/test_methods.py::test_two_workers_take_the_one_process_steps",)),
    Mutation("prograd-wrong-branch", "ProGrad projecting where the gradients agree instead of where they conflict",
             "coop_core/methods.py", "g_kl_hat.flatten()) < 0:", "g_kl_hat.flatten()) > 0:",
             ("tests/test_methods.py::test_prograd_step_equals_the_reference",)),
    Mutation("prograd-teacher-no-temperature", "ProGrad's teacher distribution without the temperature",
             "coop_core/methods.py", "soft = F.softmax(teacher / t, dim=-1)", "soft = F.softmax(teacher, dim=-1)",
             ("tests/test_methods.py::test_prograd_step_equals_the_reference",)),
    Mutation("prograd-unreduced-kl-gradient", "ProGrad comparing a worker's own distillation gradient (not summed)",
             "coop_core/methods.py", "            reduce(p.grad)\n            kl_grads.append",
             "            kl_grads.append",
             ("tests/test_methods.py::test_two_workers_take_the_one_process_steps",)),
    Mutation("cocoop-batch-mean-shift", "CoCoOp shifting every image's context by the batch's mean meta-net output",
             "coop_core/model.py", "ctx = pl.ctx.unsqueeze(0) + bias.unsqueeze(1)",
             "ctx = pl.ctx.unsqueeze(0) + bias.mean(0, keepdim=True).expand_as(bias).unsqueeze(1)",
             ("tests/test_methods.py::test_cocoop_step_equals_the_reference",
              "tests/test_methods.py::test_cocoop_conditions_each_image_on_its_own_features")),
)

GROUPS = {"numerics": NUMERICS, "checks": CHECKS, "methods": METHODS}
MUTATIONS = (*NUMERICS, *CHECKS, *METHODS)

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


def run(mutation: Mutation, python: str, long: bool = False) -> bool | None:
    """Whether ``mutation``'s tests caught it; None when only long tests guard it and ``long`` is off."""
    tests = (*mutation.tests, *mutation.long_tests) if long else mutation.tests
    if not tests:
        print(f"{mutation.name}: {mutation.what}\n    skipped: only long tests guard it (run with --long)")
        return None
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
        # A long test named here would be deselected by the default -m 'not load and not long': select by id only.
        marks = ["-m", ""] if long and mutation.long_tests else []
        proc = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *marks, *tests], cwd=copy,
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
    parser.add_argument("--group", action="append", choices=sorted(GROUPS), default=[],
                        help="also run every mutation of this group (repeatable)")
    parser.add_argument("--long", action="store_true", help="also run the mutations' long tests (minutes each)")
    parser.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"))
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTATIONS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"unknown mutation(s) {unknown}; choose from {sorted(by_name)}")
    chosen = dict.fromkeys([*args.names, *(m.name for g in args.group for m in GROUPS[g])]) or by_name
    results = [run(by_name[n], args.python, args.long) for n in chosen]
    return 0 if all(r is not False for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
