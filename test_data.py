"""
Tests for data.py's shared machinery and its image domains: the on-disk formats as they really are, and
every way getting them can go wrong; the caches and the splits. test_domains.py tests the other domains.

The writers of the genuine formats are in conftest.py. Here small archives are built from them and
served through file:// URLs or a fake urlopen. Nothing here touches the network or modifies
the project's shared/data.
"""
import hashlib
import io
import os
import pickle
import pickletools
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import FrozenInstanceError
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from conftest import (Loading, assert_refused, at, const, fails, holds, listing, make_cifar, make_imagenet32, serve,
                      write_cifar_batch)
from data import DataError

REAL_CIFAR = Path(__file__).resolve().parent.parent / 'shared' / 'data' / 'cifar-10-batches-py'


# -----------------------------------------------------------------------------
# helpers

def make_tarball(tmp_path, extra=()):
    """cifar-10-python.tar.gz holding cifar-10-batches-py/ (+ extra TarInfo members); returns (path, expected)."""
    expected = make_cifar(tmp_path / 'src' / 'cifar-10-batches-py')
    archive = tmp_path / 'cifar-10-python.tar.gz'
    with tarfile.open(archive, 'w:gz') as t:
        t.add(tmp_path / 'src' / 'cifar-10-batches-py', arcname='cifar-10-batches-py')
        for info in extra:
            t.addfile(info, io.BytesIO(b'x' * info.size) if info.isfile() else None)
    return archive, expected


def no_network(*args, **kwargs):
    raise AssertionError("the network was used although the data was already there")


def assert_splits(s, expected):
    for got, want in zip((s.train_x, s.train_y, s.test_x, s.test_y), expected):
        assert got.device.type == 'cpu' and got.is_contiguous()
        assert np.array_equal(got.numpy(), want)
    assert s.train_x.dtype == s.test_x.dtype == torch.uint8
    assert s.train_y.dtype == s.test_y.dtype == torch.int64


# -----------------------------------------------------------------------------
# the CIFAR-10 format

def test_py2_writer_gives_bytes_keys_like_the_originals(tmp_path):
    write_cifar_batch(tmp_path / 'b', np.zeros((2, 3072), np.uint8), [1, 2])
    raw = (tmp_path / 'b').read_bytes()
    assert raw[:2] == b'\x80\x02'  # protocol 2
    assert b'_codecs' not in raw  # byte strings are Python 2 str, not Python 3 encode() calls
    ops = {op.name for op, _, _ in pickletools.genops(raw)}
    assert 'SHORT_BINSTRING' in ops and 'BINSTRING' in ops  # keys, and the 6,144-byte pixel buffer
    d = pickle.loads(raw, encoding='bytes')
    assert set(d) == {b'batch_label', b'labels', b'data', b'filenames'}
    assert d[b'data'].dtype == np.uint8 and d[b'data'].shape == (2, 3072)


def test_pixel_layout_is_rgb_planes_row_major(tmp_path):
    # the file's definition: 1024 red, 1024 green, 1024 blue values, each plane row by row
    def value(c, h, w):
        return (h * 32 + w + 7 * c) % 256  # differs under an h/w transpose or a channel shift
    row = np.array([value(c, h, w) for c in range(3) for h in range(32) for w in range(32)], np.uint8)
    one = np.zeros(3072, np.uint8)
    one[0 * 1024 + 0 * 32 + 1] = 10  # red at (h=0, w=1)
    one[1 * 1024 + 1 * 32 + 0] = 20  # green at (h=1, w=0)
    one[2 * 1024 + 31 * 32 + 2] = 30  # blue at (h=31, w=2)
    write_cifar_batch(tmp_path / 'b', np.stack([row, one]), [3, 9])
    x, y = data.read_image_batch(tmp_path / 'b', 10)
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [3, 9]
    assert all(x[0, c, h, w] == value(c, h, w) for c in range(3) for h in range(32) for w in range(32))
    assert x[1, 0, 0, 1] == 10 and x[1, 1, 1, 0] == 20 and x[1, 2, 31, 2] == 30
    assert np.count_nonzero(x[1]) == 3


@pytest.mark.parametrize('writer', ['py2', 'py3-2', 'py3'])
def test_batches_parse_whoever_wrote_them(tmp_path, writer):
    # row count from the data (3 per file here, not 10,000); train is data_batch_1..5 in order
    expected = make_cifar(tmp_path / 'cifar-10-batches-py', rows_per_file=3, writer=writer)
    s = data.load_cifar10(tmp_path, download=False)
    assert len(s.train_x) == 15 and len(s.test_x) == 3
    assert_splits(s, expected)


