"""
Tests for the non-image DABS domains in data.py: speech, sensors, tabular, DNA and proteins.

Fixtures are written in each dataset's genuine format by conftest.py's writers (wav through `wave`,
PAMAP2's .dat text with NaN gaps, gzip CSV, a TSV inside a zip, JSON arrays) and go through the loaders
exactly as a download would, archives included. The spectrogram is checked against a direct DFT written
here in numpy. Nothing here touches the network or writes into shared/data.
"""
import gzip
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import struct
import subprocess
import tarfile
import urllib.error
import urllib.request
import wave
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from conftest import (FAKE_WRITERS, REAL_DATA, Loading, assert_refused, at, const, fails, holds, listing,
                      protein_records, serve, write_fake,
                      write_fake_audio_mnist, write_fake_genomics, write_fake_google_speech, write_fake_higgs,
                      write_fake_librispeech, write_fake_pamap2, write_fake_pfam, write_fake_scop, write_fake_wafer,
                      write_genomics_zip, write_json_array, write_wafer_npz, write_wav)
from conftest import write_fake_hapt, write_fake_higgs_sample, write_fake_speech_subset, write_fake_splice
from data import DataError

SHARED = Path(__file__).resolve().parent.parent / 'shared' / 'data'
SPEECH_SAMPLE = SHARED / 'speech_commands_v0.01_sample'


# -----------------------------------------------------------------------------
# helpers

def tar_gz(path, folder, arcname):
    with tarfile.open(path, 'w:gz') as t:
        t.add(folder, arcname=arcname)
    return path


def zip_folder(path, folder, arcname):
    with zipfile.ZipFile(path, 'w') as z:
        for f in sorted(folder.rglob('*')):
            z.write(f, f'{arcname}/{f.relative_to(folder).as_posix()}' if arcname else f.relative_to(folder).as_posix())
    return path


# -----------------------------------------------------------------------------
# the log-mel spectrogram, against a direct DFT and a filterbank written here from the definitions

def slaney_mel_filterbank(sr, n_fft=2048, n_mels=224):
    """librosa.filters.mel(sr, n_fft, n_mels) (htk=False, norm='slaney') in float64 numpy."""
    def hz_to_mel(f):
        f = np.asarray(f, np.float64)
        return np.where(f < 1000, 3 * f / 200, 15 + 27 * np.log(np.maximum(f, 1e-10) / 1000) / np.log(6.4))

    def mel_to_hz(m):
        return np.where(m < 15, 200 * m / 3, 1000 * 6.4 ** ((m - 15) / 27))
    edges = mel_to_hz(np.linspace(0, hz_to_mel(sr / 2), n_mels + 2))
    freqs = np.arange(n_fft // 2 + 1) * sr / n_fft
    fb = np.zeros((n_mels, len(freqs)))
    for m in range(n_mels):
        lo, mid, hi = edges[m:m + 3]
        rise, fall = (freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)
        fb[m] = np.maximum(0, np.minimum(rise, fall)) * 2 / (hi - lo)
    return fb


def dabs_log_mel_direct(y, sr):
    """DABS's recipe, with the DFT as a matrix product (no FFT): (224, 224) dB before normalisation."""
    y = np.pad(np.asarray(y, np.float64)[:150_526], (0, max(0, 150_526 - len(y))))
    y = np.pad(y, 1024, mode='reflect')  # librosa < 0.10: center=True, pad_mode='reflect'
    frames = np.stack([y[t * 672:t * 672 + 2048] for t in range(224)], axis=1)  # (2048, 224)
    n = np.arange(2048)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / 2048)  # periodic Hann
    angle = 2 * np.pi * np.outer(np.arange(1025), n) / 2048
    wf = window[:, None] * frames
    power = (np.cos(angle) @ wf) ** 2 + (np.sin(angle) @ wf) ** 2  # |DFT|^2, (1025, 224)
    db = 10 * np.log10(np.maximum(1e-10, (slaney_mel_filterbank(sr) @ power) ** 2))  # power_to_db(S**2)
    return np.maximum(db, db.max() - 80)


def test_mel_filterbank_matches_the_slaney_definition():
    for sr in (16_000, 48_000):
        fb = data.mel_filterbank(sr).numpy()
        assert fb.shape == (224, 1025)
        np.testing.assert_allclose(fb, slaney_mel_filterbank(sr), rtol=1e-9, atol=1e-12)
        assert (fb.max(axis=1) > 0).all()  # no empty filter at either rate (DABS.md section 5)
        # Slaney norm: every triangle has area 1 in Hz (exactly so where it spans many FFT bins)
        area = fb.sum(axis=1) * sr / 2048
        assert np.abs(area[-50:] - 1).max() < 0.01
    # known values: at 16 kHz the 226 edges are equally spaced in mels up to 15 + 27 ln(8) / ln(6.4); below
    # 1 kHz (15 mels) a mel is 200/3 Hz, so the first filter rises from 0 to 13.40 Hz and falls to 26.81 Hz,
    # with height 2 / 26.81 Hz; FFT bins are 7.8125 Hz apart
    f1 = 200 / 3 * (15 + 27 * math.log(8) / math.log(6.4)) / 225
    assert f1 == pytest.approx(13.40, abs=0.01)
    bins = 7.8125 * np.arange(5)
    expect = np.maximum(0, np.minimum(bins / f1, (2 * f1 - bins) / f1)) * 2 / (2 * f1)
    assert np.allclose(data.mel_filterbank(16_000)[0, :5].numpy(), expect, rtol=1e-9, atol=0)
    assert expect[3] > 0 and expect[4] == 0


