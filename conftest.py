"""
Shared test helpers: writers of every dataset's genuine on-disk format, and the checks the data tests share.

The writers are plain functions, imported where needed (`from conftest import make_cifar`: pytest puts this
folder on sys.path), so that a test calls them with the arguments it needs. CIFAR-format files are written
the way the originals were (protocol-2 pickles from Python 2, so bytes keys and byte strings); wav files
through `wave`, PAMAP2's .dat text with NaN gaps, gzip CSV, a TSV inside a zip, JSON arrays, and what
the one-time conversions of docs/domains.md write (LibriSpeech's WAV beside each FLAC, the wafer maps' .npz). Each
writer returns what the loader must give back. `write_fake(name, data_dir, monkeypatch)` writes any domain's fake,
e.g. for one training step per domain. Last, what the command-line tests share: `run_cli` runs a script as a
user would, `assert_clean_error` checks the one-line promise, `tiny_model` is a model small enough for
step-by-step checks. Nothing here touches the network or writes into shared/data.
"""
import gzip
import hashlib
import json
import math
import os
import pickle
import random
import struct
import subprocess
import sys
import wave
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from data import DataError


def data_error(fn, *needles):
    """fn() must raise a one-line DataError that mentions every needle; returns the message."""
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert '\n' not in msg, msg
    for n in needles:
        assert str(n) in msg, f"{n!r} not in {msg!r}"
    return msg


class Loading:
    """What a row of the loaders' tables (test_data.py, test_domains.py) gets: its own folder, pytest's monkeypatch
    and capsys."""

    def __init__(self, tmp, mp, capsys):
        self.tmp, self.mp, self.capsys = tmp, mp, capsys

    def load(self, name, folder=None, download=False):
        """The call a row makes: domain `name`'s loader on folder (the row's own folder if None)."""
        return lambda: data.get_domain(name).load(self.tmp if folder is None else folder, download=download)


def at(*parts):
    """A word of a row that is a path in the row's own folder."""
    return lambda c: c.tmp.joinpath(*parts)


def const(name):
    """A word of a row that is data.<name> as the row's setup left it (serve() points constants at the fakes)."""
    return lambda c: getattr(data, name)


def holds(*names, folder=''):
    """What a row leaves: its folder (or a folder in it) holds these names and no other (as listing() sees it)."""
    def after(c, msg):
        assert listing(c.tmp / folder) == sorted(names)
    return after


def assert_refused(c, setup, exception, words, after):
    """A row of the loaders' tables: setup(c) makes its files and returns the call, which must raise `exception`
    with a one-line message that holds every word (a word may be a function of c, giving a word or a list);
    then after(c, message), unless None, checks what is left."""
    call = setup(c)
    with pytest.raises(exception) as e:
        call()
    msg = str(e.value)
    assert '\n' not in msg, msg
    for word in words:
        word = word(c) if callable(word) else word
        for n in word if isinstance(word, list) else [word]:
            assert str(n) in msg, f"{n!r} not in {msg!r}"
    assert after is None or after(c, msg) is not False


def fails(*args, **kwargs):
    raise AssertionError("called although the cache should have been used")


def serve(monkeypatch, prefix, path, digest=True):
    """Point data.<prefix>_URL at a local file, and, with `digest`, the published size and md5 or sha256 too."""
    monkeypatch.setattr(data, f'{prefix}_URL', path.as_uri())
    if digest:
        algo = 'md5' if hasattr(data, f'{prefix}_MD5') else 'sha256'
        monkeypatch.setattr(data, f'{prefix}_SIZE', path.stat().st_size)
        monkeypatch.setattr(data, f'{prefix}_{algo.upper()}', hashlib.new(algo, path.read_bytes()).hexdigest())


# -----------------------------------------------------------------------------
# CIFAR-10 and ImageNet32: batch pickles in the CIFAR plane layout

