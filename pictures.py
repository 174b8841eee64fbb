"""
A run's pictures, written without a plotting library: the reconstruction grid of an image run (a PNG: the inputs,
their visible patches, the reconstructions from Z and from Z*, and their difference), made by reconstruct(), which
reads any MetaMAE; and the curves of any run (an SVG: text, which renders where the README does), drawn from its
log.jsonl. train.py writes the grid at the end of a run, at --stop-step and at each validation probe, and the curves
at each checkpoint and at the end.
"""

import json
import math
import re
import struct
import zlib
from xml.sax.saxutils import escape

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

# -----------------------------------------------------------------------------
# the curves of a run, read from its log.jsonl


PANELS = (  # title, the keys it draws (and name_2, name_3, ...: a learned step size per inner step), a factor
    ("loss", ("loss",), 1),
    ("query loss, from Z and Z*", ("amortized", "adapted"), 1),
    ("support loss", ("support",), 1),
    ("shift: mean |Z* - Z| / |Z|", ("shift",), 1),
    ("contrastive cosines", ("pos_cos", "neg_cos"), 1),
    ("inner_lr (learned)", ("inner_lr",), 1),
    ("probe validation accuracy (%)", ("probe_val_acc",), 100),
)
COLOURS = ("#1f77b4", "#e6550d", "#2ca02c", "#9467bd")
W, H, LEFT, TOP, BOTTOM, COLUMNS = 330, 200, 58, 28, 34, 3  # a panel's size and margins (px), panels per row


def read_log(path):
    return [json.loads(line) for line in open(path)]


def write_curves(out_dir):
    """<out_dir>/curves.svg from <out_dir>/log.jsonl; returns its path."""
    curves_svg(read_log(out_dir / "log.jsonl"), out_dir / "curves.svg")
    return out_dir / "curves.svg"


def series(records, name):
    """{key: [(step, value), ...]} of the log's training records for name (and name_2, ...), in step order, and the
    same of the held-out records ('val_' + key: --eval-interval's and a finished run's last record). The probe's
    validation accuracy at a run's end is the last record's val_acc."""
    steps = [r for r in records if "step" in r]
    if name == "probe_val_acc":  # the end's probe, same protocol as --eval-interval's: one curve
        steps = [dict(r, probe_val_acc=r["val_acc"]) if "total_minutes" in r and "val_acc" in r else r for r in steps]
    keys = sorted({k for r in steps for k in r if re.fullmatch(name + r"(_\d+)?", k)})

    def points(key):
        return sorted((r["step"], r[key]) for r in steps if isinstance(r.get(key), (int, float))
                      and math.isfinite(r[key]))
    lines, dots = {k: points(k) for k in keys}, {k: points("val_" + k) for k in keys}
    return {k: p for k, p in lines.items() if p}, {k: p for k, p in dots.items() if p}


