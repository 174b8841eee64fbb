"""
MetaMAE: a masked auto-encoder read as meta-learning, in one file.

Jang et al., "Modality-Agnostic Self-Supervised Learning with Meta-Learned Masked Auto-Encoder",
NeurIPS 2023, https://arxiv.org/abs/2310.16318. Authors' code: github.com/alinlab/MetaMAE.

Masking splits each input into a task: the visible tokens are its *support* set, the masked tokens
its *query* set. The encoder maps the support set to the *amortized latent* Z. MetaMAE then adapts Z
with a gradient step on the support reconstruction loss taken through the decoder,
Z* = Z - inner_lr * grad_Z(B * loss_support(Z)), reconstructs the query set from the *adapted latent* Z*,
and adds a contrastive loss that pulls Z and Z* of the same input together (SimCLR's NT-Xent). The
gradient step adapts an activation, not parameters: torch.autograd.grad on Z is the whole mechanism.
With inner_steps=0 and contrast_weight=0 the same network is a plain MAE.

    cfg = MetaMAEConfig(input_shape=(3, 32, 32), patch_size=(4, 4))
    model = MetaMAE(cfg)
    x = torch.rand(64, 3, 32, 32)
    loss, logs = model(x)      # logs: amortized / support / adapted / contrast losses (detached)
    loss.backward()
    features = model.encode(x) # (64, 256): the features a linear probe reads

Deliberate differences from the authors' models.py (the default configuration computes the same loss
and gradients for the same weights and random state):
- The patch embedding is a Linear on patchified tokens instead of a Conv with stride = patch: the same
  function (weight.permute maps one onto the other), but only the visible patches are projected.
- 2-D position tables work for non-square grids; theirs assume a square one.
- Hyper-parameters live in one dataclass and are validated when the model is built.
- `encode` never applies dropout, so features are deterministic whatever the module's mode.
- On CPU, dropout masks come from int64 random bits instead of torch.bernoulli (about half the cost);
  same distribution, different draws. Elsewhere it is F.dropout.
- The support set is drawn right after the mask noise (theirs: after the encoder pass); the two agree
  whenever the encoder draws no random numbers (dropout 0), and ours is reproducible from `noise` + seed.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# -----------------------------------------------------------------------------
# configuration


@dataclass
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
    first_order: bool = False     # True: do not differentiate through the inner gradient
    support_ratio: float = 0.1    # chance that a masked neighbour of a visible token joins the support set
    contrast_weight: float = 0.1
    temperature: float = 0.5
    proj_dim: int = 128

    @property
    def kind(self):
        if self.vocab_size > 0:
            return "tokens"
        return {3: "2d", 2: "1d", 1: "tabular"}.get(len(self.input_shape), "invalid")

    @property
    def grid(self):
        """The token grid: (H/ph, W/pw) for 2-D inputs, (n,) otherwise; tokens are its row-major cells."""
        if self.kind in ("2d", "1d"):
            return tuple(n // p for n, p in zip(self.input_shape[1:], self.patch_size))
        return (self.input_shape[0],)

    @property
    def patch_dim(self):
        """Values per token: ph * pw * C, p * C, or 1 (a tabular feature, or a token id)."""
        return math.prod(self.patch_size) * self.input_shape[0] if self.kind in ("2d", "1d") else 1

    @property
    def num_tokens(self):
        return math.prod(self.grid)

    @property
    def num_visible(self):
        return int(self.num_tokens * (1 - self.mask_ratio))

    def validate(self):
        """Raises ValueError naming the first invalid field. Checks run in order, so later ones may assume
        earlier ones passed (e.g. the mask ratio check needs a valid grid)."""
        spatial = self.input_shape[1:] if self.kind in ("2d", "1d") else ()
        even = 4 if self.kind == "2d" else 2  # sin-cos tables halve the width, 2-D tables halve it again
        checks = [
            ("input_shape", "expected positive ints (C, H, W), (C, T), (L,) or (F,); tokens are (L,)",
             lambda: self.kind != "invalid" and all(isinstance(s, int) and s > 0 for s in self.input_shape)
             and (self.kind != "tokens" or len(self.input_shape) == 1)),
            ("vocab_size", "must be >= 0", lambda: self.vocab_size >= 0),
            ("patch_size", f"expected {len(spatial)} positive sizes that divide {spatial}",
             lambda: not spatial or len(self.patch_size) == len(spatial)
             and all(p > 0 and n % p == 0 for n, p in zip(spatial, self.patch_size))),
            *[(f, "must be positive", lambda f=f: getattr(self, f) > 0)
              for f in ("num_heads", "decoder_num_heads", "proj_dim", "mlp_ratio", "temperature")],
            *[(f, "must be >= 0", lambda f=f: getattr(self, f) >= 0)
              for f in ("depth", "decoder_depth", "inner_steps", "contrast_weight")],
            *[(f, f"must be positive and divisible by {h} and by {even}",
               lambda f=f, h=h: getattr(self, f) > 0 and getattr(self, f) % math.lcm(getattr(self, h), even) == 0)
              for f, h in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads"))],
            ("dropout", "must be in [0, 1)", lambda: 0 <= self.dropout < 1),
            ("mask_ratio", "must keep at least one token and mask at least one",
             lambda: 0 < self.num_visible < self.num_tokens),
            ("support_ratio", "must be in [0, 1]", lambda: 0 <= self.support_ratio <= 1),
            ("contrast_weight", "needs inner_steps > 0: without adaptation both views are the same latent",
             lambda: self.contrast_weight == 0 or self.inner_steps > 0),
        ]
        for field, why, ok in checks:
            if not ok():
                raise ValueError(f"MetaMAEConfig.{field}: {why} (got {getattr(self, field)!r})")

# -----------------------------------------------------------------------------
# tokenizers: every modality becomes a (B, N, P) array of patch values (or (B, N) token ids)


class Tokenizer(nn.Module):
    """Cuts an input into N tokens, embeds a subset of them, and puts predictions back in the input's layout."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        if cfg.kind == "tokens":
            self.embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
            nn.init.xavier_uniform_(self.embedding.weight)
        else:
            # one Linear over a patch's values; tabular features share a Linear(1, D), as a 1-D series
            # of one channel with patch 1 (the authors' treatment of HIGGS)
            self.proj = nn.Linear(cfg.patch_dim, cfg.embed_dim)
            nn.init.xavier_uniform_(self.proj.weight)  # bias keeps PyTorch's default, as their Conv's does

    def patchify(self, x):
        """Input -> reconstruction targets: (B, N, patch_dim) floats, or (B, N) token ids."""
        if self.cfg.kind == "2d":  # MAE's patch order: (ph, pw, C)
            ph, pw = self.cfg.patch_size
            return rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=ph, p2=pw)
        if self.cfg.kind == "1d":
            return rearrange(x, "b c (n p) -> b n (p c)", p=self.cfg.patch_size[0])
        if self.cfg.kind == "tabular":
            return x.unsqueeze(-1)  # (B, F, 1)
        return x.long()  # (B, L) token ids

    def unpatchify(self, t):
        """Inverse of patchify, for predictions: (B, N, patch_dim) -> the input's layout."""
        if self.cfg.kind == "2d":
            (ph, pw), (gh, gw) = self.cfg.patch_size, self.cfg.grid
            return rearrange(t, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=gh, w=gw, p1=ph, p2=pw)
        if self.cfg.kind == "1d":
            return rearrange(t, "b n (p c) -> b c (n p)", p=self.cfg.patch_size[0])
        return t.squeeze(-1) if self.cfg.kind == "tabular" else t

    def embed(self, tokens):
        """(B, n, patch_dim) patches or (B, n) ids -> (B, n, D)."""
        return self.embedding(tokens) if self.cfg.kind == "tokens" else self.proj(tokens)