@pytest.mark.parametrize('n', [3000, 160_000])  # a short clip (zero-padded) and a long one (cropped)
def test_log_mel_matches_a_direct_dft(n):
    rng = np.random.default_rng(n)
    t = np.arange(n) / 16_000
    y = (0.4 * np.sin(2 * np.pi * (300 + 900 * t) * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)
    for sr in (16_000, 48_000):  # the same samples through both filterbanks
        ours = data.log_mel(torch.from_numpy(y)[None], sr)[0].double().numpy()
        ref = dabs_log_mel_direct(y, sr)
        assert ours.shape == (224, 224)
        assert np.abs(ours - ref).max() < 1e-3, np.abs(ours - ref).max()  # dB; float32 vs float64
        assert ref.max() - ref.min() == pytest.approx(80)  # top_db clipped something: a real test of it


def test_log_mel_known_values():
    # a full-scale tone on FFT bin 64 (500 Hz at 16 kHz): the periodic Hann window puts |X| = N/4 on the
    # bin and N/8 on each neighbour, so every mel value is fb @ power with that 3-bin power spectrum
    n = 16_000
    y = torch.sin(2 * torch.pi * 64 / 2048 * torch.arange(n, dtype=torch.float64))[None]
    db = data.log_mel(y, 16_000)[0].double()
    power = np.zeros(1025)
    power[63:66] = [(2048 / 8) ** 2, (2048 / 4) ** 2, (2048 / 8) ** 2]
    mel = slaney_mel_filterbank(16_000) @ power
    expect = 10 * np.log10(np.maximum(mel ** 2, 1e-10))
    expect = np.maximum(expect, expect.max() - 80)
    frame = db[:, 10].numpy()  # a frame well inside the tone
    assert np.abs(frame - expect).max() < 0.01
    assert db[:, 200].max() == db.max() - 80  # frames past the clip hold only zero padding: the floor


def test_log_mel_batch_rows_are_independent():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(5000) * 0.1, rng.standard_normal(12000) * 0.1
    batch = torch.zeros(2, 12000)
    batch[0, :5000], batch[1] = torch.from_numpy(a), torch.from_numpy(b)
    both = data.log_mel(batch, 16_000)
    assert torch.allclose(both[0], data.log_mel(torch.from_numpy(a)[None].float(), 16_000)[0], atol=1e-4)
    assert torch.allclose(both[1], data.log_mel(torch.from_numpy(b)[None].float(), 16_000)[0], atol=1e-4)


# -----------------------------------------------------------------------------
# wav files

def test_read_wav_gives_the_int16_samples(tmp_path):
    samples = np.array([0, 1, -1, 32767, -32768, 1234], np.int16)
    assert np.array_equal(data.read_wav(write_wav(tmp_path / 'a.wav', samples, 16_000), 16_000), samples)
    # WAVE_FORMAT_EXTENSIBLE (which Python < 3.12's wave refuses) through the RIFF parser
    ext = write_wav(tmp_path / 'b.wav', samples, 48_000, extensible=True)
    assert ext.read_bytes()[20:22] == b'\xfe\xff'
    assert np.array_equal(data.read_wav(ext, 48_000), samples)
    # stereo: the first channel, as DABS's wavform[0]
    stereo = np.stack([samples, -samples], axis=1)
    assert np.array_equal(data.read_wav(write_wav(tmp_path / 'c.wav', stereo, 16_000, channels=2), 16_000), samples)


# -----------------------------------------------------------------------------
# Google Speech Commands

def expected_speech_rows(root, files, mean=data.GOOGLE_SPEECH_MEAN, std=data.GOOGLE_SPEECH_STD, rate=16_000):
    """Each file's spectrogram on its own, normalised: what the row of that file must hold."""
    out = []
    for f in files:
        y = torch.from_numpy(data.read_wav(root / f, rate)[:150_526].astype(np.float32) / 32768)[None]
        out.append((data.log_mel(y, rate) - mean) / std)
    return torch.cat(out)[:, None]


def test_google_speech_split_labels_and_rows(tmp_path):
    expected = write_fake_google_speech(tmp_path)
    root = tmp_path / 'speech_commands_v0.02'
    s = data.load_google_speech(tmp_path, download=False)
    assert s.train_x.shape == (len(expected['train']), 1, 224, 224) and s.train_x.dtype == torch.float16
    assert s.test_x.shape == (len(expected['test']), 1, 224, 224)
    for x, y, files in ((s.train_x, s.train_y, expected['train']), (s.test_x, s.test_y, expected['test'])):
        assert y.dtype == torch.int64
        assert y.tolist() == [data.GOOGLE_SPEECH_WORDS.index(f.split('/')[0]) for f in files]
        assert (x.float() - expected_speech_rows(root, files)).abs().max() < 0.01  # float16 rounding
    # the test clips are out of train (DABS leaves them in); the validation clips are train's last rows
    assert not set(expected['train']) & set(expected['test'])
    assert s.test_y.unique().tolist() == sorted(data.GOOGLE_SPEECH_WORDS.index(w) for w in ('eight', 'cat', 'learn'))
    assert s.train_y[-6:].tolist() == [data.GOOGLE_SPEECH_WORDS.index(w) for w in ('no', 'no', 'up', 'up', 'yes', 'yes')]
    assert 35 in s.train_y.tolist()  # _background_noise_ is class 35, cropped to 150,526 samples
    assert data.GOOGLE_SPEECH.num_classes == len(data.GOOGLE_SPEECH_WORDS) == 36


def test_google_speech_download_verifies_extracts_and_caches(tmp_path, monkeypatch):
    expected = write_fake_google_speech(tmp_path / 'src')
    # the real tar has no top-level folder: the word folders are at its root
    archive = tar_gz(tmp_path / 'speech_commands_v0.02.tar.gz', tmp_path / 'src' / 'speech_commands_v0.02', '.')
    serve(monkeypatch, 'GOOGLE_SPEECH', archive)
    data_dir = tmp_path / 'data'
    s = data.load_google_speech(data_dir, download=True)
    assert listing(data_dir) == ['speech_commands_v0.02', 'speech_commands_v0.02.logmel.npy',
                                            'speech_commands_v0.02.tar.gz']  # no temporary files left
    assert len(s.train_x) == len(expected['train'])
    # the second time: no network, no wav read, the cached spectrograms
    monkeypatch.setattr(urllib.request, 'urlopen', fails)
    monkeypatch.setattr(data, 'read_wav', fails)
    again = data.load_google_speech(data_dir, download=True)
    assert torch.equal(again.train_x, s.train_x) and torch.equal(again.test_y, s.test_y)
    # (a wrong archive is refused with both digests named: the table's row 'google_speech-archive-of-another-sha256')


def test_stale_speech_cache_is_rebuilt(tmp_path):
    write_fake_google_speech(tmp_path)
    first = data.load_google_speech(tmp_path, download=False)
    (tmp_path / 'speech_commands_v0.02' / 'yes' / '0a1b2c3d_nohash_0.wav').unlink()
    again = data.load_google_speech(tmp_path, download=False)
    assert len(again.train_x) == len(first.train_x) - 1


@pytest.mark.skipif(not SPEECH_SAMPLE.is_dir(), reason="the real Speech Commands sample is not in shared/data")
def test_real_speech_commands_sample():
    before = sorted((p.as_posix(), p.stat().st_mtime_ns) for p in SHARED.rglob('*'))
    s = data.get_domain('google_speech_sample').load(SHARED, download=False)
    assert sorted((p.as_posix(), p.stat().st_mtime_ns) for p in SHARED.rglob('*')) == before  # nothing written
    # 300 clips: 205 in neither list + 44 in validation_list = train; 51 in testing_list = test
    assert len(s.train_x) == 249 and len(s.test_x) == 51
    listed = {name: set((SPEECH_SAMPLE / name).read_text().split()) for name in ('validation_list.txt', 'testing_list.txt')}
    files = sorted(p.relative_to(SPEECH_SAMPLE).as_posix() for p in SPEECH_SAMPLE.glob('*/*.wav'))
    test = [f for f in files if f in listed['testing_list.txt']]
    train = [f for f in files if f not in listed['testing_list.txt'] and f not in listed['validation_list.txt']] + \
        [f for f in files if f in listed['validation_list.txt']]
    assert s.test_y.tolist() == [data.GOOGLE_SPEECH_WORDS.index(f.split('/')[0]) for f in test]
    assert s.train_y.tolist() == [data.GOOGLE_SPEECH_WORDS.index(f.split('/')[0]) for f in train]
    assert len(set(s.train_y.tolist())) == 30  # v0.01's 30 words, all among DABS's 36 labels
    rows = [0, 100, 248]
    assert (s.train_x[rows].float() - expected_speech_rows(SPEECH_SAMPLE, [train[i] for i in rows])).abs().max() < 0.01
    assert torch.isfinite(s.test_x.float()).all()


# -----------------------------------------------------------------------------
# AudioMNIST

def test_audio_mnist_speaker_split_and_rows(tmp_path):
    expected = write_fake_audio_mnist(tmp_path)
    s = data.load_audio_mnist(tmp_path, download=False)
    for x, y, files in ((s.train_x, s.train_y, expected['train']), (s.test_x, s.test_y, expected['test'])):
        assert y.tolist() == [int(f.name[0]) for f in files]
        rows = expected_speech_rows(Path('/'), [f.as_posix() for f in files], data.AUDIO_MNIST_MEAN,
                                    data.AUDIO_MNIST_STD, 48_000)
        assert (x.float() - rows).abs().max() < 0.01
    assert (tmp_path / 'AudioMNIST.logmel.npy').exists()


# -----------------------------------------------------------------------------
# LibriSpeech (WAV converted from its FLAC)

def librispeech_rows(files):
    return expected_speech_rows(Path('/'), [f.as_posix() for f in files], data.LIBRISPEECH_MEAN, data.LIBRISPEECH_STD)


def test_librispeech_pretrains_on_the_training_splits_present(tmp_path, capsys):
    files = write_fake_librispeech(tmp_path)
    s = data.load_librispeech(tmp_path, download=False)
    # train-clean-100 then train-other-500 (DABS's order), each sorted by stem; train-clean-360 is absent, and said
    rows = files['train-clean-100'] + files['train-other-500']
    assert [f.stem for f in rows[:3]] == ['103-1240-0000', '103-1240-0001', '103-1240-0002']  # '103' < '19' as strings
    assert s.train_x.shape == (10, 1, 224, 224) and s.train_x.dtype == torch.float16
    assert (s.train_x.float() - librispeech_rows(rows)).abs().max() < 0.01
    assert s.train_y.dtype == torch.int64 and s.train_y.tolist() == [0] * 10
    assert s.test_x.shape == (0, 1, 224, 224) and s.test_y.shape == (0,)
    assert 'train-clean-360 not found' in capsys.readouterr().out
    assert (tmp_path / 'LibriSpeech.train-clean-100+train-other-500.logmel.npy').is_file()
    # a split added later: a cache of its own, the rows in DABS's order
    more = write_fake_librispeech(tmp_path / 'more', seed=1, layout={'train-clean-360': {7: {100: 2}}})
    (tmp_path / 'more' / 'LibriSpeech' / 'train-clean-360').rename(tmp_path / 'LibriSpeech' / 'train-clean-360')
    s = data.load_librispeech(tmp_path, download=False)
    assert len(s.train_x) == 12 and 'not found' not in capsys.readouterr().out
    moved = [tmp_path / 'LibriSpeech' / 'train-clean-360' / f.parent.parent.name / f.parent.name / f.name
             for f in more['train-clean-360']]
    assert (s.train_x[8:10].float() - librispeech_rows(moved)).abs().max() < 0.01
    assert (tmp_path / 'LibriSpeech.train-clean-100+train-clean-360+train-other-500.logmel.npy').is_file()


def test_librispeech_transfer_is_dabs_per_speaker_split(tmp_path, monkeypatch):
    files = write_fake_librispeech(tmp_path)['dev-clean']
    s = data.load_librispeech_transfer(tmp_path, download=False)
    # by hand, as DABS's LibriSpeechTransfer: the walker's order (stems sorted as strings), speakers as numbers
    speaker_ids = np.array([int(f.stem.split('-')[0]) for f in files])
    assert [f.stem.split('-')[0] for f in files][:2] == ['1272', '1272'] and speaker_ids[-1] == 84
    rs = np.random.RandomState(42)
    train, test = [], []
    for speaker in sorted(set(speaker_ids.tolist())):  # 84, 174, 1272, 2412
        idx = np.where(speaker_ids == speaker)[0]
        rs.shuffle(idx)
        train += idx[:int(0.8 * len(idx))].tolist()
        test += idx[int(0.8 * len(idx)):].tolist()
    rank = {84: 0, 174: 1, 1272: 2, 2412: 3}
    assert (len(train), len(test)) == (2 + 4 + 4 + 3, 1 + 1 + 2 + 1)
    assert s.train_y.tolist() == [rank[speaker_ids[i]] for i in train]
    assert s.test_y.tolist() == [rank[speaker_ids[i]] for i in test]
    assert (s.train_x.float() - librispeech_rows([files[i] for i in train])).abs().max() < 0.01
    assert (s.test_x.float() - librispeech_rows([files[i] for i in test])).abs().max() < 0.01
    assert data.LIBRISPEECH_TRANSFER.num_classes == 40
    # cached: the second load reads no wav
    monkeypatch.setattr(data, 'read_wav', fails)
    again = data.load_librispeech_transfer(tmp_path, download=False)
    assert torch.equal(again.test_x, s.test_x) and torch.equal(again.train_y, s.train_y)


# -----------------------------------------------------------------------------
# PAMAP2

def test_interpolation_is_pandas_linear_interpolate():
    nan = np.nan
    a = np.array([[nan, 1.0, nan],
                  [nan, nan, nan],
                  [2.0, nan, nan],
                  [nan, 4.0, nan],
                  [6.0, nan, nan]])
    # pandas: DataFrame(a).interpolate() -- linear in the row number, forward only
    expected = np.array([[nan, 1.0, nan],
                         [nan, 2.0, nan],   # leading NaNs stay NaN
                         [2.0, 3.0, nan],
                         [4.0, 4.0, nan],
                         [6.0, 4.0, nan]])  # after the last value: that value; an all-NaN column stays NaN
    np.testing.assert_array_equal(data.interpolate_nans(a.copy()), expected)


def test_pamap2_windows_labels_and_subject_split(tmp_path):
    expected = write_fake_pamap2(tmp_path)
    s = data.load_pamap2(tmp_path, download=False)
    for x, y, (ex, ey) in ((s.train_x, s.train_y, expected['train']), (s.test_x, s.test_y, expected['test'])):
        assert x.dtype == torch.float32 and x.shape == (len(ey), 52, 320)
        assert y.tolist() == ey.tolist()
        np.testing.assert_allclose(x.numpy(), ex, rtol=0, atol=1e-4)  # the NaN gaps interpolated back exactly
    assert len(s.train_y) == 7 * 3 and len(s.test_y) == 2 * 3  # subjects 101-104, 107-109 / 105, 106
    assert [data.PAMAP2_ACTIVITIES[i] for i in s.train_y[:3]] == [1, 17, 24]


def test_pamap2_download_extracts_the_zip(tmp_path, monkeypatch):
    expected = write_fake_pamap2(tmp_path / 'src')
    archive = zip_folder(tmp_path / 'PAMAP2_Dataset.zip', tmp_path / 'src' / 'PAMAP2_Dataset', 'PAMAP2_Dataset')
    serve(monkeypatch, 'PAMAP2', archive, digest=False)  # UCI publishes no checksum
    s = data.load_pamap2(tmp_path / 'data', download=True)
    assert np.allclose(s.test_x.numpy(), expected['test'][0], atol=1e-4)
    assert (tmp_path / 'data' / 'PAMAP2_Dataset' / 'Protocol' / 'subject109.dat').is_file()


# -----------------------------------------------------------------------------
# HIGGS

def higgs_split(a):
    a = a[np.random.RandomState(42).permutation(len(a))]  # DABS's df.sample(frac=1, random_state=42)
    n = math.ceil(0.9 * len(a))
    return a[:n], a[n:]


def test_higgs_rows_split_and_cache(tmp_path, monkeypatch):
    a = write_fake_higgs(tmp_path)
    serve(monkeypatch, 'HIGGS', tmp_path / 'HIGGS.csv.gz')
    s = data.load_higgs(tmp_path, download=False)
    train, test = higgs_split(a)
    assert s.train_x.shape == (270, 28) and s.test_x.shape == (30, 28) and s.train_x.dtype == torch.float32
    assert np.array_equal(s.train_x.numpy(), train[:, 1:]) and np.array_equal(s.test_x.numpy(), test[:, 1:])
    assert s.train_y.tolist() == train[:, 0].astype(int).tolist() and s.test_y.dtype == torch.int64
    # cached: the second load neither reads nor verifies the csv.gz
    monkeypatch.setattr(data, 'read_higgs', fails)
    monkeypatch.setattr(data, '_check', fails)
    again = data.load_higgs(tmp_path, download=False)
    assert torch.equal(again.train_x, s.train_x) and torch.equal(again.test_y, s.test_y)


def test_higgs_download_and_a_small_file(tmp_path, monkeypatch):
    a = write_fake_higgs(tmp_path / 'src', rows=100)  # quick runs: a small file in the genuine format
    serve(monkeypatch, 'HIGGS', tmp_path / 'src' / 'HIGGS.csv.gz')
    s = data.load_higgs(tmp_path / 'data', download=True)
    train, test = higgs_split(a)
    assert np.array_equal(s.test_x.numpy(), test[:, 1:]) and len(s.train_x) == 90
    assert listing(tmp_path / 'data') == ['HIGGS.csv.gz', 'HIGGS.npy']  # no temporary files left
    # (a file too small to leave a test row, and no file with downloading off: the table's rows 'higgs-of-9-rows'
    # and 'higgs-missing')


# -----------------------------------------------------------------------------
# genomics

def test_genomics_tokens_labels_and_split(tmp_path, monkeypatch):
    rows = write_fake_genomics(tmp_path / 'src')
    serve(monkeypatch, 'GENOMICS', tmp_path / 'src' / 'genomics_ood.zip', digest=False)  # TFDS publishes none
    s = data.load_genomics(tmp_path / 'data', download=True)  # the zip is read as it is: nothing extracted
    assert listing(tmp_path / 'data') == ['genomics_ood.zip']
    perm = np.random.RandomState(42).permutation(len(rows))
    tokens = np.array([['ACGT'.index(b) for b in seq] for seq, _ in rows], np.uint8)[perm]
    labels = np.array([data.GENOMICS_GENERA.index(g) for _, g in rows])[perm]
    assert s.train_x.dtype == torch.uint8 and s.train_x.shape == (54, 250) and s.test_x.shape == (6, 250)
    assert np.array_equal(s.train_x.numpy(), tokens[:54]) and np.array_equal(s.test_x.numpy(), tokens[54:])
    assert s.train_y.tolist() == labels[:54].tolist() and s.test_y.tolist() == labels[54:].tolist()
    assert data.GENOMICS.to_input(s.train_x[:2]).dtype == torch.int64


def test_genomics_members_under_a_folder_are_found(tmp_path):
    rows = write_fake_genomics(tmp_path)
    write_genomics_zip(tmp_path / 'genomics_ood.zip', {'genomics_ood/before_2011_in_tr.txt': rows})
    assert len(data.load_genomics(tmp_path, download=False).train_x) == 54


# -----------------------------------------------------------------------------
# proteins: the streamed JSON reader, Pfam, SCOP

def protein_tokens(records):
    return np.array([[data.AMINO_ACIDS.index(c) for c in r['primary'][:128].ljust(128, 'X')] for r in records], np.uint8)


def test_iter_json_array_equals_json_load_at_any_chunk_size(tmp_path):
    rng = random.Random(0)
    values = [{'primary': 'ARND' * rng.randint(0, 40), 'clan': rng.randint(0, 700), 'note': 'a "]," b'},
              12345678901234567890, -1.5e-300, 'x', None, True, [], {}, [1, [2, {'k': ']'}]]]
    f = tmp_path / 'a.json'
    for trial in range(30):
        arr = [rng.choice(values) for _ in range(rng.randint(0, 12))]
        f.write_text(json.dumps(arr, indent=rng.choice([None, 2])))
        for chunk in (1, 2, 5, 64):  # numbers and records cut at every possible place
            assert list(data.iter_json_array(f, chunk)) == arr


def test_pfam_pretrains_on_pfam_train_without_labels(tmp_path, monkeypatch):
    records = write_fake_pfam(tmp_path)
    s = data.load_pfam(tmp_path, download=False)
    assert s.train_x.dtype == torch.uint8 and np.array_equal(s.train_x.numpy(), protein_tokens(records['train']))
    assert (s.train_x == 0).any() and (protein_tokens(records['train']) != 0).all(axis=1).any()  # padded and cut
    assert s.train_y.dtype == torch.int64 and s.train_y.tolist() == [0] * 40  # labels not used
    assert s.test_x.shape == (0, 128) and s.test_x.dtype == torch.uint8 and s.test_y.shape == (0,)
    assert data.PFAM.num_classes == 0 and data.PFAM.transfer == ('pfam_transfer',)
    assert listing(tmp_path / 'pfam') == [  # pfam_valid is the transfer domain's
        'pfam_train.clans.npy', 'pfam_train.json', 'pfam_train.tokens.npy', 'pfam_valid.json']
    monkeypatch.setattr(data, 'iter_json_array', fails)  # parsed once
    assert torch.equal(data.load_pfam(tmp_path, download=False).train_x, s.train_x)


def pfam_transfer_by_hand(n, tail=200_000):
    """DABS: pfam_valid.sample(frac=1, random_state=42).tail(200000), then head(ceil(0.9 m)) / tail(floor(0.1 m))."""
    perm = np.random.RandomState(42).permutation(n)
    transfer = perm[max(n - tail, 0):]
    m = len(transfer)
    assert math.ceil(0.9 * m) + math.floor(0.1 * m) == m
    return transfer[:math.ceil(0.9 * m)], transfer[m - math.floor(0.1 * m):]


def test_pfam_transfer_is_dabs_carve_out_of_pfam_valid(tmp_path, monkeypatch):
    records = write_fake_pfam(tmp_path)
    s = data.load_pfam_transfer(tmp_path, download=False)
    clans = sorted({r['clan'] for r in records['train']})  # label = rank among pfam_train's clans
    tokens, labels = protein_tokens(records['test']), np.array([clans.index(r['clan']) for r in records['test']])
    train, test = pfam_transfer_by_hand(10)  # a file under 200,000 records: all of it, 9 / 1
    assert len(train) == 9 and len(test) == 1
    assert np.array_equal(s.train_x.numpy(), tokens[train]) and np.array_equal(s.test_x.numpy(), tokens[test])
    assert s.train_y.tolist() == labels[train].tolist() and s.test_y.tolist() == labels[test].tolist()
    assert data.PFAM_TRANSFER.num_classes == 623 and s.train_y.dtype == torch.int64
    monkeypatch.setattr(data, 'iter_json_array', fails)  # both files' caches are used from now on
    assert torch.equal(data.load_pfam_transfer(tmp_path, download=False).test_x, s.test_x)


def test_pfam_transfer_takes_the_tail_of_the_permutation(tmp_path, monkeypatch):
    # the real rule on a file larger than the tail: 200,000 of ~1M records in DABS, here 20 of 25
    write_fake_pfam(tmp_path)
    valid = protein_records(25, 'clan', [3, 17, 42, 100, 622], seed=5)
    perm = np.random.RandomState(42).permutation(25)
    valid[perm[2]]['clan'] = 7  # a clan pfam_train lacks, in DABS's pretraining validation: not used, no error
    write_json_array(tmp_path / 'pfam' / 'pfam_valid.json', valid)
    monkeypatch.setattr(data, 'PFAM_TRANSFER_RECORDS', 20)
    s = data.load_pfam_transfer(tmp_path, download=False)
    train, test = pfam_transfer_by_hand(25, tail=20)
    assert list(train) == list(perm[5:23]) and list(test) == list(perm[23:])  # 18 / 2, in the permuted order
    assert np.array_equal(s.train_x.numpy(), protein_tokens(valid)[train])
    assert np.array_equal(s.test_x.numpy(), protein_tokens(valid)[test])
    # (the same clan in a transfer row is an error: the table's row 'pfam_valid-transfer-row-of-an-unknown-clan')


def test_pfam_and_scop_download_extract(tmp_path, monkeypatch):
    records = {'pfam': write_fake_pfam(tmp_path / 'src'), 'scop': write_fake_scop(tmp_path / 'src')}
    for prefix, folder, load in (('PFAM', 'pfam', data.load_pfam_transfer),
                                 ('SCOP', 'remote_homology', data.load_scop)):
        archive = tar_gz(tmp_path / f'{folder}.tar.gz', tmp_path / 'src' / folder, folder)
        serve(monkeypatch, prefix, archive, digest=False)  # TAPE publishes no checksum
        s = load(tmp_path / 'data', download=True)
        if folder == 'pfam':
            test = pfam_transfer_by_hand(10)[1]
            assert np.array_equal(s.test_x.numpy(), protein_tokens(records['pfam']['test'])[test])
        else:
            assert np.array_equal(s.test_x.numpy(), protein_tokens(records['scop']['test']))


def test_scop_labels_are_fold_labels(tmp_path):
    records = write_fake_scop(tmp_path)
    s = data.load_scop(tmp_path, download=False)
    assert s.train_y.tolist() == [r['fold_label'] for r in records['train']]
    assert np.array_equal(s.train_x.numpy(), protein_tokens(records['train']))
    assert s.train_y.max() == 1194 == data.SCOP.num_classes - 1


# -----------------------------------------------------------------------------
# WM-811K wafer maps (the .npz of docs/domains.md's conversion)

def one_map(m):
    """data.wafer_images of a single map."""
    return data.wafer_images(np.asarray(m, np.uint8).ravel(), np.array([m.shape]), np.array([0]), np.array([0]))[0]


def pil_bilinear_by_hand(pixels, size=32):
    """PIL's Resize((32, 32)) (bilinear) of a map no larger than 32 x 32 written out: output pixel i samples the
    input at x = (i + 0.5) * n / 32 - 0.5, clamped to the edge pixels, linearly between its two neighbours;
    the width first, rounded half up to 8 bits, then the height."""
    def axis(a, n):  # a: (..., n) -> (..., 32)
        x = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
        lo = np.floor(x).astype(int)
        hi, t = np.minimum(lo + 1, n - 1), x - lo
        return np.floor(a[..., lo] * (1 - t) + a[..., hi] * t + 0.5)
    a = axis(np.asarray(pixels, np.float64), pixels.shape[1])
    return axis(a.T, pixels.shape[0]).T


def test_wafer_preprocessing_by_hand():
    # DABS: pixel = int(value * 127.5); a constant map stays constant whatever its size
    for value, pixel in ((0, 0), (1, 127), (2, 255)):
        for shape in ((2, 2), (5, 7), (45, 31), (64, 64), (300, 202)):
            img = one_map(np.full(shape, value))
            assert img.shape == (3, 32, 32) and img.dtype == np.uint8 and (img == pixel).all(), (value, shape)
    # a 2 x 2 map enlarged: bilinear between the 4 pixels, edges held
    m = np.array([[0, 1], [2, 1]])
    img = one_map(m)
    expect = pil_bilinear_by_hand(data.WAFER_PIXELS[m])
    assert np.array_equal(img[0], expect) and np.array_equal(img[1], img[0]) and np.array_equal(img[2], img[0])
    assert img[0, 0, 0] == 0 and img[0, 0, 31] == 127 and img[0, 31, 0] == 255 and img[0, 31, 31] == 127
    assert img[0, 15, 0] == 120  # 0 * 17/32 + 255 * 15/32 = 119.53 rounded
    # a 5 x 7 map enlarged (no ties: every value is an odd multiple of 1/32 away from x.5)
    m = np.random.default_rng(0).integers(0, 3, (5, 7))
    assert np.array_equal(one_map(m)[0], pil_bilinear_by_hand(data.WAFER_PIXELS[m]))
    # shrinking is antialiased: 64 -> 32 averages 4 columns with weights 1/8, 3/8, 3/8, 1/8 (plain bilinear
    # would sample 2 columns: 127 and 255 here)
    m = np.ones((64, 64), int)
    m[:, 32:] = 2
    row = one_map(m)[0, 7]
    assert row[:15].tolist() == [127] * 15 and row[17:].tolist() == [255] * 15
    assert row[15] == 143 and row[16] == 239  # 7/8 * 127 + 1/8 * 255, 1/8 * 127 + 7/8 * 255
    # and any map agrees with torch's antialiased bilinear resize to within PIL's 8-bit rounding
    rng = np.random.default_rng(1)
    for shape in ((45, 31), (71, 19), (300, 202), (32, 77)):
        m = rng.integers(0, 3, shape)
        x = torch.from_numpy(data.WAFER_PIXELS[m]).double()[None, None]
        ref = torch.nn.functional.interpolate(x, size=(32, 32), mode='bilinear', antialias=True, align_corners=False)
        assert (torch.from_numpy(one_map(m)[0]).double() - ref[0, 0]).abs().max() <= 1


def test_wafer_maps_labels_and_splits(tmp_path, monkeypatch):
    fake = write_fake_wafer(tmp_path)
    label = fake['label']
    images = np.stack([one_map(m) for m in fake['maps']])
    # DABS: each set in the file's order, the seed-42 permutation, ceil(90%) train
    unlabelled, labelled = np.flatnonzero(label == -1), np.flatnonzero(label >= 0)
    pu, pl = np.random.RandomState(42).permutation(20), np.random.RandomState(42).permutation(20)
    s = data.load_wafer(tmp_path, download=False)
    assert s.train_x.dtype == torch.uint8 and np.array_equal(s.train_x.numpy(), images[unlabelled[pu[:18]]])
    assert s.train_y.tolist() == [0] * 18 and s.test_x.shape == (0, 3, 32, 32) and s.test_y.shape == (0,)
    t = data.load_wafer_transfer(tmp_path, download=False)
    assert np.array_equal(t.train_x.numpy(), images[labelled[pl[:18]]])
    assert np.array_equal(t.test_x.numpy(), images[labelled[pl[18:]]])
    assert t.train_y.tolist() == label[labelled[pl[:18]]].tolist()
    assert t.test_y.tolist() == label[labelled[pl[18:]]].tolist()
    assert t.train_y.dtype == torch.int64 and sorted(set(label[labelled])) == list(range(9))
    assert data.WAFER_TRANSFER.to_input(t.train_x[:2]).max() <= 1
    assert listing(tmp_path) == ['wafer.labelled.32x32.npy', 'wafer.npz', 'wafer.unlabelled.32x32.npy']
    # the real sizes: 638,507 unlabelled and 172,950 labelled maps give DABS's 574,657 / 63,850 and 155,655 / 17,295
    assert [len(a) for a in data.seeded_split(638_507, '')] == [574_657, 63_850]
    assert [len(a) for a in data.seeded_split(172_950, '')] == [155_655, 17_295]
    # cached: the maps are not read again (the labels are: 1.6 MB)
    monkeypatch.setattr(data, 'read_wafer', fails)
    assert torch.equal(data.load_wafer_transfer(tmp_path, download=False).test_x, t.test_x)
    assert torch.equal(data.load_wafer(tmp_path, download=False).train_x, s.train_x)


# -----------------------------------------------------------------------------
# the real samples shipped in shared/data: the Speech Commands subset, HAPT, the HIGGS sample, splice junctions

def sha1_is_test(speaker):
    """The speech subset's split rule written out: SHA-1 of the speaker id as a number, divisible by 5."""
    return int.from_bytes(hashlib.sha1(speaker.encode()).digest(), 'big') % 5 == 0


def speaker_of(path):
    return Path(path).name.split('_nohash_')[0]


def snapshot(folder):
    return sorted((p.as_posix(), p.stat().st_mtime_ns, p.stat().st_size) for p in Path(folder).rglob('*'))


def sample_fix(folder):
    """What a damaged file of a sample says to do: both, as the folder may be the project's copy or a download."""
    return [f"restore {folder.name}/ from the project's copy if it is the one in shared/data",
            f"else delete {folder}/ and run again to download it again"]


def test_speech_subset_speaker_split_labels_and_rows(tmp_path):
    expected = write_fake_speech_subset(tmp_path)
    root = tmp_path / 'speech_commands_v0.02_subset'
    before = snapshot(tmp_path)
    s = data.load_google_speech_subset(tmp_path, download=False)
    assert snapshot(tmp_path) == before  # nothing written: no cache beside a read-only sample
    assert data.SPEECH_SUBSET_WORDS == [w for w in data.GOOGLE_SPEECH_WORDS if w in
                                        {'yes', 'no', 'up', 'down', 'left', 'right', 'on', 'off', 'stop', 'go'}]
    assert s.train_x.shape == (31, 1, 224, 32) and s.test_x.shape == (20, 1, 224, 32)
    assert s.train_x.dtype == torch.float16
    for x, y, files in ((s.train_x, s.train_y, expected['train']), (s.test_x, s.test_y, expected['test'])):
        assert y.dtype == torch.int64 and y.tolist() == [data.SPEECH_SUBSET_WORDS.index(f.split('/')[0]) for f in files]
        full = expected_speech_rows(root, files)  # google_speech's log-mels, of which the first 32 frames are kept
        assert (x.float() - full[..., :32]).abs().max() < 0.01
        assert (full[..., 32:] == full[..., -1:]).all()  # what is dropped is the padding's one value
    # by speaker, by the SHA-1 rule; no speaker on both sides; the groups are the speakers, numbered in sorted order
    assert all(sha1_is_test(speaker_of(f)) for f in expected['test'])
    assert not any(sha1_is_test(speaker_of(f)) for f in expected['train'])
    assert not {speaker_of(f) for f in expected['train']} & {speaker_of(f) for f in expected['test']}
    speakers = sorted({speaker_of(f) for f in expected['train'] + expected['test']})
    assert s.train_groups.dtype == torch.int64
    assert s.train_groups.tolist() == [speakers.index(speaker_of(f)) for f in expected['train']]
    assert data.GOOGLE_SPEECH_SUBSET.num_classes == 10


def test_hapt_windows_labels_and_user_split(tmp_path):
    expected = write_fake_hapt(tmp_path)
    before = snapshot(tmp_path)
    s = data.load_hapt_sample(tmp_path, download=False)
    assert snapshot(tmp_path) == before
    for x, y, (ex, ey, eu), groups in ((s.train_x, s.train_y, expected['train'], s.train_groups),
                                       (s.test_x, s.test_y, expected['test'], None)):
        assert x.dtype == torch.float32 and x.shape == (len(ey), 6, 128)
        assert np.array_equal(x.numpy(), ex)  # the raw values, as written
        assert y.dtype == torch.int64 and y.tolist() == ey.tolist()
        if groups is not None:
            assert groups.dtype == torch.int64 and groups.tolist() == eu.tolist()
    # 2 and 4 test, 1, 3, 5 train: the users present among the split files' (which name absent users too)
    assert set(expected['train'][2].tolist()) == {1, 3, 5} and set(expected['test'][2].tolist()) == {2, 4}
    # per recording: 3 + 1 + 0 + 1 + 2 + 2 + 3 windows; user 1 has two recordings; all six activities, no transition
    assert len(s.train_y) == 12 * 4 and len(s.test_y) == 12 * 2
    assert s.train_y.tolist()[:12] == [4, 4, 4, 0, 1, 2, 2, 3, 3, 5, 5, 5]
    # channels first: acc x y z then gyro x y z (acc x is about 1 g here, gyro about 0)
    assert abs(s.train_x[:, 0].mean() - 1) < 0.1 and abs(s.train_x[:, 3:].mean()) < 0.1


def test_higgs_sample_rows_and_split(tmp_path):
    expected = write_fake_higgs_sample(tmp_path)
    before = snapshot(tmp_path)
    s = data.load_higgs_sample(tmp_path, download=False)
    assert snapshot(tmp_path) == before
    # train = binary.train, test = binary.test, rows in the files' order
    for x, y, a in ((s.train_x, s.train_y, expected['train']), (s.test_x, s.test_y, expected['test'])):
        assert x.dtype == torch.float32 and np.array_equal(x.numpy(), a[:, 1:])
        assert y.dtype == torch.int64 and y.tolist() == a[:, 0].astype(int).tolist()
    assert s.train_x.shape == (60, 28) and s.test_x.shape == (20, 28) and s.train_groups is None


def splice_tokens_by_hand(seq):
    return [{'A': 0, 'C': 1, 'G': 2, 'T': 3, 'D': 4, 'N': 5, 'S': 6, 'R': 7}[c] for c in seq]


def test_splice_tokens_labels_and_split(tmp_path):
    rows = write_fake_splice(tmp_path)
    before = snapshot(tmp_path)
    s = data.load_splice(tmp_path, download=False)
    assert snapshot(tmp_path) == before
    tokens = np.array([splice_tokens_by_hand(seq) for _, _, seq in rows], np.uint8)
    labels = np.array([{'EI': 0, 'IE': 1, 'N': 2}[c] for c, _, _ in rows])
    perm = np.random.RandomState(42).permutation(60)  # DABS's seed-42 permutation, ceil(90%) = 54 train
    assert s.train_x.dtype == torch.uint8 and s.train_x.shape == (54, 60) and s.test_x.shape == (6, 60)
    assert np.array_equal(s.train_x.numpy(), tokens[perm[:54]]) and np.array_equal(s.test_x.numpy(), tokens[perm[54:]])
    assert s.train_y.tolist() == labels[perm[:54]].tolist() and s.test_y.tolist() == labels[perm[54:]].tolist()
    assert set(torch.cat([s.train_x, s.test_x]).unique().tolist()) == set(range(8))  # the ambiguity codes: 4-7
    assert data.SPLICE.to_input(s.train_x[:2]).dtype == torch.int64


# the real folders (skipped where shared/data does not have them)

SPEECH_SUBSET = SHARED / 'speech_commands_v0.02_subset'
HAPT = SHARED / 'hapt_sample'


@pytest.mark.skipif(not SPEECH_SUBSET.is_dir(), reason="the real Speech Commands v0.02 subset is not in shared/data")
def test_real_speech_subset():
    before = snapshot(SHARED)
    s = data.get_domain('google_speech_subset').load(SHARED, download=False)
    assert snapshot(SHARED) == before  # nothing written
    files = sorted(p.relative_to(SPEECH_SUBSET).as_posix() for p in SPEECH_SUBSET.glob('*/*.wav'))
    train = [f for f in files if not sha1_is_test(speaker_of(f))]
    test = [f for f in files if sha1_is_test(speaker_of(f))]
    assert len(files) == 1008 and (len(s.train_x), len(s.test_x)) == (len(train), len(test)) == (838, 170)
    train_speakers, test_speakers = {speaker_of(f) for f in train}, {speaker_of(f) for f in test}
    assert (len(train_speakers), len(test_speakers)) == (51, 10) and not train_speakers & test_speakers
    # labels: the 10 words in GOOGLE_SPEECH_WORDS's order (right yes up no stop on down go left off)
    assert s.train_y.tolist() == [data.SPEECH_SUBSET_WORDS.index(f.split('/')[0]) for f in train]
    assert s.test_y.tolist() == [data.SPEECH_SUBSET_WORDS.index(f.split('/')[0]) for f in test]
    assert np.bincount(s.train_y.numpy()).tolist() == [87, 90, 88, 77, 84, 83, 85, 83, 80, 81]
    assert np.bincount(s.test_y.numpy()).tolist() == [18, 21, 18, 17, 12, 16, 18, 18, 19, 13]
    # train_groups are the speakers: a grouped validation split shares none with the rest of train
    assert len(s.train_groups.unique()) == 51
    assert all(len({speaker_of(train[i]) for i in np.flatnonzero(s.train_groups.numpy() == g)}) == 1
               for g in s.train_groups.unique().tolist())
    tr, va = data.train_val_split(len(s.train_x), 0.1, groups=s.train_groups)
    assert not {speaker_of(train[i]) for i in tr.tolist()} & {speaker_of(train[i]) for i in va.tolist()}
    # one clip's row: its log-mel computed on that file alone, and also from its samples read with `wave` here
    i = 100
    alone = data.speech_splits([SPEECH_SUBSET / test[i]], [], [0], 16_000, data.GOOGLE_SPEECH_MEAN,
                               data.GOOGLE_SPEECH_STD).train_x
    assert torch.equal(s.test_x[i:i + 1], alone[..., :32])
    assert (alone[..., 26:] == alone[..., -1:]).all()  # past the 26 frames that reach the clip: padding
    with wave.open(str(SPEECH_SUBSET / test[i])) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels(), w.getnframes()) == (16_000, 2, 1, 16_000)
        y = np.frombuffer(w.readframes(16_000), '<i2').astype(np.float32) / 32768
    db = data.log_mel(torch.from_numpy(y)[None], 16_000)
    assert (s.test_x[i].float() - (db[..., :32] - data.GOOGLE_SPEECH_MEAN) / data.GOOGLE_SPEECH_STD).abs().max() < 0.01


