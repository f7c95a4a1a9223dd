"""KgCoOp, ProGrad and CoCoOp against their reference implementations, on a tiny CLIP.

The expected values come from code written here from the references' definitions, in the references' own shape: the
prompts concatenated per class, the text transformer run on all 77 positions, features normalised by dividing by the
norm, the loss and update as the reference trainer writes them —

- KgCoOp: ``KgCoOp/trainers/kgcoop.py`` (htyao89/KgCoOp): ``CustomCLIP.forward`` returns ``logits`` and
  ``score = 1 - mean(CosineSimilarity(dim=1, eps=1e-07)(text_features, text_features_old))``; ``forward_backward``
  takes ``F.cross_entropy(output, label) + self.w * score``.
- ProGrad: ``ProGradLoss`` (``ProGrad.public/trainers/prograd.py``, BeierZhu/Prompt-align) returns ``xe_loss`` and
  ``kl_loss = (-softmax(tea / T) * log_softmax(stu / T) * T * T).sum(1).mean()`` against zero-shot CLIP's logits;
  ``prograd_backward_and_update`` (``Dassl.ProGrad.pytorch/dassl/engine/trainer.py``) backpropagates ``kl_loss`` with
  ``retain_graph``, keeps the gradients, zeroes them, backpropagates ``xe_loss``, and where
  ``dot(a_grad / |a_grad|, b_grad / |b_grad|) < 0`` replaces the gradient by
  ``a_grad - lambda * dot(a_grad, b_grad_hat) * b_grad_hat``; then the optimiser steps.
- CoCoOp: ``trainers/cocoop.py`` (KaiyangZhou/CoOp): ``bias = meta_net(image_features)``, ``ctx_shifted = ctx + bias``,
  and for each image its own ``n_cls`` prompts through the text encoder, ``l_i = logit_scale * imf_i @ text.t()``.

Comparisons are float32 math in another order (``tests/numerics.py`` budgets); ``scripts/broken_copies.py`` breaks
each method on purpose and shows these tests fail.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from numerics import (
    EPS,
    FORWARD_BACKWARD,
    ONE_PASS,
    TRAJECTORY,
    assert_reordered,
    assert_reordered_scalar,
    scaled_error,
)
from test_engine import ThreadGroup

from coop_core.config import MethodConfig, PromptConfig, TrainConfig, check_method_prompt
from coop_core.engine import global_batches, lr_at, train
from coop_core.features import CachedViews
from coop_core.methods import KgCoOp, Objective, ProGrad, make_objective
from coop_core.model import CoCoOpModel, CoOpModel
from coop_core.zeroshot import zeroshot_text_features

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CLASSNAMES = ["annual_crop_land", "forest", "highway", "sea_or_lake"]
# EuroSAT's hand-crafted prompt (KgCoOp's and ProGrad's CUSTOM_TEMPLATES)
TEMPLATE = "a centered satellite photo of {}."
D = 32  # the tiny CLIP's embedding width
B = 6


# --- the references, written from their definitions ------------------------------------------------------------

def ref_text_encoder(clip, prompts: torch.Tensor, tokenized: torch.Tensor) -> torch.Tensor:
    """The references' ``TextEncoder.forward``: every position of the context, EOT gathered, then the projection."""
    x = prompts + clip.positional_embedding
    x = clip.transformer(x, attn_mask=clip.attn_mask)  # open_clip is batch-first: no permute needed
    x = clip.ln_final(x)
    return x[torch.arange(x.shape[0]), tokenized.argmax(dim=-1)] @ clip.text_projection


def ref_prompts(model: CoOpModel, ctx: torch.Tensor) -> torch.Tensor:
    """The references' ``PromptLearner.forward`` for the end and front positions: per-class concatenation."""
    pl = model.prompt_learner
    if ctx.dim() == 2:
        ctx = ctx.unsqueeze(0).expand(pl.n_cls, -1, -1)
    prefix, suffix = pl.token_prefix, pl.token_suffix
    if pl.class_token_position == "end":
        return torch.cat([prefix, ctx, suffix], dim=1)
    rows = []
    for i in range(pl.n_cls):  # front: [SOS, class, ctx, ".", EOS]
        k = pl.name_lens[i]
        rows.append(torch.cat([prefix[i:i + 1], suffix[i:i + 1, :k], ctx[i:i + 1], suffix[i:i + 1, k:]], dim=1))
    return torch.cat(rows)


