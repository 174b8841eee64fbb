"""Tests of train.py: overrides, resume = uninterrupted, torchrun, and the bad-input table."""

import math
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch

import cli
import probe
import train
from conftest import (FAKE_WRITERS, HERE, REAL_DATA, TINY, assert_clean_error, make_cifar, make_imagenet32, read_log,
                      run_cli, run_in_process, tiny_model, train_losses, write_fake)


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_cifar(root / "cifar-10-batches-py", rows_per_file=20)  # 100 train, 20 test
    return root


def parse(argv):  # as train.main parses: --resume takes the run's own options
    return cli.parse_args([str(a) for a in argv], train.Config, "", train.PRESETS, None, cli.resumed_options)


def run_main(*args):
    """train.py in this process; returns the final record."""
    return train.run(parse(args))


def train_cli(*args):
    """train.py's command line, in this process: (exit code, stdout, stderr)."""
    return run_in_process(train.main, *args)


def assert_share_of_the_test_split(acc, domain_name, data_dir):
    """An accuracy is a count of right answers over the domain's test split: k / n for an integer k."""
    n = len(train.data.DOMAINS[domain_name].load(data_dir, False).test_y)
    assert n > 0 and abs(acc * n - round(acc * n)) < 1e-3, (acc, n)

# ----------------------------------------------------------------------------- overrides


def test_overrides_both_spellings_and_types():
    cfg = parse(["--domain", "cifar10", "--max-steps=7", "--lr", "3e-4", "--compile", "--first_order=true",
                            "--download", "false", "--out-dir", "x"])
    assert (cfg.max_steps, cfg.lr, cfg.compile, cfg.first_order, cfg.download, cfg.out_dir) == (7, 3e-4, True, True,
                                                                                                 False, "x")
    assert train.Config().max_steps == 100_000  # defaults untouched


def test_help_lists_every_knob():
    code, out, _ = run_cli("train.py", "--help")
    assert code == 0
    for f in train.fields(train.Config):
        assert f"--{f.name.replace('_', '-')}" in out


def test_presets_and_domain_defaults():
    domain = train.data.get_domain("cifar10")
    cpu_cfg, _, _, cpu = train.check(parse(["--preset", "cpu"]))
    assert (cpu.embed_dim, cpu.depth, cpu.decoder_depth, cpu.mask_ratio, cpu_cfg.max_steps) == (192, 6, 2, 0.75, 3400)
    given = parse(["--depth", "3", "--preset", "cpu", "--max-steps", "10"])  # options win over presets
    assert (given.depth, given.embed_dim, given.max_steps) == (3, 192, 10)
    paper = train.check(parse(["--depth", "3", "--mask-ratio", "0.75"]))[3]
    assert (paper.embed_dim, paper.depth, paper.mask_ratio) == (256, 3, 0.75)
    cfg, _, _, mcfg = train.check(parse([]))
    assert mcfg.mask_ratio == cfg.mask_ratio == domain.mask_ratio and cfg.batch_size == domain.batch_size


def test_the_paper_preset_is_the_authors_recipe_and_mae_keeps_ours():
    model = tiny_model()
    paper = parse(["--preset", "paper"])
    opt = train.make_optimizer(model, paper)
    assert [len(g["params"]) for g in opt.param_groups] == [len(list(model.parameters())), 0]  # decay on everything
    assert all(g["weight_decay"] == 1e-4 and g["betas"] == (0.9, 0.999) for g in opt.param_groups[:1])
    assert {train.lr_at(s, paper) for s in (0, 1, 50_000, 99_999)} == {1e-4} and paper.grad_clip == 0
    assert parse([]).lr == paper.lr  # the default run is the paper's
    mae = parse(["--preset", "mae"])
    assert (mae.lr, mae.warmup_steps, mae.weight_decay, mae.adam_beta2, mae.grad_clip, mae.decay_all) == (
        5e-4, 2000, 0.05, 0.95, 1.0, False)
    cpu = parse(["--preset", "cpu"])  # the CPU preset is MAE's recipe, as measured in docs/ablation.md
    assert (cpu.weight_decay, cpu.adam_beta2, cpu.grad_clip, cpu.decay_all) == (0.05, 0.95, 1.0, False)


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
    mcfg = train.check(parse(argv))[3]
    assert (mcfg.embed_dim, mcfg.num_heads, mcfg.inner_lr, mcfg.temperature, mcfg.proj_dim) == (64, 4, 0.25, 0.2, 16)