@pytest.mark.skipif(not HAPT.is_dir(), reason="the real HAPT sample is not in shared/data")
def test_real_hapt_sample():
    before = snapshot(SHARED)
    s = data.get_domain('hapt_sample').load(SHARED, download=False)
    assert snapshot(SHARED) == before
    # the windows counted from labels.txt by hand: every segment of activity 1-6 of the 7 users present
    segments = [[int(v) for v in line.split()] for line in (HAPT / 'RawData' / 'labels.txt').read_text().split('\n')
                if line.strip()]
    count = {'train': [0] * 6, 'test': [0] * 6}
    for e, user, activity, first, last in segments:
        if user in (1, 2, 3, 4, 5, 7, 8) and activity <= 6:
            count['test' if user in (2, 4) else 'train'][activity - 1] += max(0, (last - first + 1 - 128) // 64 + 1)
    assert np.bincount(s.train_y.numpy()).tolist() == count['train'] == [314, 251, 230, 234, 286, 267]
    assert np.bincount(s.test_y.numpy()).tolist() == count['test'] == [119, 100, 92, 95, 111, 101]
    assert s.train_x.shape == (1582, 6, 128) and s.test_x.shape == (618, 6, 128)
    # the official split by user: 2 and 4 test (the distinct users of Test/subject_id_test.txt that are here)
    test_users = {int(v) for v in (HAPT / 'Test' / 'subject_id_test.txt').read_text().split()}
    assert test_users & {1, 2, 3, 4, 5, 7, 8} == {2, 4}
    assert set(s.train_groups.tolist()) == {1, 3, 5, 7, 8}
    tr, va = data.train_val_split(len(s.train_x), 0.1, groups=s.train_groups)
    assert not set(s.train_groups[tr].tolist()) & set(s.train_groups[va].tolist())
    # the first test rows, re-read with plain Python: user 2's first recording (experiment 3), its first segment of
    # an activity long enough for a window, windows 0 and 1 (stride 64)
    e, user, activity, first, last = next(r for r in segments if r[:2] == [3, 2] and r[2] <= 6 and r[4] - r[3] >= 127)
    acc, gyro = ([[float(v) for v in line.split()] for line in (HAPT / 'RawData' / f'{kind}_exp03_user02.txt')
                  .read_text().splitlines()] for kind in ('acc', 'gyro'))
    for w in (0, 1):
        rows = range(first - 1 + 64 * w, first - 1 + 64 * w + 128)  # labels.txt is 1-based
        window = np.array([[acc[r][c] for r in rows] for c in range(3)] +
                          [[gyro[r][c] for r in rows] for c in range(3)], np.float32)  # (6, 128), channels first
        assert np.array_equal(s.test_x[w].numpy(), window) and s.test_y[w] == activity - 1


@pytest.mark.skipif(not (SHARED / 'higgs_lightgbm').is_dir(), reason="the real HIGGS sample is not in shared/data")
def test_real_higgs_sample():
    before = snapshot(SHARED)
    s = data.get_domain('higgs_sample').load(SHARED, download=False)
    assert snapshot(SHARED) == before
    assert s.train_x.shape == (7000, 28) and s.test_x.shape == (500, 28)
    assert np.bincount(s.train_y.numpy()).tolist() == [3284, 3716]
    assert np.bincount(s.test_y.numpy()).tolist() == [228, 272]
    # rows parsed by hand: the first of binary.train, the last of binary.test
    for x, y, name, row in ((s.train_x, s.train_y, 'binary.train', 0), (s.test_x, s.test_y, 'binary.test', -1)):
        fields = (SHARED / 'higgs_lightgbm' / name).read_text().splitlines()[row].split('\t')
        assert len(fields) == 29 and y[row] == int(fields[0])
        assert x[row].tolist() == [float(np.float32(float(v))) for v in fields[1:]]
    assert s.train_x[0, :3].tolist() == pytest.approx([0.869, -0.635, 0.226])  # HIGGS.csv's first row, rounded


@pytest.mark.skipif(not (SHARED / 'splice').is_dir(), reason="the real splice sample is not in shared/data")
def test_real_splice():
    before = snapshot(SHARED)
    s = data.get_domain('splice').load(SHARED, download=False)
    assert snapshot(SHARED) == before
    assert s.train_x.shape == (2871, 60) and s.test_x.shape == (319, 60)  # seeded_split: ceil(90%) of 3,190
    assert np.bincount(s.train_y.numpy()).tolist() == [704, 685, 1482]  # EI, IE, N
    assert np.bincount(s.test_y.numpy()).tolist() == [63, 83, 173]
    assert set(torch.cat([s.train_x, s.test_x]).unique().tolist()) == set(range(8))  # D N S R all occur
    # one sequence tokenised by hand: an acceptor that starts with the ambiguity code D, found through the split
    lines = (SHARED / 'splice' / 'splice.data').read_text().splitlines()
    i = next(k for k, line in enumerate(lines) if 'HUMMHB27B-ACCEPTOR-1202' in line)
    cls, name, seq = (f.strip() for f in lines[i].split(','))
    assert cls == 'IE' and seq.startswith('DGACGG')
    perm = np.random.RandomState(42).permutation(3190)
    where = int(np.flatnonzero(perm == i)[0])
    x, y = (s.train_x[where], s.train_y[where]) if where < 2871 else (s.test_x[where - 2871], s.test_y[where - 2871])
    assert x.tolist() == splice_tokens_by_hand(seq) and x[0] == 4 and y == 1


# -----------------------------------------------------------------------------
# the samples' downloads, from archives and files built here out of the project's copies (out of the fakes above
# where this checkout has no shared/data), served through a fake urlopen

SAMPLE_ARCHIVES = {'google_speech_subset': 'speech_commands_test_set_v0.02.tar.gz', 'hapt_sample': 'HAPT Data Set.zip'}


def files_of(folder):
    """{name relative to folder: bytes} of every file in it."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob('*') if p.is_file()}


def write_files(folder, files):
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return folder


def digest_by_hand(files):
    """data.sample_digest written out: (count, the sha256 of the files' `sha256sum` lines in sorted order)."""
    lines = ''.join(f"{hashlib.sha256(content).hexdigest()}  {name}\n" for name, content in sorted(files.items()))
    return len(files), hashlib.sha256(lines.encode()).hexdigest()


def flipped(content):
    return content[:-1] + bytes([content[-1] ^ 1])  # same size, another sha256


def serve_bytes(monkeypatch, served):
    """urlopen gives {url: bytes}; any other URL fails as an unreachable network does."""
    def urlopen(url, timeout=None):
        if url not in served:
            raise urllib.error.URLError(OSError(101, 'Network is unreachable'))
        return io.BytesIO(served[url])
    monkeypatch.setattr(urllib.request, 'urlopen', urlopen)


def source_folder(tmp_path, name, write_fake):
    """The project's copy of the sample folder `name`, or where this checkout has none, a fake written here."""
    if (SHARED / name).is_dir():
        return SHARED / name
    write_fake(tmp_path / 'src')
    return tmp_path / 'src' / name


def speech_source(tmp_path, monkeypatch, corrupt=False):
    """The test-set archive as the original (a .tar.gz with no top folder, './' before each name) with two of the
    copy's speakers, one test and one train, whose clips the subset takes with README.md and LICENSE, and what it
    must leave: a third speaker, a word outside the ten. The constants are pointed at the two speakers.
    Returns (folder name, {url: bytes served}, {name: bytes} the folder must hold)."""
    files = files_of(source_folder(tmp_path, 'speech_commands_v0.02_subset', write_fake_speech_subset))
    speakers = sorted({speaker_of(n) for n in files if n.endswith('.wav')})
    test = next(s for s in speakers if sha1_is_test(s))
    train, other = [s for s in speakers if not sha1_is_test(s)][:2]
    taken = {n: b for n, b in files.items() if not n.endswith('.wav') or speaker_of(n) in (test, train)}
    members = {**{n: b for n, b in files.items() if not n.endswith('.wav') or speaker_of(n) in (test, train, other)},
               f'bed/{test}_nohash_0.wav': next(b for n, b in taken.items() if n.endswith('.wav'))}
    if corrupt:
        clip = min(n for n in taken if n.endswith('.wav'))
        members[clip] = flipped(members[clip])
    monkeypatch.setattr(data, 'SPEECH_SUBSET_SPEAKERS', {test, train})
    monkeypatch.setattr(data, 'SPEECH_SUBSET_FILES', digest_by_hand(taken)[0])
    monkeypatch.setattr(data, 'SPEECH_SUBSET_SHA256', digest_by_hand(taken)[1])
    archive = tar_gz(tmp_path / 'test_set.tar.gz', write_files(tmp_path / 'members', members), '.')
    return 'speech_commands_v0.02_subset', {data.SPEECH_SUBSET_URL: archive.read_bytes()}, taken


def hapt_source(tmp_path, monkeypatch, corrupt=False):
    """The HAPT zip with users 1 and 2 of the copy, whose recordings the sample takes with the files of all users,
    and what it must leave: user 3's recordings, the feature files. Returns as speech_source."""
    files = files_of(source_folder(tmp_path, 'hapt_sample', write_fake_hapt))
    user = {n: int(n[-6:-4]) for n in files if re.fullmatch(r'RawData/(acc|gyro)_exp\d+_user\d+\.txt', n)}
    taken = {n: b for n, b in files.items() if user.get(n, 1) in (1, 2)}
    members = {**{n: b for n, b in files.items() if user.get(n, 1) in (1, 2, 3)},
               'features.txt': b'1 tBodyAcc-Mean-1\n', 'Train/X_train.txt': b'0.04 -0.01 -0.04\n'}
    if corrupt:
        members['RawData/labels.txt'] = flipped(members['RawData/labels.txt'])
    monkeypatch.setattr(data, 'HAPT_SAMPLE_USERS', (1, 2))
    monkeypatch.setattr(data, 'HAPT_SAMPLE_FILES', digest_by_hand(taken)[0])
    monkeypatch.setattr(data, 'HAPT_SAMPLE_SHA256', digest_by_hand(taken)[1])
    archive = zip_folder(tmp_path / 'hapt.zip', write_files(tmp_path / 'members', members), '')
    return 'hapt_sample', {data.HAPT_URL: archive.read_bytes()}, taken


def whole_files_source(tmp_path, monkeypatch, corrupt, table, name, write_fake):
    """The files of the sample `name` served at the URLs of data.<table>, which is pointed at their sizes and
    sha256 (those of the copy where it is here). Returns as speech_source."""
    files = files_of(source_folder(tmp_path, name, write_fake))
    urls = {n: url for n, (url, _, _) in getattr(data, table).items()}
    monkeypatch.setattr(data, table, {n: (url, len(files[n]), hashlib.sha256(files[n]).hexdigest())
                                      for n, url in urls.items()})
    served = {url: files[n] for n, url in urls.items()}
    if corrupt:
        first = next(iter(served))
        served[first] = flipped(served[first])
    return name, served, files


SAMPLE_SOURCES = {
    'google_speech_subset': speech_source,
    'hapt_sample': hapt_source,
    'higgs_sample': lambda tmp_path, monkeypatch, corrupt=False: whole_files_source(
        tmp_path, monkeypatch, corrupt, 'HIGGS_SAMPLE_FILES', 'higgs_lightgbm', write_fake_higgs_sample),
    'splice': lambda tmp_path, monkeypatch, corrupt=False: whole_files_source(
        tmp_path, monkeypatch, corrupt, 'SPLICE_FILES', 'splice', write_fake_splice)}


def assert_same_splits(a, b):
    for key in ('train_x', 'train_y', 'test_x', 'test_y', 'train_groups'):
        x, y = getattr(a, key), getattr(b, key)
        assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y)), key