@pytest.mark.skipif(not REAL_CIFAR.is_dir(), reason='real CIFAR-10 sample not present')
def test_real_cifar10_sample():
    before = listing(REAL_CIFAR)
    s = data.get_domain('cifar10').load(REAL_CIFAR.parent, download=False)
    assert listing(REAL_CIFAR) == before  # read only
    assert s.train_x.shape == (10_000, 3, 32, 32) and s.test_x.shape == (2_000, 3, 32, 32)
    assert torch.bincount(s.train_y).tolist() == [1000] * 10
    assert torch.bincount(s.test_y).tolist() == [200] * 10
    # first train image = row 0 of data_batch_1, last test image = last row of test_batch
    with open(REAL_CIFAR / 'data_batch_1', 'rb') as f:
        first = pickle.load(f, encoding='bytes')
    with open(REAL_CIFAR / 'test_batch', 'rb') as f:
        last = pickle.load(f, encoding='bytes')
    assert np.array_equal(s.train_x[0].numpy().reshape(-1), first[b'data'][0])
    assert s.train_y[0] == first[b'labels'][0]
    assert np.array_equal(s.test_x[-1].numpy().reshape(-1), last[b'data'][-1]) and s.test_y[-1] == last[b'labels'][-1]
    # model input: [0, 1], not normalised (a natural-image mean near 0.47, not near 0)
    x = data.CIFAR10.to_input(s.train_x[:500])
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert 0.35 < x.mean() < 0.6


# -----------------------------------------------------------------------------
# download, verify, extract

def test_download_verifies_and_extracts(tmp_path, monkeypatch):
    archive, expected = make_tarball(tmp_path)
    serve(monkeypatch, 'CIFAR10', archive)
    data_dir = tmp_path / 'data'  # does not exist yet
    assert_splits(data.load_cifar10(data_dir, download=True), expected)
    assert listing(data_dir) == ['cifar-10-batches-py', 'cifar-10-python.tar.gz']  # no temp files
    assert (data_dir / 'cifar-10-python.tar.gz').read_bytes() == archive.read_bytes()
    # the second time, the extracted folder is used as is: no network, no hashing
    monkeypatch.setattr(urllib.request, 'urlopen', no_network)
    monkeypatch.setattr(data, '_check', no_network)
    assert_splits(data.load_cifar10(data_dir, download=True), expected)


def test_placed_archive_is_verified_and_extracted_without_network(tmp_path, monkeypatch):
    archive, expected = make_tarball(tmp_path)
    serve(monkeypatch, 'CIFAR10', archive)
    monkeypatch.setattr(urllib.request, 'urlopen', no_network)
    data_dir = tmp_path / 'data'
    data_dir.mkdir()
    shutil.copy(archive, data_dir)
    assert_splits(data.load_cifar10(data_dir, download=False), expected)
    assert listing(data_dir) == ['cifar-10-batches-py', 'cifar-10-python.tar.gz']


@pytest.mark.parametrize('interrupt', [ConnectionResetError('connection reset by peer'), KeyboardInterrupt()])
def test_interrupted_download_leaves_nothing(tmp_path, monkeypatch, interrupt):
    archive, _ = make_tarball(tmp_path)
    serve(monkeypatch, 'CIFAR10', archive)
    data_dir = tmp_path / 'data'
    seen = []

    class HalfStream(io.BytesIO):  # what urlopen returns, cut off after the first chunk
        def read(self, n=-1):
            if self.tell() > 0:
                seen.append(listing(data_dir))  # mid-download: only the temporary name
                raise interrupt
            return super().read(1000)
    monkeypatch.setattr(urllib.request, 'urlopen', lambda *a, **k: HalfStream(archive.read_bytes()))
    with pytest.raises(DataError if isinstance(interrupt, OSError) else KeyboardInterrupt):
        data.load_cifar10(data_dir, download=True)
    assert len(seen) == 1 and len(seen[0]) == 1
    assert seen[0][0].startswith('.cifar-10-python.tar.gz.') and seen[0][0].endswith('.part')
    assert listing(data_dir) == []


# -----------------------------------------------------------------------------
# ImageNet32: CIFAR layout, labels 1..1000, written by Python 3 (str keys), manual download

