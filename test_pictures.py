"""Tests of pictures.py: the PNG writer and the reconstruction grid, read back pixel by pixel; the curves of a run,
parsed as XML and read back point by point."""

import os
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import pictures


def test_png_is_valid(tmp_path):
    img = (torch.arange(2 * 3 * 3) % 256).to(torch.uint8).view(2, 3, 3).numpy()
    pictures.write_png(tmp_path / "a.png", img)
    raw = (tmp_path / "a.png").read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    idat = raw[33 + 8: -12 - 4]
    rows = zlib.decompress(idat)
    assert rows == b"".join(b"\x00" + bytes(r.flatten()) for r in img)
    assert os.listdir(tmp_path) == ["a.png"]  # nothing else left behind


def read_png(path):
    """The pixels of a PNG as write_png writes them (8-bit RGB, filter 0): uint8 (H, W, 3)."""
    raw, pos, idat = path.read_bytes(), 8, b""
    while pos < len(raw):
        n, tag = int.from_bytes(raw[pos:pos + 4], "big"), raw[pos + 4:pos + 8]
        if tag == b"IHDR":
            w, h = int.from_bytes(raw[pos + 8:pos + 12], "big"), int.from_bytes(raw[pos + 12:pos + 16], "big")
        idat += raw[pos + 8:pos + 8 + n] if tag == b"IDAT" else b""
        pos += 12 + n
    return np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)[:, 1:].reshape(h, w, 3)


def test_the_reconstruction_picture_is_labelled_and_pastes_the_visible_patches_back(tmp_path):
    from metamae import MetaMAE, MetaMAEConfig
    torch.manual_seed(0)
    model = MetaMAE(MetaMAEConfig(input_shape=(3, 32, 32), patch_size=(4, 4), embed_dim=32, depth=1, num_heads=4,
                                  decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2))
    x = torch.rand(3, 3, 32, 32) * 0.8 + 0.1  # no pixel is black, so black marks a masked one
    pictures.reconstruction_grid(model, x, tmp_path / "r.png")
    img = read_png(tmp_path / "r.png")
    h, w = img.shape[0] // 5, 3 * 32 * 3  # 5 rows of 3 inputs, each 32 pixels drawn x3
    margin, rows = img[:, :-w], [img[i * h:(i + 1) * h, -w:] for i in range(5)]
    assert margin.shape[1] > 0 and all((margin[i * h:(i + 1) * h] == 255).any() for i in range(5))  # a label each
    visible = rows[1].any(axis=2)
    assert 0.2 < visible.mean() < 0.8  # the mask ratio's share is black
    for reconstruction in rows[2:4]:
        assert (reconstruction[visible] == rows[1][visible]).all()  # the visible patches, pasted back
        assert (reconstruction[~visible] != 0).any()  # and the decoder's prediction where they were masked

# ----------------------------------------------------------------------------- the curves of a run, read from its log


def options(**model):
    return dict(config=dict(domain="cifar10", preset="cpu", max_steps=300), model_config=model)


def metamae_log(steps=(10, 20, 30, 40)):
    """A log as train.py writes it with --eval-interval 20 and a learned step size per inner step (two)."""
    records = [options(inner_steps=2, contrast_weight=0.1)]
    for i, step in enumerate(steps):
        records.append(dict(step=step, loss=1.0 / (i + 1), amortized=0.9 - 0.1 * i, adapted=0.8 - 0.1 * i,
                            support=0.5 + 0.01 * i, shift=10.0 ** -(i + 1), contrast=2.0, pos_cos=0.9, neg_cos=0.1 * i,
                            inner_lr=0.5 + 0.01 * i, inner_lr_2=0.4, lr=1e-3, ms_per_step=50.0))
        if step == 20:
            records.append(dict(step=20, val_amortized=0.75, val_adapted=0.7, probe_val_acc=0.31, probe_lr=1e-3))
    return records + [dict(step=steps[-1], train_minutes=1.0, val_amortized=0.6, val_adapted=0.5, val_acc=0.42,
                           test_acc=0.4, total_minutes=2.0)]


SVG = "{http://www.w3.org/2000/svg}"


def panels(path):
    """{panel title: [polyline points [(x, y), ...], in the order of its keys]} of a curves SVG, parsed as XML."""
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg"
    out = {}
    for g in root.iter(f"{SVG}g"):
        title = next(g.iter(f"{SVG}text")).text
        out[title] = [[tuple(map(float, p.split(","))) for p in line.get("points").split()]
                      for line in g.iter(f"{SVG}polyline")]
    return out


def test_the_curves_have_a_panel_per_quantity_logged_and_none_for_the_others(tmp_path):
    pictures.curves_svg(metamae_log(), tmp_path / "curves.svg")
    assert os.listdir(tmp_path) == ["curves.svg"]  # written atomically: nothing else left behind
    drawn = panels(tmp_path / "curves.svg")
    assert list(drawn) == [title for title, *_ in pictures.PANELS]  # every one, in PANELS' order
    assert [len(lines) for lines in drawn.values()] == [1, 2, 1, 1, 2, 2, 1]  # inner_lr and inner_lr_2: two
    # a plain MAE logs the loss and the amortized query loss only: two panels, and no inner_lr, shift, ...
    mae = [options(inner_steps=0, contrast_weight=0)] + [dict(step=s, loss=1 / s, amortized=1 / s, lr=1e-3)
                                                         for s in (5, 10, 15)]
    pictures.curves_svg(mae, tmp_path / "mae.svg")
    assert {t: len(lines) for t, lines in panels(tmp_path / "mae.svg").items()} == {
        "loss": 1, "query loss, from Z and Z*": 1}
    assert "cifar10, MAE, --preset cpu" in (tmp_path / "mae.svg").read_text()