class Py2Pickler(pickle._Pickler):
    """Pickles bytes as Python 2 `str` (SHORT_BINSTRING / BINSTRING), as the CIFAR-10 files were written.

    Python 3 at protocol 2 would write bytes as `_codecs.encode(...)` calls instead."""
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else
                   pickle.BINSTRING + struct.pack('<i', n) + obj)
        self.memoize(obj)
    dispatch[bytes] = save_py2_str


def write_cifar_batch(path, rows, labels, writer='py2'):
    """rows: uint8 (N, 3072) in the file layout. writer: 'py2' (the originals), 'py3-2', 'py3'."""
    d = {b'batch_label': b'training batch 1 of 5', b'labels': [int(v) for v in labels],
         b'data': rows, b'filenames': [b'img_%d.png' % i for i in range(len(labels))]}
    with open(path, 'wb') as f:
        if writer == 'py2':
            Py2Pickler(f, protocol=2).dump(d)
        else:
            pickle.dump(d, f, protocol=2 if writer == 'py3-2' else pickle.DEFAULT_PROTOCOL)


def make_cifar(folder, rows_per_file=3, seed=0, writer='py2'):
    """A cifar-10-batches-py/ folder with random images; returns the expected (train_x, train_y, test_x, test_y)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    out = {}
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        rows = rng.integers(0, 256, (rows_per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, rows_per_file)
        write_cifar_batch(folder / name, rows, labels, writer)
        out[name] = (rows.reshape(-1, 3, 32, 32), labels)
    with open(folder / 'batches.meta', 'wb') as f:
        Py2Pickler(f, protocol=2).dump({b'label_names': [b'airplane'] * 10, b'num_vis': 3072})
    train = [out[f'data_batch_{i}'] for i in range(1, 6)]
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
            out['test_batch'][0], out['test_batch'][1])


def make_imagenet32(root, rows=2, seed=0):
    """Imagenet32_train/ (10 files) and Imagenet32_val/ as Chrabaszcz et al. wrote them; returns expected."""
    rng = np.random.default_rng(seed)
    parts = {}
    for folder, names in [('Imagenet32_train', [f'train_data_batch_{i}' for i in range(1, 11)]),
                          ('Imagenet32_val', ['val_data'])]:
        (root / folder).mkdir(parents=True)
        for name in names:
            x = rng.integers(0, 256, (rows, 3072), dtype=np.uint8)
            y = [1, 1000] if name == 'train_data_batch_1' else rng.integers(1, 1001, rows).tolist()
            d = {'data': x, 'labels': y}
            if folder == 'Imagenet32_train':
                d['mean'] = x.mean(0)  # the train batches carry the mean image; it is not used
            with open(root / folder / name, 'wb') as f:
                pickle.dump(d, f)
            parts[name] = (x.reshape(-1, 3, 32, 32), np.array(y) - 1)
    train = [parts[f'train_data_batch_{i}'] for i in range(1, 11)]
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
            parts['val_data'][0], parts['val_data'][1])


# -----------------------------------------------------------------------------
# speech: wav files, Speech Commands, AudioMNIST

def write_wav(path, samples, rate, width=2, channels=1, extensible=False):
    """int samples (n,) or (n, channels) -> a PCM wav; `extensible`: a WAVE_FORMAT_EXTENSIBLE header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = np.asarray(samples).reshape(len(samples), channels)
    raw = samples.astype({1: '<u1', 2: '<i2', 4: '<i4'}[width]).tobytes() if width != 3 else \
        b''.join(int(v).to_bytes(3, 'little', signed=True) for v in samples.ravel())
    if not extensible:
        with wave.open(str(path), 'wb') as w:
            w.setnchannels(channels)
            w.setsampwidth(width)
            w.setframerate(rate)
            w.writeframes(raw)
        return path
    pcm = b'\x01\x00\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71'  # KSDATAFORMAT_SUBTYPE_PCM
    fmt = struct.pack('<HHIIHHHHI', 0xFFFE, channels, rate, rate * channels * width, channels * width, 8 * width,
                      22, 8 * width, 0) + (extensible if isinstance(extensible, bytes) else pcm)
    body = b'WAVE' + b'fmt ' + struct.pack('<I', len(fmt)) + fmt + b'data' + struct.pack('<I', len(raw)) + raw
    path.write_bytes(b'RIFF' + struct.pack('<I', len(body)) + body)
    return path


