"""CoOpModel: CLIP's zero-shot classifier with the prompt replaced by learned context; only the context trains."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from numerics import ONE_PASS, assert_reordered, assert_unit_norm

from coop_core.config import PromptConfig
from coop_core.model import CoOpModel

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CLASSNAMES = ["annual_crop_land", "forest", "sea_or_lake"]


@pytest.fixture
def images():
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_logits_with_photo_context_equal_clip_zero_shot_logits(tiny_clip, images):
    model = CoOpModel(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, PromptConfig(ctx_init="a photo of a"))
    with torch.no_grad():
        image = F.normalize(tiny_clip.model.encode_image(images), dim=-1)
        text = F.normalize(tiny_clip.model.encode_text(tiny_clip.tokenizer(
            [f"a photo of a {c.replace('_', ' ')}." for c in CLASSNAMES])), dim=-1)
        expected = tiny_clip.model.logit_scale.exp() * image @ text.t()  # (5, n_cls)
        logits = model(images)
    assert logits.shape == (5, len(CLASSNAMES))
    assert_reordered(logits, expected, ONE_PASS, "photo-context logits vs zero-shot logits")
    assert torch.equal(model.forward_features(model.encode_images(images)), logits)  # forward is exactly these calls


def test_features_are_normalised(tiny_clip, images):
    model = CoOpModel(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, PromptConfig(n_ctx=4))
    with torch.no_grad():
        img, txt = model.encode_images(images), model.text_features()
    assert_unit_norm(img, "image features")
    assert_unit_norm(txt, "text features")


@pytest.mark.parametrize("csc", [False, True])
def test_backward_reaches_only_the_context(tiny_clip, images, csc):
    model = CoOpModel(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, PromptConfig(n_ctx=4, csc=csc),
                      generator=torch.Generator().manual_seed(0))
    loss = F.cross_entropy(model(images), torch.tensor([0, 1, 2, 0, 1]))
    loss.backward()
    assert model.prompt_learner.ctx.grad is not None
    assert model.prompt_learner.ctx.grad.abs().sum() > 0
    if csc:  # every class's own context gets a gradient
        assert (model.prompt_learner.ctx.grad.flatten(1).abs().sum(1) > 0).all()
    assert all(p.grad is None for p in tiny_clip.model.parameters())
    assert not any(p.requires_grad for p in tiny_clip.model.parameters())


def test_image_encoder_runs_without_building_a_graph(tiny_clip, images):
    model = CoOpModel(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, PromptConfig(n_ctx=4))
    assert not model.encode_images(images).requires_grad


def test_freezes_a_trainable_clip_and_shares_its_modules(tiny_vit_config):
    from coop_core.backbone import load_clip

    clip = load_clip(tiny_vit_config, "none")
    clip.model.requires_grad_(True)
    model = CoOpModel(clip.model, clip.tokenizer, CLASSNAMES, PromptConfig(n_ctx=2))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_learner.ctx"]
    assert model.image_encoder is clip.model.visual
    assert model.text_encoder.transformer is clip.model.transformer  # shared, not copied
    assert model.classnames == ["annual crop land", "forest", "sea or lake"]


def test_logit_scale_is_clips(tiny_clip, images):
    model = CoOpModel(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, PromptConfig(n_ctx=4))
    with torch.no_grad():
        feats = model.encode_images(images)
        text = model.text_features()
    assert torch.equal(model.logits(feats, text), tiny_clip.model.logit_scale.exp() * feats @ text.t())  # same ops
    assert tiny_clip.model.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-4)


def test_train_mode_keeps_frozen_clip_in_eval(tiny_rn_config):
    """model.train() must not put CLIP's BatchNorm into training mode (batch statistics, drifting running stats)."""
    from coop_core.backbone import load_clip
    from coop_core.config import PromptConfig
    from coop_core.model import CoOpModel

    clip = load_clip(tiny_rn_config, "none")
    model = CoOpModel(clip.model, clip.tokenizer, ["cat", "dog"], PromptConfig(n_ctx=2))
    model.train()
    assert model.training and model.prompt_learner.training
    assert not any(m.training for m in model.image_encoder.modules())
    assert not any(m.training for m in model.text_encoder.modules())
    stats = [b.clone() for b in model.image_encoder.buffers()]
    images = __import__("torch").randn(4, 3, 32, 32)
    first = model.encode_images(images)
    assert all((a == b).all() for a, b in zip(stats, model.image_encoder.buffers()))
    assert (model.encode_images(images[:2]) - first[:2]).abs().max() < 1e-5  # no batch statistics
