"""Nearest-word interpretation: context set to real word embeddings reads back as exactly those words."""

from __future__ import annotations

import pytest
import torch

from coop_core.interpret import nearest_words, nearest_words_table

pytestmark = pytest.mark.usefixtures("torch_single_thread")

WORDS = ["photo", "satellite", "river", "forest"]


def _word_embeddings(clip, words: list[str]) -> torch.Tensor:
    ids = clip.tokenizer([" ".join(words)])[0, 1 : 1 + len(words)]
    assert len(set(ids.tolist())) == len(words)  # each word is one token
    return clip.model.token_embedding.weight[ids].detach().clone()  # (n, width)


def test_unified_context_of_real_words_reads_back_as_those_words(tiny_clip):
    ctx = _word_embeddings(tiny_clip, WORDS)
    words = nearest_words(ctx, tiny_clip.model.token_embedding, tiny_clip.tokenizer, topk=3)
    assert len(words) == 1 and len(words[0]) == len(WORDS)
    assert [ranked[0][0] for ranked in words[0]] == WORDS
    assert all(ranked[0][1] == pytest.approx(0.0, abs=1e-3) for ranked in words[0])
    for ranked in words[0]:
        distances = [d for _, d in ranked]
        assert len(ranked) == 3 and distances == sorted(distances) and distances[1] > 0.1


def test_class_specific_context_gives_one_word_set_per_class(tiny_clip):
    per_class = [["photo", "river"], ["satellite", "forest"], ["forest", "photo"]]
    ctx = torch.stack([_word_embeddings(tiny_clip, w) for w in per_class])  # (n_cls, n_ctx, width)
    words = nearest_words(ctx, tiny_clip.model.token_embedding, tiny_clip.tokenizer, topk=1)
    assert [[ranked[0][0] for ranked in ctx_set] for ctx_set in words] == per_class
    table = nearest_words_table(words, ["Annual Crop", "Forest", "River"])
    lines = table.splitlines()
    assert lines[0].split("\t") == ["set", "position", "words (distance)"]
    assert lines[1].startswith("Annual Crop\t1\tphoto (0.000)")
    assert lines[4].startswith("Forest\t2\tforest (0.000)")
    assert len(lines) == 1 + 3 * 2


def test_table_of_unified_context_is_labelled_shared(tiny_clip):
    words = nearest_words(_word_embeddings(tiny_clip, WORDS), tiny_clip.model.token_embedding, tiny_clip.tokenizer)
    table = nearest_words_table(words, ["a", "b"])
    assert [line.split("\t")[:2] for line in table.splitlines()[1:]] == [["shared", str(i)] for i in range(1, 5)]
    for word in WORDS:
        assert f"{word} (0.000)" in table


def test_perturbed_context_still_finds_its_word_with_a_positive_distance(tiny_clip):
    ctx = _word_embeddings(tiny_clip, WORDS)
    noisy = ctx + 1e-3 * torch.randn(ctx.shape, generator=torch.Generator().manual_seed(0))
    words = nearest_words(noisy, tiny_clip.model.token_embedding, tiny_clip.tokenizer, topk=1)
    assert [ranked[0][0] for ranked in words[0]] == WORDS
    for ranked, row in zip(words[0], (noisy - ctx).norm(dim=-1)):
        assert ranked[0][1] == pytest.approx(row.item(), rel=1e-3)


def test_nearest_words_table_reads_back():
    from coop_core.interpret import nearest_words_table, parse_nearest_words_table

    words = [[[("a", 0.5), ("photo", 0.75)], [("of, the", 1.0), ("x", 2.0)]],
             [[("b", 0.25), ("c", 0.125)], [("d", 3.0), ("e", 4.0)]]]
    table = nearest_words_table(words, ["Forest", "River"])
    assert parse_nearest_words_table(table) == {"Forest": words[0], "River": words[1]}
    assert list(parse_nearest_words_table(nearest_words_table(words[:1]))) == ["shared"]
    with pytest.raises(ValueError, match="header"):
        parse_nearest_words_table("position\tword\n1\ta")


@pytest.mark.parametrize("rows_per_pass", [256, 5])
def test_nearest_words_are_the_exact_nearest_by_direct_distance(tiny_clip, monkeypatch, rows_per_pass):
    """Against the definition (every word's distance, computed directly): the same words in the same order and the
    same distances, for unified and class-specific context, whether the rows go in one product or in several."""
    import coop_core.interpret as interpret

    monkeypatch.setattr(interpret, "ROWS_PER_PASS", rows_per_pass)
    vocab = tiny_clip.model.token_embedding.weight.detach()
    gen = torch.Generator().manual_seed(3)
    for shape in [(4, vocab.shape[1]), (3, 4, vocab.shape[1])]:
        ctx = vocab.std() * torch.randn(shape, generator=gen)
        words = nearest_words(ctx, tiny_clip.model.token_embedding, tiny_clip.tokenizer, topk=4)
        sets = ctx.reshape(-1, shape[-2], shape[-1])
        assert len(words) == sets.shape[0]
        for ctx_set, got in zip(sets, words):
            for row, ranked in zip(ctx_set, got):
                dist = (vocab - row).norm(dim=-1)
                d, idx = dist.topk(4, largest=False)
                assert [w for w, _ in ranked] == [interpret._decode(tiny_clip.tokenizer, int(i)) for i in idx]
                assert [x for _, x in ranked] == pytest.approx(d.tolist(), rel=1e-5, abs=1e-6)
