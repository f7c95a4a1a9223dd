"""The registry's champion rule compares like with like: the same images (the dataset's registry evaluation set) with
the same CLIP (backbone and weights digest); the same prompts are one version.

Each registration here is a real one (a pyfunc logged to a run of a SQLite store, a model version, aliases) of a
prompt file written the way a trial writes it; only the accuracies and digests a trial would report are chosen.
"""

from __future__ import annotations

import json
from platform import artifacts
from platform.registry import CHAMPION, register_prompt, scoped_champion_alias

import pytest
import torch
from mlflow.tracking import MlflowClient

from coop_core.config import PromptConfig
from coop_core.fewshot import REGISTRY_EVAL_PER_CLASS, registry_eval_items
from coop_core.prompts_io import PromptMeta, save_prompts

CLASSES = ("cat", "dog")
WEIGHTS_A, WEIGHTS_B = "a" * 64, "b" * 64
IMAGES = "1" * 64  # the digest of the dataset's registry evaluation set


@pytest.fixture
def register(tmp_path, tiny_vit_config):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("coop-toy")
    made = iter(range(1000))

    def _register(*, val_acc: float, registry_acc: float | None, seed: int = 1, shots: int = 2,
                  weights: str = WEIGHTS_A, images: str = IMAGES, ctx_seed: int | None = None):
        n = next(made)
        d = tmp_path / f"ckpt{n}"
        d.mkdir()
        prompt = PromptConfig(n_ctx=2)
        ctx = torch.randn(2, 16, generator=torch.Generator().manual_seed(n if ctx_seed is None else ctx_seed))
        save_prompts(d / artifacts.PROMPTS_FILE, ctx, PromptMeta(backbone=tiny_vit_config, pretrained="none",
                                                                 classnames=CLASSES, prompt=prompt))
        spec = {"dataset": "toy", "model": {"backbone": tiny_vit_config, "pretrained": "none"},
                "prompt": {"n_ctx": 2, "ctx_init": "", "csc": False, "class_token_position": "end"},
                "train": {"shots": shots, "seed": seed}, artifacts.WEIGHTS_DIGEST_KEY: weights,
                artifacts.REGISTRY_SET_KEY: images}
        metrics = {"val_acc": val_acc, "test_acc": 50.0}
        if registry_acc is not None:
            metrics[artifacts.REGISTRY_METRIC] = registry_acc
        run_id = client.create_run(experiment).info.run_id
        return register_prompt(d, spec, metrics, run_id=run_id, tracking_uri=uri)

    _register.client = client
    return _register


def _alias(client: MlflowClient, alias: str) -> int:
    return int(client.get_model_version_by_alias("coop-toy", alias).version)


def test_a_seed_change_is_judged_on_the_same_images_not_on_its_own_validation_images(register):
    first = register(val_acc=15.0, registry_acc=60.0, seed=1)
    assert first.promoted and first.reason == "no champion yet"
    # Seed 2's few-shot validation images are other images: its 30 % there says nothing against seed 1's 15 %.
    luckier = register(val_acc=30.0, registry_acc=55.0, seed=2)
    assert (luckier.version, luckier.champion_version, luckier.promoted) == (2, 1, False)
    assert "does not beat" in luckier.reason and "55.00" in luckier.reason and "60.00" in luckier.reason
    better = register(val_acc=10.0, registry_acc=62.5, seed=3)  # worse on its own images, better on the same ones
    assert better.promoted and _alias(register.client, CHAMPION) == 3
    description = register.client.get_model_version("coop-toy", "3").description
    assert "Champion rule: promoted to @champion (registry acc 62.50 beats @champion v1's 60.00" in description


def test_other_weights_under_the_same_backbone_name_never_displace_the_champion(register):
    register(val_acc=20.0, registry_acc=40.0, weights=WEIGHTS_A)
    other = register(val_acc=90.0, registry_acc=90.0, weights=WEIGHTS_B)
    assert not other.promoted and other.champion_version == 1 and _alias(register.client, CHAMPION) == 1
    assert "other CLIP weights" in other.reason
    # Nor its family's alias (same backbone and shots): the scoped champion compares like with like too.
    assert _alias(register.client, other.scoped_alias) == 1
    description = register.client.get_model_version("coop-toy", "2").description
    assert "Champion rule: not promoted" in description and "other CLIP weights" in description


def test_a_champion_measured_on_other_images_or_not_at_all_is_not_compared(register):
    register(val_acc=20.0, registry_acc=40.0)
    elsewhere = register(val_acc=99.0, registry_acc=99.0, images="2" * 64)  # another val split under this name
    assert not elsewhere.promoted and "measured on other images" in elsewhere.reason
    assert _alias(register.client, CHAMPION) == 1 and _alias(register.client, elsewhere.scoped_alias) == 1


def test_a_champion_registered_before_the_rule_measured_it_stays_until_promoted_by_hand(register):
    register(val_acc=20.0, registry_acc=None)
    later = register(val_acc=99.0, registry_acc=99.0)
    assert not later.promoted and "not measured on the registry evaluation set" in later.reason
    assert _alias(register.client, CHAMPION) == 1
    description = register.client.get_model_version("coop-toy", "2").description
    assert "Champion rule: not promoted" in description and "left in place" in description


def test_the_same_prompts_from_another_run_are_one_version(register):
    first = register(val_acc=20.0, registry_acc=40.0, ctx_seed=7)
    again = register(val_acc=20.0, registry_acc=40.0, ctx_seed=7)  # another run that learned the same context
    assert again.version == first.version == 1 and again.champion_version == 1
    assert "the same prompts are v1 (from run" in again.reason
    assert len(register.client.search_model_versions("name = 'coop-toy'")) == 1


