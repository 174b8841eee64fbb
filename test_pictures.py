"""Tests of pictures.py: the PNG writer and the reconstruction grid, read back pixel by pixel."""

import os
import zlib

import numpy as np
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
