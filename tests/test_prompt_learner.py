"""The prompt learner: context shapes and initialisation, the class-token positions, and what is learnable."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_reordered

from coop_core.config import PromptConfig
from coop_core.model import CoOpModel
from coop_core.prompt_learner import CTX_INIT_STD, PromptLearner, clean_classname, position_index

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CLASSNAMES = ["forest", "sea_lake", "annual_crop_land", "highway"]


def _learner(clip, classnames=CLASSNAMES, **kwargs) -> PromptLearner:
    return PromptLearner(clip.model.token_embedding, clip.tokenizer, classnames, **kwargs)


def _embed(clip, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return clip.model.token_embedding(clip.tokenizer(texts))  # (n, seq, width)


def test_unified_and_class_specific_context_shapes(tiny_clip):
    width = tiny_clip.model.token_embedding.weight.shape[1]
    assert _learner(tiny_clip, n_ctx=8).ctx.shape == (8, width)
    assert _learner(tiny_clip, n_ctx=8, csc=True).ctx.shape == (len(CLASSNAMES), 8, width)
    prompts = _learner(tiny_clip, n_ctx=8, csc=True)()
    assert prompts.shape == (len(CLASSNAMES), tiny_clip.model.context_length, width)


def test_random_context_is_normal_with_std_0_02(tiny_clip):
    ctx = _learner(tiny_clip, n_ctx=64, csc=True, generator=torch.Generator().manual_seed(0)).ctx.detach()
    n = ctx.numel()  # 4 * 64 * 64 = 16384 draws: the sample std is within ~1.5 % of the truth
    assert CTX_INIT_STD == 0.02
    assert abs(ctx.std().item() - 0.02) < 0.02 * 0.05
    assert abs(ctx.mean().item()) < 4 * 0.02 / n**0.5
    within_1_sigma = (ctx.abs() < 0.02).float().mean().item()
    assert abs(within_1_sigma - 0.6827) < 0.02  # normal, not uniform


def test_random_context_is_reproducible_from_the_generator(tiny_clip):
    a = _learner(tiny_clip, n_ctx=4, generator=torch.Generator().manual_seed(3)).ctx
    b = _learner(tiny_clip, n_ctx=4, generator=torch.Generator().manual_seed(3)).ctx
    c = _learner(tiny_clip, n_ctx=4, generator=torch.Generator().manual_seed(4)).ctx
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_ctx_init_sets_n_ctx_to_its_word_count_and_copies_the_word_embeddings(tiny_clip):
    learner = _learner(tiny_clip, n_ctx=16, ctx_init="a photo of a")
    assert learner.n_ctx == 4
    assert learner.ctx.dtype == torch.float32
    assert torch.equal(learner.ctx.detach(), _embed(tiny_clip, ["a photo of a"])[0, 1:5])
    # Underscores and repeated spaces are normalised like class names.
    again = _learner(tiny_clip, ctx_init="  a_photo   of a ")
    assert again.ctx_init == "a photo of a"
    assert torch.equal(again.ctx, learner.ctx)


def test_ctx_init_counts_tokens_not_words(tiny_clip):
    learner = _learner(tiny_clip, ctx_init="herbaceous vegetation")  # "herbaceous" is two BPE tokens
    assert learner.n_ctx == 3
    assert torch.equal(learner.ctx.detach(), _embed(tiny_clip, ["herbaceous vegetation"])[0, 1:4])


def test_class_specific_ctx_init_is_replicated_per_class_and_independent(tiny_clip):
    learner = _learner(tiny_clip, ctx_init="a photo of a", csc=True)
    words = _embed(tiny_clip, ["a photo of a"])[0, 1:5]
    assert learner.ctx.shape == (len(CLASSNAMES), 4, words.shape[-1])
    for c in range(len(CLASSNAMES)):
        assert torch.equal(learner.ctx[c].detach(), words)
    with torch.no_grad():
        learner.ctx[0].add_(1.0)  # a real copy per class, not a broadcast view
    assert torch.equal(learner.ctx[1].detach(), words)


def test_state_dict_holds_only_the_context(tiny_clip):
    learner = _learner(tiny_clip, n_ctx=4)
    assert list(learner.state_dict()) == ["ctx"]
    assert [name for name, _ in learner.named_parameters()] == ["ctx"]
    assert {name for name, _ in learner.named_buffers()} >= {"token_prefix", "token_suffix", "tokenized_prompts"}


def test_only_the_context_is_trainable_in_coop_model(tiny_clip):
    model = CoOpModel(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, PromptConfig(n_ctx=4, csc=True))
    trainable = [(name, p.numel()) for name, p in model.named_parameters() if p.requires_grad]
    width = tiny_clip.model.token_embedding.weight.shape[1]
    assert trainable == [("prompt_learner.ctx", len(CLASSNAMES) * 4 * width)]
    assert model.trainable_parameters() == [model.prompt_learner.ctx]
    assert not any(p.requires_grad for p in tiny_clip.model.parameters())


@pytest.mark.parametrize(
    ("position", "sentence"),
    [
        ("end", "a photo of a {}."),
        ("middle", "a photo {} of a."),
        ("front", "{} a photo of a."),
    ],
)
def test_positions_build_the_token_sequence_of_the_equivalent_sentence(tiny_clip, position, sentence):
    """With the context set to real words, the prompt embeddings are those of the sentence, token for token.

    n_ctx=4: the middle position puts n_ctx // 2 = 2 words before the name. Class names of 1-3 tokens.
    """
    learner = _learner(tiny_clip, ctx_init="a photo of a", class_token_position=position)
    expected = _embed(tiny_clip, [sentence.format(clean_classname(c)) for c in CLASSNAMES])
    assert torch.equal(learner(), expected)
    assert torch.equal(learner.eot_idx, tiny_clip.tokenizer(
        [sentence.format(clean_classname(c)) for c in CLASSNAMES]).argmax(-1))


def test_middle_position_splits_an_odd_context_n_ctx_floor_half_before_the_name(tiny_clip):
    learner = _learner(tiny_clip, ctx_init="a photo of the", class_token_position="middle")
    assert learner.n_ctx == 4
    odd = _learner(tiny_clip, ctx_init="one two three four five", class_token_position="middle")
    assert odd.n_ctx == 5
    expected = _embed(tiny_clip, [f"one two {clean_classname(c)} three four five." for c in CLASSNAMES])
    assert torch.equal(odd(), expected)


def test_position_index_orders(tiny_clip):
    # Source: [SOS, c1, c2, c3, n1, n2, ".", EOS, pad]; name of 2 tokens, n_ctx 3, seq 9.
    assert position_index([2], 3, 9, "end").tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 8]]
    assert position_index([2], 3, 9, "front").tolist() == [[0, 4, 5, 1, 2, 3, 6, 7, 8]]
    assert position_index([2], 3, 9, "middle").tolist() == [[0, 1, 4, 5, 2, 3, 6, 7, 8]]
    with pytest.raises(ValueError, match="class_token_position"):
        position_index([2], 3, 9, "left")


def _ctx_slots(n_name_tokens: int, n_ctx: int, position: str) -> list[int]:
    """Sequence positions of the context vectors, written out by hand (position 0 is SOS)."""
    if position == "end":
        return list(range(1, 1 + n_ctx))
    if position == "front":
        return list(range(1 + n_name_tokens, 1 + n_name_tokens + n_ctx))
    half = n_ctx // 2
    return list(range(1, 1 + half)) + list(range(1 + half + n_name_tokens, 1 + n_name_tokens + n_ctx))


@pytest.mark.parametrize("csc", [False, True])
@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_context_gradient_reaches_exactly_the_context_slots(tiny_clip, csc, position):
    """Each context vector appears once per class, at its slot, and nothing else in the prompt depends on it."""
    learner = _learner(tiny_clip, n_ctx=3, csc=csc, class_token_position=position,
                       generator=torch.Generator().manual_seed(0))
    weights = torch.randn(learner().shape, generator=torch.Generator().manual_seed(1))  # (n_cls, seq, width)
    (learner() * weights).sum().backward()
    name_tokens = [int(ids.argmax()) - 1 for ids in tiny_clip.tokenizer([clean_classname(c) for c in CLASSNAMES])]
    assert name_tokens == [1, 2, 3, 1] and learner.name_lens == name_tokens
    expected = torch.stack([weights[c, _ctx_slots(k, 3, position)] for c, k in enumerate(name_tokens)])
    if csc:  # each class's context receives its own slots' weights, copied: nothing is summed
        assert torch.equal(learner.ctx.grad, expected)
    else:  # the shared context sums every class's slots, autograd in its own order: a 4-term sum reordered
        assert_reordered(learner.ctx.grad, expected.sum(0), 4 * len(CLASSNAMES), "shared context gradient")


def test_many_classes_in_one_batched_forward_match_single_class_learners(tiny_clip):
    """1000 classes with names of different token lengths: each row equals the prompt built for that class alone."""
    words = ["red", "sea lake", "annual crop land", "herbaceous vegetation land area", "x"]
    classnames = [f"{words[i % len(words)]} {i}" for i in range(1000)]
    g = torch.Generator().manual_seed(0)
    learner = _learner(tiny_clip, classnames, n_ctx=4, class_token_position="middle", generator=g)
    prompts = learner()
    assert prompts.shape[0] == 1000
    for c in (0, 1, 2, 3, 4, 517, 999):
        alone = _learner(tiny_clip, [classnames[c]], n_ctx=4, class_token_position="middle")
        with torch.no_grad():
            alone.ctx.copy_(learner.ctx)
        assert torch.equal(prompts[c], alone()[0])
        assert learner.eot_idx[c] == alone.eot_idx[0]


def test_too_long_prompt_raises_with_the_token_budget(tiny_clip):
    name_tokens = int(tiny_clip.tokenizer(["forest"])[0].argmax()) - 1
    assert name_tokens == 1
    fits = 77 - 3 - name_tokens  # SOS + context + name + "." + EOS == 77
    assert _learner(tiny_clip, ["forest"], n_ctx=fits)().shape[1] == 77
    with pytest.raises(ValueError, match=r"77-token text context: n_ctx is 74, and class 'forest' takes 1 more \+ 3 "
                                         r"\(start, '.', end\); use a context of at most 73 tokens"):
        _learner(tiny_clip, ["forest"], n_ctx=fits + 1)


def test_invalid_arguments(tiny_clip):
    with pytest.raises(ValueError, match="classnames must not be empty"):
        _learner(tiny_clip, [])
    with pytest.raises(ValueError, match="class_token_position"):
        _learner(tiny_clip, class_token_position="left")


def test_classnames_are_cleaned(tiny_clip):
    assert _learner(tiny_clip, n_ctx=2).classnames == ["forest", "sea lake", "annual crop land", "highway"]
    assert clean_classname(" sea_lake ") == "sea lake"


def test_prompts_that_cannot_fit_the_text_context_are_refused_with_the_numbers(tiny_clip):
    from coop_core.prompt_learner import check_prompt_fits

    seq = tiny_clip.tokenizer(["x"]).shape[1]
    # "annual crop land" is 3 tokens: start + context + 3 + "." + end must fit, so the context may take seq - 6.
    assert check_prompt_fits(tiny_clip.tokenizer, CLASSNAMES, seq - 6) == seq - 6
    with pytest.raises(ValueError, match=rf"n_ctx is {seq - 5}, and class 'annual crop land' takes 3 more \+ 3 "
                                         rf"\(start, '.', end\); use a context of at most {seq - 6} tokens "
                                         r"\(--n-ctx\)"):
        _learner(tiny_clip, n_ctx=seq - 5)
    long_init = " ".join(["photo"] * 100)  # 100 tokens: open_clip would silently cut it at the context length
    with pytest.raises(ValueError, match=r"ctx_init 'photo photo .*' is 100 tokens.*\(a shorter --ctx-init\)"):
        _learner(tiny_clip, ctx_init=long_init)
    with pytest.raises(ValueError, match=r"class name 'land land .*' is 80 tokens, too long for the text context"):
        check_prompt_fits(tiny_clip.tokenizer, ["forest", " ".join(["land"] * 80)], 4)
    with pytest.raises(ValueError, match=r"class name '' tokenizes to no tokens"):
        check_prompt_fits(tiny_clip.tokenizer, ["forest", "__"], 4)
