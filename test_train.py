"""Tests of train.py: overrides, resume = uninterrupted, torchrun, the probe's honesty, and the bad-input table."""

import contextlib
import copy
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import bench
import train
from conftest import FAKE_WRITERS, make_cifar, make_imagenet32, write_fake

HERE = Path(__file__).resolve().parent
REAL_DATA = HERE.parent / "shared" / "data"
TINY = ("--embed-dim 32 --depth 1 --num-heads 2 --decoder-embed-dim 16 --decoder-depth 1 --decoder-num-heads 2 "
        "--batch-size 8 --probe-epochs 2 --log-interval 1 --warmup-steps 2 --threads 1").split()


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_cifar(root / "cifar-10-batches-py", rows_per_file=20)  # 100 train, 20 test
    return root


def run_main(*args):
    """train.py in this process; returns the final record."""
    return train.run(train.parse_args([str(a) for a in args]))


def run_cli(*args, cwd=HERE, timeout=300):
    """train.py as a user runs it; returns (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, str(HERE / "train.py"), *map(str, args)], cwd=cwd, capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return p.returncode, p.stdout, p.stderr


def read_log(path):
    return [json.loads(line) for line in open(path)]

# ----------------------------------------------------------------------------- overrides


def test_overrides_both_spellings_and_types():
    cfg = train.parse_args(["--domain", "cifar10", "--max-steps=7", "--lr", "3e-4", "--compile", "--first_order=true",
                            "--download", "false", "--out-dir", "x"])
    assert (cfg.max_steps, cfg.lr, cfg.compile, cfg.first_order, cfg.download, cfg.out_dir) == (7, 3e-4, True, True,
                                                                                                 False, "x")
    assert train.Config().max_steps == 100_000  # defaults untouched


@pytest.mark.parametrize("argv,needle", [
    (["--no-such-knob", "1"], "unrecognized arguments: --no-such-knob"),
    (["--max-steps", "ten"], "--max-steps: invalid int value: 'ten'"),
    (["--compile=maybe"], "--compile: invalid bool value: 'maybe'"),
    (["--lr"], "--lr: expected one argument"),
    (["stray"], "unrecognized arguments: stray"),
    (["--max-s", "3"], "unrecognized arguments: --max-s"),  # no abbreviations: a typo is not a guess
])
def test_bad_overrides_name_the_option(argv, needle):
    with pytest.raises(train.UsageError, match=needle):
        train.parse_args(argv)


def test_help_lists_every_knob():
    code, out, _ = run_cli("--help")
    assert code == 0
    for f in train.fields(train.Config):
        assert f"--{f.name.replace('_', '-')}" in out


def test_presets_and_domain_defaults():
    domain = train.data.get_domain("cifar10")
    cpu_cfg, _, cpu = train.check(train.parse_args(["--preset", "cpu"]))
    assert (cpu.embed_dim, cpu.depth, cpu.decoder_depth, cpu.mask_ratio, cpu_cfg.max_steps) == (192, 6, 2, 0.75, 3400)
    given = train.parse_args(["--depth", "3", "--preset", "cpu", "--max-steps", "10"])  # options win over presets
    assert (given.depth, given.embed_dim, given.max_steps) == (3, 192, 10)
    paper = train.check(train.parse_args(["--depth", "3", "--mask-ratio", "0.75"]))[2]
    assert (paper.embed_dim, paper.depth, paper.mask_ratio) == (256, 3, 0.75)
    cfg, _, mcfg = train.check(train.parse_args([]))
    assert mcfg.mask_ratio == cfg.mask_ratio == domain.mask_ratio and cfg.batch_size == domain.batch_size


def test_model_defaults_are_defined_once():
    # every model knob of the command line is a MetaMAEConfig field with MetaMAEConfig's default (the mask
    # ratio's default is the domain's), and the run's model config is built from the knobs, not retyped
    knobs = {f.name: f.default for f in train.fields(train.Config)}
    for f in train.fields(train.MetaMAEConfig):
        if f.name in train.DOMAIN_SET:
            assert f.name not in knobs
        else:
            assert knobs[f.name] == (None if f.name == "mask_ratio" else f.default), f.name
    argv = ["--embed-dim", "64", "--num-heads", "4", "--inner-lr", "0.25", "--temperature", "0.2", "--proj-dim", "16"]
    mcfg = train.check(train.parse_args(argv))[2]
    assert (mcfg.embed_dim, mcfg.num_heads, mcfg.inner_lr, mcfg.temperature, mcfg.proj_dim) == (64, 4, 0.25, 0.2, 16)


def test_underscores_and_flags_without_values():
    cfg = train.parse_args(["--max_steps=5", "--first_order", "--download=no", "--out_dir", "runs/my_run"])
    assert (cfg.max_steps, cfg.first_order, cfg.download, cfg.out_dir) == (5, True, False, "runs/my_run")


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = train.parse_args(["--max-steps", "100", "--warmup-steps", "10", "--lr", "1e-3", "--min-lr", "1e-5"])
    lrs = [train.lr_at(s, cfg) for s in range(100)]
    assert lrs[9] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(1e-5, rel=0.05)


def test_no_weight_decay_on_biases_norms_and_tokens():
    model = train.MetaMAE(train.MetaMAEConfig(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                                              decoder_depth=1, decoder_num_heads=2))
    opt = train.make_optimizer(model, train.Config())
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2 and not name.endswith(("cls_token", "mask_token"))), name

# ----------------------------------------------------------------------------- the probe


def test_linear_probe_selects_on_validation_and_scores_test_once():
    torch.manual_seed(0)
    w = torch.randn(8, 3)
    make = lambda n: (lambda f: (f, (f @ w).argmax(1)))(torch.randn(n, 8) * 5 + 3)  # noqa: E731 (unstandardized)
    cfg = train.parse_args(["--probe-epochs", "30", "--probe-lrs", "1e-2,1e-5"])
    tr, va, te = make(400), make(100), make(100)
    res = train.linear_probe(tr, va, 3, cfg, test=te)
    assert res["lr"] == 1e-2 and 1 <= res["epoch"] <= 30 and res["val_acc"] > 0.85 and res["test_acc"] > 0.85
    # the choice ignores the test split: garbage test labels change the test score, not the choice
    garbage = train.linear_probe(tr, va, 3, cfg, test=(te[0], (te[1] + 1) % 3))
    assert (garbage["lr"], garbage["epoch"], garbage["val_acc"]) == (res["lr"], res["epoch"], res["val_acc"])
    assert garbage["test_acc"] < 0.5
    assert "test_acc" not in train.linear_probe(tr, va, 3, cfg)  # no test unless asked


def test_weighted_f1_by_hand():
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    # per class F1 = 2 tp / (true + predicted): 4/5, 2/4, 2/3; weights 3, 2, 1 of 6; class 3 never occurs
    assert train.weighted_f1(pred, y, 4) == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert train.weighted_f1(y, y, 4) == pytest.approx(1.0)
    # unlike accuracy, predicting the majority class everywhere scores low
    majority = torch.zeros_like(y)
    assert (majority == y).float().mean() == 0.5 and train.weighted_f1(majority, y, 4) == pytest.approx(3 / 6 * 2 * 3 / 9)


def test_probe_selects_and_reports_by_the_domains_metric():
    torch.manual_seed(0)
    w = torch.randn(8, 3)
    make = lambda n: (lambda f: (f, (f @ w).argmax(1)))(torch.randn(n, 8))  # noqa: E731
    cfg = train.parse_args(["--probe-epochs", "5"])
    res = train.linear_probe(make(300), make(100), 3, cfg, test=make(100), metric="weighted_f1")
    assert set(res) == {"val_acc", "val_f1", "test_acc", "test_f1", "lr", "epoch"}
    assert 0 < res["test_f1"] <= 1 and 0 < res["val_f1"] <= 1
    assert set(train.linear_probe(make(300), make(100), 3, cfg, test=make(100))) == {"val_acc", "test_acc", "lr",
                                                                                     "epoch"}


def test_png_is_valid(tmp_path):
    import zlib
    img = (torch.arange(2 * 3 * 3) % 256).to(torch.uint8).view(2, 3, 3).numpy()
    train.write_png(tmp_path / "a.png", img)
    raw = (tmp_path / "a.png").read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    idat = raw[33 + 8: -12 - 4]
    rows = zlib.decompress(idat)
    assert rows == b"".join(b"\x00" + bytes(r.flatten()) for r in img)

# ----------------------------------------------------------------------------- runs


def test_resume_continues_exactly_like_an_uninterrupted_run(cifar_dir, tmp_path):
    common = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--max-steps", "6", "--eval-interval", "0"]
    full = run_main(*common, "--out-dir", tmp_path / "full")
    run_main(*common, "--out-dir", tmp_path / "split", "--stop-step", "3")
    split_ckpt = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert split_ckpt["step"] == 3
    resumed = run_main(*common, "--out-dir", tmp_path / "split", "--resume")
    a = [r for r in read_log(tmp_path / "full" / "log.jsonl") if "loss" in r]
    b = [r for r in read_log(tmp_path / "split" / "log.jsonl") if "loss" in r]
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("loss", "amortized", "support", "adapted", "contrast", "lr"):
            assert ra[key] == rb[key], (ra["step"], key)
    assert resumed["test_acc"] == full["test_acc"]
    sa = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)["model"]
    sb = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(k.startswith(("_orig_mod", "module")) for k in sa)
    assert (tmp_path / "full" / "reconstructions_6.png").is_file()


def test_pretraining_lowers_the_loss(cifar_dir, tmp_path):
    run_main("--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--max-steps", "40", "--lr", "3e-3",
             "--out-dir", tmp_path, "--eval-interval", "0")
    log = [r for r in read_log(tmp_path / "log.jsonl") if "loss" in r]
    first, last = sum(r["adapted"] for r in log[:5]) / 5, sum(r["adapted"] for r in log[-5:]) / 5
    assert last < 0.7 * first


def test_eval_only_modes(cifar_dir, tmp_path):
    common = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--out-dir", tmp_path]
    raw = run_main(*common, "--eval-only", "raw")
    rnd = run_main(*common, "--eval-only", "random")
    run_main(*common, "--max-steps", "2", "--eval-interval", "0")
    ck = run_main(*common, "--eval-only", "ckpt")
    for rec in (raw, rnd, ck):
        assert 0 <= rec["test_acc"] <= 1 and 0 <= rec["val_acc"] <= 1
    assert len(read_log(tmp_path / "eval.jsonl")) == 3


def test_compiled_encoder_trains_like_eager_and_saves_clean_keys(cifar_dir, tmp_path):
    common = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--max-steps", "3", "--eval-interval", "0",
              "--dropout", "0", "--probe-epochs", "1"]
    run_main(*common, "--out-dir", tmp_path / "eager")
    run_main(*common, "--out-dir", tmp_path / "compiled", "--compile")
    eager = [r["loss"] for r in read_log(tmp_path / "eager" / "log.jsonl") if "loss" in r]
    compiled = [r["loss"] for r in read_log(tmp_path / "compiled" / "log.jsonl") if "loss" in r]
    assert compiled == pytest.approx(eager, rel=1e-4)
    keys = torch.load(tmp_path / "compiled" / "ckpt.pt", weights_only=True)["model"].keys()
    assert keys == torch.load(tmp_path / "eager" / "ckpt.pt", weights_only=True)["model"].keys()


def test_torchrun_two_cpu_ranks_stay_identical(cifar_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "train.py"), "--domain", "cifar10", "--data-dir", str(cifar_dir), *TINY, "--max-steps", "3",
           "--out-dir", str(tmp_path), "--eval-interval", "0", "--device", "cpu"]
    p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ranks in sync: max parameter difference 0" in p.stdout
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 3

def test_bench_prints_three_rows_with_ratios_to_mae(capsys):
    res = bench.bench(train.parse_args([*TINY, "--bench-steps", "1", "--bench-repeats", "1"], bench.BenchConfig))
    assert list(res) == ["MAE", "MetaMAE 1st-order", "MetaMAE 2nd-order"]
    assert res["MAE"]["ratio"] == 1.0 and all(r["ms_per_step"] > 0 and r["peak_mb"] > 0 for r in res.values())
    out = capsys.readouterr().out
    assert "ms/step" in out and "MetaMAE 2nd-order" in out
    # the old spelling, train.py --bench, is the same command; bench options are refused by train.py alone
    train.main(["--bench", *TINY, "--bench-steps", "1", "--bench-repeats", "1", "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert "bfloat16" in out and out.count("MetaMAE") == 2
    with pytest.raises(train.UsageError, match="--bench-steps"):
        train.parse_args(["--bench-steps", "1"])
    with pytest.raises(train.UsageError, match="--bench-steps"):
        bench.bench(train.parse_args(["--bench-steps", "0"], bench.BenchConfig))



def tiny_model(**kw):
    torch.manual_seed(0)
    return train.MetaMAE(train.MetaMAEConfig(input_shape=(3, 16, 16), patch_size=(4, 4), embed_dim=32, depth=1,
                                             num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                                             **kw))


def train_losses(model, opt, cfg, lrs, x, lr_tensor=None):
    """Steps at the given lrs, set as Python floats, or by filling lr_tensor as GraphedStep does."""
    autocast = train.setup_device(cfg)[3]
    step = train.make_step(model, opt, cfg, autocast)
    out = []
    for i, lr in enumerate(lrs):
        torch.manual_seed(i)  # the same masks and dropout in every run
        if lr_tensor is None:
            out.append(step(x, lr)[0].item())
        else:
            lr_tensor.fill_(lr)
            out.append(train.train_step(model, opt, x, cfg, autocast)[0].item())
    return out


def test_graph_mode_optimizer_steps_like_the_eager_one():
    # --cuda-graph keeps the lr and the step count on the device (a tensor lr, capturable AdamW) so a replayed
    # step reads them there: the updates must be those of the eager optimizer, also after resuming its state
    x, lrs = torch.rand(8, 3, 16, 16), [1e-3, 5e-4, 2e-4, 1e-4]
    cfg = train.Config(device="cpu")
    eager = tiny_model()
    eager_opt = train.make_optimizer(eager, cfg)
    graph = tiny_model()
    graph_opt = train.make_optimizer(graph, cfg)
    lr_tensor = train.device_lr(graph_opt, torch.device("cpu"))  # a captured step holds this very tensor
    assert all(g["lr"] is lr_tensor and g["capturable"] for g in graph_opt.param_groups)
    # not bit for bit: the tensor lr is float32, the Python one float64
    assert train_losses(eager, eager_opt, cfg, lrs[:2], x) == pytest.approx(
        train_losses(graph, graph_opt, cfg, lrs[:2], x, lr_tensor), rel=1e-6)
    assert all(g["lr"] is lr_tensor for g in graph_opt.param_groups) and lr_tensor.item() == pytest.approx(lrs[1])
    for p, q in zip(eager.parameters(), graph.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # an update is ~1e-4
    # resume the eager run's state in graph mode: GraphedStep is built after loading, so the saved float lr
    # is replaced by the device tensor
    resumed = tiny_model()
    resumed.load_state_dict(eager.state_dict())
    resumed_opt = train.make_optimizer(resumed, cfg)
    resumed_opt.load_state_dict(copy.deepcopy(eager_opt.state_dict()))  # as if from disk
    resumed_lr = train.device_lr(resumed_opt, torch.device("cpu"))
    assert all(g["lr"] is resumed_lr and g["capturable"] for g in resumed_opt.param_groups)
    train_losses(eager, eager_opt, cfg, lrs[2:], x)
    train_losses(resumed, resumed_opt, cfg, lrs[2:], x, resumed_lr)
    for p, q in zip(eager.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # an update is ~1e-4


class FakeGraph:
    """A CPU stand-in for torch.cuda.CUDAGraph. Capture records every aten op the step dispatches, with the
    very tensors it read and wrote; replay re-runs them into the same tensors. As in a real graph, what
    Python decided at capture (a float lr, a branch, a value read from a tensor) stays frozen, and random
    ops draw anew. Unlike a real graph, capture also executes the step once."""

    def __init__(self):
        self.ops = []

    @torch.no_grad()  # kernels only, as a GPU replays them: no autograd bookkeeping
    def replay(self):
        for func, args, kwargs, out in self.ops:
            new = func(*args, **kwargs)
            for old, fresh in zip(tree_leaves(out), tree_leaves(new)):
                if isinstance(old, torch.Tensor) and old.data_ptr() != fresh.data_ptr():
                    old.copy_(fresh)


class Record(TorchDispatchMode):
    def __init__(self, graph):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:  # a view aliases memory the replay refreshes anyway
            self.graph.ops.append((func, args, kwargs or {}, out))
        return out


class FakeStream:
    def wait_stream(self, other):
        pass


def test_cuda_graph_step_replays_like_eager_training(monkeypatch):
    # GraphedStep on CPU through FakeGraph: its warm-up, capture on static buffers, lr handling and returned
    # tensors must give the eager run's losses and weights bit for bit (the meta-device test in
    # test_metamae covers what capture itself forbids: host syncs and host-to-device copies)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: Record(g))
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    cfg = train.Config(device="cpu", cuda_graph=True)
    autocast = train.setup_device(train.Config(device="cpu"))[3]
    batches = torch.rand(8, 4, 3, 16, 16)
    lrs = [1e-3, 8e-4, 6e-4, 4e-4, 3e-4, 2e-4, 1e-4, 5e-5]
    graphed = tiny_model()
    step = train.make_step(graphed, train.make_optimizer(graphed, cfg), cfg, autocast)
    assert isinstance(step, train.GraphedStep)
    torch.manual_seed(0)
    got = [step(x, lr)[0].item() for x, lr in zip(batches, lrs)]
    assert len(step.graph.ops) > 100
    eager = tiny_model()
    opt = train.make_optimizer(eager, cfg)
    lr_tensor = train.device_lr(opt, torch.device("cpu"))
    no_cache = functools.partial(autocast, cache_enabled=False)
    torch.manual_seed(0)
    want = []
    for i, (x, lr) in enumerate(zip(batches, lrs)):
        lr_tensor.fill_(lr)
        if i == 3:  # the fake's capture ran this step once already
            train.train_step(eager, opt, x, cfg, no_cache)
        want.append(train.train_step(eager, opt, x, cfg, no_cache)[0].item())
    assert got == want
    for p, q in zip(graphed.parameters(), eager.parameters()):
        assert torch.equal(p, q)


def test_bf16_autocast_loss_curve_follows_fp32():
    # bf16 changes precision, not the method: its curve must stay close to fp32's, well inside what training moves
    torch.manual_seed(1)
    x = torch.rand(16, 3, 16, 16) * torch.linspace(0, 1, 16)  # a horizontal ramp: something to learn
    curves = {}
    for dtype in ("float32", "bfloat16"):
        cfg = train.Config(device="cpu", dtype=dtype)
        model = tiny_model()
        curves[dtype] = train_losses(model, train.make_optimizer(model, cfg), cfg, [3e-3] * 40, x)
    fp32, bf16 = curves["float32"], curves["bfloat16"]
    learned = fp32[0] - min(fp32)
    gap = max(abs(a - b) for a, b in zip(fp32, bf16))
    assert learned > 0.3 * fp32[0], fp32  # training moved the loss
    assert 0 < gap < 0.01 * learned, (gap, learned)  # bf16 is really in use, and close

def test_training_loop_reads_the_device_only_at_log_and_checkpoint_steps(cifar_dir, tmp_path, monkeypatch):
    # on a GPU each read of a device value (.item(), bool(t), .cpu(), ...) stalls the queue: the loop may read
    # only at log and checkpoint steps, so 4 and 12 steps with the same log/ckpt schedule read equally often
    reads = []

    def counting(name, original):
        def read(self, *args, **kwargs):
            reads.append(name)
            return original(self, *args, **kwargs)
        return read
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    counts = []
    for stop in (4, 12):
        reads.clear()
        run_main("--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--max-steps", 20, "--stop-step", stop,
                 "--log-interval", 100, "--ckpt-interval", 100, "--out-dir", tmp_path / str(stop))
        counts.append(sorted(reads))
    assert counts[0] == counts[1] and counts[0], counts

# ----------------------------------------------------------------------------- bad input: one line, non-zero, no traceback


def assert_clean_error(result, code, *needles):
    rc, out, err = result
    assert rc == code, (rc, out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)


def test_missing_data_without_download_names_url_file_and_option(tmp_path):
    assert_clean_error(run_cli("--domain", "cifar10", "--data-dir", tmp_path, "--download", "false"), 1,
                       "cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                       "--data-dir")
    assert list(tmp_path.iterdir()) == []


def test_no_internet_is_a_clean_error(tmp_path):
    # this machine has no route to the dataset's host; CI neither. Either way the error must be clean.
    rc, out, err = run_cli("--domain", "cifar10", "--data-dir", tmp_path, timeout=600)
    assert_clean_error((rc, out, err), 1, "cifar-10-python.tar.gz", "--data-dir")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing half-written


def test_wrong_checksum_archive_is_refused(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not the real archive")
    assert_clean_error(run_cli("--domain", "cifar10", "--data-dir", tmp_path, "--download", "false"), 1,
                       "cifar-10-python.tar.gz")
    assert not (tmp_path / "cifar-10-batches-py").exists()


def test_truncated_batch_file_is_a_clean_error(tmp_path):
    make_cifar(tmp_path / "cifar-10-batches-py", rows_per_file=4)
    victim = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    victim.write_bytes(victim.read_bytes()[:500])
    assert_clean_error(run_cli("--domain", "cifar10", "--data-dir", tmp_path, *TINY), 1, "data_batch_3")


@pytest.mark.parametrize("args,needle", [
    (["--domain", "mnist"], "mnist"),
    (["--batch-size", "1"], "--batch-size 1"),
    (["--mask-ratio", "1.5"], "--mask-ratio"),
    (["--embed-dim", "30"], "embed_dim"),
    (["--inner-steps", "0"], "contrast_weight"),
    (["--eval-only", "maybe"], "--eval-only"),
    (["--preset", "huge"], "--preset"),
    (["--max-steps", "zero"], "--max-steps"),
    (["--warp-speed", "9"], "--warp-speed"),
    (["--cuda-graph"], "--cuda-graph"),  # this machine has no GPU
])
def test_invalid_options_are_clean_errors(cifar_dir, args, needle):
    base = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY]
    rc, out, err = run_cli(*base, *args)
    assert rc != 0 and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_missing_and_incompatible_checkpoints(cifar_dir, tmp_path):
    base = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--out-dir", tmp_path]
    assert_clean_error(run_cli(*base, "--resume"), 1, "no checkpoint")
    assert_clean_error(run_cli(*base, "--eval-only", "ckpt"), 1, "no checkpoint")
    run_main(*base, "--max-steps", "1", "--stop-step", "1")
    assert_clean_error(run_cli(*base, "--resume", "--embed-dim", "64"), 1, "different model", "embed_dim")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    state["model_config"]["input_shape"] = [3, 16, 16]  # as if trained on another domain
    torch.save(state, tmp_path / "other.pt")
    assert_clean_error(run_cli(*base, "--eval-only", "ckpt", "--ckpt", tmp_path / "other.pt"), 1, "--domain")
    (tmp_path / "broken.pt").write_bytes(b"garbage")
    assert_clean_error(run_cli(*base, "--eval-only", "ckpt", "--ckpt", tmp_path / "broken.pt"), 1, "unreadable")


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(cifar_dir, tmp_path):
    base = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--out-dir", tmp_path, "--max-steps", "4"]
    run_main(*base, "--stop-step", "2")
    before = (tmp_path / "ckpt.pt").read_bytes()
    # an absurd learning rate sends the weights to ~1e30 in one step, and the next loss overflows
    assert_clean_error(run_cli(*base, "--resume", "--lr", "1e30"), 1, "non-finite")
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("name", sorted(FAKE_WRITERS))
def test_every_domain_pretrains_and_probes_through_train_py(name, tmp_path, monkeypatch):
    # files in the genuine format, read by the same code path as a real download
    data_dir = write_fake(name, tmp_path / "data", monkeypatch)
    rec = run_main("--domain", name, "--data-dir", data_dir, *TINY, "--max-steps", "2", "--probe-epochs", "1",
                   "--download", "false", "--eval-interval", "0", "--out-dir", tmp_path / "run")
    domain = train.data.DOMAINS[name]
    # a domain with labels is probed itself; a label-free one (LibriSpeech, wafer, Pfam) on its DABS transfer domain
    key = "test_acc" if domain.num_classes else f"{domain.transfer[0]}_test_acc"
    assert rec["step"] == 2 and 0 <= rec[key] <= 1
    if domain.metric == "weighted_f1" or (not domain.num_classes and
                                          train.data.DOMAINS[domain.transfer[0]].metric == "weighted_f1"):
        assert 0 <= rec[key.replace("acc", "f1")] <= 1
    log = [r for r in read_log(tmp_path / "run" / "log.jsonl") if "loss" in r]
    assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log)


@pytest.mark.skipif(not (REAL_DATA / "cifar-10-batches-py").is_dir(), reason="no real CIFAR-10 sample")
def test_one_step_on_the_real_cifar10_sample(tmp_path):
    rec = run_main("--domain", "cifar10", "--data-dir", REAL_DATA, *TINY, "--max-steps", "1", "--probe-epochs", "1",
                   "--out-dir", tmp_path, "--eval-interval", "0")
    assert rec["step"] == 1 and 0 <= rec["test_acc"] <= 1


class Payload:
    """A pickle that runs a shell command when loaded: what a crafted checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_crafted_checkpoint_cannot_run_code(cifar_dir, tmp_path):
    base = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--out-dir", tmp_path]
    marker = tmp_path / "pwned"
    torch.save(dict(model={}, model_config={}, payload=Payload(marker)), tmp_path / "evil.pt")
    assert_clean_error(run_cli(*base, "--eval-only", "ckpt", "--ckpt", tmp_path / "evil.pt"), 1, "unreadable")
    assert not marker.exists()