def test_underscores_and_flags_without_values():
    cfg = parse(["--max_steps=5", "--first_order", "--download=no", "--out_dir", "runs/my_run"])
    assert (cfg.max_steps, cfg.first_order, cfg.download, cfg.out_dir) == (5, True, False, "runs/my_run")


def test_lr_schedule_warms_up_then_decays_to_min():
    cfg = parse(["--max-steps", "100", "--warmup-steps", "10", "--lr", "1e-3", "--min-lr", "1e-5"])
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

def test_a_learned_step_size_trains_in_its_own_group_undecayed_unclipped_at_the_scaled_rate():
    # --learn-inner-lr: log inner_lr is never decayed (not even under the paper's decay of everything), steps at
    # --learned-lr-scale x the schedule's rate, and is left out of the clipped norm, so the other parameters' steps
    # are clipped as with a fixed step size
    cfg = parse(["--preset", "paper", "--learn-inner-lr", "--learned-lr-scale", "7", "--grad-clip", "1e-3"])
    model = tiny_model(learn_inner_lr=True)
    opt = train.make_optimizer(model, cfg)
    *others, own = opt.param_groups
    assert own["params"] == [model.log_inner_lr] and own["weight_decay"] == 0 and own["lr_scale"] == 7
    assert all(model.log_inner_lr is not p for g in others for p in g["params"])
    seen = {}

    def clip(params, max_norm):  # what train_step clips
        seen["clipped"] = {id(p) for p in params}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.utils, "clip_grad_norm_", clip)
        train_losses(model, opt, cfg, [2e-3], torch.rand(4, 3, 16, 16))
    assert [g["lr"] for g in opt.param_groups] == [2e-3] * len(others) + [7 * 2e-3]
    assert seen["clipped"] == {id(p) for p in model.parameters()} - {id(model.log_inner_lr)}
    assert model.log_inner_lr.item() == pytest.approx(math.log(0.5) + 7 * 2e-3, abs=1e-5) or \
        model.log_inner_lr.item() == pytest.approx(math.log(0.5) - 7 * 2e-3, abs=1e-5)  # Adam's first step: +-lr


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


def test_evaluation_during_pretraining_reads_validation_only_and_leaves_training_alone(cifar_dir, tmp_path):
    common = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--max-steps", "4", "--probe-epochs", "1"]
    run_main(*common, "--eval-interval", "0", "--out-dir", tmp_path / "plain")
    run_main(*common, "--eval-interval", "2", "--out-dir", tmp_path / "eval")
    plain, evald = read_log(tmp_path / "plain" / "log.jsonl"), read_log(tmp_path / "eval" / "log.jsonl")
    mid = [r for r in evald if "probe_val_acc" in r]
    assert [r["step"] for r in mid] == [2]  # not at the last step: the run's end probes then
    assert {"val_amortized", "val_adapted", "val_shift", "probe_lr"} <= set(mid[0])
    assert not any(k.startswith("test") for r in mid for k in r)  # the test split is scored once, at the end
    assert (tmp_path / "eval" / "reconstructions_2.png").is_file()
    losses = lambda log: [(r["step"], r["loss"]) for r in log if "loss" in r]  # noqa: E731
    assert losses(evald) == losses(plain)  # the evaluation draws from no generator the training uses
    assert evald[-1]["test_acc"] == plain[-1]["test_acc"]


def test_pretraining_lowers_the_loss(cifar_dir, tmp_path):
    run_main("--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--max-steps", "40", "--lr", "3e-3",
             "--out-dir", tmp_path, "--eval-interval", "0")
    log = [r for r in read_log(tmp_path / "log.jsonl") if "loss" in r]
    first, last = sum(r["adapted"] for r in log[:5]) / 5, sum(r["adapted"] for r in log[-5:]) / 5
    assert last < 0.7 * first



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


def test_missing_data_without_download_names_url_file_and_option(tmp_path):
    # through the real entry point, as a user's shell meets it
    (tmp_path / "data").mkdir()
    assert_clean_error(run_cli("train.py", "--domain", "cifar10", "--data-dir", tmp_path / "data", "--download", "false",
                               "--out-dir", tmp_path / "run"), 1, "cifar-10-python.tar.gz",
                       "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "--data-dir")
    assert list((tmp_path / "data").iterdir()) == []


def test_no_internet_is_a_clean_error(tmp_path, monkeypatch):
    # what a machine without a route to the dataset's host meets, whatever the machine running this test has
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(train.data.DataError) as e:
        run_main("--domain", "cifar10", "--data-dir", tmp_path / "data", *TINY, "--out-dir", tmp_path / "run")
    msg = str(e.value)  # one_line_errors prints it as the one line, with exit code 1
    assert "\n" not in msg and "could not download" in msg and "cifar-10-python.tar.gz" in msg and "--data-dir" in msg
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".lock")]  # nothing half-written