def speech_like(rng, n, rate):
    """A random 'utterance': a decaying tone plus noise, as int16."""
    t = np.arange(n) / rate
    y = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t) * np.exp(-3 * t) + 0.02 * rng.standard_normal(n)
    return (np.clip(y, -1, 1) * 32767).astype(np.int16)


def write_fake_google_speech(data_dir, seed=0):
    """speech_commands_v0.02/ with every word (2 speakers each), a 10 s noise file and the two list files.
    Returns {'train': [...], 'test': [...]} relative paths in the loader's row order."""
    rng = np.random.default_rng(seed)
    root = Path(data_dir) / 'speech_commands_v0.02'
    files = []
    for word in data.GOOGLE_SPEECH_WORDS[:-1]:
        for speaker in ('0a1b2c3d', 'f00dfeed'):
            files.append(f'{word}/{speaker}_nohash_0.wav')
            write_wav(root / files[-1], speech_like(rng, int(rng.integers(8000, 16001)), 16_000), 16_000)
    write_wav(root / '_background_noise_' / 'white_noise.wav', rng.integers(-3000, 3000, 160_000), 16_000)
    (root / '_background_noise_' / 'README.md').write_text('noise')  # not a wav: ignored
    # the official lists name clips by speaker; they also name clips this folder does not have
    val = [f for f in files if f.startswith(('yes/', 'no/', 'up/'))] + ['down/deadbeef_nohash_0.wav']
    test = [f for f in files if f.split('/')[0] in ('eight', 'cat', 'learn')] + ['left/deadbeef_nohash_1.wav']
    (root / 'validation_list.txt').write_text(''.join(f + '\n' for f in val))
    (root / 'testing_list.txt').write_text(''.join(f + '\n' for f in test))
    everything = sorted(files + ['_background_noise_/white_noise.wav'])
    return {'train': [f for f in everything if f not in val + test] + [f for f in everything if f in val],
            'test': [f for f in everything if f in test]}


AUDIO_MNIST_FAKE_SPEAKERS = {'train': (1, 2), 'test': (5, 13)}


def write_fake_audio_mnist(data_dir, seed=0):
    """AudioMNIST/data/<NN>/<digit>_<NN>_0.wav (48 kHz) for two train and two test speakers; one file
    has a WAVE_FORMAT_EXTENSIBLE header. Returns {'train': [...], 'test': [...]} paths in row order."""
    rng = np.random.default_rng(seed)
    out = {'train': [], 'test': []}
    for split, speakers in AUDIO_MNIST_FAKE_SPEAKERS.items():
        for s in speakers:
            for digit in range(10):
                f = Path(data_dir) / 'AudioMNIST' / 'data' / f'{s:02d}' / f'{digit}_{s:02d}_0.wav'
                write_wav(f, speech_like(rng, 4800, 48_000), 48_000, extensible=(s, digit) == (2, 3))
                out[split].append(f)
    return out


# LibriSpeech: {split: {speaker: {chapter: utterances}}}. Speaker ids whose string order differs from their
# numeric order (the walker sorts stems as strings; labels rank the ids as numbers); train-clean-360 is absent.
LIBRISPEECH_LAYOUT = {
    'train-clean-100': {19: {198: 3, 227: 2}, 103: {1240: 3}},
    'train-other-500': {20: {205: 2}},
    'dev-clean': {84: {121123: 3}, 174: {50561: 2, 84280: 3}, 1272: {128104: 6}, 2412: {153948: 4}},
}