def test_imagenet32_labels_are_shifted_to_zero_based(tmp_path):
    expected = make_imagenet32(tmp_path)
    s = data.get_domain('imagenet32').load(tmp_path, download=True)
    assert_splits(s, expected)
    assert len(s.train_x) == 20 and len(s.test_x) == 2
    assert s.train_y[:2].tolist() == [0, 999]  # file labels 1 and 1000


@pytest.mark.parametrize('layout', ['folder-inside-zip', 'files-at-zip-root'])
def test_imagenet32_placed_zips_are_extracted(tmp_path, layout):
    expected = make_imagenet32(tmp_path / 'src')
    data_dir = tmp_path / 'data'
    data_dir.mkdir()
    for name in ('Imagenet32_train', 'Imagenet32_val'):
        with zipfile.ZipFile(data_dir / f'{name}.zip', 'w') as z:
            for f in sorted((tmp_path / 'src' / name).iterdir()):
                z.write(f, f'{name}/{f.name}' if layout == 'folder-inside-zip' else f.name)
    assert_splits(data.load_imagenet32(data_dir, download=False), expected)
    assert listing(data_dir) == ['Imagenet32_train', 'Imagenet32_train.zip',
                                            'Imagenet32_val', 'Imagenet32_val.zip']
    assert len(listing(data_dir / 'Imagenet32_train')) == 10


# -----------------------------------------------------------------------------
# caches: built once, streamed, renamed into place, readable by others, refused in one line when broken

def two_file_cache(folder):
    return {folder / 'a.npy': (np.float32, (3,)), folder / 'b.npy': (np.int64, ())}


def chunks(n_chunks=3, rows=4):
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((rows, 3)).astype(np.float32), np.arange(rows) + 100 * i) for i in range(n_chunks)]


def test_cache_is_built_once_then_memory_mapped(tmp_path):
    files = two_file_cache(tmp_path)
    parts = chunks() + [(np.zeros((0, 3), np.float32), np.zeros(0, np.int64))]  # an empty chunk too
    a, b = data.cached_arrays(files, lambda: iter(parts))
    assert np.array_equal(a, np.concatenate([p[0] for p in parts]))
    assert np.array_equal(b, np.concatenate([p[1] for p in parts]))
    assert isinstance(a, np.memmap) and a.dtype == np.float32 and b.dtype == np.int64
    assert listing(tmp_path) == ['a.npy', 'b.npy']  # no temporary files left
    assert np.array_equal(np.load(tmp_path / 'a.npy'), a)  # a plain .npy file: its header has the final count
    again = data.cached_arrays(files, fails)  # parsed once
    assert all(np.array_equal(x, y) for x, y in zip(again, (a, b)))
    # a stale cache (another row count than the data has now) is built again
    fresh = data.cached_arrays(files, lambda: iter(parts[:1]), rows=4)
    assert len(fresh[0]) == len(fresh[1]) == 4 and np.array_equal(fresh[1], parts[0][1])


@pytest.mark.parametrize('interrupt', [DataError('a bad record'), KeyboardInterrupt()])
def test_interrupted_cache_build_leaves_nothing(tmp_path, interrupt):
    files = two_file_cache(tmp_path)
    seen = []

    def parse():
        yield from chunks(2)
        seen.append(listing(tmp_path))  # mid-build: only the temporary names
        raise interrupt
    with pytest.raises(type(interrupt)):
        data.cached_arrays(files, parse)
    assert [name.split('.npy.')[0] for name in seen[0]] == ['.a', '.b']
    assert all(name.endswith('.part') for name in seen[0])
    assert listing(tmp_path) == []
    # a build interrupted between its two renames leaves one file of two: it is built again, not read
    np.save(tmp_path / 'a.npy', np.zeros((1, 3), np.float32))
    a, b = data.cached_arrays(files, lambda: iter(chunks(1)))
    assert len(a) == len(b) == 4