def ref_logits(clip, model: CoOpModel, ctx: torch.Tensor, image_features: torch.Tensor):
    text = ref_text_encoder(clip, ref_prompts(model, ctx), model.prompt_learner.tokenized_prompts)
    text = text / text.norm(dim=-1, keepdim=True)
    return clip.logit_scale.exp() * image_features @ text.t(), text


def ref_anchors(clip, tokenizer) -> torch.Tensor:
    """``text_features_old`` / zero-shot CLIP's classifier: the hand-crafted prompts through ``encode_text``."""
    with torch.no_grad():
        t = clip.encode_text(tokenizer([TEMPLATE.format(c.replace("_", " ")) for c in CLASSNAMES]))
    return t / t.norm(dim=-1, keepdim=True)


def ref_kgcoop_loss(clip, model, ctx, feats, labels, weight, anchors):
    logits, text = ref_logits(clip, model, ctx, feats)
    cos = torch.nn.CosineSimilarity(dim=1, eps=1e-07)
    score = 1.0 - torch.mean(cos(text, anchors))
    return logits, F.cross_entropy(logits, labels) + weight * score, score


def ref_prograd_losses(clip, model, ctx, feats, labels, temperature, anchors):
    logits, _ = ref_logits(clip, model, ctx, feats)
    with torch.no_grad():
        tea = clip.logit_scale.exp() * feats @ anchors.t()
    xe = F.cross_entropy(logits, labels)
    kl = (-F.softmax(tea / temperature, dim=-1) * F.log_softmax(logits / temperature, -1)
          * temperature * temperature).sum(1).mean()
    return logits, xe, kl


def ref_prograd_grad(ctx: torch.Tensor, xe: torch.Tensor, kl: torch.Tensor, lam: float) -> tuple[torch.Tensor, bool]:
    """``prograd_backward_and_update`` for the one parameter, up to the optimiser step."""
    kl.backward(retain_graph=True)
    b_grad = ctx.grad.clone()
    ctx.grad.zero_()
    xe.backward()
    b_grad_norm = b_grad / torch.linalg.norm(b_grad)
    a_grad = ctx.grad.clone()
    a_grad_norm = a_grad / torch.linalg.norm(a_grad)
    conflict = bool(torch.dot(a_grad_norm.flatten(), b_grad_norm.flatten()) < 0)
    if conflict:
        return a_grad - lam * torch.dot(a_grad.flatten(), b_grad_norm.flatten()) * b_grad_norm, True
    return a_grad, False


def ref_cocoop_logits(clip, model: CoCoOpModel, ctx, meta_net, feats):
    """CoCoOp's ``PromptLearner.forward`` + ``CustomCLIP.forward``: one text pass per image, over every class."""
    pl = model.prompt_learner
    bias = meta_net(feats).unsqueeze(1)  # (batch, 1, ctx_dim)
    ctx_shifted = ctx.unsqueeze(0) + bias  # (batch, n_ctx, ctx_dim)
    logits = []
    for ctx_i, imf_i in zip(ctx_shifted, feats):
        pts_i = torch.cat([pl.token_prefix, ctx_i.unsqueeze(0).expand(pl.n_cls, -1, -1), pl.token_suffix], dim=1)
        text = ref_text_encoder(clip, pts_i, pl.tokenized_prompts)
        text = text / text.norm(dim=-1, keepdim=True)
        logits.append(clip.logit_scale.exp() * imf_i @ text.t())
    return torch.stack(logits)


# --- fixtures ----------------------------------------------------------------------------------------------------

def _model(tiny_clip, method: str = "coop", seed: int = 0, **prompt):
    prompt = PromptConfig(**({"n_ctx": 4} | prompt))
    g = torch.Generator().manual_seed(seed)
    if method == "cocoop":
        model = CoCoOpModel(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, prompt, meta_net_ratio=8, generator=g)
    else:
        model = CoOpModel(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, prompt, generator=g)
    return model


def _objective(tiny_clip, model, method: MethodConfig):
    anchors = zeroshot_text_features(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, TEMPLATE)
    return make_objective(method, model, anchors)