def test_the_curves_map_steps_and_values_to_points(tmp_path):
    records = metamae_log()
    pictures.curves_svg(records, tmp_path / "curves.svg")
    drawn = panels(tmp_path / "curves.svg")
    for title, lines in drawn.items():
        for points in lines:
            xs = [x for x, _ in points]
            assert xs == sorted(xs) and len(set(xs)) == len(xs), title  # one point per step, in step order
    # the query panel by hand: x in proportion to the step, from 0; the higher the loss, the higher the point
    amortized, adapted = drawn["query loss, from Z and Z*"]
    steps = [r["step"] for r in records if "amortized" in r]
    assert len(amortized) == len(steps) == 4
    slope = (amortized[-1][0] - amortized[0][0]) / (steps[-1] - steps[0])
    assert slope > 0 and all(abs(x - amortized[0][0] - slope * (s - steps[0])) < 0.2 for (x, _), s in
                             zip(amortized, steps))
    assert amortized[0][0] - slope * steps[0] == pytest.approx(pictures.LEFT, abs=0.2)  # the axis starts at step 0
    assert amortized[0][1] < amortized[-1][1]  # 0.9 at the start, 0.6 at the end: SVG's y grows downwards
    assert all(a[1] < b[1] for a, b in zip(amortized, adapted))  # adapted (0.1 lower) is drawn lower, step by step
    # the shift spans three decades: a log axis puts 1e-1, 1e-2, 1e-3, 1e-4 at equal distances
    (shift,) = drawn["shift: mean |Z* - Z| / |Z|"]
    gaps = [b[1] - a[1] for a, b in zip(shift, shift[1:])]
    assert min(gaps) > 0 and max(gaps) - min(gaps) < 0.2, gaps
    # the probe's validation accuracy: --eval-interval's, then the end's, in percent
    (accuracy,) = drawn["probe validation accuracy (%)"]
    assert len(accuracy) == 2 and accuracy[0][1] > accuracy[1][1]  # 31% at step 20, 42% at the end
    text = (tmp_path / "curves.svg").read_text()
    assert "step 40 of 300; test accuracy 40.0%" in text and ">30<" in text  # the title, and 30% as a tick label
    # the held-out values (val_amortized, val_adapted) as open circles: at step 20 and at the end, two keys
    assert text.count('fill="white" stroke=') == 4


def test_a_log_with_only_the_options_or_nothing_is_a_figure_that_says_so(tmp_path):
    for name, records in (("options", [options(inner_steps=1, contrast_weight=0.1)]), ("empty", [])):
        pictures.curves_svg(records, tmp_path / f"{name}.svg")
        assert panels(tmp_path / f"{name}.svg") == {}
        assert "no step logged yet" in (tmp_path / f"{name}.svg").read_text()
    # a record cut off before its values (the stop record of --stop-step) draws no point and breaks nothing
    pictures.curves_svg([options(), dict(step=3, train_minutes=0.1)], tmp_path / "stop.svg")
    assert panels(tmp_path / "stop.svg") == {}


def test_a_tiny_run_draws_its_pictures_at_each_checkpoint_and_at_its_stop_step(tmp_path, monkeypatch):
    import train
    from conftest import TINY, make_cifar, run_in_process
    make_cifar(tmp_path / "data" / "cifar-10-batches-py", rows_per_file=20)
    drawn_at, write_curves = [], pictures.write_curves

    def recording(out_dir):  # the last step the log holds whenever the curves are drawn
        drawn_at.append(max(r.get("step", 0) for r in pictures.read_log(out_dir / "log.jsonl")))
        return write_curves(out_dir)
    monkeypatch.setattr(pictures, "write_curves", recording)
    out = tmp_path / "run"
    code, stdout, err = run_in_process(train.main, "--domain", "cifar10", "--data-dir", tmp_path / "data", *TINY,
                                       "--max-steps", 8, "--stop-step", 3, "--ckpt-interval", 2, "--out-dir", out)
    assert code == 0, err
    assert drawn_at == [2, 3, 3]  # the checkpoints of steps 2 and 3, then the run's end
    assert (out / "reconstructions_3.png").is_file() and not list(out.glob(".*.part"))
    drawn = panels(out / "curves.svg")
    assert {"loss", "query loss, from Z and Z*", "support loss", "contrastive cosines"} <= set(drawn)
    assert all(len(points) == 3 for lines in drawn.values() for points in lines)  # steps 1, 2, 3: --log-interval 1
    assert "step 3 of 8" in (out / "curves.svg").read_text()
    summary = stdout.strip().splitlines()[-3]  # then where it ran, and "stopped early"
    assert summary.startswith("step 3 of 8") and str(out / "curves.svg") in summary
    assert str(out / "reconstructions_3.png") in summary


def test_the_method_figure_is_valid_svg_with_the_paper_s_names_and_the_readme_shows_it():
    here = Path(__file__).resolve().parent
    root = ET.parse(here / "docs" / "method.svg").getroot()  # a parse error fails here
    assert root.tag == f"{SVG}svg" and root.get("viewBox")
    text = " ".join("".join(root.itertext()).split())
    for name in ("support set", "query set", "encoder", "amortized", "adapted", "decoder", "support loss",
                 "inner_lr", "query loss", "projector", "NT-Xent", "contrast_weight"):
        assert name in text, name
    assert "![" in (here / "README.md").read_text().split("## How MetaMAE works")[1].split("##")[0]
    assert "(docs/method.svg)" in (here / "README.md").read_text()