@pytest.mark.parametrize('umask, file_mode, dir_mode', [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_written_files_have_the_usual_permissions(tmp_path, monkeypatch, umask, file_mode, dir_mode):
    # tempfile's files are private (0600, folders 0700), and a rename keeps that: what data.py leaves must
    # get the permissions of any new file, so that a data folder can be shared
    archive, _ = make_tarball(tmp_path)
    serve(monkeypatch, 'CIFAR10', archive)
    data_dir = tmp_path / 'data'
    make_imagenet32(tmp_path / 'src')
    data_dir.mkdir()
    with zipfile.ZipFile(data_dir / 'Imagenet32_val.zip', 'w') as z:  # files at the root: the folder is ours
        z.write(tmp_path / 'src' / 'Imagenet32_val' / 'val_data', 'val_data')
    shutil.copytree(tmp_path / 'src' / 'Imagenet32_train', data_dir / 'Imagenet32_train')
    old = os.umask(umask)
    try:
        data.load_cifar10(data_dir, download=True)
        data.load_imagenet32(data_dir, download=False)
        data.cached_arrays(two_file_cache(data_dir), lambda: iter(chunks(1)))
    finally:
        os.umask(old)
    modes = {name: (data_dir / name).stat().st_mode & 0o777 for name in listing(data_dir)}
    assert {name: modes[name] for name in ('cifar-10-python.tar.gz', 'a.npy', 'b.npy', 'Imagenet32_val')} == \
        {'cifar-10-python.tar.gz': file_mode, 'a.npy': file_mode, 'b.npy': file_mode, 'Imagenet32_val': dir_mode}


# -----------------------------------------------------------------------------
# splits, domains, model input

def test_seeded_split_is_dabs_table_split():
    # DABS: df.sample(frac=1, random_state=42), which is RandomState(42).permutation(n), then the first
    # ceil(0.9 n) rows train, the rest test. Pinned as the code before seeded_split computed them
    train, test = data.seeded_split(10, 'x')
    assert train.tolist() == [8, 1, 5, 0, 7, 2, 9, 4, 3] and test.tolist() == [6]
    train, test = data.seeded_split(11, 'x')  # ceil(9.9) = 10 train rows
    assert train.tolist() == [5, 0, 9, 10, 2, 1, 8, 4, 7, 3] and test.tolist() == [6]
    state = np.random.get_state()[1].copy()
    train, test = data.seeded_split(1006, 'x')
    assert np.array_equal(state, np.random.get_state()[1])  # numpy's global RNG is neither used nor advanced
    assert len(train) == 906 and len(test) == 100  # ceil(905.4), not round
    assert sorted(train.tolist() + test.tolist()) == list(range(1006))  # disjoint, covers all
    assert all(np.array_equal(x, y) for x, y in zip(data.seeded_split(1006, 'y'), (train, test)))  # deterministic


def test_train_val_split_is_a_fixed_partition():
    state = torch.get_rng_state()
    train, val = data.train_val_split(1000)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is neither used nor advanced
    assert len(train) == 900 and len(val) == 100 and train.dtype == val.dtype == torch.int64
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(1000))  # disjoint, covers all
    assert torch.equal(train, train.sort().values) and torch.equal(val, val.sort().values)
    torch.manual_seed(123)  # the global seed does not matter, the split's seed does
    assert torch.equal(data.train_val_split(1000)[1], val)
    assert not torch.equal(data.train_val_split(1000, seed=1)[1], val)
    assert not torch.equal(val, torch.arange(100))  # actually shuffled
    assert [len(t) for t in data.train_val_split(50_000, 0.2)] == [40_000, 10_000]
    assert [len(t) for t in data.train_val_split(10, 0.0)] == [10, 0]
    assert [len(t) for t in data.train_val_split(0)] == [0, 0]
    # the partition itself, pinned: train.py's validation split, and docs/ablation.md's validation figures, rest on it
    assert [t.tolist() for t in data.train_val_split(10)] == [[0, 1, 2, 3, 5, 6, 7, 8, 9], [4]]
    assert [t.tolist() for t in data.train_val_split(20, 0.25, seed=3)] == \
        [[0, 2, 4, 5, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19], [1, 3, 6, 7, 12]]



def test_train_val_split_without_groups_is_unchanged():
    # groups=None must give exactly the partition docs/ablation.md's validation figures were measured on: a copy of
    # the formula as it was before groups existed
    def before_groups(n, val_frac=0.1, seed=0):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_val = round(n * val_frac)
        return perm[n_val:].sort().values, perm[:n_val].sort().values
    for n, val_frac, seed in ((0, 0.1, 0), (1, 0.5, 0), (10, 0.1, 0), (1000, 0.1, 0), (1000, 0.2, 7),
                              (50_000, 0.1, 0), (7_000, 0.05, 3), (838, 0.1, 1)):
        for got in (data.train_val_split(n, val_frac, seed), data.train_val_split(n, val_frac, seed, groups=None)):
            for a, b in zip(got, before_groups(n, val_frac, seed)):
                assert a.dtype == b.dtype and torch.equal(a, b), (n, val_frac, seed)


def test_train_val_split_with_groups_holds_out_whole_groups():
    rng = np.random.default_rng(0)
    groups = torch.from_numpy(rng.choice([3, 17, 42, 100, 7, 8, 9, 2000], 500))  # 8 groups of unequal size
    state = torch.get_rng_state()
    train, val = data.train_val_split(500, 0.2, seed=1, groups=groups)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is neither used nor advanced
    assert train.dtype == val.dtype == torch.int64
    assert torch.equal(train, train.sort().values) and torch.equal(val, val.sort().values)
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(500))  # disjoint, covers all
    assert not set(groups[train].tolist()) & set(groups[val].tolist())  # no group on both sides
    # the rule by hand: the sorted distinct groups in the seed's permutation, taken until >= round(500 * 0.2) rows
    ids = sorted(set(groups.tolist()))
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(1)).tolist()
    taken, rows = [], 0
    for i in order:
        if rows >= 100:
            break
        taken.append(ids[i])
        rows += int((groups == ids[i]).sum())
    assert set(groups[val].tolist()) == set(taken) and len(val) == rows >= 100
    assert len(val) - int((groups == taken[-1]).sum()) < 100  # one group fewer would be too few
    # fixed by the seed; another seed, other groups
    assert torch.equal(data.train_val_split(500, 0.2, seed=1, groups=groups)[1], val)
    assert any(not torch.equal(data.train_val_split(500, 0.2, seed=s, groups=groups)[1], val) for s in range(2, 5))
    assert [len(t) for t in data.train_val_split(500, 0.0, groups=groups)] == [500, 0]
    assert [len(t) for t in data.train_val_split(0, 0.1, groups=torch.zeros(0, dtype=torch.int64))] == [0, 0]
    # each row its own group: whole groups are single rows, and validation has exactly round(n * val_frac) rows
    assert [len(t) for t in data.train_val_split(1000, 0.1, groups=torch.arange(1000))] == [900, 100]