# -----------------------------------------------------------------------------
# fixed sin-cos position tables (MAE's layout), computed in float64


def sincos_1d(dim, pos):
    """(M,) positions -> (M, dim): first half sin, second half cos, frequencies 1/10000^(k/(dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    out = pos.double()[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_table(dim, grid):
    """(N, dim) table for a 1-D grid (n,) or a 2-D grid (gh, gw) read row-major. In 2-D the first half
    of the channels encodes the column index and the second half the row index, as MAE does."""
    if len(grid) == 1:
        return sincos_1d(dim, torch.arange(grid[0])).float()
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1).float()

# -----------------------------------------------------------------------------
# the Transformer block (timm's Block: pre-norm, qkv without bias, GELU MLP)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, fused):
        super().__init__()
        self.num_heads, self.fused = num_heads, fused
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (B, L, D) -> (B, L, D)
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        if self.fused:
            # The fused kernels behind SDPA (flash, memory-efficient; on CPU too) have no double
            # backward, so only the encoder, which is differentiated once, may use them.
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            # The decoder is differentiated twice (the inner-loop gradient is itself differentiated
            # by the outer loss), so it spells attention out in plain, twice-differentiable ops.
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, h, L, L); scaling q is cheaper
            out = attn.softmax(dim=-1) @ v  # (B, h, L, d)
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))


def dropout(x, p):
    """F.dropout, but cheaper on CPU, where PyTorch draws a Bernoulli sample per element and the encoder's
    37 dropouts cost more than a third of its forward pass. 31 random bits per element from int64
    random_ are about half the price; an element is kept with probability 1 - p (to within 2^-31)."""
    if p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p)  # fused and cheap on accelerators
    bits = torch.empty((x.numel() + 1) // 2, dtype=torch.int64).random_().view(torch.int32)[:x.numel()]
    keep = (bits & 0x7FFFFFFF) >= round(p * 2**31)  # random_ fills [0, 2^63): bit 31 of the high half is 0
    return x * (keep.view_as(x).to(x.dtype) / (1 - p))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, fused):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, fused)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x, p=0.0):  # (B, L, D); p: dropout after attention, after GELU, after fc2
        x = x + dropout(self.attn(self.norm1(x)), p)
        h = dropout(F.gelu(self.fc1(self.norm2(x))), p)  # (B, L, mlp_ratio * D)
        return x + dropout(self.fc2(h), p)


def init_linears(module):
    """xavier-uniform weights and zero biases for every Linear (LayerNorms keep PyTorch's 1 and 0)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

# -----------------------------------------------------------------------------
# encoder and decoder


class Encoder(nn.Module):
    """Visible tokens -> the amortized latent Z = LayerNorm(blocks([cls; embed(tokens) + pos]))."""

    def __init__(self, cfg):
        super().__init__()
        self.tokenizer = Tokenizer(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.register_buffer("pos", sincos_table(cfg.embed_dim, cfg.grid), persistent=False)  # (N, D)
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, fused=True)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim)
        init_linears(self.blocks)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, tokens, ids_keep=None, p=0.0):
        """tokens: (B, N, P) or (B, N) from patchify; ids_keep: (B, n) visible positions, None for all."""
        pos = self.pos.expand(tokens.shape[0], -1, -1)  # (B, N, D)
        if ids_keep is not None:  # embed only the visible tokens
            tokens = tokens.gather(1, ids_keep if tokens.dim() == 2 else
                                   ids_keep[..., None].expand(-1, -1, tokens.shape[-1]))  # (B, n, P)
            pos = pos.gather(1, ids_keep[..., None].expand(-1, -1, pos.shape[-1]))  # (B, n, D)
        x = self.tokenizer.embed(tokens) + pos  # (B, n, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+n, D); cls has no position
        x = dropout(x, p)
        for block in self.blocks:
            x = block(x, p)
        return self.norm(x)  # (B, 1+n, D)