def write_fake_librispeech(data_dir, seed=0, layout=None):
    """LibriSpeech/<split>/<speaker>/<chapter>/ as extracted from openslr and converted as docs/domains.md says: each
    <speaker>-<chapter>-<utterance>.wav (16 kHz) beside its .flac (here a stub: the loader never reads it), and
    the chapter's .trans.txt. Returns {split: wav paths sorted by stem (torchaudio's walker order)}."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, speakers in (layout or LIBRISPEECH_LAYOUT).items():
        files = []
        for speaker, chapters in speakers.items():
            for chapter, n in chapters.items():
                folder = Path(data_dir) / 'LibriSpeech' / split / str(speaker) / str(chapter)
                for u in range(n):
                    stem = f'{speaker}-{chapter}-{u:04d}'
                    clip = speech_like(rng, int(rng.integers(3000, 8001)), 16_000)
                    files.append(write_wav(folder / f'{stem}.wav', clip, 16_000))
                    (folder / f'{stem}.flac').write_bytes(b'fLaC' + bytes(30))
                (folder / f'{speaker}-{chapter}.trans.txt').write_text(
                    ''.join(f'{speaker}-{chapter}-{u:04d} HELLO WORLD\n' for u in range(n)))
        out[split] = sorted(files, key=lambda f: f.stem)
    return out


# -----------------------------------------------------------------------------
# PAMAP2, HIGGS, genomics, proteins

# PAMAP2: one layout for every subject: (activity ID, rows). Heart rate starts 60 rows in, so the first
# window of activity 1 (rows 50-369) holds NaN and is dropped; activity 9 is optional (not used).
PAMAP2_LAYOUT = [(0, 50), (1, 700), (0, 30), (17, 400), (9, 400), (24, 330), (2, 319)]
PAMAP2_WINDOWS = [(370, 0), (780, 10), (1580, 11)]  # (first row, label = index in data.PAMAP2_ACTIVITIES)


def pamap2_values(subject, rows):
    """The true (NaN-free) 54 columns: every sensor column a line in the row number, so that linear
    interpolation gives back exactly the values that were left out. Values stay within about +-150, as
    the real raw channels (heart rate, m/s^2, uT, deg C); repr() writes them exactly."""
    r = np.arange(rows)[:, None]
    slope = (np.arange(52) % 7 - 3) / 1024
    sensors = slope * r + (subject - 100) * 10 + np.arange(52)
    activity = np.concatenate([np.full(n, a) for a, n in PAMAP2_LAYOUT])[:, None]
    return np.hstack([r / 100, activity, sensors])


def write_pamap2_dat(path, values, seed=0):
    """Space-separated text as the Protocol files: 'NaN' for missing values."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(' '.join('NaN' if math.isnan(v) else repr(float(v)) for v in row) + '\n' for row in values))


def write_fake_pamap2(data_dir, seed=0):
    """PAMAP2_Dataset/Protocol/subject101..109.dat with NaN gaps. Returns the expected windows:
    {'train': (x (N, 52, 320), y), 'test': (x, y)}."""
    rng = np.random.default_rng(seed)
    rows = sum(n for _, n in PAMAP2_LAYOUT)
    out = {}
    for split, subjects in (('train', data.PAMAP2_TRAIN_SUBJECTS), ('test', data.PAMAP2_TEST_SUBJECTS)):
        xs, ys = [], []
        for s in subjects:
            true = pamap2_values(s, rows)
            gappy = true.copy()
            gappy[:, 2][np.arange(rows) % 10 != 0] = np.nan  # heart rate: ~one value in ten, as the real ~9 Hz
            gappy[:60, 2] = np.nan  # ... and none at the start: leading NaNs stay NaN
            sensors = gappy[1:-1, 3:]  # dropped samples inside the file (not the first or last row)
            sensors[rng.random(sensors.shape) < 0.1] = np.nan
            write_pamap2_dat(Path(data_dir) / 'PAMAP2_Dataset' / 'Protocol' / f'subject{s}.dat', gappy)
            xs += [true[t:t + 320, 2:].T for t, _ in PAMAP2_WINDOWS]
            ys += [label for _, label in PAMAP2_WINDOWS]
        out[split] = (np.array(xs, np.float32), np.array(ys))
    return out


