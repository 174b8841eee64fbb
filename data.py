"""
DABS datasets in their genuine on-disk formats: download, verify, parse, preprocess.

The file reads top to bottom: what a dataset is (Splits, Domain), the model inputs and how datasets are
split, then one section per domain (CIFAR-10 first), then DOMAINS, the registry train.py reads, and last
the machinery the sections call (download and verify, extract, cache), which a reader of a domain can skip.
Every section has the same shape: a header comment (what the data is, where it comes from, its format and
quirks, how it is split), the constants (URL, size, md5 or sha256), its reader(s), `load_<domain>(data_dir,
download) -> Splits`, and the `Domain` saying what the model sees. To add a domain, copy the CIFAR-10
section, adapt it, and add its Domain to DOMAINS.

Notable choices:
- Splits hold compact CPU tensors (uint8 images). `Domain.to_input` turns a batch into model input
  on whatever device the batch is on, so train.py can move a whole dataset to the accelerator once.
- No mean/std normalisation: DABS and MetaMAE both feed images in [0, 1] (DABS.md section 0).
- Test split = the official test split, which is what MetaMAE reports on; tables without one are split
  as DABS splits them (`seeded_split`). `train_val_split` carves a fixed validation set out of train for
  anything that must not look at test.
- Nothing appears complete before it is: every file is written through `atomic_file` (a temporary name,
  renamed into place when complete: archives after their size + md5 or sha256 check, caches, and train.py's
  checkpoints and pictures); archives are extracted into a temporary folder that is renamed into place. What
  is written gets the permissions of any new file (0644 / 0755 under the usual umask), not tempfile's
  private 0600 / 0700, so a data folder can be shared. Archive members that would land outside their folder
  are refused.
- Pickles are read with an allow-list (numpy arrays only): unpickling can run code, and a folder
  placed by hand, or ImageNet32 (no published checksum), is not verified.
- ImageNet32 is the Chrabaszcz et al. (2017) pickle release, not MetaMAE's torchvision ImageNet
  resized to 32x32: same images, box-filter downsampled, so close but not bit-identical.
- Every failure the user can fix is a DataError with one line: what is wrong, and what to do.
- Sources that publish no checksum (PAMAP2, genomics, TAPE's proteins) are not verified: their
  parsers check every record instead. The real samples of the project's shared/data are the exception: their
  sources publish none either, but the project holds copies, so what they download is checked against the
  sha256 of those copies.
- What takes minutes to parse (speech spectrograms, HIGGS, Pfam, wafer maps) is parsed once into .npy files
  beside the data (`cached_arrays`) and memory-mapped from then on.
- LibriSpeech (FLAC) and WM-811K (a pandas pickle) need a one-time conversion outside the project (docs/domains.md);
  their loaders read what it writes, check it, and name the command when it is missing.
- Pretraining-only domains (num_classes 0: librispeech, pfam, wafer) have no labels to learn and no test split;
  each names the labelled domain(s) a run pretrained on it is probed on (Domain.transfer), as DABS pairs them.
- Loaders take `data_dir` as a Path: train.py converts its --data-dir once.
"""
import contextlib
import csv
import dataclasses
import errno
import fcntl
import functools
import glob
import gzip
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import re
import shutil
import struct
import sys
import tarfile
import tempfile
import urllib.request
import warnings
import wave
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


class DataError(Exception):
    """One-line, actionable message (what is wrong + what to do). train.py prints it and exits 1."""


@dataclass
class Splits:
    train_x: torch.Tensor       # compact CPU tensors: images uint8 (N, 3, 32, 32)
    train_y: torch.Tensor       # labels int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    # int64 (N,): who made each train row (the speaker, the user), for domains whose rows come in groups, so that
    # a validation split can hold out whole groups (train_val_split's `groups`); None: the rows are independent
    train_groups: torch.Tensor = None


@dataclass(frozen=True)
class Domain:
    name: str
    input_shape: tuple          # model input of one example, e.g. (3, 32, 32); (L,) for tokens / tabular
    patch_size: tuple           # (4, 4) for 2-D, (5,) for 1-D series, () for tokens / tabular
    vocab_size: int             # > 0 for integer-token inputs, else 0
    num_classes: int
    batch_size: int             # pretraining batch size default for this domain
    mask_ratio: float           # pretraining mask ratio default for this domain
    load: Callable              # load(data_dir: Path, download: bool) -> Splits
    to_input: Callable          # stored batch (on any device) -> model input; e.g. uint8 -> float in [0,1]
    metric: str = 'accuracy'    # what the probe reports: 'accuracy', or 'weighted_f1' (wafer maps, as DABS)
    transfer: tuple = ()        # the domains a run pretrained on this one probes by default, e.g. ('wafer_transfer',)


# num_classes 0: a pretraining domain whose labels are not used (LibriSpeech's 960 h, the unlabelled wafer maps,
# pfam_train). Its Splits have train_y all 0 and an empty test split (label_free); train.py does not probe it
# itself, but probes the domains named in its `transfer`.


# the three kinds of Domain.to_input: stored batches stay compact (uint8, float16), the model gets these

def images_to_unit(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) uint8 -> float32 in [0, 1], on x's device. No mean/std, as DABS and MetaMAE."""
    return x.float() / 255


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """Stored float16/float32 batch (spectrograms, sensor windows, tabular rows) -> float32, on x's device."""
    return x.float()


def as_token_ids(x: torch.Tensor) -> torch.Tensor:
    """Stored uint8 token ids -> int64, on x's device (what nn.Embedding takes)."""
    return x.long()

# -----------------------------------------------------------------------------
# how a dataset is split, and the one-line message of an error

def one_line(e: BaseException, limit: int = None) -> str:
    """An exception as one line, 'Type: message', for the project's one-line errors (train.py, probe.py too);
    with `limit`, cut to about that many characters at a word's end (a message quoting PyTorch's stays short)."""
    text = f"{type(e).__name__}: {' '.join(str(e).split())}"
    return text if limit is None or len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def file_error(path: Path, e: OSError, fix: str) -> DataError:
    """A DataError in the words of what the system said about `path` (missing, no permission, a loop, a folder;
    any other OSError in its own words). Permission is permission: nothing is broken, so `fix` (delete, download
    again) is not said."""
    said = {errno.ENOENT: f"is missing: {fix}",
            errno.EACCES: "cannot be read by this user (permission denied): give it read access (chmod a+r), or run "
                          "as its owner; nothing needs deleting",
            errno.ELOOP: f"is a symbolic link that loops (it leads back to itself): point it at the file, or {fix}",
            errno.EISDIR: f"is a folder, where a file is expected: {fix}"}
    said[errno.EPERM] = said[errno.EACCES]
    return DataError(f"{path} {said[e.errno]}" if e.errno in said else f"{path} is unreadable ({one_line(e)}): {fix}")


def utf8_names(files: list, fix: str) -> list:
    """files (a list), refused if a name is not UTF-8: no dataset's file has one, and it could be neither hashed nor
    shown."""
    files = list(files)
    for f in files:
        try:
            str(f).encode()
        except UnicodeEncodeError:
            raise DataError(f"{str(os.fsencode(f))[2:-1]}: a file name that is not UTF-8, which no file of this "
                            f"dataset has: rename or remove it, or {fix}") from None
    return files


def seeded_split(n: int, what) -> tuple[np.ndarray, np.ndarray]:
    """DABS's split of a table of n rows (DABS.md section 0): pandas' df.sample(frac=1, random_state=42), which
    is the seed-42 permutation, then the first ceil(90%) rows train and the rest test.

    Returns (train, test) row indices, each in the permuted order. `what`: the file, for the message."""
    perm = np.random.RandomState(42).permutation(n)
    n_train = math.ceil(0.9 * n)
    if n - n_train < 1:
        raise DataError(f"{what}: {n} rows leave none for the test split: delete it and download it again")
    return perm[:n_train], perm[n_train:]


