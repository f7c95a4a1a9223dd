"""Presets build valid configs, pin the reference's values, and the published numbers point at real presets."""

from __future__ import annotations

import dataclasses
import json

import pytest

import coop_core
from coop_core.config import ModelConfig, PromptConfig, TrainConfig
from coop_core.presets import (
    AVERAGE_10_TARGETS,
    AVERAGE_11,
    DG_TARGETS,
    PROTOCOLS,
    Preset,
    PublishedResult,
    get_preset,
    list_presets,
    published_results,
    register_preset,
)


def _preset(**overrides):
    kwargs = {
        "name": "test_preset",
        "description": "a test preset",
        "model": ModelConfig("RN50", "openai"),
        "prompt": PromptConfig(),
        "source": "tests",
    }
    return Preset(**{**kwargs, **overrides})


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds_valid_configs_and_serialises(name):
    preset = get_preset(name)
    assert preset.name == name
    # Each config rebuilds from its fields, so every value passes the configs' own validation.
    ModelConfig(**dataclasses.asdict(preset.model))
    PromptConfig(**dataclasses.asdict(preset.prompt))
    for shots in (1, 16):
        cfg = preset.train_config(shots=shots, seed=3)
        assert (cfg.shots, cfg.seed) == (shots, 3)
        assert TrainConfig(**dataclasses.asdict(cfg)) == cfg
    assert json.loads(json.dumps(dataclasses.asdict(preset)))["name"] == name


def test_the_registry_holds_the_papers_settings():
    assert list_presets() == sorted([
        "coop_rn50_end", "coop_rn50_end_csc", "coop_rn50_imagenet", "coop_rn50_middle", "coop_rn50_middle_csc",
        "coop_vit_b16_ctxv1", "coop_vit_b16_ctxv1_imagenet", "coop_vit_b16_end", "coop_vit_b16_imagenet",
        "cocoop_vit_b16_ctxv1", "kgcoop_vit_b16_ctxv1", "prograd_rn50", "prograd_rn50_eurosat", "prograd_vit_b16",
    ])
    assert coop_core.get_preset is get_preset and coop_core.list_presets is list_presets


