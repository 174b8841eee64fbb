"""
MetaMAE: a masked auto-encoder read as meta-learning, in one file.

Jang et al., "Modality-Agnostic Self-Supervised Learning with Meta-Learned Masked Auto-Encoder",
NeurIPS 2023, https://arxiv.org/abs/2310.16318. Authors' code: github.com/alinlab/MetaMAE.

Masking splits each input into a task: the visible tokens are its *support* set, the masked tokens its *query*
set. The encoder maps the support set to the *amortized latent* Z. MetaMAE then adapts Z with a gradient step on
the support reconstruction loss taken through the decoder, Z* = Z - inner_lr * grad_Z(B * loss_support(Z)),
reconstructs the query set from the *adapted latent* Z*, and adds a contrastive loss that pulls Z and Z* of the
same input together (SimCLR's NT-Xent). The step adapts an activation, not parameters: torch.autograd.grad on Z
is the whole mechanism. With inner_steps=0 and contrast_weight=0 the same network is a plain MAE.

    cfg = MetaMAEConfig(input_shape=(3, 32, 32), patch_size=(4, 4))
    model = MetaMAE(cfg)
    x = torch.rand(64, 3, 32, 32)
    loss, logs = model(x)         # logs: amortized / support / adapted / contrast losses (detached)
    loss.backward()
    features = model.encode(x)    # (64, embed_dim = 256), frozen: what a linear probe reads
    features = model.features(x)  # with a graph, and dropout in train mode: what fine-tuning trains through
    torch.save(dict(cfg=dataclasses.asdict(cfg), model=model.state_dict()), "m.pt")  # with its config
    state = torch.load("m.pt"); MetaMAE(MetaMAEConfig(**state["cfg"])).load_state_dict(state["model"])
    torch.save(model.encoder.state_dict(), "encoder.pt")  # the encoder alone
    mae = MetaMAE(dataclasses.replace(cfg, inner_steps=0, contrast_weight=0))  # its MAE: all but the projector
    mae.load_state_dict(model.state_dict(), strict=False)

torch.compile(model) compiles all but the decoder and the inner loop, which are differentiated twice and compiled
code cannot be; model.encoder.compile(), the bulk of the work, is what train.py's --compile does.

Deliberate differences from the authors' models.py (the default configuration computes the same loss
and gradients for the same weights and random state):
- The patch embedding is a Linear on patchified tokens instead of a Conv with stride = patch: the same function
  (weight.permute maps one onto the other). 2-D position tables work for non-square grids; theirs assume a square one.
- `encode` never applies dropout, so features are deterministic whatever the module's mode.
- The support set is drawn right after the mask noise (theirs: after the encoder pass); the two agree
  whenever the encoder draws no random numbers (dropout 0), and ours is reproducible from `noise` + seed.
"""