def write_fake_higgs(data_dir, rows=300, seed=0):
    """HIGGS.csv.gz: no header, label then 28 features, '%.18e' as the original. Returns the float32 rows."""
    rng = np.random.default_rng(seed)
    a = np.hstack([rng.integers(0, 2, (rows, 1)), rng.standard_normal((rows, 28))]).astype(np.float32)
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    with gzip.open(Path(data_dir) / 'HIGGS.csv.gz', 'wt') as f:
        np.savetxt(f, a, fmt='%.18e', delimiter=',')
    return a


def write_genomics_zip(path, rows_by_member):
    """A zip of tab-separated text files with the TFDS header; rows: (seq, label) pairs."""
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as z:
        for member, rows in rows_by_member.items():
            z.writestr(member, 'seq\tlabel\tseq_info\tdomain\n' + ''.join(
                f'{seq}\t{label}\tNC_{i:06d}.1:{i}-{i + 250}\tin\n' for i, (seq, label) in enumerate(rows)))
    return path


def write_fake_genomics(data_dir, rows=60, seed=0):
    """genomics_ood.zip with the in-distribution training file (and a validation file the loader skips).
    Returns the (seq, genus) rows of the training file."""
    rng = random.Random(seed)
    train = [(''.join(rng.choice('ACGT') for _ in range(250)), rng.choice(data.GENOMICS_GENERA)) for _ in range(rows)]
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    write_genomics_zip(Path(data_dir) / 'genomics_ood.zip',
                       {'before_2011_in_tr.txt': train, 'between_2011-2016_in_val.txt': train[:3]})
    return train


def protein_records(n, label_key, labels, seed=0):
    rng = random.Random(seed)
    return [{'primary': ''.join(rng.choice(data.AMINO_ACIDS[1:]) for _ in range(rng.randint(5, 200))),
             'protein_length': 0, label_key: rng.choice(labels), 'id': f'P{i}'} for i in range(n)]


def write_json_array(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))


def write_fake_pfam(data_dir, seed=0):
    """pfam/pfam_{train,valid}.json. Returns {'train': pfam_train's records, 'test': pfam_valid's}."""
    clans = [3, 17, 42, 100, 622]
    out = {'train': protein_records(40, 'clan', clans, seed), 'test': protein_records(10, 'clan', clans, seed + 1)}
    write_json_array(Path(data_dir) / 'pfam' / 'pfam_train.json', out['train'])
    write_json_array(Path(data_dir) / 'pfam' / 'pfam_valid.json', out['test'])
    return out


def write_fake_scop(data_dir, seed=0):
    """remote_homology/remote_homology_{train,valid}.json. Returns {'train': records, 'test': records}."""
    folds = [0, 5, 1194]
    out = {'train': protein_records(30, 'fold_label', folds, seed),
           'test': protein_records(8, 'fold_label', folds, seed + 1)}
    write_json_array(Path(data_dir) / 'remote_homology' / 'remote_homology_train.json', out['train'])
    write_json_array(Path(data_dir) / 'remote_homology' / 'remote_homology_valid.json', out['test'])
    return out


# -----------------------------------------------------------------------------
# WM-811K wafer maps: the .npz that docs/domains.md's one-time conversion writes