def test_a_run_never_replaces_a_checkpoint_unasked(cifar_dir, tmp_path):
    base = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--out-dir", tmp_path, "--max-steps", "1",
            "--probe-epochs", "1", "--eval-interval", "0"]
    run_main(*base)
    before = (tmp_path / "ckpt.pt").read_bytes()
    assert_clean_error(run_cli(*base), 2, "--resume", "--overwrite")
    assert_clean_error(run_cli(*base, "--ckpt", tmp_path / "ckpt.pt"), 2, "--eval-only ckpt")
    assert_clean_error(run_cli(*base, "--resume", "--max-steps", "0"), 2, "--max-steps")
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    (tmp_path / "ckpt.pt.tmp").write_bytes(b"a save cut short")
    run_main(*base, "--overwrite", "--seed", "1")
    assert (tmp_path / "ckpt.pt").read_bytes() != before and not (tmp_path / "ckpt.pt.tmp").exists()
    assert len([r for r in read_log(tmp_path / "log.jsonl") if "loss" in r]) == 1  # a new run, a new log
    (tmp_path / "file").write_text("")
    assert_clean_error(run_cli(*base, "--out-dir", tmp_path / "file" / "run"), 2, "not a writable folder")


@pytest.mark.parametrize("args,needle", [
    (["--ckpt-interval", "0"], "--ckpt-interval must be positive"),
    (["--lr", "nan"], "--lr must be a finite number >= 0"),
    (["--min-lr", "-1"], "--min-lr must be a finite number >= 0"),
    (["--weight-decay", "-5"], "--weight-decay must be a finite number >= 0"),
    (["--inner-lr", "-0.5"], "inner_lr: must be >= 0"),
    (["--probe-lrs", "nan"], "--probe-lrs must be positive finite numbers"),  # before, not after, pretraining
    (["--device", "tpu"], "--device must be"),
    (["--device", "gpu"], "'cuda'"),
    (["--batch-size", "-5", "--contrast-weight", "0"], "--batch-size must be positive"),
    (["--domain", "nope"], "unknown --domain 'nope'; choose one of cifar10"),
    (["--bench", "--bench-steps", "0"], "--bench-steps and --bench-repeats must be positive"),
    (["--bench", "--bench-repeats", "0"], "--bench-steps and --bench-repeats must be positive"),
])
def test_bad_options_are_refused_before_any_work_with_exit_2(cifar_dir, tmp_path, args, needle):
    out_dir = tmp_path / "run"
    assert_clean_error(run_cli("--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--out-dir", out_dir, *args),
                       2, needle)
    assert not out_dir.exists()  # nothing written