def test_wrong_checksum_archive_is_refused(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not the real archive")
    assert_clean_error(train_cli("--domain", "cifar10", "--data-dir", tmp_path, "--download", "false", "--out-dir",
                                 tmp_path / "run"), 1, "cifar-10-python.tar.gz")
    assert not (tmp_path / "cifar-10-batches-py").exists()


def test_truncated_batch_file_is_a_clean_error(tmp_path):
    make_cifar(tmp_path / "cifar-10-batches-py", rows_per_file=4)
    victim = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    victim.write_bytes(victim.read_bytes()[:500])
    assert_clean_error(train_cli("--domain", "cifar10", "--data-dir", tmp_path, *TINY, "--out-dir", tmp_path / "run"), 1,
                       "data_batch_3")


def test_missing_and_incompatible_checkpoints(cifar_dir, tmp_path):
    base = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--out-dir", tmp_path]
    assert_clean_error(train_cli(*base, "--resume"), 1, "no checkpoint")
    run_main(*base, "--max-steps", "1", "--stop-step", "1")
    assert_clean_error(train_cli(*base, "--resume", "--embed-dim", "64"), 2, "--embed-dim 32 (given: 64)", "--overwrite")
    (tmp_path / "ckpt.pt").write_bytes(b"garbage")
    assert_clean_error(train_cli(*base, "--resume"), 1, "unreadable")


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(cifar_dir, tmp_path, monkeypatch):
    base = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--out-dir", tmp_path, "--max-steps", "4"]
    run_main(*base, "--stop-step", "2")
    before = (tmp_path / "ckpt.pt").read_bytes()
    step = train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a, **k: (torch.tensor(float("nan")), step(*a, **k)[1]))
    with pytest.raises(train.RunError, match="non-finite loss before step 3.*the checkpoint of step 2 .* is intact"):
        run_main(*base, "--resume")
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert not list(tmp_path.glob(".ckpt.pt.*"))


@pytest.mark.parametrize("name", sorted(FAKE_WRITERS))
def test_every_domain_pretrains_and_probes_through_train_py(name, tmp_path, monkeypatch):
    # files in the genuine format, read by the same code path as a real download
    data_dir = write_fake(name, tmp_path / "data", monkeypatch)
    rec = run_main("--domain", name, "--data-dir", data_dir, *TINY, "--max-steps", "2", "--probe-epochs", "1",
                   "--download", "false", "--eval-interval", "0", "--out-dir", tmp_path / "run")
    domain = train.data.DOMAINS[name]
    # a domain with labels is probed itself; a label-free one (LibriSpeech, wafer, Pfam) on its DABS transfer domain
    key = "test_acc" if domain.num_classes else f"{domain.transfer[0]}_test_acc"
    assert rec["step"] == 2
    assert_share_of_the_test_split(rec[key], domain.name if domain.num_classes else domain.transfer[0], data_dir)
    if domain.metric == "weighted_f1" or (not domain.num_classes and
                                          train.data.DOMAINS[domain.transfer[0]].metric == "weighted_f1"):
        assert math.isfinite(rec[key.replace("acc", "f1")])  # test_probe checks the metric by hand
    log = [r for r in read_log(tmp_path / "run" / "log.jsonl") if "loss" in r]
    assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log)



@pytest.mark.skipif(not (REAL_DATA / "cifar-10-batches-py").is_dir(), reason="no real CIFAR-10 sample")
def test_one_step_on_the_real_cifar10_sample(tmp_path):
    rec = run_main("--domain", "cifar10", "--data-dir", REAL_DATA, *TINY, "--max-steps", "1", "--probe-epochs", "1",
                   "--out-dir", tmp_path, "--eval-interval", "0")
    assert rec["step"] == 1
    assert_share_of_the_test_split(rec["test_acc"], "cifar10", REAL_DATA)