def write_wafer_npz(path, maps, labels):
    """maps: uint8 arrays of values 0-2, of any sizes; labels: -1 (unlabelled) or 0-8. Written as the
    conversion writes them (np.savez of maps, shapes, offsets, int16 label)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, maps=np.concatenate([np.asarray(x, np.uint8).ravel() for x in maps]),
             shapes=np.array([x.shape for x in maps]), offsets=np.cumsum([0] + [x.size for x in maps])[:-1],
             label=np.array(labels, np.int16))
    return path


def write_fake_wafer(data_dir, seed=0):
    """wafer.npz with 20 unlabelled and 20 labelled maps (every class, 'none' the most) of several sizes, some
    smaller than 32x32. Returns {'maps': [uint8 arrays], 'label': int array}."""
    rng = np.random.default_rng(seed)
    sizes = [(2, 2), (5, 7), (26, 26), (33, 40), (64, 64), (45, 31)]
    labels = [-1] * 20 + list(range(9)) + [0] * 11
    labels = [labels[i] for i in rng.permutation(len(labels))]
    maps = [rng.integers(0, 3, sizes[rng.integers(len(sizes))], dtype=np.uint8) for _ in labels]
    write_wafer_npz(Path(data_dir) / 'wafer.npz', maps, labels)
    return {'maps': maps, 'label': np.array(labels)}


# -----------------------------------------------------------------------------
# the real samples' formats (shared/data): the Speech Commands subset, HAPT, LightGBM's HIGGS rows, UCI splice

SPEECH_SUBSET_FAKE_SPEAKERS = {'train': ('0a1b2c3d', 'deadbeef', 'f00dfeed'), 'test': ('1234abcd', 'c0ffee00')}


def write_fake_speech_subset(data_dir, seed=0):
    """speech_commands_v0.02_subset/<word>/<speaker>_nohash_<n>.wav: every keyword by 3 train and 2 test speakers
    (SHA-1 of the id divisible by 5: test), one of them twice; 1 s clips, and the archive's README.md and LICENSE.
    Returns {'train': [...], 'test': [...]} relative paths in the loader's row order."""
    rng = np.random.default_rng(seed)
    root = Path(data_dir) / 'speech_commands_v0.02_subset'
    files = []
    for word in data.SPEECH_SUBSET_WORDS:
        for speaker in SPEECH_SUBSET_FAKE_SPEAKERS['train'] + SPEECH_SUBSET_FAKE_SPEAKERS['test']:
            for n in range(2 if (word, speaker) == ('yes', 'deadbeef') else 1):
                files.append(f'{word}/{speaker}_nohash_{n}.wav')
                write_wav(root / files[-1], speech_like(rng, 16_000, 16_000), 16_000)
    (root / 'README.md').write_text('# Speech Commands Data Set Test Files v0.02\n')  # not wavs: ignored
    (root / 'LICENSE').write_text('Creative Commons Attribution 4.0 International Public License\n')
    return {split: sorted(f for f in files if f.split('/')[1].split('_nohash_')[0] in speakers)
            for split, speakers in SPEECH_SUBSET_FAKE_SPEAKERS.items()}


# HAPT: the users present and their experiments (users 2 and 4 test, as in the sample); every recording has these
# segments from its first sample on: (activity, samples), 0 = unlabelled. 291 samples hold 3 windows of 128 at
# stride 64, 128 hold 1, 127 none; 7 and 12 are transitions (dropped).
HAPT_FAKE_RECORDINGS = {1: (1, 2), 2: (3,), 3: (5,), 4: (7,), 5: (9,)}
HAPT_FAKE_SEGMENTS = [(0, 20), (5, 291), (7, 150), (1, 128), (0, 5), (2, 127), (2, 140), (3, 200), (4, 192),
                      (12, 100), (6, 260), (0, 30)]


def write_hapt_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(''.join(' '.join(str(v) for v in row) + '\n' for row in rows))