@pytest.mark.parametrize('name', SAMPLE_SOURCES)
def test_a_missing_sample_is_downloaded_verified_and_only_its_files_kept(tmp_path, monkeypatch, name):
    folder, served, taken = SAMPLE_SOURCES[name](tmp_path, monkeypatch)
    serve_bytes(monkeypatch, served)
    data_dir = tmp_path / 'data'  # does not exist yet
    s = data.get_domain(name).load(data_dir, download=True)
    assert listing(data_dir) == [folder]  # no archive, no temporary file or folder
    assert files_of(data_dir / folder) == taken  # the sample's files, byte for byte, and nothing else
    assert len(s.train_y) and len(s.test_y)
    # from then on the folder is read as it is, as the project's copy is: no network, no hashing
    monkeypatch.setattr(urllib.request, 'urlopen', fails)
    monkeypatch.setattr(data, '_hexdigest', fails)
    assert_same_splits(data.get_domain(name).load(data_dir, download=True), s)


@pytest.mark.parametrize('name', SAMPLE_ARCHIVES)
def test_a_placed_archive_gives_the_sample_without_network_and_is_kept(tmp_path, monkeypatch, name):
    # (a corrupted one is named, kept, not replaced: the table's rows '<name>-placed-archive-corrupted')
    folder, served, taken = SAMPLE_SOURCES[name](tmp_path, monkeypatch)
    monkeypatch.setattr(urllib.request, 'urlopen', fails)
    data_dir = tmp_path / 'data'
    data_dir.mkdir()
    archive = data_dir / SAMPLE_ARCHIVES[name]
    archive.write_bytes(*served.values())
    data.get_domain(name).load(data_dir, download=False)
    assert listing(data_dir) == sorted([archive.name, folder]) and files_of(data_dir / folder) == taken