def start_training(args):
    """A train.py process, returned once it has taken its first steps."""
    p = subprocess.Popen([sys.executable, str(HERE / "train.py"), *map(str, args)], cwd=HERE, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in p.stdout:
        if line.startswith("step 3 "):
            return p
    raise AssertionError(p.stderr.read())


def test_a_run_folder_belongs_to_one_run_and_a_killed_one_leaves_it_free(cifar_dir, tmp_path):
    out = tmp_path / "run"
    base = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--out-dir", out, "--probe-epochs", 1,
            "--max-steps", 100000]
    args = [*base, "--ckpt-interval", 2]
    first = start_training(args)
    try:
        # a second training (new, resumed or overwriting) is refused at once, naming the running one
        for extra in ([], ["--resume"], ["--overwrite"]):
            assert_clean_error(train_cli(*args, *extra), 2, f"is in use by a running train.py (pid {first.pid})")
        # a probe of the same folder runs beside it and touches none of its files
        rc, _, err = run_cli("probe.py", "--domain", "cifar10", "--data-dir", cifar_dir, "--baseline", "raw",
                             "--probe-epochs", "1", "--out-dir", out)
        assert rc == 0, err
        assert first.poll() is None  # the training goes on
    finally:
        first.kill()  # kill -9: no chance to clean up
        first.wait()
    # the lock died with the process: the run continues from its last checkpoint, and its log holds each step once
    state = torch.load(out / "ckpt.pt", weights_only=True)
    rc, _, err = train_cli(*base, "--stop-step", state["step"] + 2, "--resume")
    assert rc == 0, err
    steps = [r["step"] for r in read_log(out / "log.jsonl") if "loss" in r]
    assert steps == list(range(1, state["step"] + 3))


def test_overwrite_removes_the_old_run_at_once(cifar_dir, tmp_path):
    base = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--out-dir", tmp_path, "--max-steps", "2",
            "--probe-epochs", "1"]
    run_main(*base)
    old = (tmp_path / "ckpt.pt").read_bytes()
    # an overwriting run stopped before its first save: the old weights must not stay beside the new log
    with pytest.raises(train.data.DataError):
        run_main(*base, "--overwrite", "--download", "false", "--data-dir", tmp_path / "nothing")
    assert not (tmp_path / "ckpt.pt").exists() and not (tmp_path / "log.jsonl").exists()
    run_main(*base, "--overwrite", "--seed", "1")
    assert (tmp_path / "ckpt.pt").read_bytes() != old


def test_a_run_never_replaces_a_checkpoint_unasked(cifar_dir, tmp_path):
    base = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--out-dir", tmp_path, "--max-steps", "1",
            "--probe-epochs", "1", "--eval-interval", "0"]
    run_main(*base)
    before = (tmp_path / "ckpt.pt").read_bytes()
    assert_clean_error(train_cli(*base), 2, "--resume", "--overwrite")
    assert_clean_error(train_cli(*base, "--resume", "--max-steps", "0"), 2, "--max-steps")
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    (tmp_path / ".ckpt.pt.x1y2z3.part").write_bytes(b"a save cut short by a kill")
    run_main(*base, "--overwrite", "--seed", "1")
    assert (tmp_path / "ckpt.pt").read_bytes() != before and not list(tmp_path.glob(".ckpt.pt.*"))
    assert len([r for r in read_log(tmp_path / "log.jsonl") if "loss" in r]) == 1  # a new run, a new log
    (tmp_path / "file").write_text("")
    assert_clean_error(train_cli(*base, "--out-dir", tmp_path / "file" / "run"), 2, "not a writable folder")