def write_fake_hapt(data_dir, seed=0):
    """hapt_sample/ as the HAPT archive: RawData/acc_ and gyro_expXX_userYY.txt (3 numbers a row, repr() as the
    originals), RawData/labels.txt (with segments of absent users too, as the real one lists all 30),
    activity_labels.txt, and Train/subject_id_train.txt, Test/subject_id_test.txt (which name absent users too).
    Returns {'train': (x float32 (N, 6, 128), y, users), 'test': (...)} as the loader must give them."""
    rng = np.random.default_rng(seed)
    root = Path(data_dir) / 'hapt_sample'
    n = sum(k for _, k in HAPT_FAKE_SEGMENTS)
    labels, out = [], {'train': ([], [], []), 'test': ([], [], [])}
    for user, experiments in HAPT_FAKE_RECORDINGS.items():
        for e in experiments:
            signal = rng.standard_normal((n, 6)) * [0.3, 0.3, 0.3, 1, 1, 1] + [1, 0, 0, 0, 0, 0]  # g, rad/s
            write_hapt_rows(root / 'RawData' / f'acc_exp{e:02d}_user{user:02d}.txt', signal[:, :3].tolist())
            write_hapt_rows(root / 'RawData' / f'gyro_exp{e:02d}_user{user:02d}.txt', signal[:, 3:].tolist())
            x, y, users = out['test' if user in (2, 4) else 'train']
            start = 0  # 0-based first sample of the segment
            for activity, k in HAPT_FAKE_SEGMENTS:
                if activity:
                    labels.append((e, user, activity, start + 1, start + k))
                if 1 <= activity <= 6:
                    for t in range(start, start + k - 127, 64):
                        x.append(signal[t:t + 128].T)
                        y.append(activity - 1)
                        users.append(user)
                start += k
    labels += [(11, 6, 5, 100, 400), (61, 30, 1, 9676, 10779)]  # users not in this folder
    write_hapt_rows(root / 'RawData' / 'labels.txt', sorted(labels, key=lambda r: (r[0], r[3])))  # in time order
    (root / 'activity_labels.txt').write_text(''.join(f'{i} {name:<18}\n' for i, name in enumerate(
        ['WALKING', 'WALKING_UPSTAIRS', 'WALKING_DOWNSTAIRS', 'SITTING', 'STANDING', 'LAYING', 'STAND_TO_SIT',
         'SIT_TO_STAND', 'SIT_TO_LIE', 'LIE_TO_SIT', 'STAND_TO_LIE', 'LIE_TO_STAND'], start=1)))
    write_hapt_rows(root / 'Train' / 'subject_id_train.txt', [[u] for u in (1, 1, 1, 3, 3, 5, 6, 6, 30)])
    write_hapt_rows(root / 'Test' / 'subject_id_test.txt', [[u] for u in (2, 2, 4, 9, 9)])
    (root / 'README.txt').write_text('Smartphone-Based Recognition of Human Activities and Postural Transitions\r\n')
    return {split: (np.array(x, np.float32), np.array(y), np.array(users)) for split, (x, y, users) in out.items()}


def write_fake_higgs_sample(data_dir, rows=(60, 20), seed=0):
    """higgs_lightgbm/binary.train and binary.test as LightGBM's example: tab-separated, the label (1 or 0), then 28
    features with 3 decimals. Returns {'train': float32 (N, 29), 'test': ...}: the label, then the features."""
    rng = np.random.default_rng(seed)
    folder = Path(data_dir) / 'higgs_lightgbm'
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, name, n in (('train', 'binary.train', rows[0]), ('test', 'binary.test', rows[1])):
        table = [[str(rng.integers(0, 2))] + [f'{v:.3f}' for v in rng.standard_normal(28) + 1] for _ in range(n)]
        (folder / name).write_text(''.join('\t'.join(row) + '\n' for row in table))
        out[split] = np.array([[float(v) for v in row] for row in table]).astype(np.float32)
    (folder / 'LICENSE.LightGBM').write_text('The MIT License (MIT)\n')
    return out


def write_fake_splice(data_dir, rows=60, seed=0):
    """splice/splice.data as UCI's: class, instance name, 60 letters, comma-separated and padded with spaces to the
    original's columns; every tenth sequence holds one of the ambiguity codes D N S R. Returns the rows as
    (class, name, sequence)."""
    rng = random.Random(seed)
    out = []
    for i in range(rows):
        cls = rng.choice(['EI', 'IE', 'N', 'N'])  # N is half of the real file
        seq = [rng.choice('ACGT') for _ in range(60)]
        if i % 10 == 3:
            seq[rng.randrange(60)] = 'DNSR'[i // 10 % 4]
        kind = {'EI': 'DONOR', 'IE': 'ACCEPTOR', 'N': 'NEG'}[cls]
        out.append((cls, f'HUMFAKE-{kind}-{100 + i}', ''.join(seq)))
    folder = Path(data_dir) / 'splice'
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'splice.data').write_text(''.join(f"{c + ',':<7}{name + ',':<32}{seq}\n" for c, name, seq in out))
    (folder / 'splice.names').write_text('1. Title of Database: Primate splice-junction gene sequences (DNA)\n')
    return out