def test_domains():
    assert {'cifar10', 'imagenet32'} <= set(data.DOMAINS)
    c = data.get_domain('cifar10')
    # MetaMAE's CIFAR-10: 32x32 in [0, 1], patch 4 (64 tokens), batch 64, mask ratio 0.5, 10 classes
    assert (c.input_shape, c.patch_size, c.vocab_size, c.num_classes, c.batch_size, c.mask_ratio) == \
        ((3, 32, 32), (4, 4), 0, 10, 64, 0.5)
    assert data.get_domain('imagenet32').num_classes == 1000
    for name, d in data.DOMAINS.items():
        assert d.name == name and callable(d.load) and callable(d.to_input)
        spatial = d.input_shape[-len(d.patch_size):] if d.patch_size else ()
        assert all(s % p == 0 for s, p in zip(spatial, d.patch_size))


def test_to_input_is_unit_range_float_on_the_same_device():
    x = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8)
    y = data.CIFAR10.to_input(x)
    assert y.dtype == torch.float32 and y.device == x.device
    assert torch.allclose(y, torch.tensor([0.0, 128 / 255, 1.0]).view(1, 1, 1, 3))
    assert x.dtype == torch.uint8 and x.tolist() == [[[[0, 128, 255]]]]  # input untouched


# ----------------------------------------------------------------------------- the table: what no loader may accept
# Each row builds its files (the genuine format, then broken) and names the call that must refuse them: the
# exception (a DataError, which train.py and probe.py print as one line), the words that tell what is wrong and
# what to do, and what is left on disk (test_domains.py has the table of the other domains).


class Evil:  # a pickle that creates PWNED where it is loaded
    def __reduce__(self):
        return (os.mkdir, (str(Path('PWNED').resolve()),))


def pickled(obj):
    return lambda p: p.write_bytes(pickle.dumps(obj, protocol=2))


def batch(rows, labels):
    return lambda p: write_cifar_batch(p, rows, labels)


