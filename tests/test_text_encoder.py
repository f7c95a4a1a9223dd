"""The prompt path pins CoOp's semantics: with the context set to "a photo of a" it *is* CLIP's ``encode_text``.

Golden: for every class-token position, ``CoOpModel.text_features()`` equals open_clip's ``encode_text`` of the
equivalent sentence, for a ViT CLIP, a ResNet CLIP and a ``CustomTextCLIP`` (text tower under ``.text``).
Truncation: running the text transformer only up to the longest end-of-text token changes nothing.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from numerics import FORWARD_BACKWARD, ONE_PASS, assert_reordered

from coop_core.backbone import load_clip
from coop_core.config import PromptConfig
from coop_core.model import CoOpModel
from coop_core.prompt_learner import PromptLearner
from coop_core.text_encoder import TextEncoder, text_tower

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CLASSNAMES = ["forest", "sea_lake", "annual_crop_land", "herbaceous_vegetation_land"]
SENTENCES = {"end": "a photo of a {}.", "middle": "a photo {} of a.", "front": "{} a photo of a."}
TINY_TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
TINY_VISION_CFG = {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32}


def _tiny_config(tmp_path_factory, name: str, **extra) -> str:
    path = tmp_path_factory.mktemp("configs") / f"{name}.json"
    text_cfg = TINY_TEXT_CFG | extra.pop("text_cfg", {})
    path.write_text(json.dumps({"embed_dim": 32, "vision_cfg": TINY_VISION_CFG, "text_cfg": text_cfg} | extra))
    return str(path)


@pytest.fixture(scope="module")
def clips(tiny_vit_config, tiny_rn_config, tmp_path_factory):
    """ViT, ResNet and CustomTextCLIP tiny models with random weights (perturbed so no weight is at its init)."""
    custom = _tiny_config(tmp_path_factory, "tiny-custom-text", custom_text=True)
    loaded = {
        "vit": load_clip(tiny_vit_config, "none"),
        "rn": load_clip(tiny_rn_config, "none"),
        "custom_text": load_clip(custom, "none"),
    }
    assert type(loaded["vit"].model.visual).__name__ == "VisionTransformer"
    assert type(loaded["rn"].model.visual).__name__ == "ModifiedResNet"
    assert type(loaded["custom_text"].model).__name__ == "CustomTextCLIP"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for clip in loaded.values():
            for p in text_tower(clip.model).parameters():  # e.g. zero-initialised biases become informative
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return loaded


@pytest.mark.parametrize("arch", ["vit", "rn", "custom_text"])
@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_golden_prompt_with_photo_context_reproduces_encode_text(clips, arch, position):
    clip = clips[arch]
    model = CoOpModel(clip.model, clip.tokenizer, CLASSNAMES,
                      PromptConfig(ctx_init="a photo of a", class_token_position=position))
    sentences = [SENTENCES[position].format(c.replace("_", " ")) for c in CLASSNAMES]
    with torch.no_grad():
        expected = clip.model.encode_text(clip.tokenizer(sentences))  # (n_cls, embed_dim)
        got = model.text_encoder(model.prompt_learner(), model.prompt_learner.eot_idx)
        normalised = model.text_features()
    assert got.shape == expected.shape
    # The same layers on a truncated, prefix-shared batch: one forward pass in another summation order.
    assert_reordered(got, expected, ONE_PASS, "prompt path vs encode_text")
    assert_reordered(normalised, F.normalize(expected, dim=-1), ONE_PASS, "normalised prompt path vs encode_text")
    # The sentences really differ by position, so the test would notice a wrong order.
    other = "front" if position != "front" else "end"
    with torch.no_grad():
        wrong = clip.model.encode_text(clip.tokenizer([SENTENCES[other].format(c.replace("_", " "))
                                                       for c in CLASSNAMES]))
    assert (wrong - expected).abs().max() > 1e-3


def _random_learner(clip, position: str, csc: bool) -> PromptLearner:
    learner = PromptLearner(text_tower(clip.model).token_embedding, clip.tokenizer, CLASSNAMES, n_ctx=6, csc=csc,
                            class_token_position=position, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        learner.ctx.mul_(25.0)  # context of the scale of real word embeddings' spread, far from the 0.02 init
    return learner


@pytest.mark.parametrize("arch", ["vit", "rn", "custom_text"])
@pytest.mark.parametrize("csc", [False, True], ids=["unified", "csc"])
@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_truncation_gives_the_same_features(clips, arch, csc, position):
    clip = clips[arch]
    learner = _random_learner(clip, position, csc)
    prompts = learner()
    with torch.no_grad():
        short = TextEncoder(clip.model, truncate=True)(prompts, learner.eot_idx)
        full = TextEncoder(clip.model, truncate=False)(prompts, learner.eot_idx)
    assert (short - full).abs().max().item() < 1e-5
    assert full.abs().max() > 0.1  # features are not trivially zero


@pytest.mark.parametrize("truncate", [True, False])
def test_truncation_really_shortens_the_sequence(clips, truncate):
    clip = clips["vit"]
    learner = _random_learner(clip, "end", csc=False)
    encoder = TextEncoder(clip.model, truncate=truncate)
    seen = []
    # ln_1 of the first block runs whichever code path the encoder takes, on batch-first (n, seq, width) input.
    handle = encoder.transformer.resblocks[0].ln_1.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    try:
        with torch.no_grad():
            encoder(learner(), learner.eot_idx)
    finally:
        handle.remove()
    longest = int(learner.eot_idx.max()) + 1
    name_tokens = int(clip.tokenizer(["herbaceous vegetation land"])[0].argmax()) - 1
    assert longest == 1 + 6 + name_tokens + 2  # SOS + context + longest name + "." + EOS
    assert longest < 20
    expected = longest if truncate else 77
    assert seen == [torch.Size([len(CLASSNAMES), expected, 64])]


def test_truncated_gradients_match_full_length(clips):
    clip = clips["rn"]
    grads = []
    for truncate in (True, False):
        learner = _random_learner(clip, "middle", csc=True)
        TextEncoder(clip.model, truncate=truncate)(learner(), learner.eot_idx).square().sum().backward()
        grads.append(learner.ctx.grad)
    assert_reordered(grads[0], grads[1], FORWARD_BACKWARD, "truncated vs full-length context gradient")


@pytest.mark.parametrize(
    ("text_cfg", "custom_text", "message"),
    [
        ({"pool_type": "first"}, False, "pool type 'argmax'"),
        ({"pool_type": "last"}, True, "pool type 'argmax'"),
        ({"no_causal_mask": True}, False, "causal"),
        ({"no_causal_mask": True}, True, "causal"),
        ({"embed_cls": True, "pool_type": "last"}, True, "class token"),  # CoCa-style text tower
    ],
)
def test_text_towers_that_cannot_carry_prompts_are_rejected(tmp_path_factory, text_cfg, custom_text, message):
    name = f"tiny-bad-{'-'.join(sorted(text_cfg))}-{int(custom_text)}"
    clip = load_clip(_tiny_config(tmp_path_factory, name, text_cfg=text_cfg, custom_text=custom_text), "none")
    with pytest.raises(ValueError, match=message):
        TextEncoder(clip.model)
