"""
A run's pictures, written without a plotting library: the reconstruction grid of an image run (a PNG: the inputs,
their visible patches, the reconstructions from Z and from Z*, and their difference), made by reconstruct(), which
reads any MetaMAE. train.py writes them at the end of a run and at each validation probe.
"""

import struct
import zlib

import numpy as np
import torch

import data

def write_png(path, img):
    """img: uint8 (H, W, 3). A minimal PNG (stdlib zlib), written atomically."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in img)

    def chunk(tag, payload):
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    with data.atomic_file(path) as tmp:
        tmp.write_bytes(png)


GLYPHS = {c: g for c, g in zip("BEFILMNOPRSTUVZ*|- ", (  # 3x5 capitals, row by row, for the pictures' labels
    "110101110101110", "111100110100111", "111100110100100", "111010010010111", "100100100100111", "101111101101101",
    "110101101101101", "010101101101010", "110101110100100", "110101110101101", "011100010001110", "111010010010010",
    "101101101101111", "101101101101010", "111001010100111", "000101010101000", "010010010010010", "000000111000000",
    "000000000000000"))}


def label(text, height, scale):
    """A column of `height` pixels with `text` drawn in white in its middle: (height, width) in {0, 1}."""
    pixels = np.zeros((5 * scale, 4 * scale * len(text)))
    for k, c in enumerate(text):
        glyph = np.array([int(b) for b in GLYPHS[c]]).reshape(5, 3)
        pixels[:, 4 * scale * k:4 * scale * k + 3 * scale] = glyph.repeat(scale, 0).repeat(scale, 1)
    top = (height - len(pixels)) // 2
    return np.pad(pixels, ((top, height - len(pixels) - top), (2 * scale, 2 * scale)))


@torch.no_grad()
def reconstruct(model, x, noise=None):
    """A MetaMAE's predictions from Z ('amortized') and Z* ('adapted') in the input's layout (token ids for token
    inputs), and the mask (B, N), 1 = masked: what the pictures show. noise (B, N) fixes the mask."""
    task = model.make_task(x, noise)
    z = model.encoder(task.target, task.ids_keep)
    pred = model.decode(z, task.ids_restore)
    pred_star = model.adapt(z, pred, task)[1]  # pred itself without inner steps
    layout = (lambda p: p.argmax(-1)) if model.cfg.modality == "tokens" else model.encoder.tokenizer.unpatchify
    return dict(mask=task.mask, amortized=layout(pred), adapted=layout(pred_star))


@torch.no_grad()
def reconstruction_grid(model, x, path):
    """A labelled picture, a row each: the inputs, their visible patches (the rest masked), the reconstructions
    from Z and from Z* with the visible patches pasted back (as MAE's demos show them: the decoder is never
    trained on visible tokens), and |Z* reconstruction - Z reconstruction| over all patches, amplified to white.
    Returns the largest change the adaptation made to a reconstructed value."""
    model.eval()
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):  # training's RNG untouched
        torch.manual_seed(0)  # the same masks at every call: pictures of one run compare
        rec = reconstruct(model, x)
    mcfg = model.cfg
    (ph, pw), (gh, gw) = mcfg.patch_size, mcfg.grid
    pixel_mask = rec["mask"].view(-1, 1, gh, gw).repeat_interleave(ph, 2).repeat_interleave(pw, 3)  # (B, 1, H, W)
    visible = x * (1 - pixel_mask)
    diff = (rec["adapted"] - rec["amortized"]).abs()
    rows = [x, visible, visible + rec["amortized"] * pixel_mask, visible + rec["adapted"] * pixel_mask,
            diff / diff.amax().clamp_min(1e-12)]
    lo, hi = x.amin(), x.amax()  # one intensity scale for all rows but the difference
    rows = [((r - lo) / (hi - lo)).clamp(0, 1) if i < 4 else r for i, r in enumerate(rows)]
    grid = torch.cat([torch.cat(list(r.float().cpu()), dim=2) for r in rows], dim=1)  # (C, 5H, B*W)
    grid = grid.expand(3, -1, -1) if grid.shape[0] == 1 else grid[:3]
    scale = 3 if x.shape[-1] <= 64 else 1  # small inputs x3
    grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2).permute(1, 2, 0).numpy()  # (5h, B*w, 3)
    h = grid.shape[0] // 5
    names = [label(n, h, max(1, h // 24)) for n in ("INPUT", "VISIBLE", "FROM Z", "FROM Z*", "|Z*-Z|")]
    width = max(n.shape[1] for n in names)
    names = np.concatenate([np.pad(n, ((0, 0), (0, width - n.shape[1]))) for n in names])  # (5h, width)
    names = np.repeat(names[:, :, None], 3, axis=2)  # (5h, width, 3): white on black
    write_png(path, (np.concatenate([names, grid], axis=1) * 255).round().astype(np.uint8))
    return diff.amax().item()
