"""Search spaces are data: every registered space samples into valid configs, and the sweep can run it."""

from __future__ import annotations

import dataclasses
import random

import pytest

import tune_spaces
from coop_core.config import PromptConfig, TrainConfig
from coop_core.datasets import get_dataset_spec, list_datasets
from coop_core.model import CoOpModel
from tune_spaces import (
    Choice,
    LogUniform,
    get_space,
    list_spaces,
    sample_space,
    space_for,
    split_sample,
    template_words,
)

TRAINABLE = [name for name in list_datasets() if not get_dataset_spec(name).evaluation_only]


def test_every_dataset_one_can_train_on_has_a_space():
    assert list_spaces() == TRAINABLE
    assert "imagenet_sketch" not in list_spaces() and "imagenet" in list_spaces()


def test_a_users_own_dataset_gets_the_generic_space_of_its_template():
    space = space_for("my_photos", "a photo of my {}.")
    assert space["prompt.ctx_init"].values == ("", "a photo of a", "a photo of my")
    assert space_for("eurosat", "ignored {}") == get_space("eurosat")


@pytest.mark.parametrize("dataset", TRAINABLE)
def test_samples_build_valid_configs(dataset):
    space = get_space(dataset)
    rng = random.Random(0)
    seen_ctx_init = set()
    for _ in range(50):
        sample = sample_space(space, rng)
        parts = split_sample(sample)
        prompt = dataclasses.replace(PromptConfig(), **parts["prompt"])
        train = dataclasses.replace(TrainConfig(), **parts["train"])
        assert prompt.n_ctx in (4, 8, 16)
        assert prompt.class_token_position in ("end", "middle", "front")
        assert isinstance(prompt.csc, bool)
        assert 5e-4 <= train.lr <= 2e-2
        seen_ctx_init.add(prompt.ctx_init)
    assert seen_ctx_init == set(space["prompt.ctx_init"].values)  # 50 draws reach every option
    words = template_words(get_dataset_spec(dataset).template)
    if words:
        assert words in seen_ctx_init


def test_eurosat_space_offers_the_template_words():
    space = get_space("eurosat")
    assert set(space) == {"prompt.n_ctx", "prompt.ctx_init", "prompt.class_token_position", "prompt.csc", "train.lr"}
    assert space["prompt.ctx_init"] == Choice(("", "a photo of a", "a centered satellite photo of"))
    assert space["prompt.n_ctx"] == Choice((4, 8, 16))
    assert space["train.lr"] == LogUniform(5e-4, 2e-2)


def test_template_words():
    assert template_words("a centered satellite photo of {}.") == "a centered satellite photo of"
    assert template_words("{} texture.") == ""
    assert template_words("a photo of {}, a type of food.") == "a photo of"
    with pytest.raises(ValueError, match="exactly one"):
        template_words("no placeholder")


def test_ctx_init_options_build_prompts_with_their_word_count(tiny_clip):
    """Each initialisation of the EuroSAT space builds a CoOp model; word inits set the effective n_ctx."""
    classnames = ["Forest", "Sea or Lake"]
    expected = {"": 8, "a photo of a": 4, "a centered satellite photo of": 5}
    for ctx_init in get_space("eurosat")["prompt.ctx_init"].values:
        for position in ("end", "middle", "front"):
            prompt = PromptConfig(n_ctx=8, ctx_init=ctx_init, csc=True, class_token_position=position)
            model = CoOpModel(tiny_clip.model, tiny_clip.tokenizer, classnames, prompt)
            assert model.prompt_learner.ctx.shape[:2] == (2, expected[ctx_init])
            assert model.text_features().shape[0] == 2


def test_unknown_dataset_and_bad_spaces_are_errors():
    with pytest.raises(ValueError, match="no search space for dataset 'nope'.*eurosat"):
        get_space("nope")
    with pytest.raises(ValueError, match="already registered"):
        tune_spaces.register_space("eurosat", lambda: {})
    with pytest.raises(ValueError, match="section"):
        tune_spaces.check_space({"prompt.nonsense": Choice((1,))})
    with pytest.raises(ValueError, match="low < high"):
        LogUniform(1.0, 0.1)
    with pytest.raises(ValueError, match="distinct"):
        Choice((1, 1))


def test_sweep_turns_every_space_into_ray_tune_domains():
    """What ``platform.tune`` hands to Ray Tune: same keys, and every Ray sample builds valid configs."""
    from platform.sweep.tuner import to_tune_space

    from ray.tune.search.sample import Categorical, Float

    for dataset in list_spaces():
        space = get_space(dataset)
        tune_space = to_tune_space(space)
        assert set(tune_space) == set(space)
        assert isinstance(tune_space["train.lr"], Float) and tune_space["train.lr"].lower == 5e-4
        assert isinstance(tune_space["prompt.ctx_init"], Categorical)
        assert list(tune_space["prompt.ctx_init"].categories) == list(space["prompt.ctx_init"].values)
        for _ in range(10):
            parts = split_sample({k: d.sample() for k, d in tune_space.items()})
            dataclasses.replace(PromptConfig(), **parts["prompt"])
            dataclasses.replace(TrainConfig(), **parts["train"])