@pytest.mark.parametrize("args,needle", [
    (["--domain", "mnist"], "unknown --domain 'mnist'; choose one of cifar10"),
    (["--no-such-knob", "9"], "unrecognized arguments: --no-such-knob"),
    (["--max-s", "3"], "unrecognized arguments: --max-s"),  # no abbreviations: a typo is not a guess
    (["stray"], "unrecognized arguments: stray"),
    (["--lr"], "--lr: expected one argument"),
    (["--max-steps", "zero"], "--max-steps: invalid int value: 'zero'"),
    (["--compile=maybe"], "--compile: invalid bool value: 'maybe'"),
    (["--preset", "huge"], "unknown --preset 'huge'"),
    (["--batch-size", "1"], "--batch-size 1 is too small for the contrastive loss"),
    (["--batch-size", "-5", "--contrast-weight", "0"], "--batch-size must be positive"),
    (["--mask-ratio", "1.5"], "--mask-ratio must be in (0, 1)"),
    (["--embed-dim", "30"], "embed_dim"),
    (["--inner-steps", "0"], "contrast_weight: needs inner_steps > 0"),
    (["--inner-lr", "-0.5"], "inner_lr: must be >= 0"),
    (["--ckpt-interval", "0"], "--ckpt-interval must be positive"),
    (["--lr", "nan"], "--lr must be a finite number >= 0"),
    (["--min-lr", "-1"], "--min-lr must be a finite number >= 0"),
    (["--weight-decay", "-5"], "--weight-decay must be a finite number >= 0"),
    (["--probe-lrs", "nan"], "--probe-lrs must be positive finite numbers"),  # before, not after, pretraining
    (["--val-frac", "1"], "--val-frac must be in (0, 1)"),
    (["--probe-weight-decay", "nan"], "--probe-weight-decay must be a finite number >= 0"),
    (["--probe-weight-decay", "-1"], "--probe-weight-decay must be a finite number >= 0"),
    (["--inner-lr", "inf"], "inner_lr: must be a finite number"),
    (["--contrast-weight", "inf"], "contrast_weight: must be a finite number"),
    (["--mlp-ratio", "inf"], "mlp_ratio: must be a finite number"),
    (["--probe-domains", "nope"], "or 'none'"),
    (["--seed", "-1"], "--seed must be in 0..4294967295"),
    (["--device", "tpu"], "--device must be"),
    (["--device", "gpu"], "'cuda'"),
    (["--cuda-graph"], "--cuda-graph needs one CUDA device"),  # the test machines have no GPU
    (["--resume", "--overwrite"], "choose one"),
    (["--ckpt", "x.pt"], "unrecognized arguments: --ckpt"),  # probe.py's option: train.py writes <out-dir>/ckpt.pt
    (["--learn-inner-lr", "--inner-lr", "0"], "learn_inner_lr: needs inner_steps > 0 and an inner_lr > 0"),
    (["--learned-lr-scale", "0"], "--learned-lr-scale must be a positive finite number"),
])
def test_bad_options_are_refused_before_any_work_with_exit_2(cifar_dir, tmp_path, args, needle):
    out_dir = tmp_path / "run"
    assert_clean_error(train_cli("--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--out-dir", out_dir, *args),
                       2, needle)
    assert not out_dir.exists()  # nothing written


def test_resume_refuses_a_checkpoint_of_another_dataset_of_the_same_shape(tmp_path):
    make_cifar(tmp_path / "data" / "cifar-10-batches-py", rows_per_file=20)
    make_imagenet32(tmp_path / "data")
    base = ["--data-dir", tmp_path / "data", *TINY, "--out-dir", tmp_path / "run", "--max-steps", "4"]
    run_main("--domain", "cifar10", *base, "--stop-step", "2")
    assert_clean_error(train_cli("--domain", "imagenet32", *base, "--resume"), 2, "--domain cifar10 (given: "
                       "imagenet32)", "probe it on imagenet32 with probe.py --ckpt")


def test_a_probe_that_cannot_select_or_train_is_refused_not_reported(cifar_dir, tmp_path):
    base = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--max-steps", "1"]
    for frac in ("0.00001", "0.999"):  # 0 validation rows; 0 training rows (100 images)
        assert_clean_error(train_cli(*base, "--val-frac", frac, "--out-dir", tmp_path / frac), 2, "leaves")
        assert not (tmp_path / frac / "ckpt.pt").exists()  # refused before pretraining, not after it


def test_labels_and_token_ids_outside_the_domain_are_refused(tmp_path, monkeypatch):
    import numpy as np
    data_dir = write_fake("higgs", tmp_path / "data", monkeypatch)
    train.data.load_higgs(data_dir, False)  # builds HIGGS.npy
    cache = np.load(data_dir / "HIGGS.npy")
    cache[3, 0] = 2.0  # a label HIGGS does not have, as a stale or broken cache would hold
    np.save(data_dir / "HIGGS.npy", cache)
    assert_clean_error(train_cli("--domain", "higgs", "--data-dir", data_dir, *TINY, "--download", "false",
                                 "--out-dir", tmp_path / "run"), 1, "HIGGS.npy holds a label other than 0 or 1")
    labels = train.data.Splits(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 10]),
                               torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, dtype=torch.long))
    with pytest.raises(train.data.DataError, match="a train label is 10, but it has 10 classes"):
        probe.check_values(labels, train.data.DOMAINS["cifar10"])
    splits = train.data.Splits(torch.full((2, 250), 7, dtype=torch.uint8), torch.zeros(2, dtype=torch.long),
                               torch.zeros(1, 250, dtype=torch.uint8), torch.zeros(1, dtype=torch.long))
    with pytest.raises(train.data.DataError, match="a train token id is 7, but the vocabulary has 4"):
        probe.check_values(splits, train.data.DOMAINS["genomics"])