def test_method_presets_are_their_reference_configs():
    """Each method's preset against its reference config file (the values read from the yaml and script, not from
    our code): KgCoOp vit_b16_ep100_ctxv1.yaml + base2new_train.sh W=8.0; ProGrad rn50*.yaml (batch 32, T 1.0, 16
    padded context tokens, lambda 1.0, epochs by shots); CoCoOp vit_b16_c4_ep10_batch1_ctxv1.yaml."""
    kg = get_preset("kgcoop_vit_b16_ctxv1")
    assert (kg.method.name, kg.method.kg_weight, kg.prompt.ctx_init, kg.prompt.n_ctx) == ("kgcoop", 8.0,
                                                                                        "a photo of a", 4)
    cfg = kg.train_config()
    assert (cfg.batch_size, cfg.lr, cfg.epochs, cfg.warmup_epochs, cfg.warmup_lr) == (128, 0.002, 100, 1, 1e-5)
    for name, words in (("prograd_rn50", "a photo of a"), ("prograd_rn50_eurosat", "a centered satellite photo of")):
        pg = get_preset(name)
        assert (pg.method.name, pg.method.prograd_lambda, pg.method.prograd_temperature) == ("prograd", 1.0, 1.0)
        assert pg.prompt == PromptConfig(n_ctx=16, ctx_init=words, pad_ctx_init=True)
        assert [pg.train_config(shots=k).resolved_epochs for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
        assert pg.train_config().batch_size == 32
    co = get_preset("cocoop_vit_b16_ctxv1")
    assert (co.method.name, co.method.meta_net_ratio) == ("cocoop", 16)
    assert (co.train_config().batch_size, co.train_config().epochs, co.prompt.n_ctx) == (1, 10, 4)


@pytest.mark.parametrize(
    ("name", "csc", "position"),
    [
        ("coop_rn50_end", False, "end"),
        ("coop_rn50_end_csc", True, "end"),
        ("coop_rn50_middle", False, "middle"),
        ("coop_rn50_middle_csc", True, "middle"),
    ],
)
def test_few_shot_presets_are_coop_md_main_sh_arguments(name, csc, position):
    # COOP.md: `main.sh <dataset> rn50 <end|middle> 16 <shots> <False|True>`; configs/trainers/CoOp/rn50.yaml.
    preset = get_preset(name)
    assert preset.model == ModelConfig("RN50", "openai")
    assert preset.prompt == PromptConfig(n_ctx=16, ctx_init="", csc=csc, class_token_position=position)
    assert dict(preset.train) == {}
    # No fixed epochs: the schedule by shots (rn50_ep50 at 1 shot, rn50_ep100 at 2/4, rn50 = 200 at 8/16).
    assert [preset.train_config(shots=k).resolved_epochs for k in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert f"rn50 {position} 16 <shots> {csc}" in preset.source


@pytest.mark.parametrize(("name", "backbone"), [("coop_rn50_imagenet", "RN50"), ("coop_vit_b16_imagenet", "ViT-B-16")])
def test_domain_generalisation_presets_train_50_epochs_at_every_shot_count(name, backbone):
    # COOP.md: ImageNet uses *_ep50.yaml for all settings; eval.sh loads NCTX=16 CSC=False CTP=end at epoch 50.
    preset = get_preset(name)
    assert preset.model == ModelConfig(backbone, "openai")
    assert preset.prompt == PromptConfig(n_ctx=16, ctx_init="", csc=False, class_token_position="end")
    assert [preset.train_config(shots=k).resolved_epochs for k in (1, 4, 16)] == [50, 50, 50]
    assert "_ep50.yaml" in preset.source


@pytest.mark.parametrize(("name", "epochs", "config"), [
    ("coop_vit_b16_ctxv1", 200, "vit_b16_ctxv1"),
    ("coop_vit_b16_ctxv1_imagenet", 50, "vit_b16_ep50_ctxv1"),
])
def test_cocoop_baseline_presets_are_vit_b16_with_a_photo_of_a(name, epochs, config):
    # scripts/cocoop/base2new_train.sh / xd_train.sh with TRAINER=CoOp: CFG=vit_b16_ctxv1 (vit_b16_ep50_ctxv1 on
    # ImageNet); both YAMLs set CTX_INIT "a photo of a", so the prompt learner uses its 4 words as the context.
    preset = get_preset(name)
    assert preset.model == ModelConfig("ViT-B-16", "openai")
    assert preset.prompt == PromptConfig(n_ctx=4, ctx_init="a photo of a", csc=False, class_token_position="end")
    assert preset.train_config(shots=16).resolved_epochs == epochs
    assert f"CFG={config}" in preset.source


def test_unknown_preset_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown preset 'coop'; available: cocoop_vit_b16_ctxv1, coop_rn50_end, "):
        get_preset("coop")


def test_duplicate_key_is_an_error():
    with pytest.raises(ValueError, match=r"preset 'coop_rn50_end' is already registered"):
        register_preset(_preset(name="coop_rn50_end"))
    with pytest.raises(ValueError, match=r"register_preset expects a Preset, got dict"):
        register_preset({"name": "x"})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": "CoOp-RN50"}, r"preset name must be lowercase \[a-z0-9_\]\+, got 'CoOp-RN50'"),
        ({"description": ""}, r"description must be one non-empty line"),
        ({"description": "two\nlines"}, r"description must be one non-empty line"),
        ({"model": "RN50"}, r"model must be a ModelConfig, got str"),
        ({"prompt": {"n_ctx": 16}}, r"prompt must be a PromptConfig, got dict"),
        ({"prompt": PromptConfig(n_ctx=16, ctx_init="a photo of a")}, r"n_ctx \(16\) must equal the word count"),
        ({"train": {"epoch": 50}}, r"unknown TrainConfig fields \['epoch'\]"),
        ({"train": {"shots": 16}}, r"\['shots'\] are chosen per run"),
        ({"train": {"seed": 2}}, r"\['seed'\] are chosen per run"),
        ({"train": {"lr": -1.0}}, r"lr must be > 0, got -1.0"),
        ({"source": " "}, r"source must name the config"),
    ],
)
def test_preset_rejects_bad_values_and_says_why(overrides, message):
    with pytest.raises(ValueError, match=message):
        _preset(**overrides)