def test_data_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "data").write_text("")
    assert_clean_error(run_cli("--domain", "cifar10", "--data-dir", tmp_path / "data"), 2, "is a file, not a folder")


@pytest.mark.parametrize("damage,needle", [
    (lambda s: s.pop("model"), "does not hold this model's weights"),
    (lambda s: s.pop("optimizer"), "cannot be resumed"),
    (lambda s: s.pop("rng_cpu"), "cannot be resumed"),
    (lambda s: s["model"].pop("encoder.norm.weight"), "encoder.norm.weight"),
    (lambda s: s["model"].update({"encoder.norm.weight": torch.ones(3)}), "encoder.norm.weight"),
    (lambda s: s["model"]["encoder.norm.bias"].fill_(float("nan")), "non-finite weights (encoder.norm.bias)"),
])
def test_damaged_checkpoints_are_refused_in_one_line(cifar_dir, tmp_path, damage, needle):
    base = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--out-dir", tmp_path, "--max-steps", "2"]
    run_main(*base, "--stop-step", "1")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    damage(state)
    torch.save(state, tmp_path / "ckpt.pt")
    assert_clean_error(run_cli(*base, "--resume"), 1, needle)
    if "optimizer" in state and "rng_cpu" in state:  # a checkpoint only probed needs its weights, and they are bad
        assert_clean_error(run_cli(*base, "--eval-only", "ckpt"), 1, needle)


