"""Packed sweeps (``--pack-size``): several configurations trained in one Tune trial on one CLIP, each still a trial
of its own -- its own MLflow child run, ASHA decision at ASHA's rungs, Optuna result, checkpoint and registration --
and a packed grid giving each configuration the results of its solo trial.

The ASHA rule for packs (``platform.sweep.halving``) is checked against Ray's own bracket on random result
sequences; the sweeps run on real EuroSAT with the tests' ridge-aligned tiny ViT (so configurations differ).
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from pathlib import Path
from platform.pack_worker import _Report, _Reporter
from platform.sweep.halving import AshaRungs, RungsClient
from platform.sweep.pack_search import PackedOptunaSearch
from platform.sweep.packs import chunk, pack_sizes
from platform.sweep.tuner import to_tune_space
from platform.tracking import EARLY_STOPPED_TAG, TRIAL_TAG
from platform.tune import main
from types import SimpleNamespace

import pytest
from cli_runs import aligned_sweep, child_runs, mlflow_client, run_cli
from numerics import TRAJECTORY, assert_reordered_scalar
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from tune_spaces import space_for

EPOCHS = 4


@pytest.mark.parametrize(("max_t", "grace", "rf"), [(9, 1, 2), (9, 2, 3), (4, 1, 2), (20, 3, 2.5)])
def test_the_pack_rule_decides_as_rays_asha_bracket(max_t, grace, rf):
    from ray.tune.schedulers.async_hyperband import _Bracket

    rng = random.Random(max_t * 100 + grace)
    for _ in range(20):
        ours, rays = AshaRungs(max_t, grace, rf), _Bracket(grace, max_t, rf, 0)
        epoch = {f"t{i}": 0 for i in range(rng.randint(2, 12))}
        stopped: set[str] = set()
        while running := [t for t in epoch if t not in stopped and epoch[t] < max_t]:
            t = rng.choice(running)  # the trials report in an interleaved order, as concurrent packs do
            epoch[t] += 1
            value = rng.choice([rng.random() * 100, round(rng.random() * 10) * 10.0])  # ties too
            ray_stop = epoch[t] >= max_t or _Bracket.on_result(rays, SimpleNamespace(trial_id=t), epoch[t],
                                                                value) == "STOP"
            assert ours.stop(t, epoch[t], value) == ray_stop, (t, epoch[t], value)
            if ray_stop:
                stopped.add(t)
        restored = AshaRungs.from_dict(ours.to_dict())  # what a resumed sweep reads back
        assert restored.rungs == ours.rungs


@pytest.mark.parametrize(("max_t", "grace", "rf"), [(9, 1, 2), (9, 2, 3), (20, 3, 2.5), (40, 1, 3)])
def test_a_pack_asks_the_rungs_only_where_they_could_stop_it_and_gets_their_answers(max_t, grace, rf):
    rng = random.Random(max_t * 7 + grace)
    for trial in range(20):
        direct, behind = AshaRungs(max_t, grace, rf), AshaRungs(max_t, grace, rf)
        asked = []

        def ask(key, epoch, value, behind=behind, asked=asked):
            asked.append((key, epoch))
            return behind.stop(key, epoch, None if value is None or math.isnan(value) else value)  # as RungsActor

        milestones = [m for m, _ in behind.rungs]
        clients = [RungsClient(ask, max_t, milestones) for _ in range(2)]  # two packs of one sweep
        keys = {f"t{i}": clients[i % 2] for i in range(rng.randint(2, 12))}
        epoch, stopped = dict.fromkeys(keys, 0), set()
        if trial % 4 == 3:  # a resumed sweep: the actor holds records the new packs' clients never saw
            for key in keys:
                value = rng.random() * 100
                direct.stop(key, grace, value)
                behind.stop(key, grace, value)
                epoch[key] = grace
        while running := [t for t in epoch if t not in stopped and epoch[t] < max_t]:
            t = rng.choice(running)
            epoch[t] += 1
            value = rng.choice([rng.random() * 100, round(rng.random() * 10) * 10.0, None, float("nan")])
            expected = direct.stop(t, epoch[t], None if value is None or math.isnan(value) else value)
            assert keys[t].stop(t, epoch[t], value) == expected, (t, epoch[t], value)
            if expected:
                stopped.add(t)
        assert behind.rungs == direct.rungs  # the actor recorded exactly what it would have been asked every epoch
    # A configuration that reports a value every epoch asks once per rung, not once per epoch.
    asked = []
    client = RungsClient(lambda *a: asked.append(a) or False, max_t, [m for m, _ in AshaRungs(max_t, grace, rf).rungs])
    assert [client.stop("t", e, 50.0) for e in range(1, max_t + 1)] == [False] * (max_t - 1) + [True]
    assert [e for _, e, _ in asked] == sorted({math.ceil(m) for m, _ in AshaRungs(max_t, grace, rf).rungs})


def test_packs_are_cut_evenly():
    assert [len(p) for p in chunk([{}] * 7, 4)] == [4, 3]
    assert [len(p) for p in chunk([{}] * 32, 5)] == [5, 5, 5, 5, 4, 4, 4]
    assert [len(p) for p in chunk([{"i": i} for i in range(6)], 1)] == [1] * 6
    assert chunk([{"i": i} for i in range(5)], 2) == [[{"i": 0}, {"i": 1}], [{"i": 2}, {"i": 3}], [{"i": 4}]]
    assert chunk([], 3) == []
    assert pack_sizes(7, 4) == [4, 3] and pack_sizes(0, 4) == []


def test_a_packed_grid_is_cut_into_packs_of_even_work():
    """The benchmark's grid (n_ctx first) cut in order makes one pack of short prompts and one of long ones; cut by
    ``text_step_cost`` the two packs' estimated work is within one configuration's, sizes as ``pack_sizes`` says,
    every configuration once and each pack in the grid's order."""
    from platform.run_spec import RunSpec
    from platform.sweep.packs import grid_configs, text_step_cost
    from platform.trials import trial_spec

    from coop_core.config import ModelConfig

    grid = {"prompt.n_ctx": [4, 8, 16], "prompt.class_token_position": ["end", "middle", "front"],
            "prompt.csc": [False, True], "train.lr": [0.002, 0.02]}
    configs = grid_configs(grid)
    base = RunSpec(dataset="eurosat", data_root="/data",
                   model=ModelConfig(backbone="ViT-B-16", pretrained="none")).to_dict()
    costs = [text_step_cost(trial_spec(base, c), 10, 27000) for c in configs]
    key = [tuple(sorted(c.items())) for c in configs]

    def work(packs):
        return [sum(costs[key.index(tuple(sorted(c.items())))] for c in p) for p in packs]

    in_order, balanced = chunk(configs, 18), chunk(configs, 18, costs)
    assert max(work(in_order)) > 1.5 * min(work(in_order))  # what the grid's order gave
    assert [len(p) for p in balanced] == [18, 18]
    assert sorted(map(key.index, (tuple(sorted(c.items())) for p in balanced for c in p))) == list(range(36))
    assert max(work(balanced)) - min(work(balanced)) <= max(costs)
    for p in balanced:
        idx = [key.index(tuple(sorted(c.items()))) for c in p]
        assert idx == sorted(idx)
    # the estimate: unified context at the end shares its prefix; CSC, shots and epochs scale it
    spec = trial_spec(base, {"prompt.n_ctx": 16, "prompt.csc": False, "prompt.class_token_position": "end"})
    csc = trial_spec(base, {"prompt.n_ctx": 16, "prompt.csc": True, "prompt.class_token_position": "end"})
    assert text_step_cost(csc, 10, 27000) / text_step_cost(spec, 10, 27000) == pytest.approx(200 / 56)
    assert text_step_cost(trial_spec(base, {"train.shots": "all"}), 10, 27000) > text_step_cost(spec, 10, 27000)
    with pytest.raises(ValueError, match="2 costs for 3 configurations"):
        chunk([{}] * 3, 2, [1.0, 2.0])