def split_rows(x: torch.Tensor, y: torch.Tensor, n_train: int) -> Splits:
    """Rows of one array, train rows first: the first n_train are the train split, the rest the test split."""
    return Splits(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def label_free(train_x: torch.Tensor) -> Splits:
    """A pretraining domain's Splits (num_classes 0): labels all 0 (int64), and an empty test split of the
    same row shape, (0, *stored shape)."""
    zeros = torch.zeros(len(train_x), dtype=torch.int64)
    return Splits(train_x, zeros, train_x[:0], zeros[:0])


def train_val_split(n: int, val_frac: float = 0.1, seed: int = 0,
                    groups: torch.Tensor = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-seed split of range(n) into sorted (train_idx, val_idx): disjoint, together all of it.

    Not seeded_split: this one carves validation out of any train split, for train.py, and its partition
    (torch's generator) is what the validation figures of docs/ablation.md were measured on.

    groups: None, or int (n,), the group of each row (Splits.train_groups: a speaker, a user). Rows of one
    speaker are alike, so a validation set that shares speakers with train would flatter the probe: with
    groups, whole groups go to validation. The rule: the distinct groups (sorted) in a fixed-seed permutation,
    taken in that order until they hold at least round(n * val_frac) rows. So validation may be a little
    larger than val_frac; it is a ValueError if it would take every group. Without groups, the rows are
    permuted one by one, exactly as before groups existed."""
    if n < 0 or not 0 <= val_frac < 1:
        raise ValueError(f"need n >= 0 and 0 <= val_frac < 1, got n={n}, val_frac={val_frac}")
    # a private generator: the split is the same whatever the caller did to the global RNG, and
    # taking it does not change the global RNG either
    generator = torch.Generator().manual_seed(seed)
    n_val = round(n * val_frac)
    if groups is None:
        perm = torch.randperm(n, generator=generator)
        return perm[n_val:].sort().values, perm[:n_val].sort().values
    groups = torch.as_tensor(groups).cpu()  # the indices are CPU tensors either way, as without groups
    if groups.shape != (n,) or groups.is_floating_point() or groups.dtype == torch.bool:
        raise ValueError(f"groups must be integers of shape ({n},), got {groups.dtype} {tuple(groups.shape)}")
    ids, group_of = torch.unique(groups, return_inverse=True)  # sorted distinct groups; each row's index in ids
    order = torch.randperm(len(ids), generator=generator)
    rows = torch.bincount(group_of, minlength=len(ids))[order].cumsum(0)  # rows in the first 1, 2, ... groups
    k = int((rows < n_val).sum()) + (n_val > 0)  # the fewest groups, in that order, that hold n_val rows
    if n_val and k == len(ids):
        raise ValueError(f"val_frac={val_frac} of {n} rows in {len(ids)} groups would put every group in "
                         f"validation: use a smaller val_frac, or more groups")
    is_val = torch.isin(group_of, order[:k])
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()  # sorted, as nonzero gives them

# -----------------------------------------------------------------------------
# CIFAR-10: 32x32 RGB photos, 10 classes, 50k train / 10k test.
# Source: the official python archive (md5 published), extracted to cifar-10-batches-py/.
# Format: data_batch_1..5 and test_batch, pickles in the CIFAR plane layout (read_image_batch).
# Split: the official train / test. MetaMAE uses the images as they are: 32x32 in [0, 1], patch 4.

CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR10_SIZE = 170_498_071
CIFAR10_MD5 = 'c58f30108f718f92721af3b95e74349a'



class _NumpyOnlyUnpickler(pickle.Unpickler):
    # what a pickled numpy array needs (numpy 1 and 2 names; _codecs for Python-3 protocol-2 bytes)
    ALLOWED = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
               ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
               ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode')}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_image_batch(path: Path, num_classes: int, first_label: int = 0):
    """A CIFAR-layout batch pickle -> (x uint8 (N, 3, 32, 32), y int64 (N,) in 0..num_classes-1).

    The dict's 'data' is uint8 (N, 3072): 1024 red, then 1024 green, then 1024 blue values, each
    plane row-major 32x32, so a plain reshape gives (N, C, H, W). N comes from the file."""
    fix = f"delete {path.parent} and run again to re-extract or re-download it"
    try:
        with open(path, 'rb') as f:
            # encoding='bytes': CIFAR-10 was pickled by Python 2, whose str is bytes
            d = _NumpyOnlyUnpickler(f, encoding='bytes').load()
    except OSError as e:  # missing, a folder, a loop, no permission: said as such
        raise file_error(path, e, fix) from None
    except Exception as e:  # UnpicklingError, EOFError (truncated), ValueError, ...: a broken file
        raise DataError(f"{path} is corrupt or truncated ({one_line(e)}): {fix}") from e
    # CIFAR-10 has bytes keys (Python 2); the ImageNet32 pickles have str keys (Python 3)
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()} if isinstance(d, dict) else {}
    x, y = d.get('data'), np.asarray(d.get('labels'))
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3 * 32 * 32):
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{path}: 'data' should be a uint8 (N, 3072) array, got {got}: {fix}")
    if y.ndim != 1 or len(y) != len(x) or (len(y) and y.dtype.kind not in 'iu'):
        raise DataError(f"{path}: expected {len(x)} integer labels, got shape {y.shape} dtype {y.dtype}: {fix}")
    y = y.astype(np.int64) - first_label
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{path}: labels should be in {first_label}..{first_label + num_classes - 1}, got "
                        f"{y.min() + first_label}..{y.max() + first_label}: {fix}")
    return x.reshape(-1, 3, 32, 32), y


def to_splits(train: list, test: list) -> Splits:
    """Lists of (x, y) numpy batches -> one contiguous CPU tensor per array."""
    def cat(batches, i):
        return torch.from_numpy(np.concatenate([b[i] for b in batches]))
    return Splits(cat(train, 0), cat(train, 1), cat(test, 0), cat(test, 1))

def load_cifar10(data_dir: Path, download: bool) -> Splits:
    folder = fetch_and_extract(CIFAR10_URL, 'cifar-10-python.tar.gz', CIFAR10_SIZE, CIFAR10_MD5, download,
                               data_dir / 'cifar-10-batches-py')
    train = [read_image_batch(folder / f'data_batch_{i}', 10) for i in range(1, 6)]
    test = [read_image_batch(folder / 'test_batch', 10)]
    return to_splits(train, test)


CIFAR10 = Domain(name='cifar10', input_shape=(3, 32, 32), patch_size=(4, 4), vocab_size=0, num_classes=10,
                 batch_size=64, mask_ratio=0.5, load=load_cifar10, to_input=images_to_unit)

# -----------------------------------------------------------------------------
# ImageNet32 (Chrabaszcz et al. 2017, "A downsampled variant of ImageNet"): 1,281,167 train / 50,000
# val images, 1000 classes. MetaMAE pretrains on ImageNet resized to 32x32; this release is the light
# equivalent.
# Source: Imagenet32_train.zip and Imagenet32_val.zip from image-net.org, which needs a login, so there is
# no download: the user places the two zips (or their extracted folders) in data_dir.
# Format: the CIFAR plane layout (read_image_batch), pickled by Python 3, labels 1..1000.
# Split: the official train / val. The full train set is 3.9 GB as uint8; loading briefly needs twice that.

IMAGENET32_URL = 'https://image-net.org/download-images.php'  # a login page: no download


def load_imagenet32(data_dir: Path, download: bool) -> Splits:
    # `download` is unused: there is no public URL
    for name in ('Imagenet32_train', 'Imagenet32_val'):
        folder, archive = data_dir / name, data_dir / f'{name}.zip'
        if not folder.is_dir():
            if not archive.is_file():
                raise DataError(
                    f"{folder}/ not found, and ImageNet32 needs an image-net.org login, so it cannot be downloaded "
                    f"automatically: log in at {IMAGENET32_URL}, download "
                    f"Imagenet32_train.zip and Imagenet32_val.zip (Downsampled ImageNet 32x32, the pickle version, "
                    f"not *_npz), put both in {data_dir} (they are extracted on first use), "
                    f"or pass --data-dir with the folder that holds them")
            extract_archive(archive, folder)
    train = [read_image_batch(data_dir / 'Imagenet32_train' / f'train_data_batch_{i}', 1000, first_label=1)
             for i in range(1, 11)]
    test = [read_image_batch(data_dir / 'Imagenet32_val' / 'val_data', 1000, first_label=1)]
    return to_splits(train, test)


IMAGENET32 = Domain(name='imagenet32', input_shape=(3, 32, 32), patch_size=(4, 4), vocab_size=0, num_classes=1000,
                    batch_size=64, mask_ratio=0.5, load=load_imagenet32, to_input=images_to_unit,
                    transfer=('cifar10',))  # DABS's natural-image protocol: pretrain on ImageNet, probe CIFAR-10

# -----------------------------------------------------------------------------
# speech, shared by Google Speech Commands and AudioMNIST: 16-bit PCM wav files -> the log-mel spectrogram
# DABS feeds its models (DABS.md section 5).
# DABS: pad (or crop) each clip to 150,526 samples, librosa.feature.melspectrogram(y, sr, hop_length=672,
# n_mels=224) with its defaults (n_fft 2048, periodic Hann, centred frames with reflect padding as
# librosa < 0.10 did, power 2, Slaney mels with Slaney norm, fmax sr/2), then power_to_db(S**2) (the
# power squared again, so twice the usual dB), top_db 80, then (x - mean) / std with dataset constants:
# (1, 224, 224), patches 16x16. Here: torch.stft and our own filterbank (no librosa); test_domains.py
# checks them against a direct DFT. Spectrograms are computed once at load and stored as float16
# (rounding <= 0.002 of a std, 0.04 dB), 100 KB per clip. A clip longer than 150,526 samples keeps its
# first ones (DABS at test time; in training DABS keeps the first or the last at random).

SPEECH_SAMPLES = 150_526  # every clip is zero-padded (or cropped) to this many samples
N_FFT, HOP, N_MELS = 2048, 672, 224
N_FRAMES = 1 + SPEECH_SAMPLES // HOP  # 224


def read_wav(path: Path, sample_rate: int, fix: str = "delete it and download the dataset again") -> np.ndarray:
    """A mono 16-bit PCM wav -> int16 samples (of the first channel, as DABS takes). fix: how to get a good
    copy of a damaged file, which depends on where the files came from."""
    try:
        with wave.open(str(path), 'rb') as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(n)
    except wave.Error as e:
        if 'unknown format: 65534' not in str(e):  # WAVE_FORMAT_EXTENSIBLE: Python < 3.12's wave refuses it
            raise DataError(f"{path} is not a PCM wav file ({one_line(e)}): {fix}") from None
        channels, width, rate, n, raw = _read_wav_extensible(path, fix)
    except EOFError:  # the wave module's word for a file that ends inside its header, or is empty
        raise DataError(f"{path} is empty or cut short inside its header ({path.stat().st_size} bytes): {fix}") from None
    except OSError as e:
        raise file_error(path, e, fix) from None
    if width != 2:
        raise DataError(f"{path} has {8 * width}-bit samples, expected 16-bit PCM: {fix}")
    if rate != sample_rate:  # the dataset's clips all have one rate; a file with another was not among them
        raise DataError(f"{path} is sampled at {rate} Hz, but this dataset's clips are {sample_rate} Hz: resample "
                        f"it (e.g. 'sox {path.name} -r {sample_rate} out.wav') or remove it")
    if len(raw) != n * channels * width:
        raise DataError(f"{path} is truncated: {len(raw):,} of {n * channels * width:,} sample bytes: {fix}")
    return np.frombuffer(raw, '<i2').reshape(n, channels)[:, 0]


def _read_wav_extensible(path: Path, fix: str):
    """The RIFF chunks of a WAVE_FORMAT_EXTENSIBLE file -> (channels, bytes per sample, rate, frames, data)."""
    raw, pos, fmt = path.read_bytes(), 12, None
    while pos + 8 <= len(raw):
        chunk, size = struct.unpack_from('<4sI', raw, pos)
        body = raw[pos + 8:pos + 8 + size]
        if chunk == b'fmt ' and len(body) >= 26:
            _, channels, rate, _, _, bits = struct.unpack_from('<HHIIHH', body)
            if body[24:26] != b'\x01\x00':  # the sub-format GUID starts with the format code; 1 = PCM
                raise DataError(f"{path} is not PCM (WAVE_FORMAT_EXTENSIBLE with another sub-format): {fix}")
            if channels < 1 or bits < 8 or bits % 8:
                raise DataError(f"{path} has {channels} channels of {bits}-bit samples, expected 16-bit PCM: {fix}")
            fmt = channels, bits // 8, rate
        elif chunk == b'data' and fmt:
            channels, width, rate = fmt
            return channels, width, rate, size // (channels * width), body
        pos += 8 + size + (size & 1)  # chunks are padded to an even size
    raise DataError(f"{path} is truncated: no 'fmt ' and 'data' chunk: {fix}")


@functools.lru_cache(maxsize=4)
def mel_filterbank(sample_rate: int) -> torch.Tensor:
    """(224, 1025) float64 triangles on the Slaney mel scale, Slaney-normalised: librosa.filters.mel's default.

    The Slaney scale is linear below 1 kHz (3 mels per 200 Hz) and logarithmic above; each triangle is
    scaled by 2 / its width in Hz, so that every filter has the same area."""
    f_sp, brk, logstep = 200 / 3, 1000.0, math.log(6.4) / 27

    def hz_to_mel(f):
        return torch.where(f >= brk, brk / f_sp + torch.log(f.clamp(min=1e-10) / brk) / logstep, f / f_sp)

    def mel_to_hz(m):
        return torch.where(m >= brk / f_sp, brk * torch.exp(logstep * (m - brk / f_sp)), f_sp * m)

    fft_hz = torch.linspace(0, sample_rate / 2, 1 + N_FFT // 2, dtype=torch.float64)
    top = hz_to_mel(torch.tensor(sample_rate / 2, dtype=torch.float64))
    edges = mel_to_hz(torch.linspace(0, float(top), N_MELS + 2, dtype=torch.float64))  # (226,) in Hz
    ramps = edges[:, None] - fft_hz[None]  # (226, 1025)
    width = edges.diff()
    rising, falling = -ramps[:-2] / width[:-1, None], ramps[2:] / width[1:, None]
    return torch.minimum(rising, falling).clamp(min=0) * (2 / (edges[2:] - edges[:-2]))[:, None]


def log_mel(y: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """(B, T) float waveforms in [-1, 1] -> (B, 224, 224) dB, as DABS computes it (before mean/std).

    Clips are zero-padded to 150,526 samples, so frames past the clip's end hold only zeros: their power
    is 0, and only the frames that reach the clip are transformed (5x faster for 1 s clips)."""
    n = min(y.shape[1], SPEECH_SAMPLES)
    frames = min(N_FRAMES, -(-(n + N_FFT // 2) // HOP))  # frame t covers samples t*HOP -+ N_FFT/2
    m = min(SPEECH_SAMPLES, (frames - 1) * HOP + N_FFT // 2)  # the samples those frames cover
    y = F.pad(y[:, :n].float(), (0, m - n))
    # centred frames: reflect N_FFT/2 samples at the start (and at the end, if the frames reach it)
    y = F.pad(y[:, None], (N_FFT // 2, N_FFT // 2 if m == SPEECH_SAMPLES else 0), mode='reflect')[:, 0]
    y = y[:, :(frames - 1) * HOP + N_FFT].contiguous()
    window = torch.hann_window(N_FFT, device=y.device)  # periodic, as librosa's
    power = torch.stft(y, N_FFT, HOP, window=window, center=False, return_complex=True).abs() ** 2  # (B, 1025, t)
    mel = mel_filterbank(sample_rate).to(y.device, torch.float32) @ power  # (B, 224, frames)
    mel = F.pad(mel, (0, N_FRAMES - frames))  # (B, 224, 224)
    db = 10 * torch.log10((mel ** 2).clamp(min=1e-10))  # power_to_db(S**2): DABS squares the power again
    return torch.maximum(db, db.amax(dim=(1, 2), keepdim=True) - 80)  # top_db=80


def speech_splits(train: list, test: list, labels: list, sample_rate: int, mean: float, std: float,
                  cache: Path = None, fix: str = None) -> Splits:
    """wav files -> Splits of float16 (N, 1, 224, 224) normalised log-mels; labels: train's, then test's.

    Train rows first, then test rows, so that both splits are slices of one array. With `cache`, the
    spectrograms are computed once into that .npy (a full dataset is GBs), and computed again when the
    number of files changes. fix: read_wav's advice for a damaged file (None: its default)."""
    files, fix = train + test, {} if fix is None else {"fix": fix}

    def batches(size=256):
        for i in range(0, len(files), size):
            clips = [read_wav(f, sample_rate, **fix)[:SPEECH_SAMPLES] for f in files[i:i + size]]
            y = torch.zeros(len(clips), max(len(c) for c in clips))
            for row, c in zip(y, clips):
                row[:len(c)] = torch.from_numpy(c.astype(np.float32) / 32768)  # the scale torchaudio.load uses
            yield (((log_mel(y, sample_rate) - mean) / std).half().unsqueeze(1).numpy(),)

    if cache is None:
        x = np.concatenate([b[0] for b in batches()])
    else:
        x, = cached_arrays({cache: (np.float16, (1, N_MELS, N_FRAMES))}, batches, rows=len(files), sources=files)
    x, y = torch.from_numpy(x), torch.tensor(labels, dtype=torch.int64)
    return split_rows(x, y, len(train))

# -----------------------------------------------------------------------------
# Google Speech Commands v0.02: 105,829 one-second clips (16 kHz) of 35 words, plus 6 long recordings in
# _background_noise_, which DABS keeps as a 36th class.
# Source: the TensorFlow tar (sha256 published), which has no top folder: extracted to speech_commands_v0.02/.
# Format: <word>/<speaker>_nohash_<n>.wav and the official validation_list.txt and testing_list.txt (split by
# speaker). Label = the folder's index in DABS's list below, which is not alphabetical.
# Split: DABS's split code never removes the listed files from train (its readlines() entries keep their
# '\n'), so DABS and MetaMAE train on the test clips (and on the validation clips twice). Here train = every
# clip in neither list + validation_list (what DABS meant: it adds validation_list back), test = testing_list:
# no clip, and no speaker, in both. The validation clips are the last rows of train.
# Cache: speech_commands_v0.02.logmel.npy beside the folder (10.6 GB).

GOOGLE_SPEECH_URL = 'http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz'
GOOGLE_SPEECH_SIZE = 2_428_923_189
GOOGLE_SPEECH_SHA256 = 'af14739ee7dc311471de98f5f9d2c9191b18aedfe957f4a6ff791c709868ff58'
GOOGLE_SPEECH_WORDS = [
    'eight', 'right', 'happy', 'three', 'yes', 'up', 'no', 'stop', 'on', 'four', 'nine', 'zero', 'down', 'go', 'six',
    'two', 'left', 'five', 'off', 'seven', 'one', 'cat', 'bird', 'marvin', 'wow', 'tree', 'dog', 'sheila', 'bed',
    'house', 'follow', 'visual', 'backward', 'forward', 'learn', '_background_noise_']
GOOGLE_SPEECH_MEAN, GOOGLE_SPEECH_STD = -46.847, 19.151


def speech_commands_splits(root: Path, cache: Path = None, fix: str = None) -> Splits:
    """A Speech Commands folder (v0.02, or v0.01 whose 30 words are among v0.02's) -> Splits. fix: how to
    get a good copy of the folder (None: download it again)."""
    refetch = fix or f"delete {root} and download it again"
    files = sorted(p.relative_to(root).as_posix() for p in utf8_names(root.glob('*/*.wav'), refetch))
    lists = {}
    for name in ('validation_list.txt', 'testing_list.txt'):
        try:
            lists[name] = set((root / name).read_text(encoding='utf-8').split())
        except UnicodeDecodeError as e:
            raise DataError(f"{root / name} is not UTF-8 text (byte {e.start}): it is damaged; {refetch}") from None
        except OSError as e:
            raise file_error(root / name, e, f"it comes with the dataset; {refetch}") from None
    for f in files:
        if f.split('/')[0].lower() not in GOOGLE_SPEECH_WORDS:
            raise DataError(f"{root / f}: unknown word {f.split('/')[0]!r}; expected one of the 35 Speech Commands "
                            f"v0.02 words or _background_noise_: is {root} a Speech Commands folder?")
    val, test = lists['validation_list.txt'], lists['testing_list.txt']
    train = [f for f in files if f not in val and f not in test] + [f for f in files if f in val and f not in test]
    test = [f for f in files if f in test]
    for name, split in (('train', train), ('test', test)):
        if not split:
            raise DataError(f"{root}: no wav file for the {name} split ({len(files)} wav files in all): {refetch}")
    labels = [GOOGLE_SPEECH_WORDS.index(f.split('/')[0].lower()) for f in train + test]
    return speech_splits([root / f for f in train], [root / f for f in test], labels, 16_000,
                         GOOGLE_SPEECH_MEAN, GOOGLE_SPEECH_STD, cache, fix)


def load_google_speech(data_dir: Path, download: bool) -> Splits:
    folder = fetch_and_extract(GOOGLE_SPEECH_URL, 'speech_commands_v0.02.tar.gz', GOOGLE_SPEECH_SIZE,
                               GOOGLE_SPEECH_SHA256, download, data_dir / 'speech_commands_v0.02')
    return speech_commands_splits(folder, cache=data_dir / 'speech_commands_v0.02.logmel.npy')


def load_google_speech_sample(data_dir: Path, download: bool) -> Splits:
    """The 300 real v0.01 clips shipped in shared/data (no download): a quick real run, nothing written."""
    folder = data_dir / 'speech_commands_v0.01_sample'
    refuse_broken_link(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}/ not found: it ships with the project in shared/data; "
                        f"pass --data-dir with the folder that holds it")
    # it has no download: a damaged file is fixed by restoring the shipped copy
    return speech_commands_splits(folder, fix=f"the sample shipped in shared/data is damaged: restore {folder.name}/ "
                                               "from the project's copy")


GOOGLE_SPEECH = Domain(name='google_speech', input_shape=(1, 224, 224), patch_size=(16, 16), vocab_size=0,
                       num_classes=36, batch_size=64, mask_ratio=0.5, load=load_google_speech,
                       to_input=as_float32)
GOOGLE_SPEECH_SAMPLE = dataclasses.replace(GOOGLE_SPEECH, name='google_speech_sample', load=load_google_speech_sample)

# -----------------------------------------------------------------------------
# AudioMNIST: 30,000 clips (48 kHz, <= 1 s) of the digits 0-9 by 60 speakers.
# Source: a git repository (MIT licence), not an archive, so no download: the user clones it into data_dir.
# Format: data/<NN>/<digit>_<NN>_<repetition>.wav, NN the speaker; a few files are WAVE_FORMAT_EXTENSIBLE.
# Split: by speaker, as DABS: test = its 12 test speakers; train = its train + val speakers (48).
# Cache: AudioMNIST.logmel.npy beside the clone (3 GB).

AUDIO_MNIST_REPO = 'https://github.com/soerenab/AudioMNIST'
AUDIO_MNIST_TEST_SPEAKERS = {26, 52, 60, 18, 32, 42, 5, 13, 22, 33, 45, 51}
AUDIO_MNIST_MEAN, AUDIO_MNIST_STD = -90.293, 11.799


def load_audio_mnist(data_dir: Path, download: bool) -> Splits:
    folder = data_dir / 'AudioMNIST' / 'data'
    if not folder.is_dir():
        raise DataError(f"{folder}/ not found, and AudioMNIST is a git repository, not an archive: run "
                        f"'git clone {AUDIO_MNIST_REPO} {data_dir / 'AudioMNIST'}', "
                        f"or pass --data-dir with the folder that holds AudioMNIST/")
    train, test, labels = [], [], {}
    for f in sorted(folder.glob('*/*.wav')):
        m = re.fullmatch(r'(\d)_(\d\d)_\d+', f.stem)  # <digit>_<speaker>_<repetition>
        if not (m and m[2] == f.parent.name and 1 <= int(m[2]) <= 60):
            raise DataError(f"{f}: expected data/<speaker 01-60>/<digit>_<speaker>_<repetition>.wav: "
                            f"is {data_dir / 'AudioMNIST'} a clone of {AUDIO_MNIST_REPO}?")
        (test if int(m[2]) in AUDIO_MNIST_TEST_SPEAKERS else train).append(f)
        labels[f] = int(m[1])
    for name, split in (('train', train), ('test', test)):
        if not split:
            raise DataError(f"{folder}: no wav file of the {name} speakers: is it a complete clone of "
                            f"{AUDIO_MNIST_REPO}?")
    return speech_splits(train, test, [labels[f] for f in train + test], 48_000, AUDIO_MNIST_MEAN,
                         AUDIO_MNIST_STD, cache=data_dir / 'AudioMNIST.logmel.npy',
                         fix=f"restore it with 'git checkout' in {data_dir / 'AudioMNIST'}, or clone it again")


AUDIO_MNIST = Domain(name='audio_mnist', input_shape=(1, 224, 224), patch_size=(16, 16), vocab_size=0, num_classes=10,
                     batch_size=64, mask_ratio=0.5, load=load_audio_mnist, to_input=as_float32)

# -----------------------------------------------------------------------------
# LibriSpeech: read English audiobooks, 16 kHz, each utterance's speaker known.
# Source: openslr.org/12 (CC BY 4.0): train-clean-100, train-clean-360 and train-other-500 (the 960 h: 281,241
# utterances, 2,338 speakers) and dev-clean (2,703 utterances, 40 speakers). The archives hold FLAC, which the
# standard library cannot decode, so there is no download: the user extracts them in data_dir and converts the
# FLAC once to 16-bit WAV beside each file (docs/domains.md, "Formats that need a one-time conversion"); a FLAC whose
# WAV is missing stops the load with that command.
# Format: LibriSpeech/<split>/<speaker>/<chapter>/<speaker>-<chapter>-<utterance>.wav (next to the .flac and
# the .trans.txt), each split's files in the order of their stems (a string sort), as torchaudio's walker
# lists them for DABS. Log-mels as the other speech domains, with DABS's LibriSpeech mean and std.
# librispeech (pretraining; labels not used): every utterance of the training splits present, in DABS's order
# (train-clean-100, -360, other-500), and no test split. DABS uses all three; fewer are allowed (e.g.
# train-clean-100 alone, 28,539 utterances), and the run says which are missing.
# librispeech_transfer: dev-clean; label = rank of the speaker id (a number) among dev-clean's speakers. Split
# per speaker exactly as DABS: one RandomState(42); for each speaker in increasing id order, that speaker's
# files (in the walker's order) are shuffled, the first int(0.8 n) go to train and the rest to test. Rows are
# in that order (speaker by speaker).
# Cache: LibriSpeech.<splits>.logmel.npy beside the folder (the name says which splits it holds; 28 GB and
# about an hour of CPU, 10 ms a clip, for the 960 h), LibriSpeech.dev-clean.logmel.npy (270 MB).

LIBRISPEECH_URL = 'http://www.openslr.org/resources/12/'
LIBRISPEECH_TRAIN = ('train-clean-100', 'train-clean-360', 'train-other-500')
LIBRISPEECH_DEV = 'dev-clean'
LIBRISPEECH_SPEAKERS = 40  # dev-clean's: the classes of librispeech_transfer
LIBRISPEECH_MEAN, LIBRISPEECH_STD = -22.924, 12.587
LIBRISPEECH_FIX = "decode it again from the .flac beside it: flac -d -s -f -o <name>.wav <name>.flac"  # for read_wav


def librispeech_convert(folder: Path) -> str:
    """The one-time FLAC -> WAV conversion of docs/domains.md, as one shell command over `folder`."""
    return f"find {folder} -name '*.flac' -exec sh -c 'flac -d -s -f -o \"${{1%.flac}}.wav\" \"$1\"' _ {{}} \\;"


def librispeech_missing(data_dir: Path, splits) -> DataError:
    root = data_dir / 'LibriSpeech'
    return DataError(
        f"{' and '.join(f'{s}/' for s in splits)} not found in {root}: LibriSpeech is FLAC, which this project "
        f"cannot decode, so there is no download: get {', '.join(f'{s}.tar.gz' for s in splits)} from "
        f"{LIBRISPEECH_URL}, extract them in {data_dir} (they unpack to LibriSpeech/<split>/), then convert the "
        f"FLAC to WAV once: {librispeech_convert(root)}; or pass --data-dir with the folder that holds LibriSpeech/")


def librispeech_files(folder: Path) -> list:
    """The WAV files of one split folder, sorted by stem as torchaudio's walker sorts them."""
    flac = sorted(folder.glob('*/*/*.flac'))
    unconverted = [f for f in flac if not f.with_suffix('.wav').is_file()]
    if unconverted:
        raise DataError(f"{unconverted[0]} has no .wav beside it ({len(unconverted)} of {len(flac)} FLAC files in "
                        f"{folder} are not converted), and the loader reads WAV: convert them once: "
                        f"{librispeech_convert(folder)}")
    files = sorted(folder.glob('*/*/*.wav'), key=lambda f: f.stem)
    for f in files:
        m = re.fullmatch(r'(\d+)-(\d+)-\d+', f.stem)
        if not (m and m[1] == f.parent.parent.name and m[2] == f.parent.name):
            raise DataError(f"{f}: expected <speaker>/<chapter>/<speaker>-<chapter>-<utterance>.wav: is {folder} "
                            f"a LibriSpeech split extracted from {LIBRISPEECH_URL}?")
    if not files:
        raise DataError(f"{folder} holds no <speaker>/<chapter>/*.wav or *.flac file: extract its archive from "
                        f"{LIBRISPEECH_URL} again")
    return files


def load_librispeech(data_dir: Path, download: bool) -> Splits:
    # `download` is unused: the archives are FLAC (see the header)
    root = data_dir / 'LibriSpeech'
    present = [s for s in LIBRISPEECH_TRAIN if (root / s).is_dir()]
    if not present:
        raise librispeech_missing(data_dir, LIBRISPEECH_TRAIN)
    if len(present) < len(LIBRISPEECH_TRAIN):
        print(f"librispeech: pretraining on {' + '.join(present)} only; "
              f"{', '.join(s for s in LIBRISPEECH_TRAIN if s not in present)} not found in {root}")
    files = [f for s in present for f in librispeech_files(root / s)]
    s = speech_splits(files, [], [0] * len(files), 16_000, LIBRISPEECH_MEAN, LIBRISPEECH_STD,
                      cache=data_dir / f"LibriSpeech.{'+'.join(present)}.logmel.npy",
                      fix=LIBRISPEECH_FIX)
    return label_free(s.train_x)


def librispeech_transfer_split(speakers: np.ndarray) -> tuple[list, list]:
    """DABS's per-speaker split of dev-clean: speakers[i] is file i's speaker id -> (train, test) file indices."""
    rs = np.random.RandomState(42)
    train, test = [], []
    for speaker in np.unique(speakers):  # sorted
        idx = np.flatnonzero(speakers == speaker)
        rs.shuffle(idx)
        n_train = int(0.8 * len(idx))
        train += idx[:n_train].tolist()
        test += idx[n_train:].tolist()
    return train, test


def load_librispeech_transfer(data_dir: Path, download: bool) -> Splits:
    folder = data_dir / 'LibriSpeech' / LIBRISPEECH_DEV
    if not folder.is_dir():
        raise librispeech_missing(data_dir, [LIBRISPEECH_DEV])
    files = librispeech_files(folder)
    speakers = np.array([int(f.parent.parent.name) for f in files])
    ids = np.unique(speakers)
    if len(ids) > LIBRISPEECH_SPEAKERS:
        raise DataError(f"{folder} has {len(ids)} speakers, but dev-clean has {LIBRISPEECH_SPEAKERS}: is it "
                        f"another split? Extract dev-clean.tar.gz from {LIBRISPEECH_URL} again")
    train, test = librispeech_transfer_split(speakers)
    if not train:
        raise DataError(f"{folder}: no speaker has 2 utterances, so the train split is empty: extract "
                        f"dev-clean.tar.gz from {LIBRISPEECH_URL} again")
    labels = np.searchsorted(ids, speakers)  # rank of the speaker id
    return speech_splits([files[i] for i in train], [files[i] for i in test], labels[train + test].tolist(),
                         16_000, LIBRISPEECH_MEAN, LIBRISPEECH_STD, cache=data_dir / 'LibriSpeech.dev-clean.logmel.npy',
                         fix=LIBRISPEECH_FIX)


LIBRISPEECH = Domain(name='librispeech', input_shape=(1, 224, 224), patch_size=(16, 16), vocab_size=0, num_classes=0,
                     batch_size=64, mask_ratio=0.5, load=load_librispeech, to_input=as_float32,
                     transfer=('librispeech_transfer',))
LIBRISPEECH_TRANSFER = Domain(name='librispeech_transfer', input_shape=(1, 224, 224), patch_size=(16, 16),
                              vocab_size=0, num_classes=LIBRISPEECH_SPEAKERS, batch_size=64, mask_ratio=0.5,
                              load=load_librispeech_transfer, to_input=as_float32)

# -----------------------------------------------------------------------------
# PAMAP2: 9 subjects wearing 3 IMUs and a heart-rate monitor, 100 Hz.
# Source: UCI #231, a zip with no published checksum (the parser checks every row), extracted to PAMAP2_Dataset/.
# Format: Protocol/subject1NN.dat, space-separated text with 54 columns (timestamp, activity ID, heart rate,
# 3 IMUs x 17) and NaN where a value is missing. As DABS: each column's NaNs are interpolated over the whole
# file as pandas' DataFrame.interpolate() does, and the input is columns 2: (heart rate + 51 IMU columns,
# raw, the invalid orientation columns included) = 52 channels. The 12 activities of MetaMAE: DABS's 11 +
# 17 (ironing). DABS draws 320-step windows at random from all rows of an activity; a fixed dataset needs
# fixed windows: here every contiguous run of one activity is cut into consecutive, non-overlapping 320-step
# windows from its start (the rest of the run is dropped), and a window that still holds a NaN (the NaNs
# before a column's first value stay NaN) is dropped. Model input (52, 320), channels first as MetaMAE;
# patches of 5.
# Split: by subject: train 101-104 and 107-109, test 105 + 106 (MetaMAE; DABS validates on 105 alone).

PAMAP2_URL = 'https://archive.ics.uci.edu/ml/machine-learning-databases/00231/PAMAP2_Dataset.zip'
PAMAP2_ACTIVITIES = [1, 2, 3, 4, 5, 6, 7, 12, 13, 16, 17, 24]  # label = index
PAMAP2_UNUSED_ACTIVITIES = {0, 9, 10, 11, 18, 19, 20}  # 0 = transient; the rest are optional activities
PAMAP2_TRAIN_SUBJECTS, PAMAP2_TEST_SUBJECTS = (101, 102, 103, 104, 107, 108, 109), (105, 106)
PAMAP2_WINDOW = 320


def interpolate_nans(a: np.ndarray) -> np.ndarray:
    """Fill each column's NaNs in place as pandas' DataFrame.interpolate(): linearly in the row number,
    NaNs before the first value kept, NaNs after the last value given the last value."""
    rows = np.arange(len(a))
    for col in a.T:  # each a view into a
        ok = ~np.isnan(col)
        if ok.any() and not ok.all():
            first = ok.argmax()
            col[:] = np.interp(rows, rows[ok], col[ok])
            col[:first] = np.nan
    return a


def quiet_loadtxt(source, **kwargs) -> np.ndarray:
    """np.loadtxt, without its warning about a file of no rows, which the callers refuse in one line themselves."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', 'loadtxt: input contained no data', UserWarning)
        return np.loadtxt(source, **kwargs)


def read_pamap2(path: Path):
    """A Protocol/subject1NN.dat file -> (windows float32 (N, 52, 320), labels int64 (N,))."""
    fix = "delete the PAMAP2_Dataset folder and download it again"
    try:
        with open(path, 'rb'):  # missing, a folder, a loop, no permission: each said as such
            pass
        a = quiet_loadtxt(path, dtype=np.float64, ndmin=2)
    except OSError as e:
        raise file_error(path, e, fix) from None
    except ValueError as e:  # a row with another number of columns, or a value that is no number
        raise DataError(f"{path} is not a PAMAP2 .dat file ({one_line(e)}): {fix}") from None
    if not a.size:
        raise DataError(f"{path} is empty: {fix}")
    if a.shape[1] != 54:
        raise DataError(f"{path} has {a.shape[1]} columns, expected 54: {fix}")
    activity = a[:, 1]
    unknown = set(activity.tolist()) - set(PAMAP2_ACTIVITIES) - PAMAP2_UNUSED_ACTIVITIES
    if unknown:
        raise DataError(f"{path}: unknown activity ID {min(unknown):g}: {fix}")
    a = interpolate_nans(a)
    x, y = [], []
    starts = np.flatnonzero(np.diff(activity, prepend=-1))  # where each run of one activity begins
    for start, end in zip(starts, [*starts[1:], len(a)]):
        if activity[start] in PAMAP2_ACTIVITIES:
            for t in range(start, end - PAMAP2_WINDOW + 1, PAMAP2_WINDOW):
                window = a[t:t + PAMAP2_WINDOW, 2:].T  # (52, 320)
                if not np.isnan(window).any():
                    x.append(window)
                    y.append(PAMAP2_ACTIVITIES.index(activity[start]))
    return np.array(x, np.float32).reshape(-1, 52, PAMAP2_WINDOW), np.array(y, np.int64)


def load_pamap2(data_dir: Path, download: bool) -> Splits:
    folder = fetch_and_extract(PAMAP2_URL, 'PAMAP2_Dataset.zip', None, None, download, data_dir / 'PAMAP2_Dataset')

    def subjects(ids):
        parts = [read_pamap2(folder / 'Protocol' / f'subject{i}.dat') for i in ids]
        x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        if not len(x):
            raise DataError(f"{folder / 'Protocol'}: subjects {ids} have no {PAMAP2_WINDOW}-step run of any of the "
                            f"activities {PAMAP2_ACTIVITIES}: delete {folder} and download it again")
        return torch.from_numpy(x), torch.from_numpy(y)
    return Splits(*subjects(PAMAP2_TRAIN_SUBJECTS), *subjects(PAMAP2_TEST_SUBJECTS))


PAMAP2 = Domain(name='pamap2', input_shape=(52, PAMAP2_WINDOW), patch_size=(5,), vocab_size=0, num_classes=12,
                batch_size=256, mask_ratio=0.85, load=load_pamap2, to_input=as_float32)

# -----------------------------------------------------------------------------
# HIGGS: 11,000,000 simulated collisions, signal (1) or background (0), from 28 kinematic features (21
# low-level, 7 derived).
# Source: UCI #280, HIGGS.csv.gz (sha256 published), used as it is.
# Format: no header; label, then the features. One token per feature (the model embeds each scalar), raw
# values as DABS, in the file's column order (DABS has TFDS's alphabetical order; only the position
# embedding tells features apart, so this matters only for exchanging weights).
# Split: seeded_split, as DABS splits tables (DABS permutes TFDS's order, which needs TFDS to reproduce,
# so the rows differ).
# Cache: parsing the 8 GB of text takes minutes, so the rows are cached once in HIGGS.npy (1.3 GB) in the
# split's order, train rows first: each split is then a slice of the memory-mapped file.

HIGGS_URL = 'https://archive.ics.uci.edu/ml/machine-learning-databases/00280/HIGGS.csv.gz'
HIGGS_SIZE = 2_816_407_858
HIGGS_SHA256 = 'ea302c18164d4e3d916a1e2e83a9a8d07069fa6ebc7771e4c0540d54e593b698'


def read_higgs(path: Path) -> np.ndarray:
    """HIGGS.csv.gz -> float32 (N, 29): the label, then the 28 features."""
    fix = "delete it and download it again"
    try:
        with gzip.open(path, 'rt') as f:
            a = np.loadtxt(f, delimiter=',', dtype=np.float32, ndmin=2)
    except (ValueError, EOFError, OSError, zlib.error) as e:  # a bad row; a truncated or corrupt gzip
        raise DataError(f"{path} is not the HIGGS csv.gz ({one_line(e)}): {fix}") from None
    if a.shape[1] != 29:
        raise DataError(f"{path} has {a.shape[1]} columns, expected 29 (label + 28 features): {fix}")
    if not np.isin(a[:, 0], (0, 1)).all():
        raise DataError(f"{path}: unknown label {a[~np.isin(a[:, 0], (0, 1)), 0][0]:g} (expected 0 or 1): {fix}")
    return a


def load_higgs(data_dir: Path, download: bool) -> Splits:
    cache = data_dir / 'HIGGS.npy'

    def parse():
        archive = fetch_archive(HIGGS_URL, data_dir / 'HIGGS.csv.gz', HIGGS_SIZE, HIGGS_SHA256, download, None)
        a = read_higgs(archive)
        yield (a[np.concatenate(seeded_split(len(a), archive))],)

    a, = cached_arrays({cache: (np.float32, (29,))}, parse, sources=[data_dir / 'HIGGS.csv.gz'])
    if not np.isin(a[:, 0], (0, 1)).all():  # the cache, not the csv (checked when parsed): 0.5 would read as 0
        raise DataError(f"{cache} holds a label other than 0 or 1: it is damaged; delete it and run again to rebuild it")
    n_train = len(seeded_split(len(a), cache)[0])  # the cache holds the train rows, then the test rows
    a = torch.from_numpy(a)
    return split_rows(a[:, 1:], a[:, 0].long(), n_train)


HIGGS = Domain(name='higgs', input_shape=(28,), patch_size=(), vocab_size=0, num_classes=2,
               batch_size=256, mask_ratio=0.5, load=load_higgs, to_input=as_float32)

# -----------------------------------------------------------------------------
# Genomics OOD (Ren et al. 2019): 250-base bacterial DNA fragments labelled with their genus.
# Source: the TFDS zip, with no published checksum (the parser checks every row), read as it is.
# Format: tab-separated text files with a header (seq, label, seq_info, domain); before_2011_in_tr.txt is
# the in-distribution training set, 1,000,000 fragments of 10 genera, which DABS pretrains on.
# Tokens A C G T = 0 1 2 3.
# Split: seeded_split, as DABS.

GENOMICS_URL = 'https://storage.googleapis.com/tfds-data/downloads/genomics_ood/genomics_ood.zip'
GENOMICS_GENERA = ['Bacillus', 'Burkholderia', 'Clostridium', 'Escherichia', 'Mycobacterium', 'Pseudomonas',
                   'Salmonella', 'Staphylococcus', 'Streptococcus', 'Yersinia']  # TFDS's labels 0-9
GENOMICS_LENGTH = 250



def _tokenize(text: bytes, alphabet: str, width: int, what: str, first: int = 0) -> np.ndarray:
    """Concatenated sequences of `width` letters -> uint8 (N, width) token ids (index in `alphabet`).
    `first`: the number of the first sequence, for messages."""
    table = np.full(256, 255, np.uint8)
    table[np.frombuffer(alphabet.encode(), np.uint8)] = np.arange(len(alphabet))
    ids = table[np.frombuffer(text, np.uint8)]
    bad = np.flatnonzero(ids == 255)
    if len(bad):
        raise DataError(f"{what}: sequence {first + bad[0] // width} has the letter {chr(text[bad[0]])!r}, which is "
                        f"not one of {alphabet}: the file is not the expected dataset; delete it and download it again")
    return ids.reshape(-1, width)

def read_genomics(archive: Path, member: str = 'before_2011_in_tr.txt'):
    """The TSV `member` of the genomics_ood zip -> (tokens uint8 (N, 250), labels int64 (N,))."""
    fix = "delete it and download it again"
    genus = {g: i for i, g in enumerate(GENOMICS_GENERA)}
    seqs, labels = [], []
    try:
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n.rsplit('/', 1)[-1] == member]
            if not names:
                raise DataError(f"{archive} holds no {member}: it is not the genomics_ood zip; {fix}")
            with z.open(names[0]) as raw:
                rows = csv.DictReader(io.TextIOWrapper(raw, 'utf-8', newline=''), delimiter='\t')
                if not {'seq', 'label'} <= set(rows.fieldnames or ()):
                    raise DataError(f"{archive}: {member} has no 'seq' and 'label' columns: {fix}")
                for line, row in enumerate(rows, start=2):
                    if row['label'] not in genus:
                        raise DataError(f"{archive}: {member} line {line}: unknown label {row['label']!r}, expected "
                                        f"one of the 10 in-distribution genera: {fix}")
                    if len(row['seq'] or '') != GENOMICS_LENGTH:
                        raise DataError(f"{archive}: {member} line {line}: sequence of {len(row['seq'] or '')} "
                                        f"bases, expected {GENOMICS_LENGTH}: {fix}")
                    seqs.append(row['seq'])
                    labels.append(genus[row['label']])
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{archive} is not a readable zip of text files ({one_line(e)}): {fix}") from None
    text = ''.join(seqs).encode('ascii', 'replace')
    return _tokenize(text, 'ACGT', GENOMICS_LENGTH, f"{archive}: {member}"), np.array(labels, np.int64)


def load_genomics(data_dir: Path, download: bool) -> Splits:
    archive = fetch_archive(GENOMICS_URL, data_dir / 'genomics_ood.zip', None, None, download, None)
    x, y = read_genomics(archive)
    train, test = seeded_split(len(x), archive)
    return Splits(*(torch.from_numpy(a) for a in (x[train], y[train], x[test], y[test])))


GENOMICS = Domain(name='genomics', input_shape=(GENOMICS_LENGTH,), patch_size=(), vocab_size=4, num_classes=10,
                  batch_size=32, mask_ratio=0.5, load=load_genomics, to_input=as_token_ids)

# -----------------------------------------------------------------------------
# proteins, shared by Pfam and SCOP: TAPE's raw JSON, each file one JSON array of records with an amino-acid
# string 'primary' and the label. Sequences are cut to 128 and right-padded with X; tokens = index in
# XARNDCQEGHILKMFPSTWYVUOBZJ (X = 0 is also the padding), vocab 26, as DABS. TAPE publishes no checksum:
# the parser checks every record.

AMINO_ACIDS = 'XARNDCQEGHILKMFPSTWYVUOBZJ'
PROTEIN_LENGTH = 128



def iter_json_array(path: Path, chunk_chars: int = 1 << 22):
    """Yield the elements of the JSON array in `path` one at a time, never holding the whole file.

    json.JSONDecoder.raw_decode parses one element from a buffer of `chunk_chars` characters. An element
    cut by the buffer's end fails to parse and is tried again with the next chunk appended; a margin
    of unread text is kept ahead so that no number can be cut short and still parse."""
    decoder = json.JSONDecoder()
    fix = "the file is not the expected dataset or is truncated: delete it and download it again"
    try:
        yield from _json_elements(path, chunk_chars, decoder, fix)
    except OSError as e:  # missing (an archive whose folder had another name), a folder, a loop, no permission
        fix = f"delete {path.parent} and download the dataset again"
        raise file_error(path, e, fix) from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}): {fix}") from None


def _json_elements(path: Path, chunk_chars: int, decoder, fix: str):
    with open(path, encoding='utf-8') as f:
        buf, pos, n, expect, eof = '', 0, 0, '[', False  # expect: '[', 'element', or ',' (or ']')

        def read_more():
            nonlocal buf, pos, eof
            if len(buf) - pos > 1 << 28:  # a syntax error must not read the whole file into memory
                raise DataError(f"{path}: element {n} is over 256 MB, so it is no dataset record: {fix}")
            more = f.read(chunk_chars)
            buf, pos, eof = buf[pos:] + more, 0, not more

        while True:
            if len(buf) - pos < 1 << 16 and not eof:
                read_more()
                continue
            while pos < len(buf) and buf[pos] in ' \t\r\n':
                pos += 1
            if pos == len(buf):
                if eof:
                    raise DataError(f"{path}: the JSON array ends early, after {n} elements: {fix}")
            elif expect == '[' and buf[pos] == '[':
                pos, expect = pos + 1, 'element'
            elif buf[pos] == ']' and (expect == ',' or expect == 'element' and n == 0):
                rest = buf[pos + 1:]
                while rest:  # nothing may follow the array but white space
                    if rest.strip():
                        raise DataError(f"{path}: text after the JSON array's end ({rest.strip()[:20]!r}): {fix}")
                    rest = f.read(chunk_chars)
                return
            elif expect == ',' and buf[pos] == ',':
                pos, expect = pos + 1, 'element'
            elif expect == 'element':
                try:
                    obj, pos = decoder.raw_decode(buf, pos)
                except RecursionError:  # arrays in arrays, deeper than Python's stack
                    raise DataError(f"{path}: element {n} nests deeper than any record ({sys.getrecursionlimit()} "
                                    f"levels): {fix}") from None
                except json.JSONDecodeError:
                    if eof:
                        raise DataError(f"{path}: element {n} is not valid JSON: {fix}") from None
                    read_more()
                    continue
                yield obj
                n, expect = n + 1, ','
            else:
                raise DataError(f"{path}: expected {expect!r} after element {n}, found {buf[pos]!r}: {fix}")

def protein_chunks(path: Path, label_key: str, size: int = 1 << 16):
    """Yield (tokens uint8 (n, 128), labels int64 (n,)) chunks of a TAPE JSON file, never holding the whole file."""
    def chunk(seqs, labels, start):  # start: the number of the chunk's first record, for messages
        text = ''.join(seqs).encode('ascii', 'replace')
        return _tokenize(text, AMINO_ACIDS, PROTEIN_LENGTH, f"{path}", start), np.array(labels, np.int64)

    seqs, labels, start = [], [], 0
    for i, r in enumerate(iter_json_array(path)):
        seq, label = (r.get('primary'), r.get(label_key)) if isinstance(r, dict) else (None, None)
        if not isinstance(seq, str) or not isinstance(label, int) or isinstance(label, bool):
            raise DataError(f"{path}: element {i} is not a record with a 'primary' string and an integer "
                            f"{label_key!r}: delete it and download the dataset again")
        if not -2**63 <= label < 2**63:  # no label of a dataset, and no int64 holds it
            raise DataError(f"{path}: element {i} has the {label_key} {label}, beyond any label (a 64-bit integer): "
                            "delete it and download the dataset again")
        seqs.append(seq[:PROTEIN_LENGTH].ljust(PROTEIN_LENGTH, 'X'))
        labels.append(label)
        if len(seqs) == size:
            yield chunk(seqs, labels, start)
            seqs, labels, start = [], [], i + 1
    if start + len(seqs) == 0:  # raised inside cached_arrays' parse, so no cache of an empty file is written
        raise DataError(f"{path} holds no records: delete it and download the dataset again")
    if seqs:
        yield chunk(seqs, labels, start)


def read_proteins(path: Path, label_key: str):
    """A small TAPE JSON file -> (tokens uint8 (N, 128), labels int64 (N,)), in memory."""
    chunks = list(protein_chunks(path, label_key))
    return np.concatenate([x for x, _ in chunks]), np.concatenate([y for _, y in chunks])

# -----------------------------------------------------------------------------
# Pfam: ~32M protein domains labelled with their clan.
# Source: TAPE's pfam.tar.gz, extracted to pfam/.
# Format: pfam_train.json (tens of GB) and pfam_valid.json, records with 'primary' and 'clan'. Label = rank
# of the clan among pfam_train's clans (623), as DABS; a transfer record whose clan pfam_train lacks is an error.
# pfam (pretraining; labels not used): all of pfam_train, no test split, as DABS.
# pfam_transfer: DABS's carve-out of pfam_valid: its seed-42 permutation (DABS's df.sample(frac=1,
# random_state=42)), whose last 200,000 rows (pandas' tail(200000): all of them for a smaller file, such as a
# test fixture) are the transfer set, cut in order (no second shuffle) into the first ceil(90%) = 180,000 train
# and the remaining 20,000 test rows. The rest of pfam_valid is DABS's pretraining validation, unused here.
# Cache: each JSON file is streamed once into <name>.tokens.npy and <name>.clans.npy beside it (4 GB of
# tokens for train); pfam_transfer reads pfam_train's for the clan list.

PFAM_URL = 'http://s3.amazonaws.com/songlabdata/proteindata/data_raw_pytorch/pfam.tar.gz'
PFAM_CLANS = 623
PFAM_TRANSFER_RECORDS = 200_000  # the tail of the permuted pfam_valid that DABS transfers to


def pfam_parsed(path: Path) -> list:
    """A TAPE Pfam JSON file -> [tokens uint8 (N, 128), clan ids int64 (N,)], cached beside it."""
    return cached_arrays({path.with_suffix('.tokens.npy'): (np.uint8, (PROTEIN_LENGTH,)),
                          path.with_suffix('.clans.npy'): (np.int64, ())}, lambda: protein_chunks(path, 'clan'),
                         sources=[path])


def pfam_transfer_split(n: int, what) -> tuple[np.ndarray, np.ndarray]:
    """DABS's pfam_transfer rows of a pfam_valid of n records -> (train, test) row indices, in order."""
    perm = np.random.RandomState(42).permutation(n)
    transfer = perm[n - min(PFAM_TRANSFER_RECORDS, n):]  # pandas' tail(200000)
    n_train = math.ceil(0.9 * len(transfer))  # DABS's head(ceil(0.9 m)) / tail(floor(0.1 m))
    if len(transfer) - n_train < 1:
        raise DataError(f"{what}: {n} records leave none for the test split: delete it and download it again")
    return transfer[:n_train], transfer[n_train:]


def load_pfam(data_dir: Path, download: bool) -> Splits:
    folder = fetch_and_extract(PFAM_URL, 'pfam.tar.gz', None, None, download, data_dir / 'pfam')
    x, _ = pfam_parsed(folder / 'pfam_train.json')
    return label_free(torch.from_numpy(x))


def load_pfam_transfer(data_dir: Path, download: bool) -> Splits:
    folder = fetch_and_extract(PFAM_URL, 'pfam.tar.gz', None, None, download, data_dir / 'pfam')
    clans = np.unique(pfam_parsed(folder / 'pfam_train.json')[1])  # sorted: label = rank, as DABS
    if len(clans) > PFAM_CLANS:
        raise DataError(f"{folder / 'pfam_train.json'} has {len(clans)} clans, expected {PFAM_CLANS}: "
                        f"delete {folder} and download it again")
    x, c = pfam_parsed(folder / 'pfam_valid.json')
    train, test = pfam_transfer_split(len(x), folder / 'pfam_valid.json')
    rows = np.concatenate([train, test])
    c = c[rows]
    y = np.searchsorted(clans, c)
    unknown = c[clans[np.minimum(y, len(clans) - 1)] != c]
    if len(unknown):
        raise DataError(f"{folder / 'pfam_valid.json'}: unknown clan {unknown[0]}, which pfam_train.json does not "
                        f"have: delete {folder} and download it again")
    x = torch.from_numpy(x[rows])
    y = torch.from_numpy(y)
    return split_rows(x, y, len(train))


PFAM = Domain(name='pfam', input_shape=(PROTEIN_LENGTH,), patch_size=(), vocab_size=len(AMINO_ACIDS),
              num_classes=0, batch_size=128, mask_ratio=0.5, load=load_pfam, to_input=as_token_ids,
              transfer=('pfam_transfer',))
PFAM_TRANSFER = dataclasses.replace(PFAM, name='pfam_transfer', num_classes=PFAM_CLANS, load=load_pfam_transfer,
                                    transfer=())

# -----------------------------------------------------------------------------
# SCOP (TAPE remote homology): proteins labelled with their fold, 'fold_label' (1195 folds).
# Source: TAPE's remote_homology.tar.gz, extracted to remote_homology/.
# Format: remote_homology_{train,valid}.json, small enough to read in memory.
# Split: train = train, test = valid, as DABS.

SCOP_URL = 'http://s3.amazonaws.com/songlabdata/proteindata/data_raw_pytorch/remote_homology.tar.gz'
SCOP_FOLDS = 1195


def load_scop(data_dir: Path, download: bool) -> Splits:
    folder = fetch_and_extract(SCOP_URL, 'remote_homology.tar.gz', None, None, download, data_dir / 'remote_homology')
    splits = []
    for name in ('remote_homology_train.json', 'remote_homology_valid.json'):
        x, y = read_proteins(folder / name, 'fold_label')
        bad = y[(y < 0) | (y >= SCOP_FOLDS)]
        if len(bad):
            raise DataError(f"{folder / name}: unknown fold_label {bad[0]}, expected 0..{SCOP_FOLDS - 1}: "
                            f"delete {folder} and download it again")
        splits += [torch.from_numpy(x), torch.from_numpy(y)]
    return Splits(*splits)


SCOP = Domain(name='scop', input_shape=(PROTEIN_LENGTH,), patch_size=(), vocab_size=len(AMINO_ACIDS),
              num_classes=SCOP_FOLDS, batch_size=128, mask_ratio=0.5, load=load_scop, to_input=as_token_ids)

# -----------------------------------------------------------------------------
# WM-811K wafer maps (Wu et al. 2015): 811,457 maps of the dies on a wafer (0 = off the wafer, 1 = pass, 2 =
# fail), of many sizes; 172,950 are labelled with a failure pattern (147,431 of them 'none'), 638,507 are not.
# Source: MIR-WM811K.zip from mirlab.org (no published checksum). Its pandas pickle and MATLAB v7.3 file need
# pandas or HDF5, so there is no download: the user converts the pickle once into wafer.npz in data_dir
# (docs/domains.md, "Formats that need a one-time conversion"): `maps` (uint8, every map flattened, concatenated),
# `shapes` (N, 2), `offsets` (N,) into `maps`, and int16 `label` (N,): -1 unlabelled, else the index in
# WAFER_CLASSES (DABS's codes). Every array is checked when the cache is built.
# Preprocessing as DABS: pixel = int(value * 127.5), so 0, 127, 255; 3 identical channels; torchvision's
# Resize((32, 32)), i.e. PIL's bilinear resize with antialiasing, reproduced bit for bit (pil_resize: PIL's
# fixed-point weights, width first, rounded to 8 bits between the passes; checked equal to Pillow 9.5 on maps
# of many sizes; F.interpolate(antialias=True) is 1 off on ~2% of pixels, and so is Pillow 13 on some maps, as
# it may run the height pass first). Stored uint8 (N, 3, 32, 32) and fed in [0, 1], as CIFAR; patches 4x4.
# Split as DABS, in the file's row order (DABS uses the .mat file's order; that the pickle's is the same is
# assumed, not checked): the unlabelled maps and the labelled maps each get seeded_split (the seed-42
# permutation, ceil(90%) train): 574,657 / 63,850 and 155,655 / 17,295 maps.
# wafer (pretraining; labels not used): the 574,657 train maps of the unlabelled set, which DABS pretrains on
# (its 63,850 validation maps are not used). wafer_transfer: the labelled maps, 9 classes ('none' = 0), scored
# with weighted F1 as DABS and MetaMAE.
# Cache: the resized maps of each, in split order, as wafer.unlabelled.32x32.npy (1.8 GB) and
# wafer.labelled.32x32.npy (530 MB) beside the .npz; the labels are read from the .npz each time (1.6 MB).

WAFER_URL = 'http://mirlab.org/dataSet/public/MIR-WM811K.zip'
WAFER_CLASSES = ['none', 'random', 'donut', 'scratch', 'center', 'loc', 'edge-loc', 'edge-ring', 'near-full']
WAFER_PIXELS = np.array([0, 127, 255], np.uint8)  # int(value * 127.5) for the values 0, 1, 2, as DABS
WAFER_SIZE = 32
WAFER_REDO = "re-run the conversion that writes it (docs/domains.md, 'Formats that need a one-time conversion')"


def wafer_npz(path: Path, keys: tuple) -> list:
    """The arrays `keys` of the converted wafer.npz (only those are read)."""
    if not path.is_file():
        raise DataError(f"{path} not found: WM-811K ships as a pandas pickle and a MATLAB v7.3 file, which this "
                        f"project cannot read, so there is no download: get MIR-WM811K.zip from {WAFER_URL} and "
                        f"convert MIR-WM811K/Python/WM811K.pkl once into {path.name} in {path.parent} as docs/domains.md "
                        f"shows ('Formats that need a one-time conversion'); or pass --data-dir with the folder "
                        f"that holds {path.name}")
    try:
        z = np.load(path)  # allow_pickle=False: arrays only
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise DataError(f"{path} is a single array, not the .npz of arrays {', '.join(keys)}: {WAFER_REDO}")
        with z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise DataError(f"{path} has no array {missing[0]!r} (it has {', '.join(z.files) or 'none'}): "
                                f"{WAFER_REDO}")
            return [z[k] for k in keys]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is truncated or no .npz ({one_line(e)}): {WAFER_REDO}") from None


def _wafer_ints(path: Path, name: str, a: np.ndarray, shape: tuple, lo: int, hi: int) -> np.ndarray:
    """Check that array `name` has `shape` (None: any length) and integer values in lo..hi; returns it."""
    if a.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, a.shape)) or \
            (a.size and a.dtype.kind not in 'iu'):
        want = ', '.join('N' if s is None else str(s) for s in shape) + (',' if len(shape) == 1 else '')
        raise DataError(f"{path}: '{name}' is {a.dtype} {a.shape}, expected integers of shape ({want}): {WAFER_REDO}")
    if a.size and (a.min() < lo or a.max() > hi):
        raise DataError(f"{path}: '{name}' holds {a.min() if a.min() < lo else a.max()}, expected {lo}..{hi}: "
                        f"{WAFER_REDO}")
    return a