import math
from dataclasses import dataclass, fields
from numbers import Integral, Real  # numpy's numbers too
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# -----------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)  # frozen: a model keeps its config, so nobody can change it under the model's feet
class MetaMAEConfig:
    # input: (C, H, W) images/spectrograms with patch (ph, pw); (C, T) series with patch (p,);
    # (L,) integer tokens with vocab_size > 0; (F,) tabular features with vocab_size = 0.
    input_shape: tuple = (3, 32, 32)
    patch_size: tuple = (4, 4)
    vocab_size: int = 0
    # the DABS backbone the authors use
    embed_dim: int = 256
    depth: int = 12
    num_heads: int = 8
    decoder_embed_dim: int = 128
    decoder_depth: int = 4
    decoder_num_heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.1          # encoder only, as timm's Block(drop=...) in their code
    mask_ratio: float = 0.5
    # the meta-learning part
    inner_lr: float = 0.5
    inner_steps: int = 1          # 0: no adaptation (plain MAE when contrast_weight is 0 too)
    learn_inner_lr: bool = False  # True: learn a step size per inner step (through its log), starting at inner_lr
    first_order: bool = False     # True: do not differentiate through the inner gradient
    support_ratio: float = 0.1    # chance that a masked neighbour of a visible token joins the support set
    contrast_weight: float = 0.1
    temperature: float = 0.5
    proj_dim: int = 128

    def __post_init__(self):  # checked once, when made (dataclasses.replace makes and checks a new one)
        for name in ("input_shape", "patch_size"):  # a list (from JSON, say) becomes the tuple it stands for
            object.__setattr__(self, name, tuple(v) if isinstance(v := getattr(self, name), list) else v)
        check_config(self)  # at the end of the file, out of the method's way

    @property
    def modality(self):
        """'image' (C, H, W) -- spectrograms too --, 'series' (C, T), 'tokens' (L,) or 'tabular' (F,)."""
        return "tokens" if self.vocab_size > 0 else {3: "image", 2: "series", 1: "tabular"}[len(self.input_shape)]

    @property
    def grid(self):
        """The token grid: (H/ph, W/pw) for images, (T/p,) for series, (L,) or (F,); tokens are its row-major cells."""
        if self.modality in ("image", "series"):
            return tuple(n // p for n, p in zip(self.input_shape[1:], self.patch_size))
        return (self.input_shape[0],)

    @property
    def patch_dim(self):
        """Values per token: ph * pw * C, p * C, or 1 (a tabular feature, or a token id)."""
        return math.prod(self.patch_size) * self.input_shape[0] if self.modality in ("image", "series") else 1

    @property
    def num_tokens(self):
        return math.prod(self.grid)

    @property
    def num_visible(self):
        return int(self.num_tokens * (1 - self.mask_ratio))

# -----------------------------------------------------------------------------
# tokens: every modality becomes (B, N, P) patch values (or (B, N) ids) on a grid with MAE's fixed sin-cos positions


class Tokenizer(nn.Module):
    """Cuts an input into N tokens, embeds them, and puts predictions back in the input's layout."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        if cfg.modality == "tokens":
            self.embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
            nn.init.xavier_uniform_(self.embedding.weight)
        else:
            # one Linear over a patch's values; tabular features share a Linear(1, D), as the authors' HIGGS
            self.proj = nn.Linear(cfg.patch_dim, cfg.embed_dim)
            nn.init.xavier_uniform_(self.proj.weight)  # bias keeps PyTorch's default, as their Conv's does

    def patchify(self, x):
        """Input (B, *input_shape) -> reconstruction targets: (B, N, patch_dim) floats, or (B, N) token ids.
        Values in any float dtype are cast to the model's (float64 from numpy too); token ids must be ints."""
        cfg = self.cfg
        x = checked_input(cfg, x, self.embedding.weight if cfg.modality == "tokens" else self.proj.weight)
        if cfg.modality == "image":  # MAE's patch order: (ph, pw, C)
            return rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=cfg.patch_size[0], p2=cfg.patch_size[1])
        if cfg.modality == "series":
            return rearrange(x, "b c (n p) -> b n (p c)", p=cfg.patch_size[0])
        return x.unsqueeze(-1) if cfg.modality == "tabular" else x.long()  # (B, F, 1), or (B, L) token ids

    def unpatchify(self, t):
        """Inverse of patchify, for predictions: (B, N, patch_dim) -> the input's layout."""
        if self.cfg.modality == "image":
            (ph, pw), (gh, gw) = self.cfg.patch_size, self.cfg.grid
            return rearrange(t, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=gh, w=gw, p1=ph, p2=pw)
        if self.cfg.modality == "series":
            return rearrange(t, "b n (p c) -> b c (n p)", p=self.cfg.patch_size[0])
        return t.squeeze(-1) if self.cfg.modality == "tabular" else t

    def embed(self, tokens):  # (B, n, patch_dim) patches or (B, n) ids -> (B, n, D)
        return self.embedding(tokens) if self.cfg.modality == "tokens" else self.proj(tokens)