class _SlowSession:
    """A Tune session whose report takes ``delay`` seconds (the driver's round trip), recording what it was given;
    its ``stop_after``-th report raises SystemExit, as Tune's does for a trial it stops."""

    def __init__(self, delay: float, stop_after: int | None = None) -> None:
        self.delay, self.stop_after, self.reports = delay, stop_after, []

    def report(self, metrics, checkpoint_dir) -> None:
        time.sleep(self.delay)
        files = sorted(p.name for p in checkpoint_dir.iterdir()) if checkpoint_dir is not None else None
        self.reports.append((metrics, checkpoint_dir, files))
        if self.stop_after is not None and len(self.reports) >= self.stop_after:
            raise SystemExit(0)


def _put_epochs(reporter, n: int, *, checkpoint_every: int, members=("a", "b"), epoch_s: float = 0.0) -> list:
    """Put ``n`` pack epochs of ``epoch_s`` seconds each (each member one row per epoch, a checkpoint every
    ``checkpoint_every``); returns the folders the checkpoints were written to (a checkpoint is written only when its
    report is sent)."""
    written = []

    def writer(epoch: int):
        def write():
            checkpoint = tempfile.TemporaryDirectory()
            (Path(checkpoint.name) / f"epoch-{epoch}").write_text("")
            written.append(Path(checkpoint.name))
            return checkpoint
        return write

    for epoch in range(1, n + 1):
        time.sleep(epoch_s)
        rows = {m: [{"epoch": epoch, "train_loss": 1.0 / epoch}] for m in members}
        reporter.put(_Report({"epoch": epoch}, rows, writer(epoch) if epoch % checkpoint_every == 0 else None))
    return written