@pytest.fixture(scope="module")
def feats() -> torch.Tensor:
    return F.normalize(torch.randn(B, D, generator=torch.Generator().manual_seed(3)), dim=-1)  # (b, d)


@pytest.fixture(scope="module")
def anchors(tiny_clip) -> torch.Tensor:
    """The references' hand-crafted text features, computed once (``text_features_old``, zero-shot's classifier)."""
    return ref_anchors(tiny_clip.model, tiny_clip.tokenizer)


@pytest.fixture(scope="module")
def labels() -> torch.Tensor:
    return torch.tensor([0, 1, 2, 3, 1, 2])


def _our_step(model, objective, feats, labels):
    """One step of ours as the engine takes it in one process: logits, terms, gradients of every trainable tensor."""
    params = model.trainable_parameters()
    for p in params:
        p.grad = torch.zeros_like(p)
    text = None if model.conditional else model.text_features()
    logits = model.forward_features(feats) if model.conditional else model.logits(feats, text)
    terms = objective.terms(model, logits.float(), labels, feats, text, len(labels), 1)
    objective.backward(terms, params, lambda x: x, lambda g: None)
    return logits.detach(), terms, [p.grad.clone() for p in params]


# --- one step: logits, loss, gradients ---------------------------------------------------------------------------

@pytest.mark.parametrize("csc", [False, True], ids=["unified", "csc"])
@pytest.mark.parametrize("ctx_init", ["", "a photo of a"], ids=["random", "photo-init"])
def test_kgcoop_step_equals_the_reference(tiny_clip, feats, labels, anchors, csc, ctx_init):
    """Logits, CE + w * (1 - mean cos) and the context gradient as ``kgcoop.py`` computes them (its prompt is CoOp's
    with the class at the end; its ``ctx_init`` branch always uses "a photo of a", the case tested here)."""
    model = _model(tiny_clip, csc=csc, ctx_init=ctx_init)
    objective = _objective(tiny_clip, model, MethodConfig("kgcoop", kg_weight=8.0))
    assert isinstance(objective, KgCoOp)
    logits, terms, (grad,) = _our_step(model, objective, feats, labels)

    ctx = model.prompt_learner.ctx.detach().clone().requires_grad_(True)
    ref_logits_, ref_loss, score = ref_kgcoop_loss(tiny_clip.model, model, ctx, feats, labels, 8.0, anchors)
    ref_loss.backward()
    assert_reordered(logits, ref_logits_.detach(), ONE_PASS, "KgCoOp logits")
    kg, total = float(terms["kg"].detach()), float((terms["ce"] + terms["kg"]).detach())
    assert_reordered_scalar(kg, 8.0 * float(score.detach()), ONE_PASS, "KgCoOp's weighted term")
    assert_reordered_scalar(total, float(ref_loss.detach()), ONE_PASS, "KgCoOp loss")
    assert float(score.detach()) > 1e-3  # the learned prompt is away from the hand-crafted one: the term pulls
    assert_reordered(grad, ctx.grad, FORWARD_BACKWARD, "KgCoOp context gradient")


def test_kgcoop_term_changes_the_gradient_by_the_reference_amount(tiny_clip, feats, labels, anchors):
    """The term is really in the gradient: with weight 0 KgCoOp is CoOp, and the difference is ``w`` times the
    reference gradient of ``score``."""
    model = _model(tiny_clip)
    _, _, (with_term,) = _our_step(model, _objective(tiny_clip, model, MethodConfig("kgcoop", kg_weight=8.0)),
                                   feats, labels)
    _, _, (coop,) = _our_step(model, Objective(), feats, labels)
    ctx = model.prompt_learner.ctx.detach().clone().requires_grad_(True)
    _, _, score = ref_kgcoop_loss(tiny_clip.model, model, ctx, feats, labels, 8.0, anchors)
    score.backward()
    assert_reordered(with_term - coop, 8.0 * ctx.grad, FORWARD_BACKWARD, "KgCoOp term's gradient")