def sincos_1d(dim, pos):
    """(M,) positions -> (M, dim): first half sin, second half cos, frequencies 1/10000^(k/(dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    out = pos.double()[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_table(dim, grid):
    """(N, dim) table for a 1-D grid (n,) or a 2-D grid (gh, gw) read row-major; in 2-D (as MAE) the first half of
    the channels encodes the column and the second half the row."""
    if len(grid) == 1:
        return sincos_1d(dim, torch.arange(grid[0])).float()
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1).float()

# -----------------------------------------------------------------------------
# the Transformer (timm's Block: pre-norm, qkv without bias, GELU MLP), the encoder and the decoder


class Attention(nn.Module):
    def __init__(self, dim, num_heads, twice_differentiable):
        super().__init__()
        self.num_heads, self.twice_differentiable = num_heads, twice_differentiable
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, L, D) -> (B, L, D)
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        if self.twice_differentiable:
            # The decoder is differentiated twice (the inner-loop gradient is itself differentiated by the outer
            # loss), and the fused kernels behind SDPA (on CPU too) have no double backward: plain ops.
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, h, L, L); scaling q is cheaper
            out = attn.softmax(dim=-1) @ v  # (B, h, L, d)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # the encoder, differentiated once: fused
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, twice_differentiable=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, twice_differentiable)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x, p=0.0):  # (B, L, D); p: dropout after attention, after GELU, after fc2 (timm's places)
        # the caller passes p (the encoder's cfg.dropout in training, 0 otherwise): .eval() alone does not turn it off
        x = x + F.dropout(self.attn(self.norm1(x)), p)
        h = F.dropout(F.gelu(self.fc1(self.norm2(x))), p)  # (B, L, mlp_ratio * D)
        return x + F.dropout(self.fc2(h), p)


def init_linears(module):
    """xavier-uniform weights and zero biases for every Linear (LayerNorms keep PyTorch's 1 and 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Encoder(nn.Module):
    """Visible tokens -> the amortized latent Z = LayerNorm(blocks([cls; embed(tokens) + pos]))."""

    def __init__(self, cfg):
        super().__init__()
        self.tokenizer = Tokenizer(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.register_buffer("pos", sincos_table(cfg.embed_dim, cfg.grid), persistent=False)  # (N, D)
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim)
        init_linears(self.blocks)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, tokens, ids_keep=None, p=0.0):
        """tokens: (B, N, P) or (B, N) from patchify; ids_keep: (B, n) visible positions (None: all) -> (B, 1+n, D)"""
        check_tokens(self.tokenizer.cfg, tokens)  # an input that skipped patchify says so
        x = self.tokenizer.embed(tokens) + self.pos  # (B, N, D)
        if ids_keep is not None:  # the encoder sees the visible tokens only
            x = x.gather(1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, n, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+n, D); cls has no position
        x = F.dropout(x, p)
        for block in self.blocks:
            x = block(x, p)
        return self.norm(x)