def test_a_pack_trains_on_while_its_reports_wait_for_the_driver_and_every_epoch_is_reported_once():
    """Reports go from a thread of their own: putting 30 epochs does not wait for a session that takes 0.2 s a
    report; the reports carry each member's epochs once and in order, the last one carries the last epoch and its
    checkpoint, a checkpoint replaced while waiting is never written, and each one reported is removed after."""
    session = _SlowSession(0.2)
    reporter = _Reporter(session, interval=0.0)
    t0 = time.perf_counter()
    written = _put_epochs(reporter, 30, checkpoint_every=5, epoch_s=0.01)
    put_s = time.perf_counter() - t0
    reporter.close()
    assert put_s < 0.2 * 30 / 3, put_s  # not one round trip per epoch (measured: ~0.3 s against 6 s)
    assert 2 <= len(session.reports) < 30
    for member in ("a", "b"):
        epochs = [row["epoch"] for metrics, _, _ in session.reports for row in metrics["member_epochs"][member]]
        assert epochs == list(range(1, 31)), member
    last, last_dir, last_files = session.reports[-1]
    assert last["epoch"] == 30 and last_files == ["epoch-30"]
    reported = [d for _, d, _ in session.reports if d is not None]
    assert reported == written, "a checkpoint was written that was never reported"
    assert all(not d.exists() for d in written), "a checkpoint folder was left behind"
    epochs = [int(files[0].split("-")[1]) for _, d, files in session.reports if d is not None]
    assert epochs == sorted(epochs) and epochs[-1] == 30


def test_a_pack_reports_at_most_once_an_interval_and_its_last_report_at_once():
    session = _SlowSession(0.0)
    reporter = _Reporter(session, interval=5.0)
    t0 = time.perf_counter()
    for epoch in range(1, 6):
        reporter.put(_Report({"epoch": epoch}, {"a": [{"epoch": epoch}]}, None))
        time.sleep(0.1)
    reporter.close()  # the last report goes at once, not when the interval is over
    wall = time.perf_counter() - t0
    assert [m["epoch"] for m, _, _ in session.reports] == [1, 5] and wall < 3.0, (session.reports, wall)
    assert [r["epoch"] for r in session.reports[1][0]["member_epochs"]["a"]] == [2, 3, 4, 5]


def test_a_trial_tune_stops_ends_at_the_packs_next_epoch_and_leaves_no_checkpoint_folder():
    session = _SlowSession(0.05, stop_after=1)
    reporter = _Reporter(session, interval=0.0)
    written = []  # each put's list of written folders, filled when its report is sent
    with pytest.raises(SystemExit):
        for _ in range(100):  # SystemExit reaches the training thread at a put once the report raised it
            written.append(_put_epochs(reporter, 1, checkpoint_every=1))
            time.sleep(0.02)
    reporter.close(raise_error=False)
    folders = [d for w in written for d in w]
    assert len(session.reports) == 1 and len(folders) == 1 and not folders[0].exists()
    with pytest.raises(SystemExit):
        reporter.close()