@pytest.mark.skipif(not (shutil.which('find') and shutil.which('sha256sum')), reason="needs GNU find and sha256sum")
def test_sample_digest_is_what_the_shell_command_of_its_docstring_gives(tmp_path):
    write_fake_hapt(tmp_path)  # files in nested folders
    folder = tmp_path / 'hapt_sample'
    command = data.sample_digest.__doc__.strip().splitlines()[-1].strip().replace('<folder>', str(folder))
    out = subprocess.run(['bash', '-c', command], capture_output=True, text=True, check=True).stdout
    assert data.sample_digest(folder) == (len(files_of(folder)), out.split()[0]) == digest_by_hand(files_of(folder))


@pytest.mark.skipif(not all((SHARED / f).is_dir() for f in ('speech_commands_v0.02_subset', 'hapt_sample',
                                                             'higgs_lightgbm', 'splice')),
                    reason="the real samples are not in shared/data")
def test_the_samples_constants_are_those_of_the_projects_copies(tmp_path, monkeypatch):
    # archives: the count and digest of the copy's files, every one of them taken by the selection
    speech, hapt = files_of(SPEECH_SUBSET), files_of(HAPT)
    for files, member, count, digest in ((speech, data.speech_subset_member, 1010, data.SPEECH_SUBSET_SHA256),
                                         (hapt, data.hapt_sample_member, 35, data.HAPT_SAMPLE_SHA256)):
        assert digest_by_hand(files) == (count, digest) and all(member(n) for n in files)
    assert (data.SPEECH_SUBSET_FILES, data.HAPT_SAMPLE_FILES) == (1010, 35)
    assert data.SPEECH_SUBSET_SPEAKERS == {speaker_of(n) for n in speech if n.endswith('.wav')}
    assert data.HAPT_SAMPLE_USERS == tuple(sorted({int(n[-6:-4]) for n in hapt if n.startswith('RawData/acc_')}))
    # whole files: served at their URLs as they are, they pass the download's size and sha256 checks
    tables = {'higgs_sample': ('higgs_lightgbm', data.HIGGS_SAMPLE_FILES), 'splice': ('splice', data.SPLICE_FILES)}
    served = {}
    for folder, table in tables.values():
        assert sorted(table) == sorted(files_of(SHARED / folder))
        served.update({url: (SHARED / folder / n).read_bytes() for n, (url, _, _) in table.items()})
    serve_bytes(monkeypatch, served)
    for name in tables:
        assert_same_splits(data.get_domain(name).load(tmp_path, download=True),
                           data.get_domain(name).load(SHARED, download=False))


# -----------------------------------------------------------------------------
# every domain: its spec, and its fixture through to_input (test_train.py trains on each fixture)

@pytest.mark.parametrize("name", sorted(FAKE_WRITERS))
def test_a_domain_s_declared_shape_vocabulary_and_classes_are_what_its_loader_reads(name, tmp_path, monkeypatch):
    # read, not restated: the inputs a loader gives (from files in the dataset's format) have the declared shape,
    # their token ids fit the vocabulary, their labels the classes, and the model builds on the declared patches
    from metamae import MetaMAEConfig
    d = data.DOMAINS[name]
    s = d.load(write_fake(name, tmp_path, monkeypatch), False)
    x = d.to_input(s.train_x[:4])
    assert tuple(x.shape[1:]) == tuple(d.input_shape) and x.is_floating_point() == (d.vocab_size == 0)
    assert not d.vocab_size or 0 <= int(s.train_x.min()) and int(s.train_x.max()) < d.vocab_size
    assert not d.num_classes or 0 <= int(s.train_y.min()) and int(s.train_y.max()) < d.num_classes
    cfg = MetaMAEConfig(input_shape=tuple(d.input_shape), patch_size=tuple(d.patch_size), vocab_size=d.vocab_size,
                        mask_ratio=d.mask_ratio)
    assert 1 <= cfg.num_visible < cfg.num_tokens and d.metric in ("accuracy", "weighted_f1")


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="the real samples are in the project's shared/data")
def test_the_real_samples_have_exactly_the_declared_classes_and_vocabulary():
    for name in ("google_speech_subset", "hapt_sample", "higgs_sample", "splice"):
        d = data.DOMAINS[name]
        s = d.load(REAL_DATA, False)
        labels = torch.cat([s.train_y, s.test_y]).unique()
        assert labels.tolist() == list(range(d.num_classes)), name  # every class occurs, no other
        if d.vocab_size:  # every letter of splice.names occurs (A C G T and the ambiguity codes D N S R)
            assert torch.cat([s.train_x, s.test_x]).unique().tolist() == list(range(d.vocab_size))


@pytest.mark.parametrize('name', sorted(FAKE_WRITERS))
def test_fixture_gives_model_input(tmp_path, monkeypatch, name):
    domain = data.get_domain(name)
    s = domain.load(write_fake(name, tmp_path, monkeypatch), download=False)
    for x, y in ((s.train_x, s.train_y), (s.test_x, s.test_y)):
        assert x.device.type == 'cpu' and len(x) == len(y) and y.dtype == torch.int64
    assert len(s.train_x) > 0 and s.test_x.shape[1:] == s.train_x.shape[1:] and s.test_x.dtype == s.train_x.dtype
    if domain.num_classes:
        assert len(s.test_x) > 0
        assert 0 <= s.train_y.min() and max(s.train_y.max(), s.test_y.max()) < domain.num_classes
    else:  # a pretraining domain: labels unused (all 0), no test split
        assert len(s.test_x) == 0 and (s.train_y == 0).all()
    x = domain.to_input(s.train_x[:4])
    assert x.shape == (4, *domain.input_shape)
    assert x.dtype == (torch.int64 if domain.vocab_size else torch.float32)
    if domain.vocab_size:
        assert x.max() < domain.vocab_size
    else:
        assert torch.isfinite(x).all()


# ----------------------------------------------------------------------------- caches tied to what they were built from


def test_a_cache_is_rebuilt_when_its_source_changes(tmp_path):
    write_fake('pfam', tmp_path, None)
    train_json = tmp_path / 'pfam' / 'pfam_train.json'
    n = len(data.load_pfam(tmp_path, download=False).train_x)
    records = json.loads(train_json.read_text())[:5]  # the file replaced by a smaller one, as a new download would
    train_json.write_text(json.dumps(records))
    os.utime(train_json, ns=(1, 1))  # another time, whatever the clock's resolution
    assert n > 5 and len(data.load_pfam(tmp_path, download=False).train_x) == 5
    assert len(data.load_pfam(tmp_path, download=False).train_x) == 5  # and then used as it is
    train_json.unlink()  # a source deleted to free space leaves the cache as it is
    assert len(data.load_pfam(tmp_path, download=False).train_x) == 5


def test_a_build_removes_what_a_killed_build_left(tmp_path, monkeypatch):
    data_dir = write_fake('higgs', tmp_path / 'data', monkeypatch)
    (data_dir / '.HIGGS.npy.k1ll3d.part').write_bytes(b'half a cache')
    data.load_higgs(data_dir, download=False)
    assert listing(data_dir) == ['HIGGS.csv.gz', 'HIGGS.npy']




# ----------------------------------------------------------------------------- the table: what no loader may accept
# As test_data.py's: each row builds a domain's files in their genuine format, breaks them, and names the call that
# must refuse them (the domain's loader, or the reader it uses); the exception, the words of its one line (the file,
# what is wrong, what to do), and what is left on disk. The changes below act on a file's lines (or a list's items),
# in place.


def item(i, new):
    """A change of a list: its item i becomes new(item i)."""
    def change(items):
        items[i] = new(items[i])
    return change


def every(new):
    """A change of a list: each item becomes new(item)."""
    def change(items):
        items[:] = [new(x) for x in items]
    return change


def first(n):
    """A change of a list: only its first n items are left."""
    def change(items):
        del items[n:]
    return change


def cell(i, j, value, sep='\t'):
    """A change of a table's lines: line i's field j becomes value."""
    def change(lines):
        fields = lines[i].split(sep)
        fields[j] = value
        lines[i] = sep.join(fields)
    return change


def lines_of(path, *changes):
    """The file's lines changed by each change in turn, written back one a line."""
    lines = path.read_text().splitlines()
    for change in changes:
        change(lines)
    path.write_text(''.join(line + '\n' for line in lines))


def fix(folder):
    """The words of a damaged sample's message: restore it, or download it again."""
    return lambda c: sample_fix(c.tmp / folder)


def missing(name, folder, url):
    """With downloading off, a missing sample says where it downloads from and where else it is; nothing is made."""
    return pytest.param(lambda c: c.load(name), DataError,
                        [at(folder), 'downloading is off', url, '--data-dir', "the project's shared/data"], holds(),
                        id=f'{name}-missing')


def not_in_message(*words):
    def after(c, msg):
        assert not any(w in msg for w in words), msg
    return after


# wav files, read at 16 kHz

SAMPLES = np.arange(100, dtype=np.int16)


def wav(write):
    """x.wav as write(path) leaves it; the call reads it."""
    def setup(c):
        write(c.tmp / 'x.wav')
        return lambda: data.read_wav(c.tmp / 'x.wav', 16_000)
    return setup