class Decoder(nn.Module):
    """Latent (B, 1+n, D) -> predictions for all N tokens: mask tokens fill the masked positions."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.decoder_embed_dim
        self.embed = nn.Linear(cfg.embed_dim, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("pos", sincos_table(d, cfg.grid), persistent=False)  # (N, d)
        self.blocks = nn.ModuleList(Block(d, cfg.decoder_num_heads, cfg.mlp_ratio, twice_differentiable=True)
                                    for _ in range(cfg.decoder_depth))
        self.norm = nn.LayerNorm(d)
        # token inputs: predict an encoder-width vector, scored against the tied token embedding
        self.head = nn.Linear(d, cfg.embed_dim if cfg.modality == "tokens" else cfg.patch_dim)
        init_linears(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, z, ids_restore, token_embedding=None):
        x = self.embed(z)  # (B, 1+n, d)
        B, N = ids_restore.shape
        x_ = torch.cat([x[:, 1:], self.mask_token.expand(B, N - x.shape[1] + 1, -1)], dim=1)  # (B, N, d) shuffled
        x_ = x_.gather(1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))  # (B, N, d) in input order
        x = torch.cat([x[:, :1], x_ + self.pos], dim=1)  # (B, 1+N, d)
        for block in self.blocks:
            x = block(x)
        pred = self.head(self.norm(x)[:, 1:])  # (B, N, out); the cls output is dropped
        return pred if token_embedding is None else pred @ token_embedding.t()  # or (B, N, vocab) logits

# -----------------------------------------------------------------------------
# masking, the support set, and the losses


def random_masking(noise, num_visible):
    """MAE's masking: the num_visible lowest-noise positions are kept. noise (B, N) ->
    ids_keep (B, n), ids_restore (B, N) (inverts the shuffle), mask (B, N) float, 1 = masked."""
    ids_shuffle = noise.argsort(dim=1)  # (B, N)
    ids_restore = ids_shuffle.argsort(dim=1)  # (B, N)
    mask = torch.ones_like(noise)
    mask[:, :num_visible] = 0
    return ids_shuffle[:, :num_visible], ids_restore, mask.gather(1, ids_restore)


def support_set(mask, grid, support_ratio, rand):
    """Support set = visible tokens + masked tokens next to a visible one (left/right in 1-D, the
    4-neighbourhood in 2-D), each kept when rand < support_ratio. mask, rand: (B, N) -> (B, N) float."""
    visible = 1 - mask
    # max-pools, not a conv: a conv kernel made on the host would break CUDA-graph capture of the step
    if len(grid) == 1:
        near = F.max_pool1d(visible[:, None], 3, stride=1, padding=1)[:, 0]  # (B, N): itself or left/right
    else:
        v = visible.view(-1, 1, *grid)  # (B, 1, gh, gw)
        near = torch.maximum(F.max_pool2d(v, (3, 1), stride=1, padding=(1, 0)),  # itself, above, below
                             F.max_pool2d(v, (1, 3), stride=1, padding=(0, 1))).flatten(1)  # left, right; (B, N)
    return visible + mask * near * (rand < support_ratio)


def recon_loss(pred, target, select):
    """Reconstruction loss summed over the selected tokens (select: (B, N), 1 = selected) and divided by
    their count over the batch: per-token MSE for values, cross-entropy for token ids."""
    if target.dtype == torch.long:
        per_token = F.cross_entropy(pred.flatten(0, 1), target.flatten(), reduction="none").view_as(select)
    else:
        per_token = (pred - target).pow(2).mean(dim=-1)  # (B, N)
    return (per_token * select).sum() / select.sum()


def nt_xent(a, b, temperature):
    """SimCLR's NT-Xent on 2B L2-normalized vectors: a[i]'s positive is b[i] and vice versa, the other
    2B-2 vectors are negatives. a, b: (B, P) -> scalar."""
    z = torch.cat([a, b])  # (2B, P)
    logits = z @ z.t() / temperature  # (2B, 2B)
    self_pairs = torch.eye(len(z), dtype=torch.bool, device=z.device)  # a vector is not its own negative
    logits = logits.masked_fill(self_pairs, float("-inf"))
    labels = (torch.arange(len(z), device=z.device) + len(a)) % len(z)  # (2B,): i <-> i + B, made on the device
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def contrast_cosines(a, b):
    """NT-Xent's diagnostics, a, b: (B, P) L2-normalized -> the mean cosine of the B positive pairs
    (alignment) and of the 2B(2B-2) ordered negative pairs (uniformity: near 0 when spread out)."""
    n, pos = 2 * len(a), (a * b).sum()  # pos: the positives' sum; each is twice among the ordered pairs
    total = torch.cat([a, b]).sum(dim=0).square().sum()  # all (2B)^2 cosines, the self-pairs' 1s too
    return pos / len(a), (total - n - 2 * pos) / max(n * (n - 2), 1)  # a batch of 1 has no negatives: 0

# -----------------------------------------------------------------------------
# the model


class Task(NamedTuple):
    """A batch of inputs read as meta-learning tasks: what the encoder sees and what each loss reads."""
    target: torch.Tensor       # (B, N, P) patch values, or (B, N) token ids: what is reconstructed
    ids_keep: torch.Tensor     # (B, n) the visible positions, in the encoder's order
    ids_restore: torch.Tensor  # (B, N) puts the encoder's order back into the input's
    mask: torch.Tensor         # (B, N) 1 = masked: the query set
    support: torch.Tensor      # (B, N) 1 = in the support set: the visible tokens and some masked neighbours


class MetaMAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self._cfg = cfg  # frozen and checked when made (MetaMAEConfig.__post_init__)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.learn_inner_lr:  # (inner_steps,): the log keeps the step size positive; the outer loss trains it
            self.log_inner_lr = nn.Parameter(torch.full((cfg.inner_steps,), math.log(cfg.inner_lr)))
        if cfg.contrast_weight > 0:  # PyTorch's default init, as in their code
            D = cfg.embed_dim
            self.projector = nn.Sequential(nn.Linear(D, 4 * D, bias=False), nn.BatchNorm1d(4 * D), nn.ReLU(),
                                           nn.Linear(4 * D, cfg.proj_dim, bias=False))

    @property
    def cfg(self):
        """The model's config, for good: its layers were built from it (a variant is a new model)."""
        return self._cfg

    def make_task(self, x, noise=None):
        """Tokens, mask and support set of a batch x; noise (B, N) fixes the mask (None: drawn)."""
        cfg = self.cfg
        target = self.encoder.tokenizer.patchify(x)  # (B, N, P) or (B, N)
        B, N = target.shape[:2]
        if noise is None:
            noise = torch.rand(B, N, device=x.device)
        elif noise.shape != (B, N):
            raise ValueError(f"MetaMAE: noise must have shape (B, N) = {(B, N)}, got {tuple(noise.shape)}")
        ids_keep, ids_restore, mask = random_masking(noise, cfg.num_visible)
        mask = mask.to(self.encoder.cls_token.dtype)  # the model's: a bf16 model's losses stay bf16
        support = 1 - mask
        if cfg.inner_steps > 0 and cfg.support_ratio > 0:  # drawn right after the noise (see the docstring)
            support = support_set(mask, cfg.grid, cfg.support_ratio, torch.rand(B, N, device=x.device))
        return Task(target, ids_keep, ids_restore, mask, support)

    # The decoder and the inner loop are differentiated twice, and compiled code cannot be: torch.compile(model) runs
    # them as they are (and compiles what forward calls around them; forward's own lines stay eager).
    @torch.compiler.disable
    def decode(self, z, ids_restore):  # (B, 1+n, D) -> (B, N, P), or (B, N, vocab) logits
        emb = self.encoder.tokenizer.embedding.weight if self.cfg.modality == "tokens" else None
        return self.decoder(z, ids_restore, emb)

    @torch.compiler.disable
    def adapt(self, z, pred, task):
        """The inner loop: Z* = Z - inner_lr * grad_Z(B * loss_support), inner_steps times, the gradient
        taken through the decoder (inner_lr: cfg's, or the learned one of each step with cfg.learn_inner_lr).
        pred = decode(Z), which the caller has made for the MAE loss. Returns Z* (B, 1+n, D) and decode(Z*)."""
        steps = self.cfg.inner_steps if self.cfg.inner_lr else 0  # inner_lr 0: Z* = Z, no work
        evaluating = steps > 0 and not torch.is_grad_enabled()
        if evaluating and torch.is_inference_mode_enabled():  # its tensors can never enter a graph
            raise RuntimeError("MetaMAE's inner loop takes a gradient: call it outside torch.inference_mode "
                               "(torch.no_grad works); encode() works under either")
        with torch.enable_grad():
            if evaluating:  # under no_grad the step is a gradient all the same: on a graph of its own, from Z detached
                z = z.detach().requires_grad_()
                pred = self.decode(z, task.ids_restore)
            for lr in self.log_inner_lr.exp() if self.cfg.learn_inner_lr else [self.cfg.inner_lr] * steps:
                support_loss = recon_loss(pred, task.target, task.support)
                # B * the batch mean: each sample takes its own step, whatever the batch size. Second order
                # keeps the gradient's graph, so the outer loss trains through the adaptation too.
                grad, = torch.autograd.grad(support_loss * len(z), z, create_graph=not self.cfg.first_order)
                z = z - lr * grad  # (B, 1+n, D)
                pred = self.decode(z, task.ids_restore)
        return (z.detach(), pred.detach()) if evaluating else (z, pred)

    def contrast(self, z, z_star):
        """NT-Xent between the mean-pooled Z and Z* of each input, through the projector: (loss, pos_cos, neg_cos)."""
        if self.training and len(z) < 2:  # BatchNorm in train mode, and a negative, need two inputs
            raise ValueError("MetaMAE: the contrastive loss needs at least 2 inputs per batch in train mode "
                             f"(negatives, and the projector's BatchNorm statistics); got {len(z)}")
        # each view through the projector on its own, so each has its own BatchNorm statistics
        a = F.normalize(self.projector(z[:, 1:].mean(dim=1)), dim=-1)  # (B, proj_dim)
        b = F.normalize(self.projector(z_star[:, 1:].mean(dim=1)), dim=-1)  # (B, proj_dim)
        return (nt_xent(a, b, self.cfg.temperature), *contrast_cosines(a.detach(), b.detach()))

    @torch.compiler.disable(recursive=False)
    def forward(self, x, noise=None):
        """x: a batch in the input layout; noise: (B, N) to fix the mask. Returns (loss, logs), detached: the query
        loss from Z ('amortized'); with adaptation the support loss before it, the query loss from Z* ('adapted'),
        'shift' = mean ||Z* - Z|| / ||Z||; with the contrastive loss its value and the mean cosines of positive and
        negative pairs ('pos_cos', 'neg_cos': alignment vs uniformity)."""
        cfg = self.cfg
        task = self.make_task(x, noise)
        z = self.encoder(task.target, task.ids_keep, cfg.dropout if self.training else 0.0)  # amortized latent
        pred = self.decode(z, task.ids_restore)  # (B, N, P): the reconstruction from Z
        amortized = recon_loss(pred, task.target, task.mask)  # query loss from Z: the MAE loss
        if cfg.inner_steps == 0:
            return amortized, {"amortized": amortized.detach()}
        z_star, pred_star = self.adapt(z, pred, task)  # the adapted latent, and its reconstruction
        loss = recon_loss(pred_star, task.target, task.mask)  # query loss from Z*
        shift = (z_star - z).flatten(1).norm(dim=1) / z.flatten(1).norm(dim=1)  # (B,): how far Z moved
        logs = dict(amortized=amortized.detach(), support=recon_loss(pred.detach(), task.target, task.support),
                    adapted=loss.detach(), shift=shift.mean().detach())
        if cfg.contrast_weight > 0:
            contrast, pos_cos, neg_cos = self.contrast(z, z_star)
            logs.update(contrast=contrast.detach(), pos_cos=pos_cos, neg_cos=neg_cos)
            loss = loss + cfg.contrast_weight * contrast
        if cfg.learn_inner_lr:  # the learned step sizes: 'inner_lr' (the first step's), then 'inner_lr_2', ...
            lrs = self.log_inner_lr.detach().exp()  # (inner_steps,)
            logs.update({"inner_lr" + (f"_{i + 1}" if i else ""): lr for i, lr in enumerate(lrs)})
        return loss, logs

    def features(self, x):
        """All tokens through the encoder, no masking, mean of the patch tokens: (B, embed_dim). Differentiable, with
        cfg.dropout in train mode: what fine-tuning trains through (put a head on it)."""
        p = self.cfg.dropout if self.training else 0.0
        return self.encoder(self.encoder.tokenizer.patchify(x), p=p)[:, 1:].mean(dim=1)

    @torch.no_grad()
    def encode(self, x):
        """features(x) without a graph, and never dropout: what a linear probe of the frozen encoder reads."""
        return self.encoder(self.encoder.tokenizer.patchify(x))[:, 1:].mean(dim=1)