def ticks(lo, hi, log):
    """A few round values in [lo, hi]: decades on a log axis (with 2x and 5x when it spans less than two), else
    multiples of 1, 2 or 5 x a power of ten."""
    if log:
        decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        values = [10.0 ** e for e in decades]
        if sum(lo <= v <= hi for v in values) < 2:
            values = [m * 10.0 ** e for e in decades for m in (1, 2, 5)]
        return [v for v in values if lo <= v <= hi]
    step = 10 ** math.floor(math.log10((hi - lo) / 4))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (m * step) <= 5)
    return [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def tick_label(v, log, step_axis=False):
    if step_axis:
        return f"{v / 1000:g}k" if v >= 1000 else f"{v:g}"
    return f"{v:g}" if log else f"{v:.6g}"


def panel(x_max, title, lines, dots, scale, legend):
    """One panel's SVG elements (at the origin): the training curves as lines, held-out values as open circles, and
    with legend the keys' names in their colours. A y axis is logarithmic where its values are positive and span a
    decade or more (losses, the shift)."""
    values = [scale * v for pts in (*lines.values(), *dots.values()) for _, v in pts]
    lo, hi = min(values), max(values)
    log = lo > 0 and hi / lo >= 10
    f = math.log10 if log else float
    # the values' range and 6% either side; at least 10% of their size, so that a flat curve (the positive cosine
    # at 1, a probe's one point) reads as flat rather than as magnified noise
    half = 0.56 * (f(hi) - f(lo) if log else max(hi - lo, 0.1 * max(abs(lo), abs(hi))) or 1)
    y0, y1 = (f(lo) + f(hi)) / 2 - half, (f(lo) + f(hi)) / 2 + half
    w, h = W - LEFT - 12, H - TOP - BOTTOM
    x = lambda step: LEFT + w * step / x_max  # noqa: E731
    y = lambda v: TOP + h * (y1 - f(scale * v)) / (y1 - y0)  # noqa: E731
    keys = sorted({*lines, *dots}, key=[*lines, *dots].index)
    names = " ".join(f'<tspan fill="{COLOURS[i]}">{escape(k)}</tspan>' for i, k in enumerate(keys))
    out = [f'<text x="10" y="16" font-weight="bold">{escape(title)}</text>',
           f'<text x="{LEFT + w}" y="16" text-anchor="end">{names if legend else ""}</text>',
           f'<rect x="{LEFT}" y="{TOP}" width="{w}" height="{h}" fill="none" stroke="#999"/>']
    for v in ticks(10 ** y0 if log else y0, 10 ** y1 if log else y1, log):
        py = TOP + h * (y1 - f(v)) / (y1 - y0)
        out += [f'<line x1="{LEFT}" x2="{LEFT + w}" y1="{py:.1f}" y2="{py:.1f}" stroke="#eee"/>',
                f'<text x="{LEFT - 4}" y="{py + 4:.1f}" text-anchor="end">{tick_label(v, log)}</text>']
    for s in ticks(0, x_max, False):
        out.append(f'<text x="{x(s):.1f}" y="{TOP + h + 14}" text-anchor="middle">{tick_label(s, False, True)}</text>')
    out.append(f'<text x="{LEFT + w}" y="{TOP + h + 28}" text-anchor="end" fill="#666">step</text>')
    for i, key in enumerate(keys):
        colour, pts = COLOURS[i], lines.get(key, [])
        if pts:  # the second curve dashed: where two coincide (Z* ~ Z), both still show
            out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5"'
                       + (' stroke-dasharray="5,3"' if i else "") + ' points="'
                       + " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in pts) + '"/>')
        if len(pts) <= 30:  # a curve of few points shows them: a probe every --eval-interval steps, a short run
            out += [f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="2.5" fill="{colour}"/>' for s, v in pts]
        out += [f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="{4 - 1.5 * i}" fill="white" stroke="{colour}" '
                'stroke-width="1.5"/>' for s, v in dots.get(key, [])]  # smaller: two that coincide both show
    return out


def curves_svg(records, path):
    """A run's curves against the step, a panel per quantity its log holds (PANELS, in that order), from the
    records of its log.jsonl (the first holds the options; every other has a 'step'), written atomically to path.
    A log without steps yet gives the title and a line that says so."""
    cfg = records[0].get("config", {}) if records else {}
    mcfg = records[0].get("model_config", {}) if records else {}
    x_max = max([r["step"] for r in records if "step" in r] or [0])
    drawn = []
    for title, names, scale in PANELS:
        lines, dots = {}, {}
        for name in names:
            training, held_out = series(records, name)
            lines.update(training)
            dots.update(held_out)
        if (lines or dots) and x_max:  # a legend where a panel may hold several curves: MAE's query loss too
            drawn.append((title, lines, dots, scale, len(names) > 1 or len(lines) > 1))
    method = "MAE" if mcfg.get("inner_steps") == 0 and mcfg.get("contrast_weight") == 0 else "MetaMAE"
    last = records[-1] if records else {}
    title = (f"{cfg.get('domain', 'a run')}, {method}, --preset {cfg.get('preset', '?')}: step {x_max:,} of "
             f"{cfg.get('max_steps', 0):,}" + (f"; test accuracy {100 * last['test_acc']:.1f}%" if "test_acc" in last
                                               else ""))
    width, height = W * min(COLUMNS, max(2, len(drawn))), 52 + H * math.ceil(len(drawn) / COLUMNS)  # the title fits
    note = ("lines: training batches, every --log-interval steps; open circles: held-out inputs, at each "
            "--eval-interval and at the end" if drawn else "no step logged yet")
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="20" font-size="14" font-weight="bold">{escape(title)}</text>',
           f'<text x="10" y="38" fill="#666">{note}</text>']
    for i, p in enumerate(drawn):
        out += [f'<g transform="translate({W * (i % COLUMNS)},{52 + H * (i // COLUMNS)})">', *panel(x_max, *p), "</g>"]
    with data.atomic_file(path) as tmp:
        tmp.write_text("\n".join(out + ["</svg>\n"]), encoding="utf-8")