def cut(end, **kwargs):
    """SAMPLES as a wav, cut at byte `end` (a slice's end)."""
    return lambda f: f.write_bytes(write_wav(f, SAMPLES, 16_000, **kwargs).read_bytes()[:end])


def extensible_header(channels, bits):
    """A WAVE_FORMAT_EXTENSIBLE header of PCM with this many channels of samples of this many bits."""
    pcm = b'\x01\x00\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71'  # KSDATAFORMAT_SUBTYPE_PCM
    fmt = struct.pack('<HHIIHHHHI', 0xFFFE, channels, 16000, 32000, 2, bits, 22, bits, 0) + pcm
    body = b'WAVE' + b'fmt ' + struct.pack('<I', len(fmt)) + fmt + b'data' + struct.pack('<I', 100) + bytes(100)
    return lambda f: f.write_bytes(b'RIFF' + struct.pack('<I', len(body)) + body)


# Google Speech Commands, AudioMNIST, LibriSpeech

def speech_archive_of_another_sha256(c):
    write_fake_google_speech(c.tmp / 'src')
    archive = tar_gz(c.tmp / 'speech_commands_v0.02.tar.gz', c.tmp / 'src' / 'speech_commands_v0.02', '.')
    serve(c.mp, 'GOOGLE_SPEECH', archive)
    (c.tmp / 'data').mkdir()
    shutil.copy(archive, c.tmp / 'data')  # as a download left it
    c.mp.setattr(data, 'GOOGLE_SPEECH_SHA256', 'f' * 64)
    return c.load('google_speech', c.tmp / 'data', download=True)


def speech_commands(change):
    def setup(c):
        write_fake_google_speech(c.tmp)
        change(c.tmp / 'speech_commands_v0.02')
        return c.load('google_speech')
    return setup


def audio_mnist(change):
    def setup(c):
        expected = write_fake_audio_mnist(c.tmp)
        change(c.tmp / 'AudioMNIST' / 'data', expected)
        return c.load('audio_mnist')
    return setup


def librispeech(change, name='librispeech_transfer'):
    """The fake LibriSpeech folder (its files, by split, kept as c.files) changed by change(dev-clean/, files)."""
    def setup(c):
        c.files = write_fake_librispeech(c.tmp)
        change(c.tmp / 'LibriSpeech' / 'dev-clean', c.files)
        return c.load(name)
    return setup


def new_folder(folder):
    shutil.rmtree(folder)
    folder.mkdir()


def silence(path, rate=16_000):
    write_wav(path, np.zeros(10, np.int16), rate)


# PAMAP2, HIGGS, genomics

def pamap2_105(change):
    """subject105.dat as change(path) leaves it."""
    def setup(c):
        write_fake_pamap2(c.tmp)
        change(c.tmp / 'PAMAP2_Dataset' / 'Protocol' / 'subject105.dat')
        return c.load('pamap2')
    return setup


def short_runs_only(f):  # only short runs left for subject 105; 106 also cut
    lines_of(f, first(300))
    shutil.copy(f, f.parent / 'subject106.dat')


def higgs_csv(change):
    """HIGGS.csv.gz as change(path, rows) leaves it, its checksums served: the parser must catch it."""
    def setup(c):
        rows = write_fake_higgs(c.tmp)
        change(c.tmp / 'HIGGS.csv.gz', rows)
        serve(c.mp, 'HIGGS', c.tmp / 'HIGGS.csv.gz')
        return c.load('higgs')
    return setup


def csv_lines(*changes):
    def change(f, rows):
        lines = gzip.decompress(f.read_bytes()).decode().splitlines()
        for ch in changes:
            ch(lines)
        f.write_bytes(gzip.compress(('\n'.join(lines) + '\n').encode()))
    return change


def higgs_of_9_rows(c):
    write_fake_higgs(c.tmp, rows=9)
    serve(c.mp, 'HIGGS', c.tmp / 'HIGGS.csv.gz')
    return c.load('higgs')


def truncated_cache(name, cache):
    """The domain loaded once (its cache built), then the cache cut short, as a disk that filled up under an older
    version left it."""
    def setup(c):
        c.load(name, write_fake(name, c.tmp, c.mp))()
        f = c.tmp / cache
        f.write_bytes(f.read_bytes()[:-100])
        return c.load(name)
    return setup


def higgs_cache_label(c):
    data_dir = write_fake('higgs', c.tmp / 'data', c.mp)
    data.load_higgs(data_dir, download=False)
    a = np.load(data_dir / 'HIGGS.npy')
    a[0, 0] = 0.5  # would read as 0
    np.save(data_dir / 'HIGGS.npy', a)
    return c.load('higgs', data_dir)


def higgs_cache_meets_a_full_disk(c):
    def full(*args, **kwargs):
        raise OSError(28, 'No space left on device')
    data_dir = write_fake('higgs', c.tmp / 'data', c.mp)
    c.mp.setattr(data, '_npy_header', full)
    return c.load('higgs', data_dir)


def higgs_in_a_read_only_folder(c):
    real_open = open

    def read_only(path, *args, **kwargs):  # what a read-only filesystem (EROFS) answers a new file
        if str(path).endswith('.lock'):
            raise OSError(30, 'Read-only file system', str(path))
        return real_open(path, *args, **kwargs)
    data_dir = write_fake('higgs', c.tmp / 'data', c.mp)
    c.mp.setattr(data, 'open', read_only, raising=False)
    return c.load('higgs', data_dir)


def higgs_of_another_size(c):
    write_fake_higgs(c.tmp, rows=20)  # not the published size: HIGGS_SIZE is the real file's
    return c.load('higgs')


def said_nothing_of_parsing(c, msg):
    assert 'parsing' not in c.capsys.readouterr().out


def genomics(change=lambda rows: None, member='before_2011_in_tr.txt'):
    """genomics_ood.zip of the fake's rows changed by change(rows), under the name member."""
    def setup(c):
        rows = write_fake_genomics(c.tmp)
        change(rows)
        write_genomics_zip(c.tmp / 'genomics_ood.zip', {member: rows})
        return c.load('genomics')
    return setup


def genomics_not_a_zip(c):
    write_fake_genomics(c.tmp)
    (c.tmp / 'genomics_ood.zip').write_bytes(b'PK\x03\x04 but not really')
    return c.load('genomics')


# proteins: the streamed JSON reader, Pfam, SCOP

def json_text(text):
    def setup(c):
        (c.tmp / 'a.json').write_text(text)
        return lambda: list(data.iter_json_array(c.tmp / 'a.json', 3))
    return setup


PROTEIN_JSON = {'pfam_transfer': ('pfam', 'pfam_valid.json'),
                'scop': ('remote_homology', 'remote_homology_train.json')}


def protein_json(name, change, cut=0):
    """The fakes of Pfam and SCOP; the JSON file the domain `name` reads (pfam_valid.json, or SCOP's
    remote_homology_train.json) written from its records changed by change(records), then cut short by `cut`."""
    def setup(c):
        records = {'pfam_transfer': write_fake_pfam(c.tmp)['test'], 'scop': write_fake_scop(c.tmp)['train']}[name]
        change(records)
        f = c.tmp.joinpath(*PROTEIN_JSON[name])
        write_json_array(f, records)
        if cut:
            f.write_text(f.read_text()[:-cut])
        return c.load(name)
    return setup


def setting(i, key, value):
    """A change of a list of records: record i's key becomes value."""
    def change(records):
        records[i][key] = value
    return change


def parsed_afresh(c, msg):  # nothing of the failed parse is kept: the fixed file is parsed afresh
    write_json_array(c.tmp / 'pfam' / 'pfam_valid.json', write_fake_pfam(c.tmp / 'again')['test'])
    s = data.load_pfam_transfer(c.tmp, download=False)
    assert len(s.train_x) + len(s.test_x) == 10


def pfam_transfer_row_of_an_unknown_clan(c):
    # the real rule on a file larger than the tail (test_pfam_transfer_takes_the_tail_of_the_permutation)
    write_fake_pfam(c.tmp)
    valid = protein_records(25, 'clan', [3, 17, 42, 100, 622], seed=5)
    perm = np.random.RandomState(42).permutation(25)
    valid[perm[2]]['clan'] = 7  # a clan pfam_train lacks, in DABS's pretraining validation: not used, no error
    valid[perm[7]]['clan'] = 7  # in a transfer row: an error
    write_json_array(c.tmp / 'pfam' / 'pfam_valid.json', valid)
    c.mp.setattr(data, 'PFAM_TRANSFER_RECORDS', 20)
    return c.load('pfam_transfer')


def pfam_valid_of_9(c):
    records = write_fake_pfam(c.tmp)
    write_json_array(c.tmp / 'pfam' / 'pfam_valid.json', records['test'][:9])  # ceil(0.9 * 9) = 9: none left
    return c.load('pfam_transfer')


def pfam_train(change):
    def setup(c):
        write_fake('pfam', c.tmp, None)
        change(c.tmp / 'pfam' / 'pfam_train.json')
        return c.load('pfam')
    return setup


def not_utf8(f):
    f.write_bytes(f.read_bytes()[:40] + b'\xff\xfe' + f.read_bytes()[40:])


# wafer maps

def wafer_npz(change, name='wafer'):
    """wafer.npz as change(path, fake) leaves it."""
    def setup(c):
        fake = write_fake_wafer(c.tmp)
        change(c.tmp / 'wafer.npz', fake)
        return c.load(name)
    return setup


def npz(change):
    """The .npz's arrays (a dict) changed by change(arrays), saved again."""
    def apply(f, fake):
        arrays = dict(np.load(f))
        change(arrays)
        np.savez(f, **arrays)
    return apply


def as_npy(f, fake):  # the maps alone, as a .npy under the .npz's name
    maps = np.load(f)['maps']
    with open(f, 'wb') as out:
        np.save(out, maps)


def offsets_off_by_one(arrays):
    arrays['offsets'][5] += 1


def label_9(arrays):
    arrays['label'][3] = 9


def value_3(arrays):
    arrays['maps'][17] = 3


# the samples: the Speech Commands subset, HAPT, the HIGGS sample, splice junctions

def speech_subset(change):
    """The fake subset (its files, by split, kept as c.expected) as change(its folder, c.expected) leaves it."""
    def setup(c):
        c.expected = write_fake_speech_subset(c.tmp)
        change(c.tmp / 'speech_commands_v0.02_subset', c.expected)
        return c.load('google_speech_subset')
    return setup


def cut_short(f, n):
    f.write_bytes(f.read_bytes()[:-n])


def in_subset(split, i):
    """A word: the path of the fake subset's file i of a split."""
    return lambda c: c.tmp / 'speech_commands_v0.02_subset' / c.expected[split][i]


def fake_sample(domain, write, folder):
    """sample(*changes): a case's setup that writes the fake sample of a domain, changes its folder with each
    change(folder) and loads it."""
    def sample(*changes):
        def setup(c):
            write(c.tmp)
            for change in changes:
                change(c.tmp / folder)
            return c.load(domain)
        return setup
    return sample


hapt = fake_sample('hapt_sample', write_fake_hapt, 'hapt_sample')
higgs_sample = fake_sample('higgs_sample', write_fake_higgs_sample, 'higgs_lightgbm')
splice = fake_sample('splice', write_fake_splice, 'splice')


def lines(name, *changes):
    """A change of a folder: its file `name`'s lines changed."""
    return lambda folder: lines_of(folder / name, *changes)


def text(name, content):
    """A change of a folder: its file `name` holds content."""
    return lambda folder: (folder / name).write_text(content)


def removed(*names):
    """A change of a folder: these files are gone."""
    def change(folder):
        for name in names:
            (folder / name).unlink()
    return change


ACC, GYRO, LABELS = 'RawData/acc_exp03_user02.txt', 'RawData/gyro_exp03_user02.txt', 'RawData/labels.txt'