def test_preset_is_frozen_and_its_train_mapping_read_only():
    preset = get_preset("coop_rn50_imagenet")
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"read-only"):
        preset.train["epochs"] = 10  # type: ignore[index]
    assert preset.train_config().epochs == 50
    changed = dataclasses.replace(preset, train={"epochs": 10})
    assert changed.train_config().epochs == 10 and preset.train_config().epochs == 50


def test_train_config_overrides_apply_on_top_of_the_preset():
    cfg = get_preset("coop_vit_b16_ctxv1").train_config(shots=16, seed=2, precision="bf16", epochs=5)
    assert (cfg.epochs, cfg.precision, cfg.seed, cfg.lr) == (5, "bf16", 2, 0.002)


def _checksum(result) -> tuple[float, float, float] | None:
    """The table-internal relation a transcribed ``result`` takes part in, as (computed, printed, rounding slack):
    a base-to-new H is the harmonic mean of its row's base and new accuracies; the ten cross-dataset targets average
    to the printed average (quoted in another source). None for a number with no such relation (DG's columns)."""
    if result.protocol == "base2new":
        row = {r.metric: r.value for r in published_results(protocol="base2new", dataset=result.dataset)
               if r.method == result.method}
        base, new = row["base_acc"], row["new_acc"]
        return 2 * base * new / (base + new), row["harmonic_mean"], 0.01
    if result.protocol == "cross" and result.target != "imagenet":
        cross = {r.target: r.value for r in published_results(protocol="cross")}
        targets = [v for t, v in cross.items() if t not in ("imagenet", AVERAGE_10_TARGETS)]
        return sum(targets) / len(targets), cross[AVERAGE_10_TARGETS], 0.005
    return None


@pytest.mark.parametrize("result", published_results(), ids=lambda r: f"{r.protocol}-{r.method}-{r.metric}-{r.target}")
def test_published_results_reference_presets_and_agree_with_their_tables(result):
    preset = get_preset(result.preset)
    assert result.protocol in PROTOCOLS
    assert round(result.value, 2) == result.value  # as printed: percent to two decimals
    check = _checksum(result)
    if check is not None:  # a mistyped digit breaks the relation (a last-digit slip within the rounding may not)
        computed, printed, slack = check
        assert computed == pytest.approx(printed, abs=slack), f"{result.value} does not fit its table: {check}"
    assert result.shots == 16
    assert "Table" in result.source
    if result.protocol in ("dg", "cross"):
        assert result.dataset == "imagenet" and preset.train_config().resolved_epochs == 50


def test_published_numbers_pin_their_sources():
    b2n = {(r.method, r.metric): r.value for r in published_results(protocol="base2new", dataset=AVERAGE_11)}
    # CoCoOp CVPR'22 Table 1(a), average over 11 datasets.
    assert b2n == {
        ("zeroshot_clip", "base_acc"): 69.34, ("zeroshot_clip", "new_acc"): 74.22,
        ("zeroshot_clip", "harmonic_mean"): 71.70,
        ("coop", "base_acc"): 82.69, ("coop", "new_acc"): 63.22, ("coop", "harmonic_mean"): 71.66,
        # KgCoOp CVPR'23, as its README's table quotes its comparison (CoCoOp's row is CoCoOp's Table 1(a)).
        ("kgcoop", "base_acc"): 80.73, ("kgcoop", "new_acc"): 73.60, ("kgcoop", "harmonic_mean"): 77.00,
        ("prograd", "base_acc"): 82.48, ("prograd", "new_acc"): 70.75, ("prograd", "harmonic_mean"): 76.16,
        ("cocoop", "base_acc"): 80.47, ("cocoop", "new_acc"): 71.69, ("cocoop", "harmonic_mean"): 75.83,
    }
    # The harmonic means are the harmonic means of their base and new accuracies (to the table's rounding).
    for method in ("zeroshot_clip", "coop", "kgcoop", "prograd", "cocoop"):
        base, new = b2n[(method, "base_acc")], b2n[(method, "new_acc")]
        assert 2 * base * new / (base + new) == pytest.approx(b2n[(method, "harmonic_mean")], abs=0.01)
    cross = {r.target: r.value for r in published_results(protocol="cross", dataset="imagenet")}
    assert cross["imagenet"] == 71.51 and cross["average_10"] == 63.88  # CoCoOp CVPR'22 Table 2, CoOp row
    # The transcribed per-target values average to the quoted average.
    targets = [v for t, v in cross.items() if t not in ("imagenet", "average_10")]
    assert len(targets) == 10 and sum(targets) / 10 == pytest.approx(63.88, abs=0.005)