def test_resume_past_max_steps_says_so(cifar_dir, tmp_path):
    base = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--out-dir", tmp_path]
    run_main(*base, "--max-steps", "3", "--stop-step", "2")
    assert_clean_error(run_cli(*base, "--max-steps", "1", "--resume"), 1, "is at step 2, past --max-steps 1")


def test_non_finite_messages_say_what_exists_and_blame_nan_data(tmp_path):
    make_cifar(tmp_path / "d1" / "cifar-10-batches-py", rows_per_file=20)
    base = ["--domain", "cifar10", "--data-dir", tmp_path / "d1", *TINY, "--max-steps", "3", "--probe-epochs", "1"]
    # no checkpoint yet: the message must not promise one
    assert_clean_error(run_cli(*base, "--out-dir", tmp_path / "r1", "--lr", "1e30"), 1, "non-finite",
                       "no checkpoint of this run was written yet")
    # NaN in the inputs: blame the data, not the learning rate
    assert "the training data hold NaN" in train.nonfinite_cause(
        type("S", (), {"train_x": torch.tensor([[0.0, float("nan")]])})())
    assert train.nonfinite_cause(type("S", (), {"train_x": torch.zeros(2, 2)})()).startswith("lower --lr")


def test_ctrl_c_exits_130_and_says_whether_a_checkpoint_exists(cifar_dir, tmp_path):
    import signal
    args = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--max-steps", "100000", "--out-dir", tmp_path]
    p = subprocess.Popen([sys.executable, str(HERE / "train.py"), *map(str, args)], cwd=HERE, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in p.stdout:  # wait until training runs
        if line.startswith("step 3 "):
            break
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert "no checkpoint of this run was written yet" in err, err
    assert not (tmp_path / "ckpt.pt").exists() and not list(tmp_path.glob("*.tmp"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_dir_is_refused_before_work(cifar_dir, tmp_path):
    tmp_path.chmod(0o555)
    try:
        assert_clean_error(run_cli("--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--eval-only", "raw",
                                   "--out-dir", tmp_path / "run"), 2, "not a writable folder")
    finally:
        tmp_path.chmod(0o755)


# ----------------------------------------------------------------------------- transfer: pretrain on one domain, probe on others


def test_transfer_imagenet32_to_cifar10_then_probe_the_checkpoint_alone(tmp_path):
    make_imagenet32(tmp_path / "data")
    make_cifar(tmp_path / "data" / "cifar-10-batches-py", rows_per_file=20)
    base = ["--data-dir", tmp_path / "data", *TINY, "--download", "false", "--probe-epochs", "1"]
    rec = run_main("--domain", "imagenet32", "--probe-domains", "cifar10", *base, "--max-steps", "2",
                   "--eval-interval", "0", "--out-dir", tmp_path / "run")
    assert 0 <= rec["test_acc"] <= 1 and 0 <= rec["cifar10_test_acc"] <= 1  # its own probe, then CIFAR-10's
    # the same checkpoint probed on CIFAR-10 alone: the same features and the same seeded probe, the same result
    alone = run_main("--domain", "cifar10", "--eval-only", "ckpt", "--ckpt", tmp_path / "run" / "ckpt.pt", *base,
                     "--out-dir", tmp_path / "probe")
    assert (alone["val_acc"], alone["test_acc"]) == (rec["cifar10_val_acc"], rec["cifar10_test_acc"])


@pytest.mark.parametrize("args,needle", [
    (["--probe-domains", "google_speech"], "its inputs (1, 224, 224)"),  # another shape than cifar10's
    (["--probe-domains", "cifar10,nope"], "unknown --probe-domains entry 'nope'"),
    (["--domain", "imagenet32", "--probe-domains", "pamap2"], "the model reads one input shape"),
])
def test_a_probe_domain_of_another_shape_is_refused(cifar_dir, tmp_path, args, needle):
    assert_clean_error(run_cli("--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--out-dir", tmp_path / "r",
                               *args), 2, needle)
    assert not (tmp_path / "r").exists()


def test_a_missing_transfer_dataset_stops_the_run_before_pretraining(cifar_dir, tmp_path):
    make_imagenet32(tmp_path / "data")  # no CIFAR-10 beside it
    rc, out, err = run_cli("--domain", "imagenet32", "--probe-domains", "cifar10", "--data-dir", tmp_path / "data",
                           *TINY, "--download", "false", "--out-dir", tmp_path / "r")
    assert_clean_error((rc, out, err), 1, "cifar-10-python.tar.gz")
    assert "step 1" not in out and not (tmp_path / "r" / "ckpt.pt").exists()


def test_librispeech_probes_its_transfer_domains_and_a_label_free_domain_is_not_probed(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    for name in ("librispeech", "audio_mnist", "google_speech"):
        write_fake(name, data_dir, monkeypatch)
    rec = run_main("--domain", "librispeech", "--probe-domains", "librispeech_transfer,audio_mnist,google_speech",
                   "--data-dir", data_dir, *TINY, "--max-steps", "1", "--probe-epochs", "1", "--download", "false",
                   "--eval-interval", "0", "--out-dir", tmp_path / "run")
    assert "test_acc" not in rec  # no labels: no probe of its own
    assert all(0 <= rec[f"{d}_test_acc"] <= 1 for d in ("librispeech_transfer", "audio_mnist", "google_speech"))
    assert_clean_error(run_cli("--domain", "librispeech", "--eval-only", "random", "--probe-domains", "none",
                               "--data-dir", data_dir, *TINY, "--out-dir", tmp_path / "e"), 2, "has no labels to probe")