# -----------------------------------------------------------------------------
# any domain's fake, by name

FAKE_WRITERS = {'google_speech': write_fake_google_speech, 'audio_mnist': write_fake_audio_mnist,
                'librispeech': write_fake_librispeech, 'librispeech_transfer': write_fake_librispeech,
                'pamap2': write_fake_pamap2, 'higgs': write_fake_higgs, 'genomics': write_fake_genomics,
                'pfam': write_fake_pfam, 'pfam_transfer': write_fake_pfam, 'scop': write_fake_scop,
                'wafer': write_fake_wafer, 'wafer_transfer': write_fake_wafer,
                'google_speech_subset': write_fake_speech_subset, 'hapt_sample': write_fake_hapt,
                'higgs_sample': write_fake_higgs_sample, 'splice': write_fake_splice}


def write_fake(name, data_dir, monkeypatch):
    """Write a small fake of domain `name` into data_dir, so that get_domain(name).load(data_dir, False) works.
    HIGGS.csv.gz is checked against the real file's size and sha256 before it is parsed: `monkeypatch`
    (pytest's fixture) points those constants at the fake."""
    FAKE_WRITERS[name](data_dir)
    if name == 'higgs':
        serve(monkeypatch, 'HIGGS', Path(data_dir) / 'HIGGS.csv.gz')
    return Path(data_dir)


# -----------------------------------------------------------------------------
# the commands as a user runs them, and a tiny model: shared by the tests of train.py, probe.py, bench.py and
# device.py

HERE = Path(__file__).resolve().parent
REAL_DATA = HERE.parent / 'shared' / 'data'  # the real samples, where this checkout has them
TINY = ("--embed-dim 32 --depth 1 --num-heads 2 --decoder-embed-dim 16 --decoder-depth 1 --decoder-num-heads 2 "
        "--batch-size 8 --probe-epochs 2 --log-interval 1 --warmup-steps 2 --threads 1").split()


def run_cli(script, *args, cwd=HERE, timeout=300):
    """python <script> as a user runs it; returns (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, str(HERE / script), *map(str, args)], cwd=cwd, capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    return p.returncode, p.stdout, p.stderr


def assert_clean_error(result, code, *needles):
    """What the README promises of bad input: exit code `code`, one line on stderr, no traceback."""
    rc, out, err = result
    assert rc == code, (rc, out, err)
    assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)


def read_log(path):
    return [json.loads(line) for line in open(path)]


def tiny_model(**kw):
    import metamae  # noqa: the data tests need no model
    torch.manual_seed(0)
    return metamae.MetaMAE(metamae.MetaMAEConfig(input_shape=(3, 16, 16), patch_size=(4, 4), embed_dim=32, depth=1,
                                                 num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                                                 decoder_num_heads=2, **kw))


def train_losses(model, opt, cfg, lrs, x, lr_tensor=None):
    """train.py's steps at the given lrs, set as Python floats, or by filling lr_tensor as GraphedStep does."""
    import device
    import train
    dev = device.setup(cfg)
    step = device.prepare(model, opt, cfg, dev, train.train_step)
    out = []
    for i, lr in enumerate(lrs):
        torch.manual_seed(i)  # the same masks and dropout in every run
        if lr_tensor is None:
            out.append(step(x, lr)[0].item())
        else:
            lr_tensor.fill_(lr)
            out.append(train.train_step(model, opt, x, cfg, dev.autocast)[0].item())
    return out


def listing(folder):
    """A folder's names, sorted, less what a build leaves on purpose: its empty .<name>.lock and the
    <cache>.sources fingerprint. Temporary .part files stay in: they must never be left."""
    return sorted(n for n in os.listdir(folder) if not (n.startswith('.') and n.endswith('.lock'))
                  and not n.endswith('.sources'))


def run_in_process(main, *args):
    """A script's main(argv) in this process, as its command line meets a user: (exit code, stdout, stderr).
    Cheaper than a subprocess (no new interpreter, no torch import); the tests that need a process of their
    own (signals, locks, torchrun) start one."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()