def wafer_labels(path: Path) -> np.ndarray:
    """The .npz's labels, int64 (N,): -1 unlabelled, else 0..8."""
    label, = wafer_npz(path, ('label',))
    label = _wafer_ints(path, 'label', label, (None,), -1, len(WAFER_CLASSES) - 1).astype(np.int64)
    if not len(label):
        raise DataError(f"{path} holds no map: {WAFER_REDO}")
    return label


def read_wafer(path: Path):
    """The .npz, every array checked -> (maps uint8 (M,), shapes int64 (N, 2), offsets int64 (N,))."""
    maps, shapes, offsets, label = wafer_npz(path, ('maps', 'shapes', 'offsets', 'label'))
    n = len(label)
    shapes = _wafer_ints(path, 'shapes', shapes, (n, 2), 1, 1 << 20).astype(np.int64)
    offsets = _wafer_ints(path, 'offsets', offsets, (n,), 0, 1 << 62).astype(np.int64)
    maps = _wafer_ints(path, 'maps', maps, (None,), 0, 2).astype(np.uint8, copy=False)
    sizes = shapes[:, 0] * shapes[:, 1]
    if len(maps) != sizes.sum():
        raise DataError(f"{path}: 'maps' has {len(maps):,} values, but 'shapes' makes {sizes.sum():,}: {WAFER_REDO}")
    bad = np.flatnonzero(offsets != np.cumsum(sizes) - sizes)
    if len(bad):
        raise DataError(f"{path}: 'offsets' of map {bad[0]} is {offsets[bad[0]]}, but the maps before it (by "
                        f"'shapes') end at {(np.cumsum(sizes) - sizes)[bad[0]]}: {WAFER_REDO}")
    return maps, shapes, offsets


