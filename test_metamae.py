"""Tests of metamae.py: each asserts a property that the paper or the math implies. CPU, well under a minute."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import numpy as np

from metamae import (MetaMAE, MetaMAEConfig, Task, contrast_cosines, nt_xent, random_masking, recon_loss, sincos_1d,
                     sincos_table, support_set)
from pictures import reconstruct  # the pictures' reading of a model: its reconstructions from Z and Z*

TINY = dict(embed_dim=32, depth=2, num_heads=4, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
            mlp_ratio=2.0, dropout=0.0)
MODALITIES = {  # name: (config kwargs, input maker)
    "2d": (dict(input_shape=(3, 8, 12), patch_size=(2, 4)), lambda B: torch.rand(B, 3, 8, 12)),
    "1d": (dict(input_shape=(5, 24), patch_size=(3,)), lambda B: torch.randn(B, 5, 24)),
    "tokens": (dict(input_shape=(20,), patch_size=(), vocab_size=7), lambda B: torch.randint(0, 7, (B, 20))),
    "tabular": (dict(input_shape=(9,), patch_size=()), lambda B: torch.randn(B, 9)),
}


def make(kind="2d", **kw):
    cfg_kw, make_x = MODALITIES[kind]
    torch.manual_seed(0)
    return MetaMAE(MetaMAEConfig(**{**TINY, **cfg_kw, **kw})), make_x

# ----------------------------------------------------------------------------- shapes and layouts


@pytest.mark.parametrize("kind", list(MODALITIES))
def test_every_modality_s_loss_logs_features_and_reconstructions(kind):
    model, make_x = make(kind)
    x, noise = make_x(6), torch.rand(6, model.cfg.num_tokens)
    N = model.cfg.num_tokens
    torch.manual_seed(0)
    loss, logs = model(x, noise)
    assert loss.shape == () and torch.isfinite(loss)
    assert set(logs) == {"amortized", "support", "adapted", "shift", "contrast", "pos_cos", "neg_cos"}
    assert all(v.shape == () and not v.requires_grad for v in logs.values())
    # the loss is the query loss from Z* plus the weighted contrastive term; cosines are cosines
    assert loss.item() == pytest.approx((logs["adapted"] + 0.1 * logs["contrast"]).item(), rel=1e-6)
    assert -1 <= logs["neg_cos"] <= logs["pos_cos"] <= 1 + 1e-6 and logs["shift"] > 0
    # the features: the mean of the encoder's patch tokens of the whole, unmasked input
    by_hand = model.encoder(model.encoder.tokenizer.patchify(x))[:, 1:].mean(dim=1)
    assert model.encode(x).shape == (6, 32) and torch.allclose(model.encode(x), by_hand, atol=1e-6)
    # the reconstructions, in the input's layout: the amortized one is the decoder's output from Z, whose query
    # loss is the logged one (the mask of the same noise)
    rec = reconstruct(model, x, noise)
    assert rec["mask"].shape == (6, N) and rec["mask"].sum(1).eq(N - model.cfg.num_visible).all()
    assert rec["amortized"].shape == x.shape and rec["adapted"].shape == x.shape
    if kind == "tokens":
        assert rec["adapted"].dtype == torch.long and 0 <= rec["adapted"].min() and rec["adapted"].max() < 7
    else:
        tok = model.encoder.tokenizer
        query = ((tok.patchify(rec["amortized"]) - tok.patchify(x)).pow(2).mean(-1) * rec["mask"]).sum()
        assert (query / rec["mask"].sum()).item() == pytest.approx(logs["amortized"].item(), rel=1e-5)


def test_logs_follow_the_configuration():
    x = torch.rand(4, 3, 8, 12)
    assert set(make(inner_steps=0, contrast_weight=0)[0](x)[1]) == {"amortized"}
    assert set(make(contrast_weight=0)[0](x)[1]) == {"amortized", "support", "adapted", "shift"}


def test_patchify_is_mae_order_and_unpatchify_inverts_it():
    model, make_x = make("2d")
    tok = model.encoder.tokenizer
    x = make_x(2)
    t = tok.patchify(x)  # (B, N, ph * pw * C), grid 4 x 3 of 2 x 4 patches
    assert t.shape == (2, 12, 24)
    # token 4 is grid cell (row 1, col 1); value index (i, j, c) = (i * 4 + j) * 3 + c
    for i, j, c in [(0, 0, 0), (1, 3, 2), (0, 2, 1)]:
        assert t[1, 4, (i * 4 + j) * 3 + c] == x[1, c, 2 + i, 4 + j]
    assert torch.equal(tok.unpatchify(t), x)
    model1d, make_x1d = make("1d")
    x = make_x1d(2)
    t = model1d.encoder.tokenizer.patchify(x)  # (B, 8, 3 * 5): values in (p, C) order
    assert t[0, 2, 1 * 5 + 4] == x[0, 4, 2 * 3 + 1]
    assert torch.equal(model1d.encoder.tokenizer.unpatchify(t), x)


def test_sincos_tables_hand_values():
    t = sincos_1d(4, torch.tensor([0.0, 1.0, 2.0]))  # frequencies 1 and 1/100
    expected = torch.tensor([[0, 0, 1, 1], [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)],
                             [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]], dtype=torch.float64)
    assert torch.allclose(t, expected, atol=1e-12)
    table = sincos_table(8, (2, 3))  # non-square grid, row-major: token k is (row k // 3, col k % 3)
    assert table.shape == (6, 8)
    for k in range(6):  # first half encodes the column, second half the row
        assert torch.allclose(table[k, :4], sincos_1d(4, torch.tensor([k % 3.0])).float()[0])
        assert torch.allclose(table[k, 4:], sincos_1d(4, torch.tensor([k // 3.0])).float()[0])

# ----------------------------------------------------------------------------- masking and support set


def test_random_masking():
    noise = torch.rand(5, 10)
    ids_keep, ids_restore, mask = random_masking(noise, 3)
    assert ids_keep.shape == (5, 3) and mask.sum(1).eq(7).all()
    # the kept positions are the lowest-noise ones, and exactly the unmasked ones
    assert torch.equal(ids_keep.sort(1).values, noise.argsort(1)[:, :3].sort(1).values)
    assert mask.gather(1, ids_keep).eq(0).all()
    # ids_restore inverts the shuffle
    shuffled = noise.gather(1, noise.argsort(1))
    assert torch.equal(shuffled.gather(1, ids_restore), noise)
    # the same noise gives the same mask
    assert torch.equal(random_masking(noise.clone(), 3)[2], mask)


def test_noise_fixes_the_mask_and_seed_fixes_the_support():
    model, make_x = make()
    x, noise = make_x(4), torch.rand(4, 12)
    torch.manual_seed(1)
    a = model(x, noise)[0]
    torch.manual_seed(1)
    b = model(x, noise)[0]
    assert torch.equal(a, b)
    assert not torch.equal(model(x, torch.rand(4, 12))[0], a)


def test_support_set_2d():
    # 3 x 4 grid, visible cells marked V: masked neighbours of V are the candidates
    visible = torch.tensor([[1, 0, 0, 0],
                            [0, 0, 0, 0],
                            [0, 0, 0, 1]], dtype=torch.float).flatten()[None]
    mask = 1 - visible
    neighbours = torch.tensor([[0, 1, 0, 0],
                               [1, 0, 0, 1],
                               [0, 0, 1, 0]], dtype=torch.float).flatten()[None]
    assert torch.equal(support_set(mask, (3, 4), 1.0, torch.rand(1, 12)), visible + neighbours)
    assert torch.equal(support_set(mask, (3, 4), 0.0, torch.rand(1, 12)), visible)
    # with ratio 0.5, exactly the neighbours whose draw is below 0.5 join
    rand = torch.rand(1, 12)
    assert torch.equal(support_set(mask, (3, 4), 0.5, rand), visible + neighbours * (rand < 0.5))


def test_support_set_1d_contains_visible_and_adds_only_masked_neighbours():
    torch.manual_seed(0)
    mask = (torch.rand(64, 30) < 0.7).float()
    s = support_set(mask, (30,), 0.5, torch.rand(64, 30))
    visible = 1 - mask
    assert (s >= visible).all() and s.max() <= 1
    added = (s - visible).bool()
    left = F.pad(visible, (1, 0))[:, :-1].bool()
    right = F.pad(visible, (0, 1))[:, 1:].bool()
    assert (mask.bool() | ~added).all() and ((left | right) | ~added).all()
    assert added.any()

# ----------------------------------------------------------------------------- losses


def test_nt_xent_hand_computation():
    a = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=1)
    b = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), dim=1)
    z, t = [a[0], a[1], b[0], b[1]], 0.5
    positive = {0: 2, 1: 3, 2: 0, 3: 1}
    total = 0.0
    for i in range(4):
        sims = {j: float(z[i] @ z[j]) / t for j in range(4) if j != i}
        total += -sims[positive[i]] + math.log(sum(math.exp(s) for s in sims.values()))
    assert nt_xent(a, b, t).item() == pytest.approx(total / 4, rel=1e-6)


def test_contrast_cosines_against_every_pair():
    a, b = F.normalize(torch.randn(5, 3), dim=1), F.normalize(torch.randn(5, 3), dim=1)
    z = torch.cat([a, b])
    positives = [float(a[i] @ b[i]) for i in range(5)]
    negatives = [float(z[i] @ z[j]) for i in range(10) for j in range(10) if j != i and abs(i - j) != 5]
    assert len(negatives) == 10 * 8
    pos, neg = contrast_cosines(a, b)
    assert pos.item() == pytest.approx(sum(positives) / 5, abs=1e-6)
    assert neg.item() == pytest.approx(sum(negatives) / 80, abs=1e-6)
    assert contrast_cosines(a, a)[0].item() == pytest.approx(1.0)  # identical views are perfectly aligned


def test_mae_loss_is_masked_mse():
    model, make_x = make(inner_steps=0, contrast_weight=0)
    x, noise = make_x(3), torch.rand(3, 12)
    loss, _ = model(x, noise)
    rec = reconstruct(model, x, noise)
    # mask per pixel: (B, 4, 3) grid of 2 x 4 patches -> (B, 8, 12)
    pixel_mask = rec["mask"].view(3, 4, 3).repeat_interleave(2, 1).repeat_interleave(4, 2)[:, None]
    se = ((rec["amortized"] - x) ** 2 * pixel_mask).sum()
    assert loss.item() == pytest.approx((se / (rec["mask"].sum() * 24)).item(), rel=1e-5)


def test_token_loss_is_cross_entropy_against_tied_embedding():
    model, make_x = make("tokens", inner_steps=0, contrast_weight=0)
    x, noise = make_x(2), torch.rand(2, 20)
    loss, _ = model(x, noise)
    _, ids_restore, mask = random_masking(noise, model.cfg.num_visible)
    z = model.encoder(x, random_masking(noise, model.cfg.num_visible)[0])
    head = model.decoder(z, ids_restore)  # (B, N, D) vectors before scoring
    logits = head @ model.encoder.tokenizer.embedding.weight.t()
    ce = F.cross_entropy(logits[mask.bool()], x[mask.bool()])
    assert loss.item() == pytest.approx(ce.item(), rel=1e-5)

# ----------------------------------------------------------------------------- the inner loop


def visible_only_task(model, x, noise):
    """The task with the visible tokens as the whole support set, and the amortized latent of it."""
    target = model.encoder.tokenizer.patchify(x)
    ids_keep, ids_restore, mask = random_masking(noise, model.cfg.num_visible)
    z = model.encoder(target, ids_keep)
    return Task(target, ids_keep, ids_restore, mask, 1 - mask), z


def test_one_inner_step_lowers_the_support_loss():
    model, make_x = make()
    model.eval()
    task, z = visible_only_task(model, *(make_x(8), torch.rand(8, 12)))
    pred = model.decode(z, task.ids_restore)
    z_star, pred_star = model.adapt(z, pred, task)
    assert torch.equal(pred_star, model.decode(z_star, task.ids_restore))
    before, after = recon_loss(pred, task.target, task.support), recon_loss(pred_star, task.target, task.support)
    assert after < before
    assert not torch.equal(z_star, z)


def test_inner_step_is_per_sample():
    # the factor B makes the step independent of the batch: a sample adapts the same alone or in a batch
    model, make_x = make(inner_lr=3.0)
    task, z = visible_only_task(model, make_x(4), torch.rand(4, 12))
    z_batch = model.adapt(z, model.decode(z, task.ids_restore), task)[0]
    one, z1 = Task(*(t[:1] for t in task)), z[:1]
    z_one = model.adapt(z1, model.decode(z1, one.ids_restore), one)[0]
    assert torch.allclose(z_batch[:1], z_one, atol=1e-6)
    assert (z_batch[:1] - z[:1]).abs().max() > 1e-3


def test_inner_step_is_the_gradient_step_by_hand():
    # Z* = Z - inner_lr * B * d(support loss)/dZ, checked against a finite difference of the support loss
    model, make_x = make("1d", inner_lr=0.7)
    model.double()
    task, z = visible_only_task(model, make_x(3).double(), torch.rand(3, 8))
    task = task._replace(target=task.target.double())
    z_star = model.adapt(z, model.decode(z, task.ids_restore), task)[0].detach()
    step = (z - z_star).detach() / (0.7 * 3)  # the gradient the inner loop used
    with torch.no_grad():
        eps, i = 1e-6, (1, 2, 5)  # one element of Z
        dz = torch.zeros_like(z)
        dz[i] = eps
        f = lambda zz: recon_loss(model.decode(zz, task.ids_restore), task.target, task.support).item()  # noqa: E731
        fd = (f(z + dz) - f(z - dz)) / (2 * eps)
    assert step[i].item() == pytest.approx(fd, rel=1e-6)


def test_adaptation_works_under_no_grad():
    model, make_x = make(inner_lr=3.0)
    model.eval()
    x, noise = make_x(4), torch.rand(4, 12)
    torch.manual_seed(0)
    with_grad = model(x, noise)[0]
    with torch.no_grad():
        torch.manual_seed(0)
        without = model(x, noise)[0]
        rec = reconstruct(model, x, noise)
    assert not without.requires_grad
    assert without.item() == pytest.approx(with_grad.item(), rel=1e-6)
    assert not torch.allclose(rec["adapted"], rec["amortized"])
    # (under torch.inference_mode it cannot differentiate, and says so: the table's row
    # 'a-forward-under-inference-mode')


def test_shift_is_zero_without_a_step_and_proportional_to_inner_lr():
    # One step moves Z by inner_lr * grad, and grad does not depend on inner_lr: shift scales linearly.
    x, noise = torch.rand(4, 3, 8, 12), torch.rand(4, 12)
    shifts = {}
    for lr in (0.0, 0.5, 2.0):
        model = make(inner_lr=lr)[0]
        torch.manual_seed(1)  # the same support set for every lr
        shifts[lr] = model(x, noise)[1]["shift"].item()
    assert shifts[0.0] == 0.0 and shifts[0.5] > 0
    assert shifts[2.0] == pytest.approx(4 * shifts[0.5], rel=1e-5)
    # and it is the per-sample ||Z* - Z|| / ||Z||, averaged: recompute it from adapt
    model = make(inner_lr=2.0)[0]
    torch.manual_seed(1)
    task = model.make_task(x, noise)
    z = model.encoder(task.target, task.ids_keep)
    z_star = model.adapt(z, model.decode(z, task.ids_restore), task)[0].detach()
    z = z.detach()
    by_hand = sum(float((z_star[i] - z[i]).norm() / z[i].norm()) for i in range(4)) / 4
    assert shifts[2.0] == pytest.approx(by_hand, rel=1e-5)


def variant(model, **changes):
    """The same weights under a config with `changes` (a model's config is its own: a variant is a new model)."""
    other = MetaMAE(dataclasses.replace(model.cfg, **changes)).to(next(model.parameters()).dtype)
    other.load_state_dict(model.state_dict())
    return other


def _grad_vector(model, x, noise):
    model.zero_grad()
    torch.manual_seed(0)  # the support-set draw
    model(x, noise)[0].backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_second_order_gradient_matches_finite_differences():
    # A large inner_lr makes the second-order term a sizable part of the gradient; in float64 the
    # central difference along a random direction is accurate to ~1e-9, so it tells the two apart.
    model, make_x = make("1d", inner_lr=20.0)
    model.double()
    x, noise = make_x(4).double(), torch.rand(4, 8)
    second = _grad_vector(model, x, noise)
    first = _grad_vector(variant(model, first_order=True), x, noise)
    torch.manual_seed(123)
    v = torch.randn_like(second)
    params = list(model.parameters())

    def loss_at(eps):
        with torch.no_grad():
            offset = 0
            for p in params:
                p += eps * v[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
        torch.manual_seed(0)
        out = model(x, noise)[0].item()
        with torch.no_grad():
            offset = 0
            for p in params:
                p -= eps * v[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
        return out

    eps = 1e-5
    fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert (second @ v).item() == pytest.approx(fd, rel=1e-6)
    gap = abs((first @ v).item() - fd)
    assert gap > 1e-4 * abs(fd) and gap > 1e3 * abs((second @ v).item() - fd)


def test_first_and_second_order_differ_but_share_the_loss():
    # first order drops a term of the gradient, not of the loss: the same loss value, another gradient
    model, make_x = make()
    x, noise = make_x(4), torch.rand(4, 12)
    first_order = variant(model, first_order=True)
    losses = []
    for m in (model, first_order):
        torch.manual_seed(0)  # the support-set draw
        losses.append(m(x, noise)[0].item())
    assert losses[0] == losses[1]
    second, first = _grad_vector(model, x, noise), _grad_vector(first_order, x, noise)
    assert not torch.allclose(first, second)
    assert (first - second).norm() < 0.1 * second.norm()  # at initialization, a small correction


def learned_variant(model, **changes):
    """The same weights with a learned step size, which starts at the config's inner_lr."""
    other = MetaMAE(dataclasses.replace(model.cfg, learn_inner_lr=True, **changes)).to(next(model.parameters()).dtype)
    assert other.load_state_dict(model.state_dict(), strict=False).missing_keys == ["log_inner_lr"]  # nothing else
    return other


def test_a_learned_step_size_starts_as_the_fixed_one_and_its_gradient_is_the_derivative_of_the_loss():
    # learn_inner_lr adds one parameter, log inner_lr: at its start value the loss and every other gradient are the
    # fixed step's. Its gradient is d loss / d log inner_lr, checked by a central difference in float64, at second
    # order and at first order (where the step is still a function of inner_lr, of a constant gradient).
    model, make_x = make("1d", inner_lr=0.5)
    x, noise = make_x(4), torch.rand(4, 8)
    learned = learned_variant(model)
    assert learned.log_inner_lr.exp().tolist() == [0.5]
    fixed_grad, learned_grad = _grad_vector(model, x, noise), _grad_vector(learned, x, noise)
    assert torch.equal(fixed_grad, learned_grad[1:])  # a module's own parameters come before its submodules'
    assert learned(x, noise)[1]["inner_lr"].item() == 0.5
    model.double()
    for first_order in (False, True):
        m = learned_variant(model, first_order=first_order)
        m.zero_grad()
        torch.manual_seed(0)
        m(x.double(), noise)[0].backward()

        def loss_at(log_lr):
            with torch.no_grad():
                m.log_inner_lr.fill_(log_lr)
                torch.manual_seed(0)
                return m(x.double(), noise)[0].item()
        eps, at = 1e-6, math.log(0.5)
        fd = (loss_at(at + eps) - loss_at(at - eps)) / (2 * eps)
        assert m.log_inner_lr.grad.item() == pytest.approx(fd, rel=1e-5) and abs(fd) > 1e-7


def test_a_learned_step_size_moves_with_training_and_takes_a_step_per_inner_step():
    model, make_x = make(inner_lr=0.5, inner_steps=2, learn_inner_lr=True)
    opt = torch.optim.Adam([model.log_inner_lr], lr=0.1)
    x = make_x(8)
    for step in range(5):
        torch.manual_seed(step)
        loss, logs = model(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.log_inner_lr.shape == (2,) and set(logs) >= {"inner_lr", "inner_lr_2"}
    assert (model.log_inner_lr - math.log(0.5)).abs().min() > 0.1  # Adam moves each by ~lr a step
    assert logs["inner_lr"].item() == pytest.approx(model.log_inner_lr[0].exp().item(), rel=0.5)


def test_every_parameter_gets_a_finite_nonzero_gradient():
    for kind in MODALITIES:
        model, make_x = make(kind, dropout=0.1)
        model(make_x(6))[0].backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name


def test_tiny_model_overfits_one_batch():
    model, make_x = make(inner_lr=0.5)
    x = make_x(8)
    noise = torch.rand(8, 12)  # the same task every step
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(150):
        torch.manual_seed(step)
        loss, logs = model(x, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(logs["adapted"].item())
    assert losses[-1] < 0.5 * losses[0]

# ----------------------------------------------------------------------------- CUDA-graph safety


class HostTraffic(TorchDispatchMode):
    """Records what breaks CUDA-graph capture, on the meta device: any op fed a tensor that lives elsewhere
    (a host-to-device copy). Meta tensors hold no data, so a host sync (.item(), bool(t), a data-dependent
    shape) raises on its own."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.seen += [str(func) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor) and a.is_cpu]
        return func(*args, **kwargs)


class HostTensors(TorchFunctionMode):
    """torch.tensor(data, device=...) copies from the host even when dispatch does not show it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.tensor, torch.as_tensor, torch.from_numpy):
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", list(MODALITIES))
@pytest.mark.parametrize("variant", [dict(inner_steps=0, contrast_weight=0.0), dict(first_order=True), dict()])
def test_training_step_has_no_host_sync_or_host_tensor(kind, variant):
    cfg_kw, _ = MODALITIES[kind]
    with torch.device("meta"):
        model = MetaMAE(MetaMAEConfig(**{**TINY, **cfg_kw, **variant, "dropout": 0.1}))
    cfg = model.cfg
    x = (torch.randint(0, 7, (4, *cfg.input_shape), device="meta") if kind == "tokens"
         else torch.rand(4, *cfg.input_shape, device="meta"))
    with HostTraffic() as ops, HostTensors() as made:
        loss, logs = model(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    assert ops.seen == [] and made.seen == []
    assert all(p.grad is not None for p in model.parameters())


def test_host_traffic_detectors_fire():  # the test above could not fail if these saw nothing
    with torch.device("meta"):
        z = torch.rand(4, 8)
    with HostTraffic() as ops, HostTensors() as made:
        z + torch.arange(8).to(z.device)  # a host-made tensor moved to the device
        torch.tensor([1.0, 2.0], device=z.device)
    assert ops.seen and made.seen == ["tensor"]
    with pytest.raises(Exception):
        z.sum().item()  # a host sync

# ----------------------------------------------------------------------------- encode, MAE, validation


def test_encode_is_deterministic_and_unmasked():
    model, make_x = make(dropout=0.5)
    x = make_x(3)
    a = model.encode(x)
    model.eval()
    assert torch.equal(model.encode(x), a)
    # the mean over all N patch tokens: changing one input patch changes the features
    x2 = x.clone()
    x2[:, :, :2, :4] += 1
    assert not torch.allclose(model.encode(x2), a)


def test_mae_configuration_has_no_projector():
    mae = make(inner_steps=0, contrast_weight=0)[0]
    meta = make()[0]
    mae_keys, meta_keys = set(mae.state_dict()), set(meta.state_dict())
    assert not any(k.startswith("projector") for k in mae_keys)
    assert mae_keys == {k for k in meta_keys if not k.startswith("projector")}


# ----------------------------------------------------------------------------- inputs, as a copier hands them over
# (what is refused, and how: the table at the end of this file)


def test_float_inputs_of_any_dtype_are_cast():
    model, make_x = make("2d")
    model.eval()
    x, noise = make_x(4), torch.rand(4, 12)
    torch.manual_seed(0)
    loss32 = model(x, noise)[0]
    torch.manual_seed(0)
    loss64 = model(x.double(), noise)[0]  # numpy and scikit-learn hand out float64
    assert loss64.dtype == torch.float32 and loss64.item() == pytest.approx(loss32.item(), rel=1e-6)
    assert torch.allclose(model.encode(x.double()), model.encode(x))
    # (integer values are refused: the table's rows 'integer-values-into-a-float-model' and 'floats-into-a-token-model')


def test_numpy_integers_configure_a_model():
    cfg = MetaMAEConfig(**{**TINY, "input_shape": tuple(np.array([3, 8, 12])), "patch_size": (np.int64(2), 4)})
    loss, _ = MetaMAE(cfg)(torch.rand(2, 3, 8, 12))
    assert torch.isfinite(loss)


def test_a_variant_is_a_new_model_of_a_replaced_config():
    # a model keeps its config, which cannot change under it (the table's rows 'a-config-...'); the way to a variant
    cfg = MetaMAEConfig(**{**TINY, **MODALITIES["2d"][0]})
    model = MetaMAE(cfg)
    mae = MetaMAE(dataclasses.replace(cfg, inner_steps=0, contrast_weight=0))
    assert model.cfg.inner_steps == 1 and mae.cfg.inner_steps == 0 and "contrast" in model(torch.rand(2, 3, 8, 12))[1]


def test_a_batch_of_one_works_in_eval_and_without_the_contrastive_loss():
    # (in training the contrastive loss needs 2 inputs, and says so: the table's row 'a-training-batch-of-one')
    model, make_x = make("2d")
    model.eval()
    loss, logs = model(make_x(1))
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in logs.values())
    mae = make("2d", inner_steps=0, contrast_weight=0)[0]
    assert torch.isfinite(mae(make_x(1))[0])  # without the contrastive loss a batch of 1 trains


def test_encode_works_under_inference_mode():
    # (reconstruct cannot, and says so: the table's row 'reconstruct-under-inference-mode')
    model, make_x = make("2d")
    with torch.inference_mode():
        assert model.encode(make_x(2)).shape == (2, 32)


def test_numpy_inputs_work():
    model, make_x = make("2d")
    x = make_x(4)
    torch.manual_seed(0)
    from_torch = model(x)[0]
    torch.manual_seed(0)
    assert model(x.numpy())[0].item() == from_torch.item()  # numpy's float64 too: cast like any float tensor
    assert torch.equal(model.encode(x.double().numpy()), model.encode(x))


def test_features_follow_the_module_s_mode_and_dropout_and_encode_never_drops_out():
    model, make_x = make("2d", dropout=0.3)
    x = make_x(3)
    f = model.features(x)  # train mode: cfg.dropout, as fine-tuning through it expects
    assert not torch.allclose(f, model.features(x)) and not torch.allclose(f.detach(), model.encode(x))
    assert torch.equal(model.encode(x), model.encode(x)) and model.encode(x).grad_fn is None  # never dropout
    f.pow(2).sum().backward()  # a task's loss on the features trains the encoder
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.blocks.parameters())
    model.eval()
    assert torch.equal(model.features(x).detach(), model.encode(x))


def test_torch_compile_of_the_whole_model_trains_like_eager():
    # the decoder and the inner loop (differentiated twice) stay eager, the rest compiles: aot_eager traces as
    # inductor does, without generating code, so a mistake shows in seconds (before: PyTorch's "differentiated
    # Tensor ... not used in the graph" at the first forward)
    model, make_x = make("1d")
    x, noise = make_x(4), torch.rand(4, 8)
    eager = _grad_vector(model, x, noise)
    torch.manual_seed(0)
    loss = model(x, noise)[0].item()
    compiled = torch.compile(model, backend="aot_eager")
    model.zero_grad()
    torch.manual_seed(0)
    out, logs = compiled(x, noise)
    out.backward()
    assert out.item() == pytest.approx(loss, rel=1e-6) and set(logs) >= {"adapted", "shift", "contrast"}
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in model.parameters()]), eager, rtol=1e-5, atol=1e-7)
    model.compile(backend="aot_eager")  # nn.Module's own, in place: the same
    torch.manual_seed(0)
    assert model(x, noise)[0].item() == pytest.approx(loss, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_computes_its_masks_and_losses_in_its_dtype(dtype):
    for kind in MODALITIES:
        model, make_x = make(kind)
        model.to(dtype)
        loss, logs = model(make_x(4))
        assert loss.dtype == dtype and all(v.dtype == dtype for v in logs.values()), (kind, loss.dtype, logs)
        assert torch.isfinite(loss)


def test_a_config_round_trips_through_json_and_the_docstring_s_save_and_load_lines_run(tmp_path, monkeypatch):
    import json
    import metamae
    cfg = MetaMAEConfig(**{**TINY, "input_shape": (5, 24), "patch_size": (3,)})
    back = MetaMAEConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert back == cfg and hash(back) == hash(cfg) and back.input_shape == (5, 24)
    # the usage lines of metamae's docstring, run as written (in a temporary folder): save and load with the
    # config, the encoder alone, and MetaMAE's weights into its MAE variant
    lines = [line[4:] for line in metamae.__doc__.splitlines() if line.startswith("    ")]
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    scope = dict(torch=torch, dataclasses=dataclasses, MetaMAE=MetaMAE, MetaMAEConfig=MetaMAEConfig)
    exec("\n".join(lines).replace("MetaMAEConfig(input_shape", "MetaMAEConfig(**TINY, input_shape"),
         {**scope, "TINY": TINY}, scope)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.pt", "m.pt"]
    model, mae = scope["model"], scope["mae"]
    assert not hasattr(mae, "projector") and torch.equal(mae.encoder.blocks[0].fc1.weight,
                                                          model.encoder.blocks[0].fc1.weight)
    loaded = MetaMAE(MetaMAEConfig(**scope["state"]["cfg"]))
    loaded.load_state_dict(scope["state"]["model"])
    assert loaded.cfg == model.cfg and torch.equal(loaded.encode(scope["x"]), model.encode(scope["x"]))


# ----------------------------------------------------------------------------- the table: what no model may accept
# Each row is a call that must raise: the exception, and a pattern of its message that says what is wrong.


def config(kind="2d", **kw):
    """Building a model of this config."""
    return lambda: make(kind, **kw)


def invalid(field, **kw):
    """A config refused as it is made, naming the field that is wrong."""
    return pytest.param(config(**kw), ValueError, f"MetaMAEConfig.{field}:",
                        id=", ".join(f"{k}={v}" for k, v in kw.items()))


def given(call, kind="2d", **kw):
    """call(model, make_x) on a model of this config."""
    def run():
        return call(*make(kind, **kw))
    return run


def inference(call):
    """call(model, make_x) under torch.inference_mode."""
    def run(model, make_x):
        with torch.inference_mode():
            return call(model, make_x)
    return run


MODEL_CASES = [  # call; the exception it raises; a pattern of its message
    # configs that cannot work
    invalid("mask_ratio", mask_ratio=0.99),      # keeps no token of 12
    invalid("mask_ratio", mask_ratio=0.0),       # masks none
    invalid("patch_size", patch_size=(3, 4)),    # 3 does not divide 8
    invalid("patch_size", patch_size=(4,)),      # wrong length for a 2-D input
    invalid("embed_dim", embed_dim=30),          # not divisible by 4 heads
    invalid("decoder_embed_dim", decoder_embed_dim=18),
    invalid("contrast_weight", inner_steps=0),   # two identical views
    invalid("depth", depth=-1),
    invalid("inner_steps", inner_steps=-1),
    invalid("num_heads", num_heads=0),
    invalid("vocab_size", vocab_size=-3),
    invalid("dropout", dropout=1.0),
    invalid("support_ratio", support_ratio=1.5),
    invalid("temperature", temperature=0.0),
    invalid("input_shape", input_shape=(1, 2, 3, 4)),
    invalid("patch_size", patch_size=2),         # an int, not a tuple
    invalid("inner_lr", inner_lr=-0.5),
    invalid("inner_lr", inner_lr=float("inf")),  # finite, or the first step is NaN
    invalid("contrast_weight", contrast_weight=float("inf")),
    invalid("mlp_ratio", mlp_ratio=float("inf")),
    invalid("mlp_ratio", mlp_ratio=1e-9),        # int(width * 1e-9) = 0: an MLP of no unit
    invalid("depth", depth=2.0),                 # a float where an int counts blocks
    invalid("inner_steps", inner_steps=1.5),
    invalid("embed_dim", embed_dim=True),
    invalid("first_order", first_order="no"),    # truthy: would silently mean first order
    invalid("vocab_size", vocab_size=10),        # token ids on an image config: vocab_size is the mistake
    invalid("learn_inner_lr", learn_inner_lr=True, inner_lr=0.0),  # learned through its log: it needs a start
    invalid("learn_inner_lr", learn_inner_lr=True, inner_steps=0, contrast_weight=0),
    pytest.param(config(embed_dim=30, num_heads=6), ValueError,
                 r"embed_dim: must be a positive multiple of 12: of the 6 heads, and of 4", id="width-of-no-multiple"),
    # a config cannot change under a model: were it mutable, building an MAE baseline from the same object
    # (cfg.inner_steps = 0) would silently turn the first model into an MAE too
    pytest.param(lambda: setattr(MetaMAEConfig(**{**TINY, **MODALITIES["2d"][0]}), "inner_steps", 0),
                 dataclasses.FrozenInstanceError, "inner_steps", id="a-config-changed"),
    pytest.param(given(lambda model, make_x: setattr(model.cfg, "mask_ratio", 0.99)),
                 dataclasses.FrozenInstanceError, "mask_ratio", id="a-config-changed-under-its-model"),
    pytest.param(given(lambda model, make_x: setattr(model, "cfg", dataclasses.replace(model.cfg, contrast_weight=.5))),
                 AttributeError, "has no setter", id="a-config-replaced-under-its-model"),  # its layers were made of it
    pytest.param(lambda: dataclasses.replace(make()[0].cfg, mask_ratio=0.99), ValueError, "mask_ratio",
                 id="a-config-variant-checked-when-made"),
    # inputs, as a copier hands them over
    pytest.param(given(lambda model, make_x: model.eval()((make_x(4) * 255).to(torch.uint8))), ValueError,
                 "floating point.*torch.uint8", id="integer-values-into-a-float-model"),
    pytest.param(given(lambda model, make_x: model(torch.rand(4, 20)), "tokens"), ValueError,
                 "integer ids.*torch.float32", id="floats-into-a-token-model"),
    pytest.param(given(lambda model, make_x: model(torch.tensor([[0] * 19 + [7]] * 2)), "tokens"), ValueError,
                 r"token ids must be in 0..6 \(cfg.vocab_size = 7\), got 0..7", id="token-ids-outside-the-vocabulary"),
    *[pytest.param(given(lambda model, make_x, shape=shape, call=call: getattr(model, call)(torch.rand(shape))),
                   ValueError, r"expected input of shape \(B, 3, 8, 12\).*got",
                   id=f"{call.strip('_')}-of-shape-{'x'.join(map(str, shape))}")
      for shape in [(4, 3, 12, 8), (3, 8, 12), (4, 1, 8, 12)] for call in ("__call__", "encode", "features")],
    # (3, 8, 12) inputs: one image without its batch dimension has 3 "rows" (was blamed on the contrastive loss's
    # batch of 1)
    pytest.param(lambda: MetaMAE(MetaMAEConfig(**{**TINY, "input_shape": (1, 8, 12), "patch_size": (2, 4)}))(
        torch.rand(1, 8, 12)), ValueError, r"expected input of shape \(B, 1, 8, 12\).*got \(1, 8, 12\)",
        id="a-batch-without-its-batch-dimension"),
    pytest.param(given(lambda model, make_x: model(make_x(4), torch.rand(4, 11))), ValueError,
                 r"noise must have shape \(B, N\) = \(4, 12\), got \(4, 11\)", id="noise-of-another-shape"),
    pytest.param(given(lambda model, make_x: model(make_x(1))), ValueError, "contrastive loss needs at least 2 inputs",
                 id="a-training-batch-of-one"),
    # the encoder reads tokens: called on raw inputs it names model.features and model.encode (token ids are their
    # own tokens: the encoder reads them)
    *[pytest.param(given(lambda model, make_x: model.encoder(make_x(2)), kind), ValueError,
                   r"the encoder reads tokens of shape .*model\.features\(x\).*model\.encode",
                   id=f"the-encoder-on-raw-{kind}-inputs") for kind in ["2d", "1d", "tabular"]],
    # the inner step differentiates: under torch.inference_mode it cannot, and says so
    pytest.param(given(inference(lambda model, make_x: model.eval()(make_x(4), torch.rand(4, 12))), inner_lr=3.0),
                 RuntimeError, "outside torch.inference_mode", id="a-forward-under-inference-mode"),
    pytest.param(given(inference(lambda model, make_x: reconstruct(model, make_x(2)))), RuntimeError,
                 "outside torch.inference_mode", id="reconstruct-under-inference-mode"),
]


@pytest.mark.parametrize("call,exception,pattern", MODEL_CASES)
def test_what_no_model_may_accept(call, exception, pattern):
    with pytest.raises(exception, match=pattern):
        call()