class Decoder(nn.Module):
    """Latent (B, 1+n, D) -> predictions for all N tokens: mask tokens fill the masked positions."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.decoder_embed_dim
        self.embed = nn.Linear(cfg.embed_dim, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("pos", sincos_table(d, cfg.grid), persistent=False)  # (N, d)
        self.blocks = nn.ModuleList(Block(d, cfg.decoder_num_heads, cfg.mlp_ratio, fused=False)
                                    for _ in range(cfg.decoder_depth))
        self.norm = nn.LayerNorm(d)
        # token inputs: predict an encoder-width vector, scored against the tied token embedding
        self.head = nn.Linear(d, cfg.embed_dim if cfg.kind == "tokens" else cfg.patch_dim)
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
        if token_embedding is not None:
            pred = pred @ token_embedding.t()  # (B, N, vocab) logits
        return pred

# -----------------------------------------------------------------------------
# masking and the support set


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

# -----------------------------------------------------------------------------
# contrastive loss between the amortized and the adapted latents


def nt_xent(a, b, temperature):
    """SimCLR's NT-Xent on 2B L2-normalized vectors: a[i]'s positive is b[i] and vice versa, the other
    2B-2 vectors are negatives. a, b: (B, P) -> scalar."""
    z = torch.cat([a, b])  # (2B, P)
    logits = z @ z.t() / temperature  # (2B, 2B)
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))  # a vector is not its own negative
    labels = (torch.arange(len(z), device=z.device) + len(a)) % len(z)  # (2B,): i <-> i + B, made on the device
    return F.cross_entropy(logits, labels)

# -----------------------------------------------------------------------------
# the model


class MetaMAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.contrast_weight > 0:  # PyTorch's default init, as in their code
            D = cfg.embed_dim
            self.projector = nn.Sequential(nn.Linear(D, 4 * D, bias=False), nn.BatchNorm1d(4 * D), nn.ReLU(),
                                           nn.Linear(4 * D, cfg.proj_dim, bias=False))

    def decode(self, z, ids_restore):
        emb = self.encoder.tokenizer.embedding.weight if self.cfg.kind == "tokens" else None
        return self.decoder(z, ids_restore, emb)

    def adapt(self, z, ids_restore, target, support):
        """The inner loop: Z* = Z - inner_lr * grad_Z(B * loss_support), inner_steps times. The factor B
        makes it a per-sample step, since loss_support averages over the batch. Returns Z*, the
        prediction from Z and the support loss before adaptation."""
        # second order: keep the graph of grad_Z, so the outer loss trains the encoder and decoder
        # through the adaptation too; but never when the caller has no graph to build (no_grad)
        create_graph = torch.is_grad_enabled() and not self.cfg.first_order
        first_pred = first_loss = None
        for _ in range(self.cfg.inner_steps):
            with torch.enable_grad():  # so that adaptation also works under torch.no_grad()
                z_ = z if z.requires_grad else z.detach().requires_grad_()
                pred = self.decode(z_, ids_restore)  # (B, N, P)
                loss = recon_loss(pred, target, support)
                grad, = torch.autograd.grad(loss * len(z), z_, create_graph=create_graph)
            if first_pred is None:
                first_pred, first_loss = pred, loss
            z = z - self.cfg.inner_lr * grad  # (B, 1+n, D)
        return z, first_pred, first_loss

    def _masked_forward(self, x, noise):
        """The shared part of forward and reconstruct."""
        cfg = self.cfg
        target = self.encoder.tokenizer.patchify(x)  # (B, N, P) or (B, N)
        B, N = target.shape[:2]
        if noise is None:
            noise = torch.rand(B, N, device=x.device)
        ids_keep, ids_restore, mask = random_masking(noise, cfg.num_visible)
        support = 1 - mask
        if cfg.inner_steps > 0 and cfg.support_ratio > 0:  # drawn right after the noise (see docstring)
            support = support_set(mask, cfg.grid, cfg.support_ratio, torch.rand(B, N, device=x.device))
        z = self.encoder(target, ids_keep, cfg.dropout if self.training else 0.0)  # amortized latent (B, 1+n, D)
        if cfg.inner_steps > 0:
            z_star, pred, support_loss = self.adapt(z, ids_restore, target, support)
        else:
            z_star, pred, support_loss = z, self.decode(z, ids_restore), None
        return target, mask, z, z_star, pred, support_loss, ids_restore

    def forward(self, x, noise=None):
        """x: a batch in the input layout; noise: (B, N) to fix the mask. Returns (loss, logs)."""
        cfg = self.cfg
        target, mask, z, z_star, pred, support_loss, ids_restore = self._masked_forward(x, noise)
        amortized = recon_loss(pred, target, mask)  # query loss from Z: the MAE loss
        logs = {"amortized": amortized.detach()}
        if cfg.inner_steps == 0:
            return amortized, logs
        loss = recon_loss(self.decode(z_star, ids_restore), target, mask)  # query loss from Z*
        logs.update(support=support_loss.detach(), adapted=loss.detach())
        if cfg.contrast_weight > 0:
            # each view through the projector on its own, so each has its own BatchNorm statistics
            a = F.normalize(self.projector(z[:, 1:].mean(dim=1)), dim=-1)  # (B, proj_dim)
            b = F.normalize(self.projector(z_star[:, 1:].mean(dim=1)), dim=-1)  # (B, proj_dim)
            contrast = nt_xent(a, b, cfg.temperature)
            logs["contrast"] = contrast.detach()
            loss = loss + cfg.contrast_weight * contrast
        return loss, logs

    @torch.no_grad()
    def encode(self, x):
        """Features for linear probing: all tokens, no dropout, mean of the patch tokens. (B, D)"""
        tokens = self.encoder.tokenizer.patchify(x)
        return self.encoder(tokens)[:, 1:].mean(dim=1)

    @torch.no_grad()
    def reconstruct(self, x, noise=None):
        """Predictions from Z ('amortized') and Z* ('adapted') in the input's layout, and the mask (B, N)."""
        target, mask, z, z_star, pred, _, ids_restore = self._masked_forward(x, noise)
        preds = {"amortized": pred, "adapted": self.decode(z_star, ids_restore) if self.cfg.inner_steps else pred}
        tok = self.encoder.tokenizer
        out = {k: p.argmax(-1) if self.cfg.kind == "tokens" else tok.unpatchify(p) for k, p in preds.items()}
        return dict(mask=mask, **out)