ROWS, LABELS = np.zeros((4, 3072), np.uint8), [0, 1, 2, 3]
BROKEN_BATCHES = {  # name: what breaks a batch file
    'truncated': lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    'empty': lambda p: p.write_bytes(b''),
    'garbage': lambda p: p.write_bytes(b'this is not a pickle at all'),
    'missing': lambda p: p.unlink(),
    'not a dict': pickled([1, 2, 3]),
    'no labels': pickled({b'data': ROWS}),
    'code in pickle': pickled({b'data': ROWS, b'labels': LABELS, b'x': Evil()}),
    'rows 3071 wide': batch(np.zeros((4, 3071), np.uint8), LABELS),
    'float pixels': batch(ROWS.astype(np.float32), LABELS),
    'label 10': batch(ROWS, [0, 1, 2, 10]),
    'label -1': batch(ROWS, [0, 1, 2, -1]),
    'fewer labels than rows': batch(ROWS, [0, 1, 2]),
}


def broken_batch(victim, breaks):
    def setup(c):
        c.mp.chdir(c.tmp)  # where the 'code in pickle' case would create PWNED
        make_cifar(c.tmp / 'cifar-10-batches-py')
        breaks(c.tmp / 'cifar-10-batches-py' / victim)
        return c.load('cifar10')
    return setup


def no_code_ran(c, msg):
    assert not (c.tmp / 'PWNED').exists()


def placed_archive_of_another_checksum(c):
    archive, _ = make_tarball(c.tmp)
    serve(c.mp, 'CIFAR10', archive)
    (c.tmp / 'data').mkdir()
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, different content
    (c.tmp / 'data' / archive.name).write_bytes(raw)
    return c.load('cifar10', c.tmp / 'data', download=True)


def download_of_another(what):
    """The archive served, and the published md5 or size another."""
    def setup(c):
        archive, _ = make_tarball(c.tmp)
        serve(c.mp, 'CIFAR10', archive)
        if what == 'md5':
            c.mp.setattr(data, 'CIFAR10_MD5', '0' * 32)
        else:
            c.mp.setattr(data, 'CIFAR10_SIZE', archive.stat().st_size + 1)
        return c.load('cifar10', c.tmp / 'data', download=True)
    return setup


def archive_md5(c):
    return hashlib.md5((c.tmp / 'cifar-10-python.tar.gz').read_bytes()).hexdigest()


def offline(failure):
    def setup(c):
        def urlopen(*args, **kwargs):
            raise failure
        c.mp.setattr(urllib.request, 'urlopen', urlopen)
        return c.load('cifar10', c.tmp / 'data', download=True)
    return setup


def nothing_there(c):
    c.mp.setattr(urllib.request, 'urlopen', no_network)
    return c.load('cifar10', c.tmp / 'nowhere')


def tar_member(name, type=tarfile.REGTYPE, linkname=''):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = type, linkname, 1 if type == tarfile.REGTYPE else 0
    return info


def tarball_with(*members):
    """A placed archive with these members beside cifar-10-batches-py/."""
    def setup(c):
        archive, _ = make_tarball(c.tmp, extra=members)
        serve(c.mp, 'CIFAR10', archive)
        (c.tmp / 'data').mkdir()
        shutil.copy(archive, c.tmp / 'data')
        return c.load('cifar10', c.tmp / 'data')
    return setup


def nothing_extracted(c, msg):  # no temporary folder left, nothing outside
    assert listing(c.tmp / 'data') == ['cifar-10-python.tar.gz']
    assert not (c.tmp / 'evil').exists() and not Path('/tmp/metamae-test-evil').exists()


def not_gzip(c):
    (c.tmp / 'x.tar.gz').write_bytes(b'\x1f\x8b' + b'not really gzip' * 10)
    return lambda: data.extract_archive(c.tmp / 'x.tar.gz', c.tmp / 'out')


def imagenet32_zero_based(c):
    make_imagenet32(c.tmp)
    with open(c.tmp / 'Imagenet32_val' / 'val_data', 'wb') as f:
        pickle.dump({'data': np.zeros((2, 3072), np.uint8), 'labels': [0, 5]}, f)
    return c.load('imagenet32')


def imagenet32_zip_escaping(c):
    make_imagenet32(c.tmp / 'src')
    with zipfile.ZipFile(c.tmp / 'Imagenet32_train.zip', 'w') as z:
        z.writestr('../evil', b'x')
    return c.load('imagenet32')


def broken_cache(breaks):
    """The two-file cache, built, then a.npy broken by breaks(path); the call reads it."""
    def setup(c):
        files = two_file_cache(c.tmp)
        data.cached_arrays(files, lambda: iter(chunks()))
        breaks(c.tmp / 'a.npy')
        return lambda: data.cached_arrays(files, fails)
    return setup


