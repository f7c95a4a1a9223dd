"""Configs validate themselves at construction, say what is allowed, and serialise to stable JSON."""

from __future__ import annotations

import dataclasses
import json

import pytest

from coop_core.config import ModelConfig, PromptConfig, TrainConfig, default_epochs, to_json


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_ctx": 0}, r"n_ctx must be a positive integer, got 0"),
        ({"n_ctx": -3}, r"n_ctx must be a positive integer"),
        ({"n_ctx": True}, r"n_ctx must be a positive integer, got True"),
        ({"n_ctx": "16"}, r"n_ctx must be a positive integer, got '16'"),
        ({"n_ctx": 65}, r"n_ctx must be <= 64 .*77-token"),
        ({"ctx_init": None}, r"ctx_init must be a string"),
        (
            {"class_token_position": "left"},
            r"class_token_position must be one of \('end', 'middle', 'front'\), got 'left'",
        ),
        ({"csc": "yes"}, r"csc must be a bool, got 'yes'"),
    ],
)
def test_prompt_config_rejects_bad_values_and_says_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "fp16"}, r"precision must be one of \('fp32', 'bf16', 'amp'\), got 'fp16'"),
        ({"feature_mode": "disk"}, r"feature_mode must be one of \('cached', 'exact'\), got 'disk'"),
        ({"shots": 0}, r"shots must be a positive integer or 'all' \(every training image\), got 0"),
        ({"shots": "every"}, r"shots must be a positive integer or 'all'"),
        ({"epochs": 0}, r"epochs must be >= 1 or None"),
        ({"batch_size": 0}, r"batch_size must be >= 1"),
        ({"lr": 0.0}, r"lr must be > 0"),
        ({"lr": float("nan")}, r"lr must be > 0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"weight_decay": -1e-4}, r"weight_decay must be >= 0"),
        ({"warmup_epochs": -1}, r"warmup_epochs must be >= 0"),
        ({"n_views": 0}, r"n_views must be >= 1"),
        ({"eval_every": 0}, r"eval_every must be >= 1"),
        ({"loader_workers": -1}, r"loader_workers \(DataLoader processes\) must be >= 0"),
        ({"text_sharding": "classes"}, r"text_sharding must be one of \('auto', 'data', 'class'\), got 'classes'"),
    ],
)
def test_train_config_rejects_bad_values_and_says_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"backbone": ""}, {"pretrained": ""}])
def test_model_config_requires_backbone_and_weights(kwargs):
    with pytest.raises(ValueError, match="backbone|pretrained"):
        ModelConfig(**kwargs)


def test_defaults_are_the_papers_recipe():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size) == (0.002, 0.9, 5e-4, 32)
    assert (cfg.warmup_epochs, cfg.warmup_lr, cfg.precision) == (1, 1e-5, "fp32")
    assert cfg.text_sharding == "auto"  # ours, not the paper's: the rule picks data sharding for small class counts
    prompt = PromptConfig()
    assert (prompt.n_ctx, prompt.ctx_init, prompt.csc, prompt.class_token_position) == (16, "", False, "end")


def test_default_epochs_follow_coop_schedule_by_shots():
    assert {k: default_epochs(k) for k in (1, 2, 4, 8, 16)} == {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}
    assert default_epochs(3) == 100  # between keys: the next larger key
    assert default_epochs(12) == 200
    assert default_epochs(64) == 200  # beyond the table: 16-shot schedule
    assert default_epochs("all") == 200  # every image: the 16-shot schedule
    with pytest.raises(ValueError, match="shots must be a positive integer"):
        default_epochs(0)


def test_resolved_epochs_explicit_value_wins_over_schedule():
    assert TrainConfig(shots=1).resolved_epochs == 50
    assert TrainConfig(shots=4).resolved_epochs == 100
    assert TrainConfig(shots=16).resolved_epochs == 200
    assert TrainConfig(shots=16, epochs=7).resolved_epochs == 7


def test_configs_are_frozen_and_replace_revalidates():
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 0.1  # type: ignore[misc]
    assert dataclasses.replace(cfg, lr=0.01).lr == 0.01
    with pytest.raises(ValueError, match="precision"):
        dataclasses.replace(cfg, precision="fp16")


def test_to_json_round_trips_configs_and_dicts_of_configs():
    prompt = PromptConfig(n_ctx=4, ctx_init="a photo of a", csc=True, class_token_position="middle")
    train = TrainConfig(shots=2, epochs=3)
    assert PromptConfig(**json.loads(to_json(prompt))) == prompt
    both = json.loads(to_json({"prompt": prompt, "train": train, "note": "x"}))
    assert PromptConfig(**both["prompt"]) == prompt
    assert TrainConfig(**both["train"]) == train
    assert both["note"] == "x"
    assert to_json(train) == to_json(TrainConfig(epochs=3, shots=2))  # stable: sorted keys