def test_features_that_are_not_finite_are_refused_not_probed(cifar_dir):
    d = probe.load_data(parse(["--data-dir", cifar_dir]), train.data.DOMAINS["cifar10"], torch.device("cpu"))
    nan_features = lambda x: torch.full((len(x), 4), float("nan"))  # noqa: E731
    with pytest.raises(train.RunError, match="features of its training inputs are not finite"):
        probe.probe(nan_features, d, train.data.DOMAINS["cifar10"], parse([]), with_test=True)


def test_sigterm_takes_ctrl_c_s_way_out(cifar_dir, tmp_path):
    args = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--max-steps", "100000", "--ckpt-interval", "2",
            "--out-dir", tmp_path]
    p = start_training(args)
    p.terminate()  # SIGTERM, as a scheduler ends a job
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert "interrupted (SIGTERM) at step" in err and "is intact: --resume continues from it" in err, err


def test_ctrl_c_in_the_final_evaluation_names_the_checkpoint(cifar_dir, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(probe, "evaluate", interrupted)
    with pytest.raises(SystemExit) as e:
        train.main(["--domain", str("cifar10"), "--data-dir", str(cifar_dir), *TINY, "--max-steps", "1",
                    "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 130 and "in the final evaluation" in err and f"--ckpt {tmp_path / 'ckpt.pt'}" in err


def test_paths_with_a_tilde_and_a_data_dir_inside_the_dataset(cifar_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(cifar_dir))
    assert parse(["--data-dir=~/x", "--out-dir=~/r"]).data_dir == str(cifar_dir / "x")
    assert_clean_error(train_cli("--domain", "cifar10", "--data-dir", cifar_dir / "cifar-10-batches-py", *TINY,
                                 "--out-dir", tmp_path / "r"), 1, "is the dataset's own folder",
                       f"--data-dir {cifar_dir}")


def test_data_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "data").write_text("")
    assert_clean_error(train_cli("--domain", "cifar10", "--data-dir", tmp_path / "data"), 2, "is a file, not a folder")


@pytest.mark.parametrize("damage,needle", [
    (lambda s: s.pop("model"), "does not hold this model's weights"),
    (lambda s: s.pop("optimizer"), "cannot be resumed"),
    (lambda s: s.pop("rng_cpu"), "cannot be resumed"),
    (lambda s: s["model"].pop("encoder.norm.weight"), "encoder.norm.weight"),
    (lambda s: s["model"].update({"encoder.norm.weight": torch.ones(3)}), "encoder.norm.weight"),
    (lambda s: s["model"]["encoder.norm.bias"].fill_(float("nan")), "non-finite weights (encoder.norm.bias)"),
    # PyTorch would load these and crash at the first step (an internal assert, then a segfault), or train on NaN
    (lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(3)), "exp_avg of parameter 0 has shape (3,)"),
    (lambda s: s["optimizer"]["state"][1]["exp_avg_sq"].fill_(float("nan")), "exp_avg_sq of parameter 1 is not finite"),
])
def test_damaged_checkpoints_are_refused_in_one_line(cifar_dir, tmp_path, damage, needle):
    base = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--out-dir", tmp_path, "--max-steps", "2"]
    run_main(*base, "--stop-step", "1")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    damage(state)
    torch.save(state, tmp_path / "ckpt.pt")
    assert_clean_error(train_cli(*base, "--resume"), 1, needle)
    if "optimizer" in state and "rng_cpu" in state and "of parameter" not in needle:  # a probe needs only weights
        assert_clean_error(run_in_process(probe.main, "--domain", "cifar10", "--data-dir", cifar_dir, "--ckpt",
                                   tmp_path / "ckpt.pt"), 1, needle)


def test_resume_continues_the_run_with_its_own_options_and_refuses_others_and_a_finished_run(cifar_dir, tmp_path):
    # a run of the cpu preset (its lr, warm-up and mask ratio) with a tiny model, stopped early
    base = ["--domain", "cifar10", "--data-dir", cifar_dir, "--out-dir", tmp_path]
    run_main(*base, "--preset", "cpu", *TINY, "--probe-epochs", "1", "--max-steps", "3", "--stop-step", "2")
    # an option that would change its numbers is refused, naming the run's value: another --max-steps or --lr would
    # restart the cosine schedule from its peak, another preset change the recipe, silently
    assert_clean_error(train_cli(*base, "--max-steps", "1", "--resume"), 2, "--max-steps 3 (given: 1)", "--overwrite")
    assert_clean_error(train_cli(*base, "--lr", "0.1", "--resume"), 2, "--lr 0.0015 (given: 0.1)")
    assert_clean_error(train_cli(*base, "--preset", "paper", "--resume"), 2, "--preset cpu (given: paper)")
    # --resume alone takes the preset, the model and the schedule from the checkpoint; where it runs may change
    cfg = parse([*base, "--resume", "--threads", "2", "--log-interval", "5"])
    assert (cfg.preset, cfg.embed_dim, cfg.lr, cfg.max_steps, cfg.mask_ratio, cfg.probe_epochs, cfg.threads,
            cfg.log_interval, cfg.stop_step) == ("cpu", 32, 1.5e-3, 3, 0.75, 1, 2, 5, 0)
    run_main(*base, "--resume")
    log = read_log(tmp_path / "log.jsonl")
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3] and len([r for r in log if "test_acc" in r]) == 1
    assert log[0]["config"]["preset"] == "cpu" and "environment" in log[0] and log[4]["resumed_at"] == 2
    assert_clean_error(train_cli(*base, "--resume"), 1, "the end of a finished run", "python probe.py --domain cifar10 "
                       "--ckpt")
    assert read_log(tmp_path / "log.jsonl") == log  # nothing appended