# -----------------------------------------------------------------------------
# the guards, out of the method's way: what a config and an input must be, each refusal naming what to change


def check_config(cfg):
    """Raises ValueError naming the first invalid field of a MetaMAEConfig; later checks assume earlier ones passed."""
    def need(ok, field, why):
        if not ok:
            raise ValueError(f"MetaMAEConfig.{field}: {why} (got {getattr(cfg, field)!r})")
    for f in fields(cfg):  # by the annotations: 2.0 blocks, an inf rate or first_order='no' (truthy) fail here
        v = getattr(cfg, f.name)
        need(f.type is not bool or isinstance(v, bool), f.name, "must be True or False")
        need(f.type is not int or isinstance(v, Integral) and not isinstance(v, bool), f.name, "must be an int")
        need(f.type is not float or isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v), f.name,
             "must be a finite number")
    shape, patch = cfg.input_shape, cfg.patch_size
    need(isinstance(shape, tuple) and 1 <= len(shape) <= 3 and all(isinstance(s, Integral) and s > 0 for s in shape),
         "input_shape", "expected a tuple of positive ints (C, H, W), (C, T), (L,) or (F,)")
    need(not cfg.vocab_size or len(shape) == 1, "vocab_size",
         f"is for token inputs of shape (L,), but input_shape is {shape}: set it to 0")
    spatial = shape[1:] if cfg.modality in ("image", "series") else ()
    need(not spatial or isinstance(patch, tuple) and len(patch) == len(spatial) and all(
        isinstance(p, Integral) and p > 0 and n % p == 0 for n, p in zip(spatial, patch)), "patch_size",
        f"expected a tuple of {len(spatial)} positive ints that divide {spatial}")
    for field in ("num_heads", "decoder_num_heads", "proj_dim", "mlp_ratio", "temperature"):
        need(getattr(cfg, field) > 0, field, "must be positive")
    for field in ("vocab_size", "depth", "decoder_depth", "inner_steps", "contrast_weight", "inner_lr"):
        need(getattr(cfg, field) >= 0, field, "must be >= 0")
    even = 4 if cfg.modality == "image" else 2  # sin-cos tables halve the width, 2-D ones halve it again
    for field, heads in (("embed_dim", cfg.num_heads), ("decoder_embed_dim", cfg.decoder_num_heads)):
        need(getattr(cfg, field) > 0 and getattr(cfg, field) % math.lcm(heads, even) == 0, field,
             f"must be a positive multiple of {math.lcm(heads, even)}: of the {heads} heads, and of {even} for the "
             "sin-cos positions")
    need(int(min(cfg.embed_dim, cfg.decoder_embed_dim) * cfg.mlp_ratio) >= 1, "mlp_ratio",
         "int(width * mlp_ratio) must be >= 1: an MLP needs a unit")
    need(0 <= cfg.dropout < 1, "dropout", "must be in [0, 1)")
    need(0 < cfg.num_visible < cfg.num_tokens, "mask_ratio", "must keep at least one token and mask at least one")
    need(0 <= cfg.support_ratio <= 1, "support_ratio", "must be in [0, 1]")
    need(not cfg.learn_inner_lr or cfg.inner_steps > 0 and cfg.inner_lr > 0, "learn_inner_lr",
         "needs inner_steps > 0 and an inner_lr > 0 to start from (it is learned through its log)")
    need(cfg.contrast_weight == 0 or cfg.inner_steps > 0, "contrast_weight",
         "needs inner_steps > 0: without adaptation both views are the same latent")