def npy(array, **kwargs):
    return lambda p: np.save(p, array, **kwargs)


def call(fn, *args, **kwargs):
    return lambda c: lambda: fn(*args, **kwargs)


DELETE = 'delete it and run again'
LOADER_CASES = [  # setup(case) -> the call; its exception; words of its one line; after(case, message) or None
    # CIFAR-10's batch files, written by Python 2's pickle: any of them broken is named, with what to do
    *[pytest.param(broken_batch(victim, breaks), DataError, [at('cifar-10-batches-py', victim), 'delete'], no_code_ran,
                   id=f'{victim}-{name}')
      for name, breaks in BROKEN_BATCHES.items() for victim in ('data_batch_3', 'test_batch')],
    # download, verify, extract: the user's file is theirs to delete; a download that fails verification is deleted
    pytest.param(placed_archive_of_another_checksum, DataError, [const('CIFAR10_MD5'), lambda c: hashlib.md5(
        (c.tmp / 'data' / 'cifar-10-python.tar.gz').read_bytes()).hexdigest(), 'delete it'],
        holds('cifar-10-python.tar.gz', folder='data'), id='placed-archive-of-another-checksum'),  # nothing extracted
    pytest.param(download_of_another('md5'), DataError, ['deleted', const('CIFAR10_URL'), '0' * 32, archive_md5],
                 holds(folder='data'), id='download-of-another-md5'),  # the expected md5 and the one got
    pytest.param(download_of_another('size'), DataError, ['deleted', const('CIFAR10_URL'),
                                                          lambda c: f'{data.CIFAR10_SIZE:,}',
                                                          lambda c: f'{data.CIFAR10_SIZE - 1:,}'],
                 holds(folder='data'), id='download-of-another-size'),
    # no internet: what to place where; the reason is shown, not swallowed
    *[pytest.param(offline(failure), DataError, [const('CIFAR10_URL'), 'cifar-10-python.tar.gz', 'cifar-10-batches-py',
                                                 at('data'), '--data-dir', type(failure).__name__],
                   holds(folder='data'), id=f'offline-{type(failure).__name__}')
      for failure in [urllib.error.URLError(OSError(101, 'Network is unreachable')), TimeoutError('timed out'),
                      urllib.error.HTTPError('http://x', 503, 'Service Unavailable', {}, None)]],
    pytest.param(nothing_there, DataError, [const('CIFAR10_URL'), 'cifar-10-python.tar.gz', at('nowhere'),
                                            '--data-dir'],
                 lambda c, msg: not (c.tmp / 'nowhere').exists(), id='download-off-and-nothing-there'),  # none made
    pytest.param(tarball_with(tar_member('../evil')), DataError, ['refusing', '../evil'], nothing_extracted,
                 id='tar-member-dotdot'),
    pytest.param(tarball_with(tar_member('cifar-10-batches-py/../../evil')), DataError,
                 ['refusing', 'cifar-10-batches-py/../../evil'], nothing_extracted, id='tar-member-nested-dotdot'),
    pytest.param(tarball_with(tar_member('/tmp/metamae-test-evil')), DataError, ['refusing', '/tmp/metamae-test-evil'],
                 nothing_extracted, id='tar-member-absolute'),
    pytest.param(tarball_with(tar_member('cifar-10-batches-py/link', tarfile.SYMTYPE, '../../evil')), DataError,
                 ['refusing', 'cifar-10-batches-py/link'], nothing_extracted, id='tar-member-symlink-out'),
    pytest.param(tarball_with(tar_member('cifar-10-batches-py/link', tarfile.SYMTYPE, '/etc/passwd')), DataError,
                 ['refusing', 'cifar-10-batches-py/link'], nothing_extracted, id='tar-member-symlink-abs'),
    pytest.param(tarball_with(tar_member('cifar-10-batches-py/hard', tarfile.LNKTYPE, '../evil')), DataError,
                 ['refusing', 'cifar-10-batches-py/hard'], nothing_extracted, id='tar-member-hardlink-out'),
    # each link points inside, yet l2 lands at the archive root's parent: links are refused outright
    pytest.param(tarball_with(tar_member('a/l1', tarfile.SYMTYPE, '..'), tar_member('a/l1/l2', tarfile.SYMTYPE, '..'),
                              tar_member('a/l1/l2/evil')), DataError, ['refusing', 'a/l1'], nothing_extracted,
                 id='tar-member-link-chain'),
    pytest.param(tarball_with(tar_member('cifar-10-batches-py/fifo', tarfile.FIFOTYPE)), DataError,
                 ['refusing', 'cifar-10-batches-py/fifo'], nothing_extracted, id='tar-member-fifo'),
    pytest.param(not_gzip, DataError, [at('x.tar.gz'), 'download it again'], holds('x.tar.gz'),
                 id='archive-not-gzip'),
    # ImageNet32: labels 1..1000 in the file, a manual download, zips extracted safely
    pytest.param(imagenet32_zero_based, DataError, [at('Imagenet32_val', 'val_data'), '1..1000'], None,
                 id='imagenet32-zero-based-labels'),
    pytest.param(lambda c: c.load('imagenet32', download=True), DataError,
                 ['image-net.org', 'Imagenet32_train.zip', 'Imagenet32_val.zip', at(), '--data-dir'], None,
                 id='imagenet32-missing'),  # the manual download's instructions
    pytest.param(imagenet32_zip_escaping, DataError, ['refusing', '../evil'],
                 lambda c, msg: not (c.tmp.parent / 'evil').exists() and not (c.tmp / 'Imagenet32_train').exists(),
                 id='imagenet32-zip-member-escaping'),
    # a broken cache: never unpickled, never read as another shape; named, with what to do
    pytest.param(broken_cache(lambda p: p.write_bytes(p.read_bytes()[:-10])), DataError,
                 [at('a.npy'), DELETE, 'truncated'], None, id='cache-truncated'),
    pytest.param(broken_cache(lambda p: p.write_bytes(b'')), DataError, [at('a.npy'), DELETE], None, id='cache-empty'),
    pytest.param(broken_cache(lambda p: p.write_bytes(b'not a numpy file at all' * 10)), DataError,
                 [at('a.npy'), DELETE], None, id='cache-garbage'),
    pytest.param(broken_cache(npy(np.array([{'x': 1}] * 12, dtype=object), allow_pickle=True)), DataError,
                 [at('a.npy'), DELETE], None, id='cache-of-pickled-objects'),  # np.load refuses them, memmaps can't
    pytest.param(broken_cache(npy(np.zeros((12, 3)))), DataError, [at('a.npy'), DELETE, 'float64', 'float32'], None,
                 id='cache-of-float64'),
    pytest.param(broken_cache(npy(np.zeros((12, 4), np.float32))), DataError, [at('a.npy'), DELETE, '(12, 4)'], None,
                 id='cache-rows-4-wide'),
    pytest.param(broken_cache(npy(np.float32(1))), DataError, [at('a.npy'), DELETE], None, id='cache-of-no-rows-axis'),
    pytest.param(broken_cache(npy(np.zeros((11, 3), np.float32))), DataError,
                 [at('a.npy'), 'different row counts', at('b.npy'), 'delete them'], None,
                 id='caches-of-other-row-counts'),
    # splits and domains
    pytest.param(call(data.seeded_split, 9, 'some.csv'), DataError,
                 ['some.csv', '9 rows leave none for the test split'], None, id='seeded-split-of-9-rows'),
    pytest.param(call(data.train_val_split, 10, 1.0), ValueError, [], None, id='val-frac-1'),
    pytest.param(call(data.train_val_split, 10, 0.1, groups=torch.full((10,), 5)), ValueError, ['every group'], None,
                 id='val-split-of-one-group'),  # validation would take it all
    pytest.param(call(data.train_val_split, 10, 0.1, groups=torch.zeros(9, dtype=torch.int64)), ValueError, ['shape'],
                 None, id='val-split-groups-of-another-shape'),
    pytest.param(call(data.train_val_split, 10, 0.1, groups=torch.zeros(10)), ValueError, ['integers'], None,
                 id='val-split-groups-of-floats'),
    pytest.param(call(data.get_domain, 'cifar100'), DataError, ['cifar100', 'cifar10', 'imagenet32'], None,
                 id='unknown-domain'),
    pytest.param(lambda c: lambda: setattr(data.get_domain('cifar10'), 'batch_size', 1), FrozenInstanceError,
                 ['batch_size'], None, id='a-domain-changed'),
]


@pytest.mark.parametrize('setup,exception,words,after', LOADER_CASES)
def test_what_no_loader_may_accept(tmp_path, monkeypatch, capsys, setup, exception, words, after):
    assert_refused(Loading(tmp_path, monkeypatch, capsys), setup, exception, words, after)