def test_non_finite_messages_say_what_exists_and_blame_nan_data(tmp_path):
    make_cifar(tmp_path / "d1" / "cifar-10-batches-py", rows_per_file=20)
    base = ["--domain", "cifar10", "--data-dir", tmp_path / "d1", *TINY, "--max-steps", "3", "--probe-epochs", "1"]
    # no checkpoint yet: the message must not promise one
    assert_clean_error(train_cli(*base, "--out-dir", tmp_path / "r1", "--lr", "1e30"), 1, "non-finite",
                       "no checkpoint of this run was written yet")
    # NaN in the inputs: blame the data, not the learning rate
    assert "the training data hold NaN" in train.nonfinite_cause(torch.tensor([[0.0, float("nan")]]))
    assert train.nonfinite_cause(torch.zeros(2, 2)).startswith("lower --lr")


def test_ctrl_c_exits_130_and_says_whether_a_checkpoint_exists(cifar_dir, tmp_path):
    args = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--max-steps", "100000", "--out-dir", tmp_path]
    p = subprocess.Popen([sys.executable, str(HERE / "train.py"), *map(str, args)], cwd=HERE, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in p.stdout:  # wait until training runs
        if line.startswith("step 3 "):
            break
    p.send_signal(2)  # SIGINT, as Ctrl-C sends
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert "interrupted (Ctrl-C) at step" in err and "no checkpoint of this run was written yet" in err, err
    assert not (tmp_path / "ckpt.pt").exists() and not list(tmp_path.glob(".ckpt.pt.*"))



# ----------------------------------------------------------------------------- transfer: pretrain on one domain, probe on others



@pytest.mark.parametrize("args,needle", [
    (["--probe-domains", "google_speech"], "its inputs (1, 224, 224)"),  # another shape than cifar10's
    (["--probe-domains", "cifar10,nope"], "unknown --probe-domains entry 'nope'"),
    (["--domain", "imagenet32", "--probe-domains", "pamap2"], "the model reads one input shape"),
])
def test_a_probe_domain_of_another_shape_is_refused(cifar_dir, tmp_path, args, needle):
    assert_clean_error(train_cli("--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--out-dir", tmp_path / "r",
                               *args), 2, needle)
    assert not (tmp_path / "r").exists()


def test_a_missing_transfer_dataset_stops_the_run_before_pretraining(cifar_dir, tmp_path):
    make_imagenet32(tmp_path / "data")  # no CIFAR-10 beside it
    rc, out, err = train_cli("--domain", "imagenet32", "--probe-domains", "cifar10", "--data-dir", tmp_path / "data",
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
    for d in ("librispeech_transfer", "audio_mnist", "google_speech"):
        assert_share_of_the_test_split(rec[f"{d}_test_acc"], d, data_dir)
    assert_clean_error(run_in_process(probe.main, "--domain", "librispeech", "--baseline", "random", "--probe-domains",
                               "none", "--data-dir", data_dir, "--out-dir", tmp_path / "e"), 2, "has no labels to probe")


def test_a_full_disk_while_saving_keeps_the_last_checkpoint(cifar_dir, tmp_path, monkeypatch):
    base = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--out-dir", tmp_path, "--max-steps", "4",
            "--ckpt-interval", "2"]
    run_main(*base, "--stop-step", "2")
    before = (tmp_path / "ckpt.pt").read_bytes()

    def full(obj, f, *args, **kwargs):  # what torch.save meets on a full disk, after writing part of the file
        open(f, "wb").write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 203456 vs 203348")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(train.RunError, match="could not write the checkpoint of step 4 .* the one on disk is intact"):
        run_main(*base, "--resume")
    assert (tmp_path / "ckpt.pt").read_bytes() == before and not list(tmp_path.glob(".ckpt.pt.*"))


def test_a_batch_that_cannot_be_allocated_is_one_line(cifar_dir, tmp_path):
    # 10^8 images of 3 KB: far more than any machine's memory, refused by the allocator at once
    assert_clean_error(train_cli("--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--batch-size", "100000000",
                                 "--out-dir", tmp_path), 1, "out of memory", "lower --batch-size")


def test_a_cpu_run_says_what_it_costs_and_its_end_reads_at_a_glance(cifar_dir, tmp_path, capsys):
    run_main("--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--max-steps", "14", "--log-interval", "100",
             "--probe-epochs", "1", "--out-dir", tmp_path)
    out = capsys.readouterr().out
    # after 10 steps; TINY's --threads 1 leaves nothing to say of threads
    assert "ms per step on this CPU with 1 thread: the 4 steps left take about" in out and "--preset cpu" in out
    assert "--threads 1 can be" not in out
    assert "probing the frozen encoder on cifar10" in out
    end = out.strip().splitlines()[-3:]
    assert end[0].startswith("step 14 of 14 after") and str(tmp_path / "ckpt.pt") in end[0] and ".png" in end[0]
    assert str(tmp_path / "curves.svg") in end[0]
    assert re.fullmatch(r"cifar10: test accuracy \d+\.\d% \(validation \d+\.\d%; probe lr .*, epoch \d+\)", end[1])
    first = read_log(tmp_path / "log.jsonl")[0]  # the options the run used, and where it ran
    assert first["config"]["max_steps"] == 14 and first["model_config"]["embed_dim"] == 32
    env = first["environment"]
    assert (env["torch"], env["device"], env["threads"], env["world_size"]) == (torch.__version__, "cpu", 1, 1)
    assert env["dtype"] == "float32" and env["device_name"] and env["python"].count(".") == 2
    assert end[2] == "ran on " + ", ".join(f"{k} {v}" for k, v in env.items())
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["environment"] == env
    # the first log record (step 14 here) tells that the paper's inner step barely moves Z, once
    assert out.count("at this inner_lr it does nothing measurable") == 1


@pytest.mark.parametrize("rec,inert", [
    (dict(shift=9e-4, amortized=2.0, adapted=1.999), True),     # inside both thresholds (shift 1e-3, gap 0.1%)
    (dict(shift=1.1e-3, amortized=2.0, adapted=2.0), False),    # it moves Z
    (dict(shift=1e-5, amortized=2.0, adapted=1.997), False),    # it lowers the query loss by 0.15%
    (dict(shift=1e-5, amortized=2.0, adapted=2.003), False),    # or raises it
    (dict(amortized=2.0), False),                               # MAE: no step
])
def test_the_inert_step_line_and_its_thresholds(rec, inert):
    note = cli.inert_note(rec)
    assert (note is not None) == inert and (not inert or f"{rec['shift']:.1e} of its norm" in note)


def test_the_cost_line_names_the_threads_and_the_way_out_of_a_shared_cpu():
    line = cli.cost_hint("cpu", 1.1, 3390, threads=2)
    assert line == ("1100 ms per step on this CPU with 2 threads: the 3,390 steps left take about 62 minutes; if other "
                    "work shares this CPU, --threads 1 can be several times faster")
    assert "--threads" not in cli.cost_hint("cpu", 0.02, 10, threads=1)
    assert cli.cost_hint("paper", 1.0, 100_000, threads=1).endswith(cli.PRESET_HINT)  # and one line: no newline
    assert "\n" not in cli.cost_hint("paper", 1.0, 100_000, threads=16)


def test_help_says_each_default_once_and_the_presets_values():
    code, out, _ = run_in_process(train.main, "--help")
    assert code == 0 and "(default: None)" not in out and "(default: the domain's) (default" not in out
    assert "'cpu': MAE's recipe, and embed_dim 192" in " ".join(out.split())
    cpu = parse(["--preset", "cpu"])
    assert (cpu.log_interval, cpu.ckpt_interval, cpu.max_steps) == (50, 500, 3400)  # a line every ~40 s on 2 cores