def test_transcribed_tables_check_themselves():
    for dataset in ("eurosat", "imagenet"):
        rows = {(r.method, r.metric): r.value for r in published_results(protocol="base2new", dataset=dataset)}
        assert len(rows) == 6
        for method in ("zeroshot_clip", "coop"):
            base, new = rows[(method, "base_acc")], rows[(method, "new_acc")]
            assert 2 * base * new / (base + new) == pytest.approx(rows[(method, "harmonic_mean")], abs=0.01)
    dg = {(r.method, r.preset, r.target): r.value for r in published_results(protocol="dg")}
    assert len(dg) == 20 and set(t for *_, t in dg) == {"imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a",
                                                         "imagenet_r"}
    assert dg[("zeroshot_clip", "coop_vit_b16_imagenet", "imagenet_a")] == 47.77  # also on paperswithcode
    # CoOp beats zero-shot CLIP on ImageNet itself for both backbones (the claim the table supports).
    for preset in ("coop_rn50_imagenet", "coop_vit_b16_imagenet"):
        assert dg[("coop", preset, "imagenet")] > dg[("zeroshot_clip", preset, "imagenet")]


def test_only_the_numbers_without_a_table_checksum_are_pinned_one_by_one():
    """Every published number is checked by a relation of its table (above), except DG's and the cross-dataset
    ImageNet accuracy, which no relation ties: those are the ones a reader has to compare with the paper."""
    unchecked = [r for r in published_results() if _checksum(r) is None]
    assert {(r.protocol, r.target) for r in unchecked} == {("cross", "imagenet"), *(("dg", t) for t in
                                                            ("imagenet", *DG_TARGETS))}
    assert len(unchecked) == 1 + 20


def test_published_results_filter():
    assert all(r.dataset == AVERAGE_11 for r in published_results(dataset=AVERAGE_11))
    assert len(published_results(dataset=AVERAGE_11)) == 15
    assert {r.metric for r in published_results(protocol="base2new", dataset="imagenet")} == {
        "base_acc", "new_acc", "harmonic_mean"}
    assert len(published_results()) == sum(len(published_results(protocol=p)) for p in PROTOCOLS)
    with pytest.raises(ValueError, match=r"protocol must be one of \('fewshot', 'dg', 'base2new', 'cross'\)"):
        published_results(protocol="b2n")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"protocol": "fewshots"}, r"protocol must be one of"),
        ({"method": "maple"}, r"method must be one of \('coop', 'kgcoop', 'prograd', 'cocoop', 'zeroshot_clip'\)"),
        ({"preset": "nope"}, r"unknown preset 'nope'; available:"),
        ({"dataset": "cifar10"}, r"dataset must be a registered dataset or 'average_11'"),
        ({"metric": "acc"}, r"metric must be one of"),
        ({"shots": 0}, r"shots must be a positive integer"),
        ({"value": 101.0}, r"value is a percentage in \[0, 100\]"),
        ({"source": ""}, r"source must name the paper"),
        ({"protocol": "dg", "dataset": "imagenet"}, r"a dg result needs the target dataset"),
        ({"protocol": "dg", "dataset": "imagenet", "target": "imagenet_c"}, r"a dg target must be imagenet or one of"),
        ({"target": "eurosat"}, r"a fewshot result has no target, got 'eurosat'"),
        ({"protocol": "cross", "dataset": "imagenet", "target": "cifar10"}, r"a cross target must be"),
    ],
)
def test_published_result_rejects_bad_values(overrides, message):
    kwargs = {
        "protocol": "fewshot", "method": "coop", "preset": "coop_rn50_end", "dataset": "eurosat", "shots": 16,
        "metric": "test_acc", "value": 80.0, "source": "CoOp IJCV Table X",
    }
    assert PublishedResult(**kwargs).value == 80.0  # the base record is valid; each override breaks one field
    with pytest.raises(ValueError, match=message):
        PublishedResult(**{**kwargs, **overrides})