PIL_BITS = 22  # PIL's fixed-point precision for 8-bit images: 32 - 8 - 2


@functools.lru_cache(maxsize=None)
def pil_bilinear(n_in: int, n_out: int) -> np.ndarray:
    """PIL's bilinear resampling of n_in pixels to n_out, as a float64 (n_out, n_in) matrix of its integer
    fixed-point weights (Pillow's Resample.c: precompute_coeffs, then normalize_coeffs_8bpc).

    The triangle filter is stretched by the scale when shrinking (antialiasing), centred on each output pixel
    at (i + 0.5) * scale (align_corners=False); each row's weights are normalised to sum 1, then rounded to
    multiples of 2**-22. F.interpolate(mode='bilinear', antialias=True) computes the same filter in floating
    point, which differs from PIL by 1 on about 2% of the pixels."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    out = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - stretch + 0.5), 0), min(int(center + stretch + 0.5), n_in)
        w = np.maximum(0, 1 - np.abs((np.arange(lo, hi) - center + 0.5) / stretch))
        out[i, lo:hi] = np.trunc(w / w.sum() * (1 << PIL_BITS) + 0.5)  # weights are >= 0: C's (int)(0.5 + k)
    return out


def pil_resize(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 images (B, H, W) -> uint8 (B, height, width), bit for bit what PIL's Image.resize(..., BILINEAR)
    gives for an 8-bit image: the width first, rounded to 8 bits, then the height, each in fixed point (the
    sums are below 2**53, so exact in float64)."""
    def rounded(a):  # PIL's clip8: (sum + 2**21) >> 22, clipped to 0..255
        return np.clip(np.floor((a + (1 << PIL_BITS - 1)) / (1 << PIL_BITS)), 0, 255)
    x = rounded(x.astype(np.float64) @ pil_bilinear(x.shape[2], width).T)  # (B, H, width)
    return rounded(pil_bilinear(x.shape[1], height) @ x).astype(np.uint8)  # (B, height, width)