@pytest.mark.parametrize("csc", [False, True], ids=["unified", "csc"])
@pytest.mark.parametrize("position", ["end", "front"])
@pytest.mark.parametrize("conflict", [True, False], ids=["conflicting", "agreeing"])
def test_prograd_step_equals_the_reference(tiny_clip, feats, anchors, csc, position, conflict):
    """Logits, both losses and the projected gradient as ``prograd_backward_and_update`` leaves it, in both of its
    branches: a batch whose cross-entropy gradient conflicts with the distillation gradient (the projection runs) and
    one where they agree (the cross-entropy gradient is kept); the labels are drawn until the reference takes the
    branch. The reference builds end and front prompts (its middle branch reads an undefined ``n_ctx``)."""
    model = _model(tiny_clip, csc=csc, class_token_position=position)
    objective = _objective(tiny_clip, model, MethodConfig("prograd", prograd_lambda=0.8, prograd_temperature=2.0))
    assert isinstance(objective, ProGrad)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        labels = torch.randint(len(CLASSNAMES), (B,), generator=g)
        ctx = model.prompt_learner.ctx.detach().clone().requires_grad_(True)
        ref_logits_, xe, kl = ref_prograd_losses(tiny_clip.model, model, ctx, feats, labels, 2.0, anchors)
        ref_grad, projected = ref_prograd_grad(ctx, xe, kl, 0.8)
        if projected == conflict:
            break
    assert projected == conflict, "no batch of labels takes this branch of the reference"
    logits, terms, (grad,) = _our_step(model, objective, feats, labels)
    assert_reordered(logits, ref_logits_.detach(), ONE_PASS, "ProGrad logits")
    assert_reordered_scalar(float(terms["ce"].detach()), float(xe.detach()), ONE_PASS, "ProGrad cross-entropy")
    assert_reordered_scalar(float(terms["kl"].detach()), float(kl.detach()), ONE_PASS, "ProGrad distillation loss")
    assert_reordered(grad, ref_grad, FORWARD_BACKWARD, "ProGrad projected gradient")
    _, _, (plain,) = _our_step(model, Objective(), feats, labels)
    if projected:  # far from the plain cross-entropy gradient, by more than the comparison above allows
        assert scaled_error(grad, plain) / EPS > 10 * FORWARD_BACKWARD
    else:
        assert_reordered(grad, plain, FORWARD_BACKWARD, "ProGrad without conflict vs cross-entropy gradient")