def test_a_pack_checkpoint_that_cannot_be_written_fails_the_pack_at_its_next_epoch():
    """A checkpoint is written when its report is sent, in the reporter's thread: a full disk there is raised in
    the training thread at the next put (or at close), as it would have been where the pack wrote it before."""
    from platform.artifacts import CheckpointError

    def full_disk():
        raise CheckpointError("cannot write the checkpoint in /tmp/x (No space left on device); free space there")

    session = _SlowSession(0.0)
    reporter = _Reporter(session, interval=0.0)
    reporter.put(_Report({"epoch": 1}, {"a": [{"epoch": 1}]}, full_disk))
    with pytest.raises(CheckpointError, match="No space left on device"):
        for _ in range(100):
            time.sleep(0.02)
            reporter.put(_Report({"epoch": 2}, {"a": [{"epoch": 2}]}, None))
    with pytest.raises(CheckpointError):
        reporter.close()
    assert session.reports == []

@pytest.fixture(scope="module")
def packed(ray_session, small_eurosat_root, shared_data, feature_cache, tiny_vit_config, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("packed")
    _, uri, common = aligned_sweep(tmp, data_root=small_eurosat_root, shared_data=shared_data,
                                   feature_cache=feature_cache, tiny_vit_config=tiny_vit_config)
    common = [*common, "--batch-size", "8", "--warmup-epochs", "0"]
    # One pack at a time, so ASHA's records fill in a known order that the test replays.
    search = run_cli(main, [*common, "--epochs", str(EPOCHS), "--num-samples", "6", "--pack-size", "3",
                            "--max-concurrent", "1", "--sweep-name", "search"])
    grid = ["--epochs", "2", "--grace-period", "2", "--grid", "prompt.n_ctx=4,8",
            "prompt.class_token_position=end,front", "--experiment", "grids"]
    solo = run_cli(main, [*common, *grid, "--pack-size", "1", "--sweep-name", "grid-solo"])
    together = run_cli(main, [*common, *grid, "--pack-size", "4", "--sweep-name", "grid-packed"])
    return {"uri": uri, "tmp": tmp, "search": search, "solo": solo, "together": together}


def _runs(packed: dict, sweep: str) -> list:
    return child_runs(mlflow_client(packed["uri"]), packed[sweep]["summary"]["parent_run_id"])


def test_a_packed_sweep_has_one_child_run_per_configuration_and_registers_a_member(packed):
    s = packed["search"]["summary"]
    assert s["pack_size"] == 3 and s["trials"] == 6 and s["trials_errored"] == 0
    assert s["trials_finished"] + s["trials_early_stopped"] == 6 and s["trials_finished"] >= 1
    runs = _runs(packed, "search")
    ids = sorted(r.data.tags[TRIAL_TAG] for r in runs)
    assert len(ids) == 6 and len({i.rsplit("-m", 1)[0] for i in ids}) == 2  # two packs of three
    assert {i.rsplit("-m", 1)[1] for i in ids} == {"0", "1", "2"}
    assert {r.info.status for r in runs} == {"FINISHED"}
    client = mlflow_client(packed["uri"])
    for r in runs:  # each configuration's own epochs, and the finished ones their own prompts and test accuracy
        epochs = [int(m.step) for m in client.get_metric_history(r.info.run_id, "val_acc")]
        finished = r.data.tags[EARLY_STOPPED_TAG] == "false"
        assert epochs == list(range(1, (EPOCHS if finished else len(epochs)) + 1)), r.data.tags[TRIAL_TAG]
        if finished:
            assert "test_acc" in r.data.metrics and "registry_acc" in r.data.metrics
            assert "prompts" in {a.path for a in client.list_artifacts(r.info.run_id)}
    best = next(r for r in runs if r.data.tags[TRIAL_TAG] == s["best_trial_id"])
    assert s["registered_version"] == 1 and best.info.run_id == s["best_run_id"]
    assert s["val_acc"] == pytest.approx(max(r.data.metrics["val_acc"] for r in runs
                                             if r.data.tags[EARLY_STOPPED_TAG] == "false"))
    version = client.get_model_version("coop-eurosat", "1")
    assert version.tags["trial_id"] == s["best_trial_id"] and version.run_id == best.info.run_id


def test_each_configuration_of_a_pack_is_stopped_by_ashas_rule_at_ashas_rungs(packed):
    """Replay the sweep's validation accuracies through ASHA's rule in the order they were decided (packs one after
    the other, epoch by epoch, member by member): the configurations it stops are exactly those the sweep stopped,
    after the same epoch."""
    client = mlflow_client(packed["uri"])
    runs = sorted(_runs(packed, "search"), key=lambda r: (r.info.start_time, r.data.tags[TRIAL_TAG]))
    history = {r.data.tags[TRIAL_TAG]: {int(m.step): m.value for m in client.get_metric_history(r.info.run_id,
                                                                                                  "val_acc")}
               for r in runs}
    packs: dict[str, list[str]] = {}
    for r in runs:
        packs.setdefault(r.data.tags[TRIAL_TAG].rsplit("-m", 1)[0], []).append(r.data.tags[TRIAL_TAG])
    rungs, expected = AshaRungs(EPOCHS, 1, 2.0), {}
    for members in packs.values():
        running = sorted(members)
        for epoch in range(1, EPOCHS):
            for mid in list(running):
                if rungs.stop(mid, epoch, history[mid][epoch]):
                    expected[mid] = epoch
                    running.remove(mid)
    stopped = {mid: max(h) for mid, h in history.items() if max(h) < EPOCHS}
    assert stopped == expected and stopped, (stopped, expected)
    assert {r.data.tags[TRIAL_TAG] for r in runs if r.data.tags[EARLY_STOPPED_TAG] == "true"} == set(stopped)
    assert packed["search"]["summary"]["trials_early_stopped"] == len(stopped)


def test_optuna_is_told_every_configurations_result(packed):
    sweep_dir = packed["tmp"] / "ray" / "search"
    saved = next(sweep_dir.glob("searcher-state-*.pkl"))  # Tune's name; PackedOptunaSearch writes JSON in it
    client = mlflow_client(packed["uri"])
    last = sorted(client.get_metric_history(r.info.run_id, "val_acc")[-1].value for r in _runs(packed, "search"))
    state = json.loads(saved.read_text())
    assert len(state["told"]) == 6 and {t["state"] for t in state["told"]} == {"COMPLETE"}
    assert sorted(t["value"] for t in state["told"]) == pytest.approx(last)
    assert state["asked"] == {} and state["sizes"] == []
    # what a resumed sweep's searcher rebuilds: TPE's study with every configuration told
    space = OptunaSearch.convert_search_space(to_tune_space(space_for("eurosat", "a centered satellite photo of {}.")))
    searcher = PackedOptunaSearch(space, pack_size=3, num_configs=6, seed=1, metric="val_acc", mode="max")
    searcher.restore(str(saved))
    assert sorted(t.value for t in searcher.study.trials) == pytest.approx(last)
    assert searcher.suggest("next") == Searcher.FINISHED


def test_a_packed_grid_gives_every_configuration_its_solo_trials_results(packed):
    """The same four configurations as one pack of four and as four trials: the same epochs, losses (up to float
    rounding in another order), accuracies; one run each either way."""
    client = mlflow_client(packed["uri"])

    def by_config(sweep: str) -> dict:
        out = {}
        for r in _runs(packed, sweep):
            key = (r.data.params["prompt.n_ctx"], r.data.params["prompt.class_token_position"])
            assert key not in out, key
            out[key] = {k: [m.value for m in client.get_metric_history(r.info.run_id, k)]
                        for k in ("train_loss", "val_acc", "test_acc")}
        return out

    solo, together = by_config("solo"), by_config("together")
    assert len(solo) == 4 and solo.keys() == together.keys()
    assert packed["together"]["summary"]["pack_size"] == 4 and packed["solo"]["summary"]["pack_size"] == 1
    for key in solo:
        assert len(together[key]["train_loss"]) == len(solo[key]["train_loss"]) == 2, key
        for a, b in zip(together[key]["train_loss"], solo[key]["train_loss"]):
            assert_reordered_scalar(a, b, TRAJECTORY, f"{key} train loss")
        for metric in ("val_acc", "test_acc"):  # a share of 20 validation / 40 test images: one may flip
            for a, b in zip(together[key][metric], solo[key][metric]):
                assert abs(a - b) <= 100 / 20 + 1e-9, (key, metric, a, b)