def test_a_better_version_of_the_same_family_moves_both_aliases_and_shots_do_not_block(register):
    register(val_acc=20.0, registry_acc=40.0, shots=2)
    other_shots = register(val_acc=20.0, registry_acc=45.0, shots=4)  # same images, same CLIP: comparable
    assert other_shots.promoted and _alias(register.client, CHAMPION) == 2
    assert _alias(register.client, other_shots.scoped_alias) == 2  # the first of its family
    assert _alias(register.client, scoped_champion_alias(register.client.get_model_version(
        "coop-toy", "1").tags["backbone"], 2)) == 1


def test_the_registry_set_is_the_same_images_for_every_seed_and_shot_count():
    from coop_core.datasets import Item

    val = [Item(f"c{c}/{i:03d}.jpg", c, f"class{c}") for c in range(3) for i in range(REGISTRY_EVAL_PER_CLASS + 7)]
    chosen = registry_eval_items(val)
    assert len(chosen) == 3 * REGISTRY_EVAL_PER_CLASS and chosen == registry_eval_items(list(reversed(val)))
    small = [it for it in val if int(it.path[-7:-4]) < 5]
    assert registry_eval_items(small) == sorted(small, key=lambda it: (it.label, it.path))  # all of a small class


def test_a_champion_registered_before_the_rule_is_measured_by_evaluate_and_then_compared(
        tmp_path, small_eurosat_root, tiny_vit_config, capsys):
    """Re-evaluating the incumbent: ``platform.evaluate --split registry --record`` measures a version registered
    without a registry accuracy on the dataset's registry evaluation set (real EuroSAT images, the tiny ViT), records it
    with the digests of those images and of the CLIP weights, and from then on the champion rule compares challengers
    against it on the same images with the same CLIP."""
    from platform import evaluate, tracking
    from platform.run_spec import RunSpec, load_splits

    from coop_core import load_clip, weights_digest
    from coop_core.features import items_digest

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("coop-eurosat")
    splits = load_splits(RunSpec(dataset="eurosat", data_root=str(small_eurosat_root), cache_dir=str(tmp_path / "c")))
    images = items_digest(tuple(registry_eval_items(splits.val)))
    weights = weights_digest(load_clip(tiny_vit_config, "none").model)

    def register(n: int, registry_acc: float | None):
        d = tmp_path / f"ckpt{n}"
        d.mkdir()
        ctx = torch.randn(4, 64, generator=torch.Generator().manual_seed(n))  # the tiny ViT's text width
        save_prompts(d / artifacts.PROMPTS_FILE, ctx, PromptMeta(backbone=tiny_vit_config, pretrained="none",
                                                                 classnames=splits.classnames,
                                                                 prompt=PromptConfig(n_ctx=4)))
        spec = {"dataset": "eurosat", "model": {"backbone": tiny_vit_config, "pretrained": "none"},
                "prompt": {"n_ctx": 4, "ctx_init": "", "csc": False, "class_token_position": "end"},
                "train": {"shots": 2, "seed": n}}
        metrics = {"val_acc": 50.0, "test_acc": 50.0}
        if registry_acc is not None:  # a measured run records what it was measured with, as the worker does
            spec |= {artifacts.WEIGHTS_DIGEST_KEY: weights, artifacts.REGISTRY_SET_KEY: images}
            metrics[artifacts.REGISTRY_METRIC] = registry_acc
        run_id = client.create_run(experiment).info.run_id
        tracking.log_run_artifacts(run_id, d, tracking_uri=uri)  # as a trial's run holds them (prompts/...)
        return register_prompt(d, spec, metrics, run_id=run_id, tracking_uri=uri)

    register(1, None)  # registered before the rule measured it
    blocked = register(2, 99.0)
    assert not blocked.promoted and "--split registry --record" in blocked.reason
    assert "python -m platform.evaluate --model models:/coop-eurosat/1 --dataset eurosat" in blocked.reason

    argv = ["--model", "models:/coop-eurosat/1", "--dataset", "eurosat", "--data-root", str(small_eurosat_root),
            "--split", "registry", "--record", "--cache-dir", str(tmp_path / "c"), "--tracking-uri", uri, "--no-log",
            "--json"]
    assert evaluate.main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["split"] == "registry" and result["n_images"] == len(registry_eval_items(splits.val))
    assert "recorded on coop-eurosat v1: registry acc" in out
    tags = client.get_model_version("coop-eurosat", "1").tags
    assert float(tags[artifacts.REGISTRY_METRIC]) == pytest.approx(result["acc"], abs=5e-5)
    assert (tags[artifacts.WEIGHTS_DIGEST_KEY], tags[artifacts.REGISTRY_SET_KEY]) == (weights, images)
    assert evaluate.main(argv) == 0 and "already holds registry acc" in capsys.readouterr().out  # measured once

    incumbent = float(tags[artifacts.REGISTRY_METRIC])
    weaker = register(3, max(incumbent - 1.0, 0.0))
    assert not weaker.promoted and "does not beat @champion v1" in weaker.reason
    stronger = register(4, incumbent + 1.0)
    assert stronger.promoted and "on the same images" in stronger.reason
    assert int(client.get_model_version_by_alias("coop-eurosat", CHAMPION).version) == 4


def test_record_takes_a_registered_version_and_the_registry_split(capsys, tmp_path):
    from platform import evaluate

    for extra in (["--split", "test"], ["--split", "registry", "--max-test-items", "5"]):
        argv = ["--model", "models:/coop-eurosat/1", "--dataset", "eurosat", "--record", "--tracking-uri",
                f"sqlite:///{tmp_path / 'm.db'}", *extra]
        assert evaluate.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: --")