def failed_download(name, case):
    """The sample's source served (corrupted, truncated) or not at all (offline), into a folder of the user's."""
    def setup(c):
        c.folder, served, _ = SAMPLE_SOURCES[name](c.tmp, c.mp, corrupt=case == 'corrupted')
        c.url = next(iter(served))  # the archive, or the first file (the one corrupted)
        if case == 'truncated':
            served[c.url] = served[c.url][:len(served[c.url]) // 2]
        serve_bytes(c.mp, {} if case == 'offline' else served)
        (c.tmp / 'data').mkdir()
        (c.tmp / 'data' / 'notes.txt').write_text("the user's\n")
        return c.load(name, c.tmp / 'data', download=True)
    return setup


def left_nothing(c, msg):  # no folder, no archive, no temporary file or folder
    assert listing(c.tmp / 'data') == ['notes.txt']


def shown_and_left_nothing(c, msg):  # the reason is shown, not swallowed
    assert any(e in msg for e in ('EOFError', 'ReadError', 'BadZipFile')), msg
    left_nothing(c, msg)


def placed_corrupted_archive(name):
    def setup(c):
        _, served, _ = SAMPLE_SOURCES[name](c.tmp, c.mp, corrupt=True)
        c.mp.setattr(urllib.request, 'urlopen', fails)
        (c.tmp / 'data').mkdir()
        (c.tmp / 'data' / SAMPLE_ARCHIVES[name]).write_bytes(*served.values())
        return c.load(name, c.tmp / 'data', download=True)
    return setup


def data_dir_the_sample_itself(c):
    write_fake_splice(c.tmp)
    c.mp.setattr(urllib.request, 'urlopen', fails)
    return c.load('splice', c.tmp / 'splice', download=True)


def speech_sample(change):
    """The Speech Commands sample (it ships with the project and has no download), whole and read once, then as
    change(its folder) leaves it."""
    def setup(c):
        root = c.tmp / 'speech_commands_v0.01_sample'
        for word in ('yes', 'no'):
            for n in range(2):
                write_wav(root / word / f'a{n}_nohash_0.wav', np.arange(100, dtype=np.int16), 16_000)
        (root / 'validation_list.txt').write_text('')
        (root / 'testing_list.txt').write_text('yes/a1_nohash_0.wav\nno/a1_nohash_0.wav\n')
        assert len(data.load_google_speech_sample(c.tmp, download=False).train_x) == 2
        change(root)
        return c.load('google_speech_sample')
    return setup


LOADER_CASES = [  # setup(case) -> the call; its exception; words of its one line; after(case, message) or None
    # wav files: what the wave module would say (or not) in a traceback, said in one line naming the file
    pytest.param(wav(cut(-50)), DataError, [at('x.wav'), 'truncated', '150 of 200'], None, id='wav-truncated'),
    pytest.param(wav(cut(30)), DataError, [at('x.wav'), 'x.wav'], None, id='wav-truncated-header'),
    pytest.param(wav(lambda f: f.write_bytes(b'')), DataError,  # the wave module says only "EOFError: "
                 [at('x.wav'), 'empty or cut short inside its header (0 bytes)'], None, id='wav-empty'),
    pytest.param(wav(lambda f: write_wav(f, SAMPLES % 256, 16_000, width=1)), DataError,
                 [at('x.wav'), '8-bit', 'expected 16-bit'], None, id='wav-8-bit'),
    pytest.param(wav(lambda f: write_wav(f, SAMPLES, 16_000, width=3)), DataError,
                 [at('x.wav'), '24-bit', 'expected 16-bit'], None, id='wav-24-bit'),
    pytest.param(wav(lambda f: write_wav(f, SAMPLES, 44_100)), DataError,  # downloading it again would not help
                 [at('x.wav'), '44100 Hz', '16000 Hz', 'resample it'], None, id='wav-of-another-rate'),
    pytest.param(wav(lambda f: f.write_bytes(b'ID3\x03' + bytes(100))), DataError, [at('x.wav'), 'not a PCM wav'],
                 None, id='wav-an-mp3'),
    pytest.param(wav(lambda f: write_wav(f, SAMPLES, 16_000, extensible=b'\x03\x00' + bytes(14))), DataError,
                 [at('x.wav'), 'PCM'], None, id='wav-extensible-float'),  # Python >= 3.12's wave refuses it itself
    pytest.param(wav(cut(40, extensible=True)), DataError, [at('x.wav'), 'truncated'], None,
                 id='wav-extensible-truncated'),
    pytest.param(wav(extensible_header(0, 16)), DataError, ['0 channels of 16-bit samples'], None,
                 id='wav-extensible-of-no-channel'),  # a ZeroDivisionError before
    pytest.param(wav(extensible_header(1, 4)), DataError, ['1 channels of 4-bit samples'], None,
                 id='wav-extensible-of-sub-byte-samples'),
    # Google Speech Commands
    pytest.param(speech_archive_of_another_sha256, DataError, ['sha256', 'f' * 64, lambda c: hashlib.sha256(
        (c.tmp / 'speech_commands_v0.02.tar.gz').read_bytes()).hexdigest()], None,
        id='google_speech-archive-of-another-sha256'),  # both digests named
    pytest.param(speech_commands(lambda root: silence(root / 'banana' / '0a1b2c3d_nohash_0.wav')), DataError,
                 ['banana', 'unknown word'], None, id='google_speech-unknown-word'),
    pytest.param(speech_commands(text('testing_list.txt', 'left/0000_nohash_0.wav\n')), DataError,
                 ['no wav file for the test split'], None, id='google_speech-no-test-clips'),
    pytest.param(speech_commands(removed('validation_list.txt')), DataError, ['validation_list.txt', 'missing'],
                 None, id='google_speech-no-validation-list'),
    pytest.param(speech_sample(lambda root: (root / 'no' / 'a0_nohash_0.wav').write_bytes(b'')), DataError,
                 ['a0_nohash_0.wav', 'restore'], not_in_message('download'), id='google_speech_sample-damaged-wav'),
    pytest.param(speech_sample(removed('testing_list.txt')), DataError, ['testing_list.txt', 'restore'],
                 not_in_message('download'), id='google_speech_sample-no-testing-list'),
    # AudioMNIST
    pytest.param(lambda c: c.load('audio_mnist'), DataError, ['git clone', data.AUDIO_MNIST_REPO, at('AudioMNIST')],
                 None, id='audio_mnist-missing'),
    pytest.param(audio_mnist(lambda root, e: silence(root / '01' / 'seven_01_0.wav', 48_000)), DataError,
                 ['seven_01_0.wav', '<digit>_<speaker>_<repetition>'], None, id='audio_mnist-misnamed'),
    pytest.param(audio_mnist(lambda root, e: [f.unlink() for f in e['test']]), DataError,
                 ['no wav file of the test speakers'], None, id='audio_mnist-no-test-speakers'),
    pytest.param(audio_mnist(lambda root, e: silence(e['train'][0], 44_100)), DataError, ['44100 Hz', '48000 Hz'],
                 None, id='audio_mnist-of-another-rate'),
    # LibriSpeech (WAV converted from its FLAC)
    pytest.param(lambda c: c.load('librispeech_transfer'), DataError,
                 ['dev-clean/', at('LibriSpeech'), data.LIBRISPEECH_URL, 'dev-clean.tar.gz', 'flac -d'],
                 not_in_message('train-clean'), id='librispeech-no-folder'),
    pytest.param(librispeech(lambda dev, files: files['dev-clean'][4].unlink()), DataError,
                 [lambda c: c.files['dev-clean'][4].with_suffix('.flac'), '1 of 18 FLAC files', 'find ',
                  'flac -d -s -f -o'], None, id='librispeech-flac-without-wav'),
    pytest.param(librispeech(lambda dev, files: [shutil.rmtree(dev.parent / split) for split in
                                                 ('train-clean-100', 'train-other-500')], name='librispeech'),
                 DataError, ['train-clean-100/ and train-clean-360/ and train-other-500/', data.LIBRISPEECH_URL,
                             'train-other-500.tar.gz', 'flac -d'], None, id='librispeech-no-training-split'),
    pytest.param(librispeech(lambda dev, files: silence(dev / '84' / '121123' / '84-999-0000.wav')), DataError,
                 ['84-999-0000.wav', '<speaker>/<chapter>/<speaker>-<chapter>-<utterance>.wav'], None,
                 id='librispeech-misnamed'),
    pytest.param(librispeech(lambda dev, files: new_folder(dev)), DataError,
                 [at('LibriSpeech', 'dev-clean'), 'holds no'], None, id='librispeech-empty-split'),
    pytest.param(librispeech(lambda dev, files: [silence(dev / str(9000 + s) / '1' / f'{9000 + s}-1-0000.wav')
                                                 for s in range(37)]), DataError,
                 ['41 speakers', 'dev-clean has 40'], None, id='librispeech-41-speakers'),
    pytest.param(librispeech(lambda dev, files: files['dev-clean'][0].write_bytes(
        files['dev-clean'][0].read_bytes()[:-10])), DataError,
        [lambda c: c.files['dev-clean'][0], 'truncated', '.flac beside it'], None, id='librispeech-bad-wav'),
    # PAMAP2
    pytest.param(pamap2_105(lambda f: lines_of(f, item(7, lambda line: line.rsplit(' ', 1)[0]))), DataError,
                 ['not a PAMAP2 .dat file'], None, id='pamap2-a-short-row'),
    pytest.param(pamap2_105(lambda f: lines_of(f, every(lambda line: line.rsplit(' ', 1)[0]))), DataError,
                 ['53 columns, expected 54'], None, id='pamap2-53-columns'),
    pytest.param(pamap2_105(lambda f: lines_of(f, item(100, lambda line: line.replace(' 1.0 ', ' 8.0 ', 1)))),
                 DataError, ['unknown activity ID 8'], None, id='pamap2-unknown-activity'),
    pytest.param(pamap2_105(lambda f: f.unlink()), DataError, ['subject105.dat is missing'], None,
                 id='pamap2-missing-subject'),
    pytest.param(pamap2_105(short_runs_only), DataError, ['(105, 106)', 'no 320-step run'], None,
                 id='pamap2-no-windows'),
    # HIGGS: the csv.gz is checked, parsed once, and nothing cached from a broken one
    pytest.param(higgs_csv(csv_lines(item(5, lambda line: line.rsplit(',', 1)[0]))), DataError,
                 [at('HIGGS.csv.gz'), 'not the HIGGS csv.gz'], holds('HIGGS.csv.gz'), id='higgs-a-short-row'),
    pytest.param(higgs_csv(csv_lines(every(lambda line: line.rsplit(',', 1)[0]))), DataError,
                 [at('HIGGS.csv.gz'), '28 columns, expected 29'], holds('HIGGS.csv.gz'), id='higgs-28-columns'),
    pytest.param(higgs_csv(csv_lines(item(3, lambda line: '2' + line[line.index(','):]))), DataError,
                 [at('HIGGS.csv.gz'), 'unknown label 2'], holds('HIGGS.csv.gz'), id='higgs-unknown-label'),
    pytest.param(higgs_csv(lambda f, rows: f.write_bytes(f.read_bytes()[:-100])), DataError,
                 [at('HIGGS.csv.gz'), 'not the HIGGS csv.gz'], holds('HIGGS.csv.gz'), id='higgs-truncated'),
    pytest.param(higgs_csv(lambda f, rows: f.write_text('\n'.join(','.join(map(str, row)) for row in rows))),
                 DataError, [at('HIGGS.csv.gz'), 'not the HIGGS csv.gz', 'gzip'], holds('HIGGS.csv.gz'),
                 id='higgs-plain-csv-named-gz'),
    pytest.param(higgs_of_9_rows, DataError, [at('HIGGS.csv.gz'), '9 rows leave none for the test split'],
                 holds('HIGGS.csv.gz'), id='higgs-of-9-rows'),  # nothing cached
    pytest.param(lambda c: c.load('higgs', c.tmp / 'nowhere'), DataError, ['HIGGS.csv.gz', '--data-dir'],
                 lambda c, msg: not (c.tmp / 'nowhere').exists(), id='higgs-missing'),  # not even the folder made
    pytest.param(higgs_of_another_size, DataError, ['HIGGS.csv.gz', 'is not the expected archive'],
                 said_nothing_of_parsing, id='higgs-of-another-size'),  # refused before anything is said of parsing
    pytest.param(truncated_cache('higgs', 'HIGGS.npy'), DataError, [at('HIGGS.npy'), 'truncated', 'delete it'], None,
                 id='higgs-cache-truncated'),
    pytest.param(higgs_cache_label, DataError, ['HIGGS.npy', 'a label other than 0 or 1'], None,
                 id='higgs-cache-label-0.5'),
    pytest.param(higgs_cache_meets_a_full_disk, DataError, ['could not write', 'No space left on device',
                                                            '--data-dir'],
                 holds('HIGGS.csv.gz', folder='data'), id='higgs-cache-on-a-full-disk'),  # no partial cache
    pytest.param(higgs_in_a_read_only_folder, DataError, ['cannot write', 'Read-only file system', 'make',
                                                          'writable', '--data-dir'], None,
                 id='higgs-cache-in-a-read-only-folder'),
    # genomics
    pytest.param(genomics(item(4, lambda row: (row[0], 'Actinoplanes'))), DataError,  # an OOD genus
                 [at('genomics_ood.zip'), 'line 6', "unknown label 'Actinoplanes'"], None, id='genomics-unknown-label'),
    pytest.param(genomics(item(7, lambda row: (row[0][:100] + 'N' + row[0][101:], row[1]))), DataError,
                 [at('genomics_ood.zip'), "sequence 7 has the letter 'N'"], None, id='genomics-bad-base'),
    pytest.param(genomics(item(2, lambda row: (row[0][:249], row[1]))), DataError,
                 [at('genomics_ood.zip'), 'line 4', 'sequence of 249 bases'], None, id='genomics-short-sequence'),
    pytest.param(genomics(member='after_2016_in_test.txt'), DataError,
                 [at('genomics_ood.zip'), 'holds no before_2011_in_tr.txt'], None, id='genomics-no-member'),
    pytest.param(genomics_not_a_zip, DataError, [at('genomics_ood.zip'), 'not a readable zip'], None,
                 id='genomics-not-a-zip'),
    # JSON arrays, streamed
    pytest.param(json_text('[{"a": 1}, {"b": '), DataError, [at('a.json'), 'element 1 is not valid JSON'], None,
                 id='json-element-cut'),
    pytest.param(json_text('[1, 2,'), DataError, [at('a.json'), 'ends early, after 2 elements'], None,
                 id='json-ends-early'),
    pytest.param(json_text('{"a": 1}'), DataError, [at('a.json'), "expected '['"], None, id='json-not-an-array'),
    pytest.param(json_text('[1 2]'), DataError, [at('a.json'), "expected ','"], None, id='json-no-comma'),
    pytest.param(json_text(''), DataError, [at('a.json'), 'ends early, after 0 elements'], None, id='json-empty'),
    # Pfam and SCOP
    pytest.param(protein_json('pfam_transfer', setting(3, 'clan', 5)), DataError,
                 [at('pfam', 'pfam_valid.json'), 'unknown clan 5'], None, id='pfam_valid-unknown-clan'),
    pytest.param(protein_json('pfam_transfer', setting(2, 'primary', 'ARN*DC')), DataError,
                 [at('pfam', 'pfam_valid.json'), "sequence 2 has the letter '*'"], None,
                 id='pfam_valid-bad-amino-acid'),
    pytest.param(protein_json('pfam_transfer', item(1, lambda record: ['ARND', 3])), DataError,
                 [at('pfam', 'pfam_valid.json'),
                  "element 1 is not a record with a 'primary' string and an integer 'clan'"], None,
                 id='pfam_valid-not-a-record'),
    pytest.param(protein_json('pfam_transfer', setting(0, 'clan', 'CL0001')), DataError,
                 [at('pfam', 'pfam_valid.json'), 'element 0'], None, id='pfam_valid-string-clan'),
    pytest.param(protein_json('pfam_transfer', first(0)), DataError, [at('pfam', 'pfam_valid.json'),
                                                                      'holds no records'], parsed_afresh,
                 id='pfam_valid-empty'),
    pytest.param(protein_json('pfam_transfer', lambda records: None, cut=30), DataError,
                 [at('pfam', 'pfam_valid.json'), 'not valid JSON'], None, id='pfam_valid-truncated'),
    pytest.param(protein_json('scop', setting(6, 'fold_label', 1195)), DataError,
                 [at('remote_homology', 'remote_homology_train.json'), 'unknown fold_label 1195'], None,
                 id='scop-fold-out-of-range'),
    pytest.param(pfam_transfer_row_of_an_unknown_clan, DataError,
                 ['pfam_valid.json', 'unknown clan 7', 'pfam_train.json does not have'], None,
                 id='pfam_valid-transfer-row-of-an-unknown-clan'),
    pytest.param(pfam_valid_of_9, DataError, ['pfam_valid.json', '9 records leave none for the test split'], None,
                 id='pfam_valid-of-9-records'),
    pytest.param(pfam_train(not_utf8), DataError, ['pfam_train.json', 'is not UTF-8'], None,
                 id='pfam_train-not-utf8'),
    pytest.param(pfam_train(lambda f: f.unlink()), DataError, ['pfam_train.json is missing'], None,
                 id='pfam_train-missing'),
    pytest.param(truncated_cache('pfam', 'pfam/pfam_train.tokens.npy'), DataError,
                 [at('pfam', 'pfam_train.tokens.npy'), 'truncated', 'delete it'], None, id='pfam-cache-truncated'),
    # wafer maps: what the conversion of docs/domains.md writes, and nothing cached from a broken one
    pytest.param(lambda c: c.load('wafer'), DataError,
                 [at('wafer.npz'), data.WAFER_URL, 'WM811K.pkl', 'docs/domains.md'], None, id='wafer-missing'),
    *[pytest.param(wafer_npz(change, name), DataError, [at('wafer.npz'), 're-run the conversion', words],
                   holds('wafer.npz'), id=f'wafer-{id}')
      for change, name, words, id in [
          (lambda f, fake: f.write_bytes(f.read_bytes()[:-300]), 'wafer', 'truncated', 'truncated'),
          (lambda f, fake: f.write_bytes(b'PK\x03\x04' + bytes(100)), 'wafer', 'truncated or no .npz', 'not-a-zip'),
          (as_npy, 'wafer', 'single array', 'a-npy'),
          (npz(lambda a: a.pop('offsets')), 'wafer', "no array 'offsets'", 'no-offsets'),
          (npz(offsets_off_by_one), 'wafer', "'offsets' of map 5", 'offsets'),
          (npz(lambda a: a.update(shapes=a['shapes'][:-1])), 'wafer',
           "'shapes' is int64 (39, 2), expected integers of shape (40, 2)", 'shapes'),
          (npz(lambda a: a.update(maps=a['maps'][:-1])), 'wafer', "but 'shapes' makes", 'short-maps'),
          (npz(label_9), 'wafer', "'label' holds 9, expected -1..8", 'label-9'),
          (npz(value_3), 'wafer', "'maps' holds 3, expected 0..2", 'value-3'),
          (npz(lambda a: a.update(maps=a['maps'].astype(np.float32))), 'wafer', "'maps' is float32", 'float-maps'),
          (lambda f, fake: write_wafer_npz(f, fake['maps'][:29], [-1] * 20 + [1] * 9), 'wafer_transfer',
           '9 labelled maps', 'too-few'),  # 9 labelled maps cannot be split 90/10
      ]],
    # the Speech Commands subset: a damaged sample says to restore it, or to download it again
    missing('google_speech_subset', 'speech_commands_v0.02_subset', data.SPEECH_SUBSET_URL),
    pytest.param(speech_subset(lambda root, e: cut_short(root / e['train'][3], 1000)), DataError,
                 [fix('speech_commands_v0.02_subset'), in_subset('train', 3), 'truncated'], None,
                 id='google_speech_subset-truncated-wav'),
    pytest.param(speech_subset(lambda root, e: (root / e['test'][0]).write_bytes(b'ID3\x03' + bytes(100))), DataError,
                 [fix('speech_commands_v0.02_subset'), in_subset('test', 0), 'not a PCM wav'], None,
                 id='google_speech_subset-not-a-wav'),
    pytest.param(speech_subset(lambda root, e: silence(root / 'banana' / '0a1b2c3d_nohash_0.wav')), DataError,
                 [fix('speech_commands_v0.02_subset'), "unknown word 'banana'"], None,
                 id='google_speech_subset-unknown-word'),
    pytest.param(speech_subset(lambda root, e: silence(root / 'yes' / '0a1b2c3d.wav')), DataError,
                 [fix('speech_commands_v0.02_subset'), '0a1b2c3d.wav', '<speaker>_nohash_<n>.wav'], None,
                 id='google_speech_subset-misnamed'),
    pytest.param(speech_subset(lambda root, e: [(root / f).unlink() for f in e['test']]), DataError,
                 [fix('speech_commands_v0.02_subset'), 'no clip of a test speaker', '31 wav files, 3 speakers'], None,
                 id='google_speech_subset-no-test-speaker'),
    # HAPT
    missing('hapt_sample', 'hapt_sample', data.HAPT_URL),
    pytest.param(hapt(lines(ACC, item(40, lambda line: line.rsplit(' ', 1)[0]))), DataError,
                 [fix('hapt_sample'), at('hapt_sample', ACC), 'not a HAPT table of 3 numbers a row'], None,
                 id='hapt_sample-short-row'),
    pytest.param(hapt(lines(ACC, item(41, lambda line: 'abc ' + line.split(' ', 1)[1]))), DataError,
                 [fix('hapt_sample'), at('hapt_sample', ACC), 'not a HAPT table'], None, id='hapt_sample-not-a-number'),
    pytest.param(hapt(lines(ACC, item(42, lambda line: 'nan ' + line.split(' ', 1)[1]))), DataError,
                 [fix('hapt_sample'), at('hapt_sample', ACC), 'row 43 holds nan, not a number'], None,
                 id='hapt_sample-nan'),
    pytest.param(hapt(lines(LABELS, every(lambda line: line.replace('3 2 5 21 311', '3 2 13 21 311')))), DataError,
                 [fix('hapt_sample'), at('hapt_sample', LABELS), 'unknown activity 13'], None,
                 id='hapt_sample-unknown-activity'),
    pytest.param(hapt(lines(ACC, first(1500)), lines(GYRO, first(1500))), DataError,  # labels.txt's last segment
                 [fix('hapt_sample'), at('hapt_sample', LABELS),          # of this recording ends at 1613
                  'of experiment 3 is not within its 1500 samples'], None, id='hapt_sample-past-the-end'),
    pytest.param(hapt(removed(GYRO)), DataError, [fix('hapt_sample'), 'gyro_exp03_user02.txt is missing'], None,
                 id='hapt_sample-missing-gyro'),
    pytest.param(hapt(removed('RawData/acc_exp02_user01.txt', 'RawData/gyro_exp02_user01.txt')), DataError,
                 [fix('hapt_sample'), 'acc_exp02_user01.txt is missing, but labels.txt has segments of it'], None,
                 id='hapt_sample-missing-recording'),
    pytest.param(hapt(lines(GYRO, lambda ls: ls.pop())), DataError,
                 [fix('hapt_sample'), at('hapt_sample', GYRO), 'has 1642 samples, but acc_exp03_user02.txt has 1643'],
                 None, id='hapt_sample-gyro-shorter'),
    pytest.param(hapt(removed('Test/subject_id_test.txt')), DataError,
                 [fix('hapt_sample'), 'subject_id_test.txt is missing'], None, id='hapt_sample-no-split-file'),
    pytest.param(hapt(text('Train/subject_id_train.txt', '1\n3\n6\n')), DataError,
                 [fix('hapt_sample'), 'user 5 is in neither'], None, id='hapt_sample-user-in-no-split'),
    pytest.param(hapt(text('Train/subject_id_train.txt', '1\n2\n3\n5\n')), DataError,
                 [fix('hapt_sample'), 'user 2 is in both'], None, id='hapt_sample-user-in-both'),
    pytest.param(hapt(text('Train/subject_id_train.txt', '1\n2\n3\n4\n5\n'), text('Test/subject_id_test.txt', '9\n')),
                 DataError, [fix('hapt_sample'), 'no 128-sample window of an activity of the test users [9]'], None,
                 id='hapt_sample-no-test-windows'),  # the split files name no test user that is here
    pytest.param(hapt(text(LABELS, '')), DataError, [fix('hapt_sample'), at('hapt_sample', LABELS), 'holds no rows'],
                 None, id='hapt_sample-empty-labels'),
    # the HIGGS sample
    missing('higgs_sample', 'higgs_lightgbm', data.HIGGS_SAMPLE_URL),
    pytest.param(higgs_sample(removed('binary.test')), DataError,
                 [fix('higgs_lightgbm'), at('higgs_lightgbm', 'binary.test'), 'is missing'], None,
                 id='higgs_sample-missing-file'),
    *[pytest.param(higgs_sample(lines('binary.test', change)), DataError,
                   [fix('higgs_lightgbm'), at('higgs_lightgbm', 'binary.test'), words], None, id=f'higgs_sample-{id}')
      for change, words, id in [
          (item(5, lambda line: line.rsplit('\t', 1)[0]), 'not the tab-separated HIGGS rows', 'short-row'),
          (every(lambda line: line.rsplit('\t', 1)[0]), 'has 28 columns, expected 29', '28-columns'),
          (cell(2, 7, 'x1.5'), 'not the tab-separated HIGGS rows', 'not-a-number'),
          (cell(4, 9, 'nan'), 'row 5 holds nan, not a number', 'nan'),
          (cell(3, 0, '0.5'), 'row 4: unknown label 0.5 (expected 0 or 1)', 'label-0.5'),
          (cell(3, 0, '2'), 'row 4: unknown label 2 (expected 0 or 1)', 'label-2'),
          (first(0), 'holds no rows', 'empty'),
      ]],
    # splice junctions
    missing('splice', 'splice', data.SPLICE_URL),
    pytest.param(splice(removed('splice.data')), DataError, [fix('splice'), at('splice', 'splice.data'), 'is missing'],
                 None, id='splice-missing-file'),
    *[pytest.param(splice(lines('splice.data', change)), DataError,
                   [fix('splice'), at('splice', 'splice.data'), words], None, id=f'splice-{id}')
      for change, words, id in [
          (item(4, lambda line: 'EE' + line[2:] if line[1] != ',' else 'X' + line[1:]), 'line 5: unknown class',
           'unknown-class'),
          (item(6, lambda line: line[:-1]), 'line 7: sequence of 59 letters, expected 60', 'short-sequence'),
          (item(8, lambda line: line[:-10] + 'X' + line[-9:]),
           "line 9: the letter 'X', which is not one of ACGTDNSR", 'unknown-letter'),
          (item(8, lambda line: line[:-10] + 'a' + line[-9:]),
           "line 9: the letter 'a', which is not one of ACGTDNSR", 'lower-case'),
          (item(2, lambda line: ','.join(line.split(',')[::2])), 'line 3: 2 comma-separated fields, expected 3',
           'two-fields'),
          (first(9), '9 sequences leave none for the test split', 'too-few'),  # ceil(0.9 * 9) = 9: none for test
      ]],
    pytest.param(data_dir_the_sample_itself, DataError,
                 ["is the dataset's own folder", lambda c: f'--data-dir {c.tmp}'],
                 holds('splice.data', 'splice.names', folder='splice'), id='splice-data-dir-the-sample-itself'),
    # the samples' downloads: a failed one leaves nothing in the user's folder
    *[pytest.param(failed_download(name, 'offline'), DataError,
                   [lambda c: c.url, 'could not download', 'Network is unreachable',
                    lambda c: f'--data-dir with a folder that holds {c.folder}/'], left_nothing,
                   id=f'{name}-download-offline') for name in SAMPLE_SOURCES],
    *[pytest.param(failed_download(name, 'corrupted'), DataError,  # the archive has no checksum: its files do
                   [lambda c: c.url, 'it was deleted', 'is not the expected archive', const(constant)], left_nothing,
                   id=f'{name}-download-corrupted')
      for name, constant in [('google_speech_subset', 'SPEECH_SUBSET_SHA256'), ('hapt_sample', 'HAPT_SAMPLE_SHA256')]],
    *[pytest.param(failed_download(name, 'truncated'), DataError, [lambda c: c.url, 'it was deleted', 'cannot extract'],
                   shown_and_left_nothing, id=f'{name}-download-truncated') for name in SAMPLE_ARCHIVES],
    *[pytest.param(failed_download(name, case), DataError,
                   [lambda c: f'downloaded {c.url.rsplit("/", 1)[1]} failed verification', 'was deleted', check],
                   left_nothing, id=f'{name}-download-{case}')
      for name in ('higgs_sample', 'splice') for case, check in [('corrupted', 'sha256'), ('truncated', 'size')]],
    *[pytest.param(placed_corrupted_archive(name), DataError,  # the user's file: named, kept, not replaced
                   [at('data', SAMPLE_ARCHIVES[name]), 'is not the expected archive', 'delete it'],
                   holds(SAMPLE_ARCHIVES[name], folder='data'), id=f'{name}-placed-archive-corrupted')
      for name in SAMPLE_ARCHIVES],
]


@pytest.mark.parametrize('setup,exception,words,after', LOADER_CASES)
def test_what_no_loader_may_accept(tmp_path, monkeypatch, capsys, setup, exception, words, after):
    assert_refused(Loading(tmp_path, monkeypatch, capsys), setup, exception, words, after)