def checked_input(cfg, x, weight):
    """x as the tokenizer reads it, on weight's device: refuses another shape, values that are not floats (or token
    ids that are not ints, or outside the vocabulary); casts values to weight's dtype."""
    x = x if torch.is_tensor(x) else torch.as_tensor(x, device=weight.device)  # a numpy array, say
    if tuple(x.shape[1:]) != tuple(cfg.input_shape):
        raise ValueError(f"MetaMAE: expected input of shape (B, {', '.join(map(str, cfg.input_shape))}) "
                         f"from cfg.input_shape, got {tuple(x.shape)}")
    if x.is_floating_point() == (cfg.modality == "tokens"):  # values are floats, token ids integers
        want = "integer ids" if cfg.modality == "tokens" else "floating point (scale integer pixels first)"
        raise ValueError(f"MetaMAE: {cfg.modality} input must be {want}, got {x.dtype}")
    # token ids checked on CPU only: on a GPU the read would stall the step (nn.Embedding then asserts there)
    if cfg.modality == "tokens" and x.device.type == "cpu" and len(x) and not 0 <= x.min() <= x.max() < cfg.vocab_size:
        raise ValueError(f"MetaMAE: token ids must be in 0..{cfg.vocab_size - 1} (cfg.vocab_size = "
                         f"{cfg.vocab_size}), got {x.min().item()}..{x.max().item()}")
    return x if cfg.modality == "tokens" else x.to(weight.dtype)


def check_tokens(cfg, tokens):  # the encoder reads patchify's (B, N, P) patches or (B, N) ids, not raw inputs
    want = (cfg.num_tokens,) if cfg.modality == "tokens" else (cfg.num_tokens, cfg.patch_dim)
    if tuple(tokens.shape[1:]) != want:
        raise ValueError(f"MetaMAE: the encoder reads tokens of shape (B, {', '.join(map(str, want))}) from "
                         f"encoder.tokenizer.patchify(x), got {tuple(tokens.shape)}: for inputs x use "
                         "model.features(x) (with a graph) or model.encode(x) (frozen features)")