def wafer_images(maps: np.ndarray, shapes: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The maps `rows` -> uint8 (len(rows), 3, 32, 32), as DABS's PIL Resize((32, 32)) makes them."""
    out = np.empty((len(rows), WAFER_SIZE, WAFER_SIZE), np.uint8)
    sizes, which = np.unique(shapes[rows], axis=0, return_inverse=True)  # maps of one size are resized together
    for k, (h, w) in enumerate(sizes):
        same = np.flatnonzero(which.reshape(-1) == k)
        for part in np.array_split(same, -(-len(same) * h * w // (1 << 22))):  # <= 4M pixels at a time
            pixels = WAFER_PIXELS[maps[offsets[rows[part], None] + np.arange(h * w)]]
            out[part] = pil_resize(pixels.reshape(-1, h, w), WAFER_SIZE, WAFER_SIZE)
    return np.repeat(out[:, None], 3, axis=1)  # PIL's convert('RGB'): 3 equal channels


def wafer_split(path: Path, labelled: bool):
    """DABS's split of the labelled (or unlabelled) maps -> (train rows, test rows) of the file, labels (N,)."""
    label = wafer_labels(path)
    rows = np.flatnonzero(label >= 0 if labelled else label < 0)
    if len(rows) < 10:
        raise DataError(f"{path} holds {len(rows)} {'labelled' if labelled else 'unlabelled'} maps, too few to split "
                        f"90/10 (the real data has {'172,950' if labelled else '638,507'}): {WAFER_REDO}")
    train, test = seeded_split(len(rows), path)
    return rows[train], rows[test], label


def wafer_cache(path: Path, cache: Path, rows: np.ndarray) -> np.ndarray:
    """The resized maps `rows` of the .npz, cached in that order."""
    def parse(chunk=16_384):
        maps, shapes, offsets = read_wafer(path)
        for i in range(0, len(rows), chunk):
            yield (wafer_images(maps, shapes, offsets, rows[i:i + chunk]),)
    x, = cached_arrays({cache: (np.uint8, (3, WAFER_SIZE, WAFER_SIZE))}, parse, rows=len(rows), sources=[path])
    return x


def load_wafer(data_dir: Path, download: bool) -> Splits:
    # `download` is unused: the source needs a conversion (see the header)
    path = data_dir / 'wafer.npz'
    train, _, _ = wafer_split(path, labelled=False)
    return label_free(torch.from_numpy(wafer_cache(path, data_dir / 'wafer.unlabelled.32x32.npy', train)))


def load_wafer_transfer(data_dir: Path, download: bool) -> Splits:
    path = data_dir / 'wafer.npz'
    train, test, label = wafer_split(path, labelled=True)
    rows = np.concatenate([train, test])
    x = torch.from_numpy(wafer_cache(path, data_dir / 'wafer.labelled.32x32.npy', rows))
    y = torch.from_numpy(label[rows])
    return split_rows(x, y, len(train))


WAFER = Domain(name='wafer', input_shape=(3, WAFER_SIZE, WAFER_SIZE), patch_size=(4, 4), vocab_size=0, num_classes=0,
               batch_size=128, mask_ratio=0.5, load=load_wafer, to_input=images_to_unit, transfer=('wafer_transfer',))
WAFER_TRANSFER = dataclasses.replace(WAFER, name='wafer_transfer', num_classes=len(WAFER_CLASSES),
                                     load=load_wafer_transfer, metric='weighted_f1', transfer=())

# -----------------------------------------------------------------------------
# The real samples of shared/data (its README.md): for each modality beyond images, a small real dataset in its
# published file format, the nearest to a DABS domain that fits on a machine without internet. Every file is a
# byte copy of a public file: a missing folder is downloaded from those files' sources (fetch_files: whole files;
# fetch_selection: some files of an archive) and checked against their sha256, computed from the project's copies.
# The project's shared/data holds the same folders (--data-dir ../shared/data). A folder that is there is read
# where it is and nothing is written beside it (shared/data is read-only), so nothing is cached: each parses in
# seconds.

def sample_fix(folder: Path) -> str:
    """What to do about a damaged file of a sample, whichever copy it is: the project's, or a download."""
    return (f"restore {folder.name}/ from the project's copy if it is the one in shared/data, else delete {folder}/ "
            f"and run again to download it again")


def read_table(path: Path, columns: int, dtype, fix: str, what: str, delimiter: str = None) -> np.ndarray:
    """A text table of a sample, `columns` numbers a row -> (N, columns) array of dtype; every value
    finite. what: the table's name in messages ('a HAPT table', 'the tab-separated HIGGS rows')."""
    try:
        text = path.read_text(encoding='ascii')
    except OSError as e:
        raise file_error(path, e, fix) from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is unreadable ({one_line(e)}): {fix}") from None
    if not text.strip():  # np.loadtxt would only warn
        raise DataError(f"{path} holds no rows: {fix}")
    try:
        a = np.loadtxt(io.StringIO(text), delimiter=delimiter, dtype=dtype, ndmin=2)
    except ValueError as e:  # a row with another number of columns, or a value that is no number (of dtype)
        raise DataError(f"{path} is not {what} of {columns} numbers a row ({one_line(e)}): {fix}") from None
    if a.shape[1] != columns:
        raise DataError(f"{path} has {a.shape[1]} columns, expected {columns}: {fix}")
    if not np.isfinite(a).all():  # 'nan' and 'inf' parse as floats, but no sensor or table of these gives them
        row, col = np.argwhere(~np.isfinite(a))[0]
        raise DataError(f"{path} row {row + 1} holds {a[row, col]}, not a number: {fix}")
    too_big = np.abs(a) > np.finfo(np.float32).max  # finite here, inf in the float32 the model reads
    if too_big.any():
        row, col = np.argwhere(too_big)[0]
        raise DataError(f"{path} row {row + 1} holds {a[row, col]:g}, beyond float32 (the model reads float32, in "
                        f"which it is infinite): {fix}")
    return a


# -----------------------------------------------------------------------------
# Speech Commands v0.02 subset (speech, as google_speech): 1,008 one-second clips (16 kHz) of 10 keywords by 61
# speakers, whole speakers of the official v0.02 test set.
# Source: http://download.tensorflow.org/data/speech_commands_test_set_v0.02.tar.gz (about 113 MB, no published
# checksum), the companion archive of speech_commands_v0.02.tar.gz; CC BY 4.0 (its LICENSE). Downloaded into a
# temporary folder, which keeps only the 10 keywords' clips of the 61 speakers below and the archive's README.md
# and LICENSE, checked against SPEECH_SUBSET_SHA256, then renamed to speech_commands_v0.02_subset/ (32 MB).
# Format: <word>/<speaker>_nohash_<n>.wav, with the archive's README.md and LICENSE; no list files. Log-mels
# exactly as google_speech (DABS's recipe and its Speech Commands mean and std), then only their first 32 frames
# kept: (1, 224, 32), patches 16x16, 28 tokens. Where it differs from DABS, and why: DABS pads every clip to
# 150,526 samples (9.4 s), so a 1-second clip fills 26 of its 224 frames and the other 198 are the same padding
# value; a model would spend 86% of its tokens, and an MAE most of its loss, on padding. The 32 frames kept hold
# all 26 that reach the clip (and 6 of padding), and cost a seventh of the tokens, which is what lets a CPU run
# the measurement of docs/ablation.md.
# Labels: the 10 words in the order they have in GOOGLE_SPEECH_WORDS, 0-9 (so not google_speech's numbers).
# Split: by speaker (the name before _nohash_), about 20% test. The dataset's own rule (its README's which_set:
# SHA-1 of the speaker, mod 2**27, as a percentage) cannot split these clips: it chose them, so every speaker's
# percentage lies in its test band, 10-20. Here a speaker is test when the SHA-1 of its id, as an integer, is
# divisible by 5: as with which_set, a speaker's side does not depend on which other speakers are there. On the
# sample: 10 of 61 speakers test, 838 train / 170 test clips, every word on both sides. Rows: each split's files
# sorted by path. train_groups: each train row's speaker, numbered by the sorted speaker ids.
# No cache: 1,008 log-mels take seconds, so they are computed at each load, in memory.

SPEECH_SUBSET_URL = 'http://download.tensorflow.org/data/speech_commands_test_set_v0.02.tar.gz'
SPEECH_SUBSET_WORDS = ['right', 'yes', 'up', 'no', 'stop', 'on', 'down', 'go', 'left', 'off']  # label = index
SPEECH_SUBSET_SPEAKERS = {  # the speakers taken whole, those of the project's copy
    '0487ba9b', '0bac8a71', '0ea0e2f4', '0fa1e7a9', '1538beb7', '189cbabe', '1cb788bc', '28497c5b', '37dca74f',
    '3cbd76a3', '412c675c', '42beb5eb', '43fc47a7', '475b61f1', '4c6167ca', '4c841771', '50033893', '5170b77f',
    '553f1a79', '5744b6a7', '5eb5fc74', '5f449e17', '5f814c23', '5ff3f9a1', '7192fddc', '7bae88ed', '7e1054e7',
    '8494fba8', '85d2ac4b', '8625475c', '8c0e5970', '8c7f81df', '8db999cf', '8fe52b97', '97f4c236', '9a356ab9',
    '9d4bab4f', 'a6f2fd71', 'a7216980', 'aa233654', 'aa48c94a', 'b11a05d2', 'b49caed3', 'b737ee80', 'c9b5ff26',
    'ca48dc76', 'ca4d5368', 'caf9fceb', 'cd85758f', 'd056d4d8', 'd1a4fb3f', 'd5ca80c6', 'd7467392', 'daf230ac',
    'db24628d', 'e0c782d5', 'e49428d9', 'e71b4ce6', 'f292725f', 'fce96bac', 'fe1916ba'}
# the folder's files (1,008 clips, README.md, LICENSE) and their sample_digest
SPEECH_SUBSET_FILES = 1_010
SPEECH_SUBSET_SHA256 = 'ad923e8bdac0208e897ce463da5a7858523fe5450586e9096bf3352ccc185cb6'
SPEECH_SUBSET_TEST_EVERY = 5  # a speaker is test when the SHA-1 of its id is divisible by this: ~20%
SPEECH_SUBSET_FRAMES = 32  # the frames kept: a 1-second clip reaches 26 (see the header)


def speech_subset_is_test(speaker: str) -> bool:
    """Whether `speaker` (the name before _nohash_) is a test speaker: SHA-1 of its id, as an integer, % 5 == 0."""
    digest = hashlib.sha1(speaker.encode(), usedforsecurity=False).hexdigest()  # a split rule, not security
    return int(digest, 16) % SPEECH_SUBSET_TEST_EVERY == 0


def speech_subset_member(name: str) -> bool:
    """Whether the test-set archive's file `name` belongs to the subset: a keyword's clip by one of its speakers,
    or the archive's README.md or LICENSE."""
    m = re.fullmatch(r'(\w+)/(\w+)_nohash_\d+\.wav', name)
    return name in ('README.md', 'LICENSE') or bool(m and m[1] in SPEECH_SUBSET_WORDS and
                                                    m[2] in SPEECH_SUBSET_SPEAKERS)


def load_google_speech_subset(data_dir: Path, download: bool) -> Splits:
    folder = fetch_selection(SPEECH_SUBSET_URL, 'speech_commands_test_set_v0.02.tar.gz', speech_subset_member,
                             SPEECH_SUBSET_FILES, SPEECH_SUBSET_SHA256, download,
                             data_dir / 'speech_commands_v0.02_subset')
    fix = sample_fix(folder)
    files = sorted(utf8_names(folder.glob('*/*.wav'), fix))
    speaker = {}
    for f in files:
        if f.parent.name not in SPEECH_SUBSET_WORDS:
            raise DataError(f"{f}: unknown word {f.parent.name!r}, expected one of the 10 keywords "
                            f"{' '.join(SPEECH_SUBSET_WORDS)}: {fix}")
        m = re.fullmatch(r'(.+)_nohash_\d+', f.stem)
        if not m:
            raise DataError(f"{f}: expected <word>/<speaker>_nohash_<n>.wav: {fix}")
        speaker[f] = m[1]
    test = [f for f in files if speech_subset_is_test(speaker[f])]
    train = [f for f in files if not speech_subset_is_test(speaker[f])]
    for name, split in (('train', train), ('test', test)):
        if not split:
            raise DataError(f"{folder}: no clip of a {name} speaker ({len(files)} wav files, "
                            f"{len(set(speaker.values()))} speakers): {fix}")
    labels = [SPEECH_SUBSET_WORDS.index(f.parent.name) for f in train + test]
    s = speech_splits(train, test, labels, 16_000, GOOGLE_SPEECH_MEAN, GOOGLE_SPEECH_STD, fix=fix)
    number = {sp: i for i, sp in enumerate(sorted(set(speaker.values())))}
    return dataclasses.replace(s, train_x=s.train_x[..., :SPEECH_SUBSET_FRAMES].contiguous(),  # (N, 1, 224, 32)
                               test_x=s.test_x[..., :SPEECH_SUBSET_FRAMES].contiguous(),
                               train_groups=torch.tensor([number[speaker[f]] for f in train]))  # (N_train,) int64


# batch and mask ratio as google_speech
GOOGLE_SPEECH_SUBSET = Domain(name='google_speech_subset', input_shape=(1, N_MELS, SPEECH_SUBSET_FRAMES),
                              patch_size=(16, 16), vocab_size=0, num_classes=len(SPEECH_SUBSET_WORDS),
                              batch_size=64, mask_ratio=0.5, load=load_google_speech_subset, to_input=as_float32)

# -----------------------------------------------------------------------------
# UCI HAPT (sensor series, as pamap2): "Smartphone-Based Recognition of Human Activities and Postural Transitions"
# v2.1, the raw signals behind UCI HAR: a smartphone on the waist, 3-axis accelerometer (g) and gyroscope (rad/s)
# at 50 Hz; 30 users doing six activities and the postural transitions between them. The sample: 7 users (1, 2,
# 3, 4, 5, 7, 8), their whole recordings.
# Source: UCI #341, https://archive.ics.uci.edu/ml/machine-learning-databases/00341/HAPT%20Data%20Set.zip (no
# published checksum). Licence (its README.txt): cite Reyes-Ortiz et al., Neurocomputing 2015; any commercial use
# is prohibited. Downloaded into a temporary folder, which keeps only the 7 users' raw recordings and the files
# below that hold all users (labels.txt, the split files, activity_labels.txt, README.txt), checked against
# HAPT_SAMPLE_SHA256, then renamed to hapt_sample/ (29 MB).
# Format: RawData/acc_expXX_userYY.txt and gyro_expXX_userYY.txt, one row per sample, 3 space-separated numbers;
# RawData/labels.txt, a row per labelled segment of every user of the full set: experiment, user, activity 1-12,
# first and last sample (1-based, inclusive). Samples outside every segment are unlabelled.
# Input: the 6 channels (acc x y z, then gyro x y z), channels first as pamap2: (6, 128) windows of 2.56 s with
# 50% overlap (stride 64), UCI HAR's own windows, cut inside one labelled segment from its first sample (as many
# as fit). Labels: the six activities 1-6 (walking, upstairs, downstairs, sitting, standing, laying) as 0-5. The
# transitions 7-12 are dropped: they last a few seconds (median 3.6 s here), so a segment holds one or two
# windows or none, and UCI HAR's task is the six activities.
# As DABS's PAMAP2: raw values (no normalisation, no filtering), fixed windows inside one activity, split by
# person. Unlike it: windows overlap by half (pamap2 here: none; DABS: random starts); there are no gaps to
# interpolate; 6 channels at 50 Hz, not 52 at 100 Hz. UCI HAR's published windows were noise-filtered (median and
# 20 Hz low-pass) and had gravity separated; these are the raw signals.
# Patches of 4 samples (80 ms, 24 values): 32 tokens. pamap2's are 50 ms (5 samples at 100 Hz), but 5 does not
# divide 128; 2 samples would make patches of 12 values, and 8 would leave 16 tokens, too few to mask most of.
# Split: by user, the archive's own: Train/subject_id_train.txt and Test/subject_id_test.txt name the user of each
# of its feature windows; their distinct values, among the users present, are the train and test users (here 2
# and 4 test; 1, 3, 5, 7, 8 train). Rows: recordings by experiment number, segments in labels.txt's order,
# windows in time order. train_groups: each train row's user.

HAPT_URL = 'https://archive.ics.uci.edu/ml/machine-learning-databases/00341/HAPT%20Data%20Set.zip'
HAPT_ACTIVITIES = ['walking', 'walking upstairs', 'walking downstairs', 'sitting', 'standing', 'laying']  # 1-6
HAPT_WINDOW, HAPT_STRIDE = 128, 64
HAPT_SAMPLE_USERS = (1, 2, 3, 4, 5, 7, 8)
HAPT_SAMPLE_SHARED = ('README.txt', 'activity_labels.txt', 'RawData/labels.txt', 'Train/subject_id_train.txt',
                      'Train/y_train.txt', 'Test/subject_id_test.txt', 'Test/y_test.txt')  # of all 30 users
# the folder's files (28 recordings, and HAPT_SAMPLE_SHARED) and their sample_digest
HAPT_SAMPLE_FILES = 35
HAPT_SAMPLE_SHA256 = 'fa8e431086f6a40607b174b34fcdf4a18a01e8c47e354fb7cda09986d9eafa04'


def hapt_sample_member(name: str) -> bool:
    """Whether the HAPT archive's file `name` belongs to the sample: a raw recording of one of its users, or one of
    HAPT_SAMPLE_SHARED."""
    m = re.fullmatch(r'RawData/(acc|gyro)_exp\d+_user(\d+)\.txt', name)
    return name in HAPT_SAMPLE_SHARED or bool(m and int(m[2]) in HAPT_SAMPLE_USERS)


def read_hapt(folder: Path):
    """hapt_sample/ -> (windows float32 (N, 6, 128), labels int64 (N,), users int64 (N,)) of every recording."""
    fix, raw = sample_fix(folder), folder / 'RawData'
    # (S, 5): experiment, user, activity, first sample, last sample
    segments = read_table(raw / 'labels.txt', 5, np.int64, fix, 'a HAPT table')
    bad = segments[(segments[:, 2] < 1) | (segments[:, 2] > 12), 2]
    if len(bad):
        raise DataError(f"{raw / 'labels.txt'}: unknown activity {bad[0]}, expected 1-12: {fix}")
    recordings = {}  # (experiment, user) -> its acc file
    for f in sorted(raw.glob('acc_exp*_user*.txt')):
        m = re.fullmatch(r'acc_exp(\d+)_user(\d+)', f.stem)
        if m:
            recordings[int(m[1]), int(m[2])] = f
    if not recordings:
        raise DataError(f"{raw} holds no acc_expXX_userYY.txt: {fix}")
    users = {u for _, u in recordings}
    # labels.txt covers all 30 users; a user present must have every recording it lists, else one lost file
    # would pass unnoticed
    missing = sorted({(e, u) for e, u in segments[:, :2].tolist() if u in users} - set(recordings))
    if missing:
        e, u = missing[0]
        raise DataError(f"{raw / f'acc_exp{e:02d}_user{u:02d}.txt'} is missing, but labels.txt has segments of it: "
                        f"{fix}")
    x, y, who = [], [], []
    for (e, u), acc_file in sorted(recordings.items()):
        gyro_file = acc_file.with_name(acc_file.name.replace('acc_', 'gyro_', 1))
        acc, gyro = (read_table(f, 3, np.float64, fix, 'a HAPT table') for f in (acc_file, gyro_file))
        if len(acc) != len(gyro):
            raise DataError(f"{gyro_file} has {len(gyro)} samples, but {acc_file.name} has {len(acc)}: {fix}")
        signal = np.hstack([acc, gyro]).T.astype(np.float32)  # (6, T): acc x y z, gyro x y z
        mine = segments[(segments[:, 0] == e) & (segments[:, 1] == u)]
        if not len(mine):
            raise DataError(f"{raw / 'labels.txt'} has no segment of {acc_file.name}: {fix}")
        for _, _, activity, first, last in mine.tolist():
            if not 1 <= first <= last <= signal.shape[1]:
                raise DataError(f"{raw / 'labels.txt'}: segment {first}-{last} of experiment {e} is not within its "
                                f"{signal.shape[1]} samples: {fix}")
            if activity > len(HAPT_ACTIVITIES):
                continue  # a postural transition (see the header)
            starts = range(first - 1, last - HAPT_WINDOW + 1, HAPT_STRIDE)  # 0-based; the window ends by `last`
            x += [signal[:, t:t + HAPT_WINDOW] for t in starts]  # each (6, 128)
            y += [activity - 1] * len(starts)
            who += [u] * len(starts)
    return (np.array(x, np.float32).reshape(-1, 6, HAPT_WINDOW), np.array(y, np.int64), np.array(who, np.int64))


def hapt_split_users(folder: Path) -> tuple[set, set]:
    """The archive's split by user: the distinct users of Train/subject_id_train.txt and Test/subject_id_test.txt."""
    fix = sample_fix(folder)
    train, test = (set(read_table(folder / part / f'subject_id_{part.lower()}.txt', 1, np.int64, fix,
                                  'a HAPT table')[:, 0].tolist()) for part in ('Train', 'Test'))
    if train & test:
        raise DataError(f"{folder}: user {min(train & test)} is in both Train/subject_id_train.txt and "
                        f"Test/subject_id_test.txt: {fix}")
    return train, test


def load_hapt_sample(data_dir: Path, download: bool) -> Splits:
    folder = fetch_selection(HAPT_URL, 'HAPT Data Set.zip', hapt_sample_member, HAPT_SAMPLE_FILES, HAPT_SAMPLE_SHA256,
                             download, data_dir / 'hapt_sample')
    fix = sample_fix(folder)
    train_users, test_users = hapt_split_users(folder)
    x, y, users = read_hapt(folder)
    unsplit = set(users.tolist()) - train_users - test_users
    if unsplit:
        raise DataError(f"{folder}: user {min(unsplit)} is in neither Train/subject_id_train.txt nor "
                        f"Test/subject_id_test.txt: {fix}")
    test = torch.from_numpy(np.isin(users, sorted(test_users)))
    for name, rows in (('train', ~test), ('test', test)):
        if not rows.any():
            raise DataError(f"{folder}: no {HAPT_WINDOW}-sample window of an activity of the {name} users "
                            f"{sorted(train_users if name == 'train' else test_users)}: {fix}")
    x, y, users = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(users)
    return Splits(x[~test], y[~test], x[test], y[test], train_groups=users[~test])


# batch as pamap2. Mask ratio: pamap2's 0.85 would keep int(32 * 0.15) = 4 of these 32 tokens; 0.75 keeps 8,
# about as many as the 9 of 64 pamap2 keeps
HAPT_SAMPLE = Domain(name='hapt_sample', input_shape=(6, HAPT_WINDOW), patch_size=(4,), vocab_size=0,
                     num_classes=len(HAPT_ACTIVITIES), batch_size=256, mask_ratio=0.75, load=load_hapt_sample,
                     to_input=as_float32)

# -----------------------------------------------------------------------------
# HIGGS sample (tabular, as higgs): 7,500 rows of UCI HIGGS (Monte-Carlo collisions: 1 = signal, 0 = background)
# rounded to 3 decimals, from LightGBM's binary-classification example.
# Source: binary.train and binary.test in https://github.com/microsoft/LightGBM/tree/master/examples/
# binary_classification; MIT (the repository's LICENSE, saved as LICENSE.LightGBM beside them); HIGGS itself is
# CC BY 4.0. Downloaded (1.3 MB) into higgs_lightgbm/ from a fixed commit, not master, so that the files cannot
# change under their sha256: the last commit to change any of the three (2019; the data files date from 2016).
# Format: tab-separated text, no header: the label, then HIGGS's 28 features in HIGGS.csv's column order. As
# higgs: input (28,), one token per feature, raw values, labels 0/1. A label other than 0 or 1 is an error, not
# cast: 0.5 is no class.
# Split: the example's own: train = binary.train (7,000 rows), test = binary.test (500).

LIGHTGBM_COMMIT = '023749239ebf390b5d56e08f227a013cbd972eb0'
HIGGS_SAMPLE_URL = f'https://github.com/microsoft/LightGBM/tree/{LIGHTGBM_COMMIT}/examples/binary_classification'
LIGHTGBM_RAW = f'https://raw.githubusercontent.com/microsoft/LightGBM/{LIGHTGBM_COMMIT}/'
HIGGS_SAMPLE_FILES = {  # name in higgs_lightgbm/: (url, size, sha256)
    'binary.train': (LIGHTGBM_RAW + 'examples/binary_classification/binary.train', 1_228_616,
                     '41c42dc14f86960256bf872fc8ae6286c688b44f43b4057b29428787fc1e0444'),
    'binary.test': (LIGHTGBM_RAW + 'examples/binary_classification/binary.test', 87_767,
                    'd99ebec91acd99638f00c727c251c947a1d17ddfcbea27bfef6b0dc5e5fb1db3'),
    'LICENSE.LightGBM': (LIGHTGBM_RAW + 'LICENSE', 1_083,
                         'b5cb7ff7859e7d282d98fc43ab081b0dda5dc659dc3385cf65740c759a7e6a6c')}


def read_higgs_sample(path: Path, fix: str) -> np.ndarray:
    """binary.train or binary.test -> float32 (N, 29): the label, then the 28 features."""
    a = read_table(path, 29, np.float64, fix, 'the tab-separated HIGGS rows', delimiter='\t')  # label + 28 features
    bad = np.flatnonzero(~np.isin(a[:, 0], (0, 1)))
    if len(bad):
        raise DataError(f"{path} row {bad[0] + 1}: unknown label {a[bad[0], 0]:g} (expected 0 or 1): {fix}")
    return a.astype(np.float32)


def load_higgs_sample(data_dir: Path, download: bool) -> Splits:
    folder = fetch_files(HIGGS_SAMPLE_FILES, HIGGS_SAMPLE_URL, download, data_dir / 'higgs_lightgbm')
    train, test = (torch.from_numpy(read_higgs_sample(folder / name, sample_fix(folder)))
                   for name in ('binary.train', 'binary.test'))
    return Splits(train[:, 1:], train[:, 0].long(), test[:, 1:], test[:, 0].long())


# batch and mask ratio as higgs: the same 28 tokens
HIGGS_SAMPLE = Domain(name='higgs_sample', input_shape=(28,), patch_size=(), vocab_size=0, num_classes=2,
                      batch_size=256, mask_ratio=0.5, load=load_higgs_sample, to_input=as_float32)

# -----------------------------------------------------------------------------
# Splice junctions (DNA tokens, as genomics): UCI "Molecular Biology (Splice-junction Gene Sequences)", 3,190
# primate DNA sequences of 60 nucleotides (positions -30 to +30 around a possible splice site) from GenBank 64.1.
# Source: UCI #69, splice.data in https://archive.ics.uci.edu/ml/machine-learning-databases/molecular-biology/
# splice-junction-gene-sequences/; CC BY 4.0. Downloaded, with splice.names, into splice/ (324 KB).
# Format: a line per sequence: class, instance name, the 60 letters; comma-separated, padded with spaces.
# Labels: EI = 0 (exon-intron, donor), IE = 1 (intron-exon, acceptor), N = 2 (neither): 767 / 768 / 1,655.
# Tokens as genomics, A C G T = 0 1 2 3. 15 sequences also hold splice.names' ambiguity codes (D = A|G|T, N = any,
# S = C|G, R = A|G; 60 letters of the 191,400, 56 of them N): each gets an id of its own, D N S R = 4 5 6 7
# (vocab 8), as each stands for another set of bases. Mapping them to a base would invent data, dropping their
# sequences would change the 3,190 everyone reports on; that their embeddings barely train costs nothing.
# Split: seeded_split, as DABS splits genomics: the seed-42 permutation, the first ceil(90%) train: 2,871 / 319.
# Not stratified: test holds EI 63 / IE 83 / N 173 (in proportion it would be about 77 / 77 / 165).
# The file holds exact duplicates (125 sequences on 310 lines, one of them under two classes), kept as in the
# file everyone uses: 26 test sequences also occur in train.

SPLICE_URL = ('https://archive.ics.uci.edu/ml/machine-learning-databases/molecular-biology/'
              'splice-junction-gene-sequences/')
SPLICE_FILES = {  # name in splice/: (url, size, sha256)
    'splice.data': (SPLICE_URL + 'splice.data', 319_000,
                    'ebbae10c85d3c285e2a2489a37e42bc2ee8d91d15005e391a9962fa3389a114f'),
    'splice.names': (SPLICE_URL + 'splice.names', 5_351,
                     'dd67d612a9c57a1230fbeed1e6e0a2130559f419b01765799627236bc7f6fff1')}
SPLICE_CLASSES = ['EI', 'IE', 'N']  # label = index
SPLICE_LETTERS = 'ACGTDNSR'  # token = index: the bases as genomics, then the ambiguity codes
SPLICE_LENGTH = 60


def read_splice(path: Path, fix: str):
    """splice.data -> (tokens uint8 (N, 60), labels int64 (N,)), in the file's order."""
    try:
        lines = path.read_text(encoding='ascii').splitlines()
    except OSError as e:
        raise file_error(path, e, fix) from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is unreadable ({one_line(e)}): {fix}") from None
    seqs, labels = [], []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(',')]
        if len(fields) != 3:
            raise DataError(f"{path} line {i}: {len(fields)} comma-separated fields, expected 3 (class, instance "
                            f"name, sequence): {fix}")
        cls, _, seq = fields
        if cls not in SPLICE_CLASSES:
            raise DataError(f"{path} line {i}: unknown class {cls!r}, expected one of {' '.join(SPLICE_CLASSES)}: "
                            f"{fix}")
        if len(seq) != SPLICE_LENGTH:
            raise DataError(f"{path} line {i}: sequence of {len(seq)} letters, expected {SPLICE_LENGTH}: {fix}")
        unknown = [c for c in seq if c not in SPLICE_LETTERS]
        if unknown:
            raise DataError(f"{path} line {i}: the letter {unknown[0]!r}, which is not one of {SPLICE_LETTERS}: {fix}")
        seqs.append(seq)
        labels.append(SPLICE_CLASSES.index(cls))
    table = np.zeros(256, np.uint8)  # every letter is checked above
    table[np.frombuffer(SPLICE_LETTERS.encode(), np.uint8)] = np.arange(len(SPLICE_LETTERS))
    tokens = table[np.frombuffer(''.join(seqs).encode(), np.uint8)].reshape(-1, SPLICE_LENGTH)  # (N, 60)
    return tokens, np.array(labels, np.int64)


def load_splice(data_dir: Path, download: bool) -> Splits:
    folder = fetch_files(SPLICE_FILES, SPLICE_URL, download, data_dir / 'splice')
    path = folder / 'splice.data'
    x, y = read_splice(path, sample_fix(folder))
    if len(x) - math.ceil(0.9 * len(x)) < 1:  # seeded_split's own message would say to download it
        raise DataError(f"{path}: {len(x)} sequences leave none for the test split (the published file has 3,190): "
                        f"{sample_fix(folder)}")
    train, test = seeded_split(len(x), path)
    return Splits(*(torch.from_numpy(a) for a in (x[train], y[train], x[test], y[test])))


# batch and mask ratio as genomics (0.5 keeps 30 of the 60 tokens)
SPLICE = Domain(name='splice', input_shape=(SPLICE_LENGTH,), patch_size=(), vocab_size=len(SPLICE_LETTERS),
                num_classes=len(SPLICE_CLASSES), batch_size=32, mask_ratio=0.5, load=load_splice,
                to_input=as_token_ids)

# -----------------------------------------------------------------------------
# the domains train.py can use: add new sections' Domains here

DOMAINS = {d.name: d for d in (CIFAR10, IMAGENET32, GOOGLE_SPEECH, GOOGLE_SPEECH_SAMPLE, AUDIO_MNIST, LIBRISPEECH,
                               LIBRISPEECH_TRANSFER, PAMAP2, HIGGS, GENOMICS, PFAM, PFAM_TRANSFER, SCOP, WAFER,
                               WAFER_TRANSFER, GOOGLE_SPEECH_SUBSET, HAPT_SAMPLE, HIGGS_SAMPLE, SPLICE)}


def get_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise DataError(f"unknown domain {name!r}: choose one of {', '.join(DOMAINS)}")
    return DOMAINS[name]

# -----------------------------------------------------------------------------
# the machinery the sections call: download, verify, extract, cache (each file written under a temporary
# name, then renamed)

def _temp_beside(path: Path, folder: bool = False) -> Path:
    """A new temporary file (or folder) next to `path`, with a name no other process uses, to be renamed to
    `path` once complete: the rename is atomic (same filesystem), so `path` never appears half-written.

    tempfile makes it private (0600 / 0700), which the rename would keep; it gets the permissions of any
    new file instead (0644 / 0755 under the usual umask 022), so that others can read a shared data folder."""
    if folder:
        tmp = tempfile.mkdtemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.part')
    else:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.part')
        os.close(fd)
    umask = os.umask(0)  # the only way to read the umask is to set it, so set it straight back
    os.umask(umask)
    os.chmod(tmp, (0o777 if folder else 0o666) & ~umask)
    return Path(tmp)


@contextlib.contextmanager
def atomic_file(path: Path):
    """The project's one way to write a file: `with atomic_file(path) as tmp:` write tmp; when the block ends
    without an error, tmp is renamed to `path`, else deleted. A kill or an error (a full disk, a failed
    check) leaves `path` as it was: the old checkpoint, cache or archive, or none."""
    tmp = _temp_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after os.replace; otherwise leave nothing behind


@contextlib.contextmanager
def building(path: Path):
    """Held while `path` (an archive, a folder or a cache) is being made: one process at a time makes it, and
    whoever holds the lock may remove the temporary .part files and folders of `path` that a killed process
    left (no live process is writing them: it would hold the lock). The lock file stays, empty. A folder
    that cannot be written (read-only data, a full disk) is one line that says so."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.parent / f'.{path.name}.lock', 'a')
    except OSError as e:
        raise DataError(f"cannot write {path} ({one_line(e)}): make {path.parent} writable (or free space there), "
                        f"or pass --data-dir with a folder that can be written") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits for another process making the same file
        for stale in path.parent.glob(f'.{glob.escape(path.name)}.*.part'):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        yield


def _check(path: Path, size, digest):
    """None if `path` has the expected size and md5 (32 hex digits) or sha256 (64) digest, else what is wrong
    (got vs expected). A size or digest of None is not checked: some sources publish neither."""
    got = path.stat().st_size
    if size is not None and got != size:  # cheap, and catches the usual truncated download before hashing
        return f"size {got:,} bytes, expected {size:,}"
    if digest is None:
        return None
    algo = 'md5' if len(digest) == 32 else 'sha256'
    got = _hexdigest(path, algo)
    if got != digest:
        return f"{algo} {got}, expected {digest}"
    return None


def _hexdigest(path: Path, algo: str) -> str:
    h = hashlib.new(algo, usedforsecurity=False)  # an integrity check, so allowed on FIPS systems too
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def fetch_archive(url: str, path: Path, size, digest, download: bool, folder: str) -> Path:
    """Make sure `path` holds the verified archive from `url`; download it only if it is absent."""
    extracted = f" or the extracted {folder}/" if folder else ""  # folder None: the file is used as it is
    place = (f"place {path.name} (from {url}){extracted} in {path.parent}, "
             f"or pass --data-dir with the folder that holds them")
    if path.exists():  # already downloaded, or placed by hand: verify, never overwrite
        problem = _check(path, size, digest)
        if problem:
            raise DataError(f"{path} is not the expected archive ({problem}): delete it and run again to "
                            f"re-download it, or place a good copy from {url}")
        return path
    if not download:
        raise DataError(f"{f'{folder}/' if folder else path.name} not found in {path.parent} and downloading is off: "
                        f"{place}")
    with building(path), atomic_file(path) as tmp:  # `path` only ever appears complete and verified
        _download(url, tmp, path, size, digest, place)
    return path


def _download(url: str, tmp: Path, path: Path, size, digest, place: str):
    """Download `url` into the temporary file `tmp`, which its caller renames to `path` or deletes, and verify
    it: a failure is a DataError that ends with `place`, what the user can do instead."""
    shown = 'size not published' if size is None else f'{size / 1e6:.0f} MB' if size >= 1e6 else f'{size:,} bytes'
    print(f"downloading {url} ({shown}) to {path}")
    try:
        with open(tmp, 'wb') as f, urllib.request.urlopen(url, timeout=60) as r:
            shutil.copyfileobj(r, f, 1 << 20)
    except OSError as e:  # URLError, HTTPError, timeouts, resets, disk full: all OSErrors
        raise DataError(f"could not download {url} ({one_line(e)}): {place}") from e
    problem = _check(tmp, size, digest)
    if problem:
        raise DataError(f"downloaded {path.name} failed verification ({problem}) and was deleted: "
                        f"run again, or {place}")


def _escapes(name: str) -> bool:
    # absolute, or with a '..' part: could land outside the target folder
    return name.startswith('/') or '..' in name.split('/')


def _tar_member_unsafe(m: tarfile.TarInfo) -> bool:
    # Datasets need only files and folders. Links are refused even when they point inside: a link
    # through a link ('a/l1' -> '..', then 'a/l1/l2' -> '..') escapes although every path looks inside.
    return _escapes(m.name) or not (m.isfile() or m.isdir())


def _refuse(archive: Path, target: Path, bad: list):
    if bad:
        raise DataError(f"refusing to extract {archive}: member {bad[0]!r} could land outside {target} (absolute "
                        f"path, '..', a link or a device); delete it and download it again from the official source")


def extract_archive(archive: Path, target: Path):
    """Extract a .tar(.gz) or .zip into the folder `target`, all or nothing, refusing members that
    would land outside it. The archive may hold the folder itself (cifar-10-batches-py/...) or its files."""
    print(f"extracting {archive} to {target}")
    tmp = _temp_beside(target, folder=True)
    try:
        try:
            if archive.suffix == '.zip':
                with zipfile.ZipFile(archive) as z:  # zipfile writes links as plain files: names suffice
                    _refuse(archive, target, [n for n in z.namelist() if _escapes(n)])
                    z.extractall(tmp)
            else:
                with tarfile.open(archive) as t:
                    _refuse(archive, target, [m.name for m in t.getmembers() if _tar_member_unsafe(m)])
                    # the 'data' filter (Python >= 3.11.4) checks again while writing: a backstop
                    t.extractall(tmp, **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
            raise DataError(f"cannot extract {archive} ({one_line(e)}): delete it and download it again") from e
        top = list(tmp.iterdir())
        src = top[0] if len(top) == 1 and top[0].name == target.name and top[0].is_dir() else tmp
        try:
            os.replace(src, target)
        except OSError:
            if not target.is_dir():  # else another process got there first, which is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_and_extract(url: str, archive_name: str, size, digest, download: bool, folder: Path) -> Path:
    """The dataset's folder: used as it is when there (no network, no hashing), else its archive is
    fetched (or found in place), verified and extracted safely into it."""
    refuse_broken_link(folder)
    if not folder.is_dir():
        _refuse_own_folder(folder)
        archive = fetch_archive(url, folder.parent / archive_name, size, digest, download, folder.name)
        with building(folder):
            if not folder.is_dir():  # another process may have extracted it while this one waited
                extract_archive(archive, folder)
    return folder


def refuse_broken_link(folder: Path):
    """A dataset's folder that is a symbolic link leading nowhere is said to be one, not 'not found'."""
    if folder.is_symlink() and not folder.exists():
        try:
            folder.stat()
            problem = "leads nowhere"
        except OSError as e:
            problem = "loops (it leads back to itself)" if e.errno == errno.ELOOP else "leads nowhere"
        raise DataError(f"{folder} is a symbolic link that {problem}: point it at the dataset's folder, or remove it")


def _refuse_own_folder(folder: Path):
    if folder.parent.name == folder.name:  # --data-dir names the dataset's folder, not the one that holds it
        raise DataError(f"{folder.parent} is the dataset's own folder: pass the folder that holds it, "
                        f"--data-dir {folder.parent.parent}")


def sample_digest(folder: Path) -> tuple[int, str]:
    """(number of files, digest) of every file in `folder`, a sample: one digest for many files, the sha256 of
    their `sha256sum` lines in sorted order, which a shell gives too:
    cd <folder> && find . -type f -printf '%P\\n' | LC_ALL=C sort | xargs sha256sum | sha256sum"""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob('*') if p.is_file())
    lines = ''.join(f"{_hexdigest(folder / name, 'sha256')}  {name}\n" for name in names)
    return len(names), hashlib.sha256(lines.encode()).hexdigest()


def _make_sample(folder: Path, download: bool, source: str, place: str, fill: Callable) -> Path:
    """A sample's folder: used as it is when there (an earlier download, or the project's read-only shared/data,
    beside which nothing is written), else made by fill(tmp) in a temporary folder beside it, which is renamed
    into place once complete and verified, and removed on any failure. place: what the user can do instead."""
    refuse_broken_link(folder)
    if folder.is_dir():
        return folder
    _refuse_own_folder(folder)
    if not download:
        raise DataError(f"{folder}/ not found and downloading is off: let it download from {source} "
                        f"(--download true), or {place}")
    with building(folder):
        if not folder.is_dir():  # another process may have made it while this one waited
            tmp = _temp_beside(folder, folder=True)
            try:
                fill(tmp)
                os.replace(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # gone after os.replace; otherwise leave nothing behind
    return folder


def fetch_files(files: dict, source: str, download: bool, folder: Path) -> Path:
    """A sample of whole published files, {name in folder: (url, size, sha256)}: `folder` used as it is when
    there, else each file downloaded and verified. source: where a user finds them."""
    place = f"pass --data-dir with a folder that holds {folder.name}/ (e.g. the project's shared/data)"

    def fill(tmp: Path):
        for name, (url, size, sha256) in files.items():
            _download(url, tmp / name, folder / name, size, sha256, place)
    return _make_sample(folder, download, source, place, fill)


def fetch_selection(url: str, archive_name: str, wanted: Callable, files: int, sha256: str, download: bool,
                    folder: Path) -> Path:
    """A sample of some of an archive's files: `folder` used as it is when there, else the archive's files whose
    names pass wanted() are copied out, and must be `files` files of sample_digest `sha256`. The archive is the
    one a user placed beside the folder (kept), else it is downloaded into the temporary folder (and deleted with
    it). Its source publishes no checksum: it is verified through the files taken out of it."""
    placed = folder.parent / archive_name
    place = (f"place {archive_name} in {folder.parent}, or pass --data-dir with a folder that holds {folder.name}/ "
             f"(e.g. the project's shared/data)")  # its URL is in every message that says this

    def fill(tmp: Path):
        if placed.exists():
            archive, what = placed, placed
            fix = f"delete it and run again to re-download it, or place a good copy from {url}"
        else:
            archive, what = tmp / archive_name, f"{archive_name} from {url}"
            fix = f"it was deleted: run again, or {place}"
            _download(url, archive, archive, None, None, place)
        extract_selected(archive, tmp, wanted, what, fix)
        if archive != placed:
            archive.unlink()  # only the sample stays
        got, digest = sample_digest(tmp)
        if (got, digest) != (files, sha256):
            raise DataError(f"{what} is not the expected archive: the sample's {got:,} files in it have the digest "
                            f"{digest}, expected {files:,} files with {sha256}: {fix}")
    return _make_sample(folder, download or placed.exists(), url, place, fill)


def extract_selected(archive: Path, folder: Path, wanted: Callable, what, fix: str):
    """Copy the regular files of a .tar(.gz) or .zip whose names (less a leading './') pass wanted() into
    `folder`, under those names. wanted() admits only a sample's own names, so none can land outside `folder`.
    what, fix: the archive and what to do about it, for the message of one that cannot be read."""
    print(f"extracting the sample's files from {what}")

    def copy(name: str, src):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        with open(folder / name, 'wb') as f:
            shutil.copyfileobj(src, f, 1 << 20)
    try:
        if archive.suffix == '.zip':
            with zipfile.ZipFile(archive) as z:
                for m in z.infolist():
                    name = m.filename.removeprefix('./')
                    if not m.is_dir() and wanted(name):
                        with z.open(m) as src:  # checks the member's CRC as it is read
                            copy(name, src)
        else:
            with tarfile.open(archive) as t:
                for m in t:  # a truncated archive stops here with an error, or lacks files: the digest tells
                    name = m.name.removeprefix('./')
                    if m.isfile() and wanted(name):
                        copy(name, t.extractfile(m))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
        raise DataError(f"cannot extract {what} ({one_line(e)}): {fix}") from None


def _npy_header(dtype, shape: tuple) -> bytes:
    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, {'descr': np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                             'fortran_order': False, 'shape': shape})
    return b.getvalue()


def _read_cache(path: Path, dtype, row_shape: tuple) -> np.ndarray:
    fix = "delete it and run again to rebuild it"
    try:
        a = np.load(path, mmap_mode='c')  # memory-mapped copy-on-write: read when used, never written
    except (ValueError, OSError, EOFError) as e:  # not a .npy, a bad header, fewer bytes than the header says
        raise DataError(f"{path} is a truncated or unreadable cache ({one_line(e)}): {fix}") from None
    if a.dtype != dtype or a.shape[1:] != row_shape or a.ndim != 1 + len(row_shape):
        raise DataError(f"{path} holds {a.dtype} {a.shape}, expected {np.dtype(dtype)} (N, "
                        f"{', '.join(map(str, row_shape))}): it is no cache of this loader; {fix}")
    return a


def _write_cache(files: dict, chunks):
    """Stream the chunks (tuples of arrays, one per file) into the .npy `files`, which appear, renamed into
    place, only once all are complete. The row count is known only at the end, so each header is written for 0 rows first and
    rewritten: numpy pads it to the same size whatever the count, which the assert checks."""
    with contextlib.ExitStack() as stack:  # the files are renamed into place when the stack closes, all or none
        tmps = [stack.enter_context(atomic_file(path)) for path in files]
        outs = [stack.enter_context(open(tmp, 'wb')) for tmp in tmps]  # closed before the renames
        specs, counts = list(files.values()), [0] * len(files)
        for f, (dtype, row_shape) in zip(outs, specs):
            f.write(_npy_header(dtype, (0, *row_shape)))
        for part in chunks:
            for i, (f, (dtype, row_shape), a) in enumerate(zip(outs, specs, part)):
                assert a.shape[1:] == row_shape, (a.shape, row_shape)
                f.write(np.ascontiguousarray(a, dtype).tobytes())
                counts[i] += len(a)
        for f, (dtype, row_shape), n in zip(outs, specs, counts):
            header = _npy_header(dtype, (n, *row_shape))
            assert len(header) == len(_npy_header(dtype, (0, *row_shape)))
            f.seek(0)
            f.write(header)


def _fingerprint(sources: list) -> str:
    """What a cache was built from: each source file's name, size and modification time, as one digest."""
    h = hashlib.sha1(usedforsecurity=False)  # a fingerprint, not security
    for path in sorted(map(Path, sources)):
        st = path.stat()
        h.update(f"{path.name} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cached_arrays(files: dict, parse: Callable, rows: int = None, sources: list = ()) -> list:
    """The arrays of the .npy `files` ({path: (dtype, shape of one row)}), memory-mapped; built first from
    parse() if one is missing, if they do not hold `rows` rows (when given), or if a file of `sources` (what
    they are built from) changed since: its size, time or name. A source that is gone (a download deleted to
    free space) leaves the cache as it is.

    parse() yields tuples of chunks, one chunk of rows per file: a dataset can exceed the memory, so the
    chunks are streamed to disk. The sources' fingerprint is kept in <first file>.sources, written last. A file
    missing means an interrupted build; a file that does not read as the array it should hold is a DataError
    that says to delete it."""
    stamp = next(iter(files)).with_suffix('.sources')
    fingerprint = _fingerprint(sources) if sources and all(Path(p).exists() for p in sources) else None

    def fresh():
        if not all(path.exists() for path in files):
            return None
        arrays = [_read_cache(path, *spec) for path, spec in files.items()]
        if len({len(a) for a in arrays}) > 1:
            raise DataError(f"{' and '.join(map(str, files))} hold different row counts, so they are not one "
                            f"cache: delete them and run again to rebuild them")
        built_from = stamp.read_text().strip() if stamp.exists() else None
        if (rows is None or len(arrays[0]) == rows) and fingerprint in (None, built_from):
            return arrays
        print(f"{stamp.with_suffix('')}: the files it was built from changed: rebuilding it")
        return None

    arrays = fresh()
    if arrays is None:
        chunks = iter(parse())
        first = next(chunks, None)  # before any lock or file is made: parse() may fetch the data, or refuse it
        with contextlib.ExitStack() as locks:
            for path in files:  # in one order: two processes cannot each hold what the other waits for
                locks.enter_context(building(path))
            arrays = fresh()  # another process may have built it while this one waited
            if arrays is None:
                print(f"parsing into {' and '.join(map(str, files))} (once; later runs memory-map it)")
                try:
                    _write_cache(files, itertools.chain([] if first is None else [first], chunks))
                except OSError as e:  # a full disk, a folder made read-only meanwhile
                    raise DataError(f"could not write {' and '.join(map(str, files))} ({one_line(e)}): free space "
                                    f"in {next(iter(files)).parent}, or pass --data-dir with another folder") from None
                if fingerprint:
                    with atomic_file(stamp) as tmp:
                        tmp.write_text(fingerprint + '\n')
                arrays = [_read_cache(path, *spec) for path, spec in files.items()]
    return arrays