def test_cocoop_step_equals_the_reference(tiny_clip, feats, labels):
    """Logits, loss and the gradients of the context and of every meta-net tensor, against ``cocoop.py``'s per-image
    loop."""
    model = _model(tiny_clip, "cocoop", ctx_init="a photo of a")
    objective = make_objective(MethodConfig("cocoop"), model)
    logits, terms, grads = _our_step(model, objective, feats, labels)

    ctx = model.prompt_learner.ctx.detach().clone().requires_grad_(True)
    meta_net = torch.nn.Sequential(torch.nn.Linear(D, D // 8), torch.nn.ReLU(inplace=True), torch.nn.Linear(D // 8, 64))
    meta_net.load_state_dict({k.replace("linear1", "0").replace("linear2", "2"): v
                              for k, v in model.meta_net.state_dict().items()})
    ref = ref_cocoop_logits(tiny_clip.model, model, ctx, meta_net, feats)
    loss = F.cross_entropy(ref, labels)
    loss.backward()
    assert_reordered(logits, ref.detach(), ONE_PASS, "CoCoOp logits")
    assert_reordered_scalar(float(terms["ce"]), float(loss), ONE_PASS, "CoCoOp loss")
    expected = [ctx.grad, meta_net[0].weight.grad, meta_net[0].bias.grad, meta_net[2].weight.grad,
                meta_net[2].bias.grad]
    names = ["ctx", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"]
    assert len(grads) == len(expected)
    for ours, theirs, name in zip(grads, expected, names):
        assert_reordered(ours, theirs, FORWARD_BACKWARD, f"CoCoOp {name} gradient")


def test_cocoop_conditions_each_image_on_its_own_features(tiny_clip, feats):
    """An image's logits depend on its own feature through the prompt: the same image in two batches gets the same
    logits (no mixing across the batch), and a chunked encoder gives the batched one's logits."""
    model = _model(tiny_clip, "cocoop")
    with torch.no_grad():
        whole = model.forward_features(feats)
        alone = torch.cat([model.forward_features(feats[i:i + 1]) for i in range(B)])
        model.max_prompts = len(CLASSNAMES) * 2  # two images per text-encoder call
        chunked = model.forward_features(feats)
    assert_reordered(alone, whole, ONE_PASS, "CoCoOp per-image vs batched logits")
    assert_reordered(chunked, whole, ONE_PASS, "CoCoOp chunked vs batched logits")
    plain = CoOpModel(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, PromptConfig(n_ctx=4),
                      generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unconditioned = plain.forward_features(feats)
    assert (whole - unconditioned).abs().max() > 1e-4  # the meta-net's shift is in the prompts


# --- training: the reference trainer's loop, several epochs ------------------------------------------------------

@pytest.fixture(scope="module")
def views() -> CachedViews:
    g = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(2, 12, D, generator=g), dim=-1)  # (n_views, n, d)
    return CachedViews(v, torch.arange(12) % len(CLASSNAMES), seed=0)


@pytest.mark.parametrize("method", ["kgcoop", "prograd", "cocoop"])
def test_training_follows_the_reference_trainer(tiny_clip, views, anchors, method):
    """``engine.train`` with each method's objective takes the reference trainer's steps: the same batches, each step
    the reference's loss and gradient rule, then Dassl's SGD (momentum 0.9, weight decay 5e-4) at CoOp's schedule."""
    cfg = TrainConfig(epochs=3, batch_size=4, lr=0.02, warmup_epochs=1, warmup_lr=1e-3)
    method_cfg = MethodConfig(method, kg_weight=2.0, prograd_lambda=1.0, prograd_temperature=1.0)
    ours = _model(tiny_clip, method)
    reference = _model(tiny_clip, method)
    history = train(ours, views, cfg, objective=_objective(tiny_clip, ours, method_cfg) if method != "cocoop"
                    else make_objective(method_cfg, ours))

    ctx = reference.prompt_learner.ctx
    params = reference.trainable_parameters()
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, dampening=0, weight_decay=5e-4, nesterov=False)
    for epoch in range(cfg.resolved_epochs):
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch, cfg)
        for batch in global_batches(12, cfg.batch_size, cfg.seed, epoch):
            f, y = views.batch(batch, epoch), views.labels[batch]
            opt.zero_grad()
            if method == "kgcoop":
                ref_kgcoop_loss(tiny_clip.model, reference, ctx, f, y, 2.0, anchors)[1].backward()
            elif method == "prograd":
                _, xe, kl = ref_prograd_losses(tiny_clip.model, reference, ctx, f, y, 1.0, anchors)
                ctx.grad = ref_prograd_grad(ctx, xe, kl, 1.0)[0]
            else:
                F.cross_entropy(ref_cocoop_logits(tiny_clip.model, reference, ctx, reference.meta_net, f), y).backward()
            opt.step()
    start = _model(tiny_clip, method).prompt_learner.ctx.detach()
    assert (ctx.detach() - start).abs().max() > 1e-3  # the trajectory moved
    assert_reordered(ours.prompt_learner.ctx, ctx, TRAJECTORY, f"{method} context after 3 epochs")
    if method == "cocoop":
        for (name, a), b in zip(ours.meta_net.named_parameters(), reference.meta_net.parameters()):
            assert_reordered(a, b, TRAJECTORY, f"cocoop meta-net {name} after 3 epochs")
    extra = {"kgcoop": "train_kg", "prograd": "train_kl"}.get(method)
    assert all((extra in h) == (extra is not None) for h in history)


# --- distribution, resume, configuration ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["kgcoop", "prograd", "cocoop"])
def test_two_workers_take_the_one_process_steps(tiny_clip, views, method):
    """Batch 5 over 2 workers (shards of 3 and 2): KgCoOp's class term counted once, ProGrad's two gradients reduced
    before they are compared, CoCoOp's meta-net gradients summed."""
    cfg = TrainConfig(epochs=2, batch_size=5, lr=0.05, warmup_epochs=0, text_sharding="data")
    method_cfg = MethodConfig(method, kg_weight=4.0)

    def objective(model):
        return make_objective(method_cfg, model) if method == "cocoop" else _objective(tiny_clip, model, method_cfg)

    single = _model(tiny_clip, method)
    single_history = train(single, views, cfg, objective=objective(single))
    group = ThreadGroup(2)
    models = [_model(tiny_clip, method) for _ in range(2)]
    histories: list = [None, None]
    errors: list[BaseException] = []

    def work(rank: int) -> None:
        try:
            histories[rank] = train(models[rank], views, cfg, dist=group.rank(rank), objective=objective(models[rank]))
        except BaseException as err:
            errors.append(err)
            group.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for rank in range(2):
        assert_reordered(models[rank].prompt_learner.ctx, single.prompt_learner.ctx, TRAJECTORY,
                         f"{method} rank {rank} context vs one process")
        for a, b in zip(models[rank].trainable_parameters()[1:], single.trainable_parameters()[1:]):
            assert_reordered(a, b, TRAJECTORY, f"{method} rank {rank} meta-net vs one process")
        for h, s in zip(histories[rank], single_history):
            assert_reordered_scalar(h["train_loss"], s["train_loss"], TRAJECTORY, "epoch loss")
            for key in ("train_kg", "train_kl"):
                if key in s:
                    assert_reordered_scalar(h[key], s[key], TRAJECTORY, key)


def test_cocoop_resumes_its_meta_net(tiny_clip, views):
    """A CoCoOp run resumed from an epoch-end state equals the straight run: the state carries the meta-net."""
    cfg = TrainConfig(epochs=3, batch_size=4, lr=0.05, warmup_epochs=0)
    straight = _model(tiny_clip, "cocoop")
    train(straight, views, cfg, objective=Objective())
    states = []
    first = _model(tiny_clip, "cocoop")
    train(first, views, TrainConfig(**{**cfg.__dict__, "epochs": 3}), objective=Objective(),
          on_epoch_end=lambda state, m: states.append(state))
    resumed = _model(tiny_clip, "cocoop", seed=5)  # other initial vectors: everything must come from the state
    train(resumed, views, cfg, objective=Objective(), resume=states[0])
    assert set(states[0].learned) == {"meta_net.linear1.weight", "meta_net.linear1.bias", "meta_net.linear2.weight",
                                      "meta_net.linear2.bias"}
    for a, b in zip(resumed.trainable_parameters(), straight.trainable_parameters()):
        assert torch.equal(a, b)


def test_prograd_initialisation_puts_the_words_last_after_zeros(tiny_clip):
    """ProGrad's ``CTX_INIT``: n_ctx 16 kept, the template's words in the last slots, zeros before."""
    words = "a centered satellite photo of"
    model = _model(tiny_clip, n_ctx=16, ctx_init=words, pad_ctx_init=True)
    ctx = model.prompt_learner.ctx.detach()
    ids = tiny_clip.tokenizer([words])[0]
    k = int(ids.argmax()) - 1
    emb = tiny_clip.model.token_embedding(ids[1:1 + k]).detach()
    assert ctx.shape == (16, 64)
    assert torch.equal(ctx[16 - k:], emb) and not ctx[:16 - k].any()
    with pytest.raises(ValueError, match="more than n_ctx 2"):
        _model(tiny_clip, n_ctx=2, ctx_init=words, pad_ctx_init=True)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "maple"}, "method must be one of"),
    ({"kg_weight": -1.0}, "kg_weight"),
    ({"prograd_lambda": float("nan")}, "prograd_lambda must be a finite number"),
    ({"prograd_temperature": 0.0}, "prograd_temperature must be > 0"),
    ({"meta_net_ratio": 0}, "meta_net_ratio"),
])
def test_method_config_refuses_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MethodConfig(**kwargs)


def test_cocoop_refuses_prompts_its_reference_does_not_build(tiny_clip):
    for prompt in (PromptConfig(csc=True), PromptConfig(class_token_position="middle")):
        with pytest.raises(ValueError, match="cocoop"):
            check_method_prompt(MethodConfig("cocoop"), prompt)
        with pytest.raises(ValueError, match="CoCoOp needs a unified context"):
            CoCoOpModel(tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, prompt)
    with pytest.raises(ValueError, match="needs a CoCoOpModel"):
        make_objective(MethodConfig("cocoop"), _model(tiny_clip))
    with pytest.raises(ValueError, match="zero-shot text features"):
        make_objective(MethodConfig("kgcoop"), _model(tiny_clip))
