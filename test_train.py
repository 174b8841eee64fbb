"""Tests of train.py: overrides, resume = uninterrupted, torchrun, and the bad-input table."""

import contextlib
import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
import probe
import train
from conftest import (FAKE_WRITERS, HERE, REAL_DATA, TINY, assert_clean_error, make_cifar, make_imagenet32, read_log,
                      run_cli, run_in_process, tiny_model, train_losses, write_cifar_batch, write_fake,
                      write_fake_google_speech, write_fake_higgs_sample, write_fake_pamap2, write_fake_speech_subset,
                      write_wav)


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




@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists the threads of a Linux process")
def test_torchrun_teardown_joins_gloo_threads_while_python_runs():
    # a gloo worker thread lets go of a collective's tensors a moment after the collective returns, and that takes
    # the GIL: one still doing it when the interpreter shuts down aborts the rank (SIGABRT, 'terminate called
    # without an active exception'). So the teardown must free the group, which joins the threads, before the exit.
    # A fresh interpreter (what it imported before init_process_group decides it), one rank, DDP as under torchrun.
    code = """if True:
        import os, torch, device, train
        dev = device.setup(train.Config(device="cpu"), distributed=True)
        model = torch.nn.Linear(4, 4)
        torch.nn.parallel.DistributedDataParallel(model)(torch.ones(2, 4)).sum().backward()
        device.check_ranks_in_sync(model, dev)
        names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        print("gloo threads left:", sorted(n for n in names if "gloo" in n))
        """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}  # port 0: any free one (no other rank connects)
    p = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "gloo threads left: []" in p.stdout, p.stdout


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

# ----------------------------------------------------------------------------- bad input as a shell meets it
# every refusal of train.py is a row of the table at the end of this file; this one runs the script itself, as the
# row 'missing-data-without-download' does in this process


def test_missing_data_without_download_names_url_file_and_option(tmp_path):
    # through the real entry point, as a user's shell meets it: python train.py, its exit code and its stderr
    (tmp_path / "data").mkdir()
    assert_clean_error(run_cli("train.py", "--domain", "cifar10", "--data-dir", tmp_path / "data", "--download", "false",
                               "--out-dir", tmp_path / "run"), 1, "cifar-10-python.tar.gz",
                       "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "--data-dir")
    assert list((tmp_path / "data").iterdir()) == []


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


def test_overwrite_replaces_the_old_run_only_once_the_new_one_has_its_data_and_model(cifar_dir, tmp_path,
                                                                                      monkeypatch):
    base = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--out-dir", tmp_path, "--max-steps", "2",
            "--probe-epochs", "1"]
    run_main(*base)
    old = {name: (tmp_path / name).read_bytes() for name in ("ckpt.pt", "log.jsonl")}
    # a typo in --data-dir must not cost a finished run
    with pytest.raises(train.data.DataError):
        run_main(*base, "--overwrite", "--download", "false", "--data-dir", tmp_path / "nothing")
    assert {name: (tmp_path / name).read_bytes() for name in old} == old
    # stopped at its first step: the old weights are gone, and do not stand beside the new run's log
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as mp:
        mp.setattr(train, "train_step", interrupted)
        with pytest.raises(cli.Interrupted, match="no checkpoint of this run was written yet"):
            run_main(*base, "--overwrite", "--seed", "1")
    assert not (tmp_path / "ckpt.pt").exists() and read_log(tmp_path / "log.jsonl")[0]["config"]["seed"] == 1
    run_main(*base, "--overwrite", "--seed", "1")
    assert (tmp_path / "ckpt.pt").read_bytes() != old["ckpt.pt"]


def test_overwrite_starts_a_new_run_and_clears_what_a_killed_save_left(cifar_dir, tmp_path):
    # (a run never replaces a checkpoint unasked: the table's rows 'train-again-without-resume-or-overwrite' and
    # 'resume-with-max-steps-0')
    base = ["--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--out-dir", tmp_path, "--max-steps", "1",
            "--probe-epochs", "1", "--eval-interval", "0"]
    run_main(*base)
    before = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / ".ckpt.pt.x1y2z3.part").write_bytes(b"a save cut short by a kill")
    run_main(*base, "--overwrite", "--seed", "1")
    assert (tmp_path / "ckpt.pt").read_bytes() != before and not list(tmp_path.glob(".ckpt.pt.*"))
    assert len([r for r in read_log(tmp_path / "log.jsonl") if "loss" in r]) == 1  # a new run, a new log


def test_resume_continues_the_run_with_its_own_options(cifar_dir, stopped_cpu_run, tmp_path):
    # a run of the cpu preset (its lr, warm-up and mask ratio) with a tiny model, stopped at step 2 of 3: --resume
    # alone takes the preset, the model and the schedule from the checkpoint; where it runs may change (an option
    # that would change its numbers is refused: the table's rows 'resume-with-another-...')
    out = tmp_path / "run"
    shutil.copytree(stopped_cpu_run, out)
    base = ["--domain", "cifar10", "--data-dir", cifar_dir, "--out-dir", out]
    cfg = parse([*base, "--resume", "--threads", "2", "--log-interval", "5"])
    assert (cfg.preset, cfg.embed_dim, cfg.lr, cfg.max_steps, cfg.mask_ratio, cfg.probe_epochs, cfg.threads,
            cfg.log_interval, cfg.stop_step) == ("cpu", 32, 1.5e-3, 3, 0.75, 1, 2, 5, 0)
    run_main(*base, "--resume")
    log = read_log(out / "log.jsonl")
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3] and len([r for r in log if "test_acc" in r]) == 1
    assert log[0]["config"]["preset"] == "cpu" and "environment" in log[0] and log[4]["resumed_at"] == 2


def test_a_tilde_in_a_path_is_the_home_folder(cifar_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(cifar_dir))
    assert parse(["--data-dir=~/x", "--out-dir=~/r"]).data_dir == str(cifar_dir / "x")


def test_a_non_finite_loss_blames_nan_data_before_the_learning_rate():
    # (what the message says of the checkpoint: the table's rows 'lr-1e30-before-any-checkpoint' and
    # 'nan-loss-on-resume')
    assert "the training data hold NaN" in probe.nonfinite_cause(torch.tensor([[0.0, float("nan")]]))
    assert probe.nonfinite_cause(torch.zeros(2, 2)).startswith("lower --lr")


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


def test_librispeech_probes_its_transfer_domains_not_itself(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    for name in ("librispeech", "audio_mnist", "google_speech"):
        write_fake(name, data_dir, monkeypatch)
    rec = run_main("--domain", "librispeech", "--probe-domains", "librispeech_transfer,audio_mnist,google_speech",
                   "--data-dir", data_dir, *TINY, "--max-steps", "1", "--probe-epochs", "1", "--download", "false",
                   "--eval-interval", "0", "--out-dir", tmp_path / "run")
    assert "test_acc" not in rec  # no labels: no probe of its own
    for d in ("librispeech_transfer", "audio_mnist", "google_speech"):
        assert_share_of_the_test_split(rec[f"{d}_test_acc"], d, data_dir)
    # (probe.py --domain librispeech is refused: test_probe.py's row 'a-label-free-domain-alone')


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

# ----------------------------------------------------------------------------- the table: what no run may do
# Each row builds its case, runs train.py as a user's shell would (warnings shown), and checks the promise of
# docs/errors.md: the exit code, one line on stderr with the words that tell what is wrong, and what is on disk
# afterwards (a run that did no work leaves nothing; a refused --resume leaves its folder as it was).


def base(data_dir):
    return ["--domain", "cifar10", "--data-dir", data_dir, *TINY, "--max-steps", "3", "--probe-epochs", "1",
            "--eval-interval", "0"]


@pytest.fixture(scope="module")
def stopped_run(cifar_dir, tmp_path_factory):
    """The folder of a run of the rows' options stopped at step 1 of 3: the rows that resume copy it."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    run_main(*base(cifar_dir), "--out-dir", out, "--stop-step", "1")
    return out


@pytest.fixture(scope="module")
def stopped_cpu_run(cifar_dir, tmp_path_factory):
    """The same of --preset cpu (its lr, warm-up and mask ratio; the rows' tiny model) stopped at step 2 of 3."""
    out = tmp_path_factory.mktemp("stopped_cpu") / "run"
    run_main(*base(cifar_dir), "--preset", "cpu", "--out-dir", out, "--stop-step", "2")
    return out


class Case:
    """What a row's setup gets: its own folder, the run folder (not made), a folder for a dataset of its own, the
    shared CIFAR-10 files, the stopped runs, and pytest's monkeypatch; once train.py has run, what it printed."""

    def __init__(self, tmp, cifar, stopped, stopped_cpu, mp):
        self.tmp, self.out, self.data, self.cifar, self.mp = tmp, tmp / "run", tmp / "data", cifar, mp
        self.stopped, self.stopped_cpu, self.stdout = stopped, stopped_cpu, None

    def copy_stopped(self, run=None):
        shutil.copytree(run or self.stopped, self.out)
        return []

    def resume(self, *extra):
        return [*self.copy_stopped(), "--resume", *extra]

    def resume_cpu(self, *extra):  # the run of --preset cpu
        return [*self.copy_stopped(self.stopped_cpu), "--resume", *extra]


def snapshot(folder):
    """Every file under folder with its bytes (a folder, a link to a device: its kind); None if folder is absent."""
    if not os.path.lexists(folder):
        return None
    out = {}
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(top) / name
            out[p.relative_to(folder).as_posix()] = p.read_bytes() if p.is_file() else "dir" if p.is_dir() else "other"
    return out


def nothing(c, before):  # a run that did no work leaves nothing behind
    assert not os.path.lexists(c.out), snapshot(c.out)


def unchanged(c, before):  # a refused run leaves the folder as it found it (but the pid in its .lock)
    def files(s):
        return {k: "a lock" if k == ".lock" and v != "dir" else v for k, v in (s or {}).items()}
    assert files(snapshot(c.out)) == files(before)


def no_checkpoint(c, before):
    assert not (c.out / "ckpt.pt").exists()


def checkpoint_kept(c, before):  # the last checkpoint as it was, and no half-written one beside it
    assert (c.out / "ckpt.pt").read_bytes() == before["ckpt.pt"] and not list(c.out.glob(".ckpt.pt.*"))


def nothing_but_locks(c, before):  # nothing half-written anywhere: no file but a lock
    assert not [p for p in c.tmp.rglob("*") if p.is_file() and not p.name.endswith(".lock")]


def before_pretraining(c, before):  # refused before the first step: nothing trained, nothing saved
    assert "step 1" not in c.stdout and not (c.out / "ckpt.pt").exists()


def logged_steps(folder):
    return [r["step"] for r in read_log(folder / "log.jsonl") if "loss" in r]


def deny(c, victim):
    """Reading victim is refused, as a file of another user is (these tests run as root, whom no mode stops)."""
    real = open

    def opener(path, *args, **kwargs):
        if Path(path) == victim:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)
    c.mp.setattr(train.data, "open", opener, raising=False)


def damage(victim, how, c):
    """victim (a file) becomes a folder, a symbolic link to itself, or unreadable."""
    victim.unlink()
    if how == "folder":
        victim.mkdir()
    elif how == "loop":
        victim.symlink_to(victim)
    else:
        victim.write_text("[]")
        deny(c, victim)


def at_step_2(c, act):
    """act() runs as the second training step starts, while the run goes on."""
    step, calls = train.train_step, []

    def stepping(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            act()
        return step(*args, **kwargs)
    c.mp.setattr(train, "train_step", stepping)
    return []


def another_run_takes(folder):  # what another run does to a folder it was given
    folder.mkdir(exist_ok=True)
    (folder / ".lock").unlink(missing_ok=True)
    (folder / ".lock").write_text("train.py (pid 1)")


def folder_replaced(c):
    c.out.rename(c.tmp / "moved")
    another_run_takes(c.out)
    (c.out / "ckpt.pt").write_bytes(b"another run's")


def full_disk_for(c, suffix):
    """A file whose name ends with suffix meets a full disk as it is written (its temporary file is /dev/full)."""
    atomic = train.data.atomic_file

    @contextlib.contextmanager
    def filling(path):
        if not path.name.endswith(suffix):
            with atomic(path) as tmp:
                yield tmp
            return
        tmp = c.tmp / f"{path.name}.full"
        tmp.symlink_to("/dev/full")
        yield tmp
    c.mp.setattr(train.data, "atomic_file", filling)
    return []


def table_cell(path, row, col, value):
    """A text table's cell (tab-separated, 0-based) replaced by value; row None: in every row."""
    lines = [line.split("\t") for line in path.read_text().splitlines()]
    for cells in lines if row is None else [lines[row]]:
        cells[col] = value
    path.write_text("".join("\t".join(cells) + "\n" for cells in lines))


def higgs_sample_with(c, name, row, value):
    write_fake_higgs_sample(c.data)
    table_cell(c.data / "higgs_lightgbm" / name, row, 3, value)
    return ["--domain", "higgs_sample", "--data-dir", c.data]


def same_images(c):
    folder = c.data / "cifar-10-batches-py"
    make_cifar(folder, rows_per_file=20)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        write_cifar_batch(folder / name, np.full((20, 3072), 7, np.uint8), np.arange(20) % 10)
    return ["--data-dir", c.data]


def speech_subset_with_a_name(c, name):
    write_fake_speech_subset(c.data)
    wav = c.data / "speech_commands_v0.02_subset" / "yes" / "0a1b2c3d_nohash_0.wav"
    os.rename(wav, os.fsencode(wav.parent) + b"/" + name)
    return ["--domain", "google_speech_subset", "--data-dir", c.data]


def speech_lists_not_utf8(c):
    write_fake_google_speech(c.data)
    (c.data / "speech_commands_v0.02" / "validation_list.txt").write_bytes(b"yes/\xff\xfe.wav\n")
    return ["--domain", "google_speech", "--data-dir", c.data, "--download", "false"]


def damaged_shipped_sample(c):  # a wav of google_speech_sample (no download) with a header of 0 channels
    write_fake_google_speech(c.data)
    folder = c.data / "speech_commands_v0.01_sample"
    (c.data / "speech_commands_v0.02").rename(folder)
    wav = write_wav(folder / "yes" / "0a1b2c3d_nohash_0.wav", [1, 2, 3], 16_000, extensible=True)
    wav.write_bytes(wav.read_bytes()[:22] + b"\x00\x00" + wav.read_bytes()[24:])
    return ["--domain", "google_speech_sample", "--data-dir", c.data]


def pamap2_dat(c, how):
    write_fake_pamap2(c.data)
    victim = c.data / "PAMAP2_Dataset" / "Protocol" / "subject103.dat"
    if how == "empty":
        victim.write_text("")
    else:
        damage(victim, how, c)
    return ["--domain", "pamap2", "--data-dir", c.data, "--download", "false"]


def tape_json(c, domain, change):
    """A TAPE JSON file of the domain's fake (scop: remote_homology_train.json) changed: change(path, records)."""
    write_fake(domain, c.data, c.mp)
    path = c.data / ("pfam/pfam_train.json" if domain == "pfam" else "remote_homology/remote_homology_train.json")
    change(path, json.loads(path.read_text()))
    return ["--domain", domain, "--data-dir", c.data, "--download", "false", "--max-steps", "1"] + (
        ["--probe-domains", "none"] if domain == "pfam" else [])


def label(key, value):
    def change(path, records):
        records[3][key] = value
        path.write_text(json.dumps(records))
    return change


def crafted(change):
    """A resume of the stopped run whose checkpoint change() altered."""
    def setup(c):
        args = c.resume()
        state = torch.load(c.out / "ckpt.pt", weights_only=True)
        change(state)
        torch.save(state, c.out / "ckpt.pt")
        return args
    return setup


def log_line(text):
    def setup(c):
        args = c.resume()
        with open(c.out / "log.jsonl", "ab") as f:
            f.write(text + b"\n")
        return args
    return setup


def stale_part(c):
    args = c.resume()
    (c.out / ".reconstructions_1.png.x1y2z3.part").write_bytes(b"a picture cut short by a kill")
    return args


def dataset_folder_loop(c):
    c.data.mkdir()
    (c.data / "cifar-10-batches-py").symlink_to("cifar-10-batches-py")
    return ["--data-dir", c.data, "--download", "false"]


def a_folder_named(name):
    def setup(c):
        (c.out / name).mkdir(parents=True)
        return []
    return setup


def fake_cuda(c, count=1):
    c.mp.setattr(torch.cuda, "is_available", lambda: True)
    c.mp.setattr(torch.cuda, "device_count", lambda: count)


def missing_data(c):
    c.data.mkdir()
    return ["--data-dir", c.data, "--download", "false"]


def offline(c):  # what a machine without a route to the dataset's host meets, whatever machine runs this test
    def urlopen(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    c.mp.setattr(urllib.request, "urlopen", urlopen)
    return ["--data-dir", c.data]


def archive_of_another_checksum(c):
    c.data.mkdir()
    (c.data / "cifar-10-python.tar.gz").write_bytes(b"not the real archive")
    return ["--data-dir", c.data, "--download", "false"]


def truncated_batch(c):
    make_cifar(c.data / "cifar-10-batches-py", rows_per_file=4)
    victim = c.data / "cifar-10-batches-py" / "data_batch_3"
    victim.write_bytes(victim.read_bytes()[:500])
    return ["--data-dir", c.data]


def a_file_as_data_dir(c):
    c.data.write_text("")
    return ["--data-dir", c.data]


def higgs_cache_with_label_2(c):
    write_fake("higgs", c.data, c.mp)
    train.data.load_higgs(c.data, False)  # builds HIGGS.npy
    cache = np.load(c.data / "HIGGS.npy")
    cache[3, 0] = 2.0  # a label HIGGS does not have, as a stale or broken cache would hold
    np.save(c.data / "HIGGS.npy", cache)
    return ["--domain", "higgs", "--data-dir", c.data, "--download", "false"]


def transfer_dataset_missing(c):
    make_imagenet32(c.data)  # no CIFAR-10 beside it
    return ["--domain", "imagenet32", "--probe-domains", "cifar10", "--data-dir", c.data, "--download", "false"]


def garbage_checkpoint(c):
    args = c.resume()
    (c.out / "ckpt.pt").write_bytes(b"garbage")
    return args


def resume_on_imagenet32(c):  # another dataset of the same shape
    make_imagenet32(c.data)
    return c.resume("--domain", "imagenet32", "--data-dir", c.data)


def finished(c):
    """A resume of the stopped run once it has run to its end."""
    args = c.resume()
    run_main(*base(c.cifar), "--out-dir", c.out, *args)
    return args


def nan_loss(c):
    """A resume whose steps' loss is NaN."""
    step = train.train_step
    c.mp.setattr(train, "train_step", lambda *a, **k: (torch.tensor(float("nan")), step(*a, **k)[1]))
    return c.resume()


def checkpoint_save_meets_a_full_disk(c):
    def full(obj, f, *args, **kwargs):  # what torch.save meets on a full disk, after writing part of the file
        open(f, "wb").write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 203456 vs 203348")
    c.mp.setattr(torch, "save", full)
    return c.resume()


def out_dir_inside_a_file(c):
    (c.tmp / "file").write_text("")
    return ["--out-dir", c.tmp / "file" / "run"]


def refused_before_work(args, words):
    """An option that cannot work: exit 2 before any work, nothing written."""
    return pytest.param(args, 2, [words], nothing, id=" ".join(args))


TRAIN_CASES = [  # setup(case) -> train.py's options beyond base() (or those options); exit code; words of the one line
    # (a word may be a function of the case); after(case, before)
    # options that cannot work, refused before any work
    refused_before_work(["--domain", "mnist"], "unknown --domain 'mnist'; choose one of cifar10"),
    refused_before_work(["--no-such-knob", "9"], "unrecognized arguments: --no-such-knob"),
    refused_before_work(["--max-s", "3"], "unrecognized arguments: --max-s"),  # no abbreviations: a typo is no guess
    refused_before_work(["stray"], "unrecognized arguments: stray"),
    refused_before_work(["--lr"], "--lr: expected one argument"),
    refused_before_work(["--max-steps", "zero"], "--max-steps: invalid int value: 'zero'"),
    refused_before_work(["--compile=maybe"], "--compile: invalid bool value: 'maybe'"),
    refused_before_work(["--preset", "huge"], "unknown --preset 'huge'"),
    refused_before_work(["--batch-size", "1"], "--batch-size 1 is too small for the contrastive loss"),
    refused_before_work(["--batch-size", "-5", "--contrast-weight", "0"], "--batch-size must be positive"),
    refused_before_work(["--mask-ratio", "1.5"], "--mask-ratio must be in (0, 1)"),
    refused_before_work(["--embed-dim", "30"], "embed_dim"),
    refused_before_work(["--inner-steps", "0"], "contrast_weight: needs inner_steps > 0"),
    refused_before_work(["--inner-lr", "-0.5"], "inner_lr: must be >= 0"),
    refused_before_work(["--ckpt-interval", "0"], "--ckpt-interval must be positive"),
    refused_before_work(["--lr", "nan"], "--lr must be a finite number >= 0"),
    refused_before_work(["--min-lr", "-1"], "--min-lr must be a finite number >= 0"),
    refused_before_work(["--weight-decay", "-5"], "--weight-decay must be a finite number >= 0"),
    refused_before_work(["--probe-lrs", "nan"], "--probe-lrs must be positive finite numbers"),  # before pretraining
    refused_before_work(["--val-frac", "1"], "--val-frac must be in (0, 1)"),
    refused_before_work(["--probe-weight-decay", "nan"], "--probe-weight-decay must be a finite number >= 0"),
    refused_before_work(["--probe-weight-decay", "-1"], "--probe-weight-decay must be a finite number >= 0"),
    refused_before_work(["--inner-lr", "inf"], "inner_lr: must be a finite number"),
    refused_before_work(["--contrast-weight", "inf"], "contrast_weight: must be a finite number"),
    refused_before_work(["--mlp-ratio", "inf"], "mlp_ratio: must be a finite number"),
    refused_before_work(["--probe-domains", "nope"], "or 'none'"),
    refused_before_work(["--seed", "-1"], "--seed must be in 0..4294967295"),
    refused_before_work(["--device", "tpu"], "--device must be"),
    refused_before_work(["--device", "gpu"], "'cuda'"),
    refused_before_work(["--cuda-graph"], "--cuda-graph needs one CUDA device"),  # the test machines have no GPU
    refused_before_work(["--resume", "--overwrite"], "choose one"),
    refused_before_work(["--ckpt", "x.pt"], "unrecognized arguments: --ckpt"),  # probe.py's: train.py writes its own
    refused_before_work(["--bench-steps", "1"], "unrecognized arguments: --bench-steps"),  # bench.py's are its own
    refused_before_work(["--learn-inner-lr", "--inner-lr", "0"],
                        "learn_inner_lr: needs inner_steps > 0 and an inner_lr > 0"),
    refused_before_work(["--learned-lr-scale", "0"], "--learned-lr-scale must be a positive finite number"),
    refused_before_work(["--device", "cuda:x"], "--device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    # sizes and rates that cannot work, refused before anything is allocated or trained
    refused_before_work(["--probe-lrs", "1e30"],
                        "--probe-lrs must be positive finite numbers of at most 1"),  # a NaN head, a fake score
    refused_before_work(["--probe-lrs", "1e-3,1e300"],
                        "--probe-lrs must be positive finite numbers of at most 1"),  # overflowed at the end
    refused_before_work(["--probe-weight-decay", "1e9"], "--probe-weight-decay 1e+09 with --probe-lrs 0.001"),
    refused_before_work(["--threads", "100000"], "--threads 100000: this machine has"),  # was a segmentation fault
    refused_before_work(["--embed-dim", "4294967296"], "lower --embed-dim"),  # was 219 s of allocation, then OOM kill
    refused_before_work(["--embed-dim", "65536"], "GiB to train"),  # 429,549,431,344 parameters
    refused_before_work(["--mlp-ratio", "1e-9"], "mlp_ratio: int(width * mlp_ratio) must be >= 1"),  # a zero-width MLP
    # a probe that cannot select or train is refused before pretraining, not reported after it (100 images)
    refused_before_work(["--val-frac", "0.00001"], "leaves"),  # 0 validation rows
    refused_before_work(["--val-frac", "0.999"], "leaves"),  # 0 training rows
    # probe domains the model cannot read
    refused_before_work(["--probe-domains", "google_speech"], "its inputs (1, 224, 224)"),  # not cifar10's shape
    refused_before_work(["--probe-domains", "cifar10,nope"], "unknown --probe-domains entry 'nope'"),
    refused_before_work(["--domain", "imagenet32", "--probe-domains", "pamap2"], "the model reads one input shape"),
    # data that cannot be had: one line that names the file, the way to get it, and --data-dir; nothing half-written
    pytest.param(missing_data, 1, ["cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                                   "--data-dir"], lambda c, b: list(c.data.iterdir()) == [],
                 id="missing-data-without-download"),  # (as python train.py meets it: test_missing_data_without_...)
    pytest.param(offline, 1, ["could not download", "cifar-10-python.tar.gz", "--data-dir"], nothing_but_locks,
                 id="no-internet"),
    pytest.param(archive_of_another_checksum, 1, ["cifar-10-python.tar.gz"],
                 lambda c, b: not (c.data / "cifar-10-batches-py").exists(), id="archive-of-another-checksum"),
    pytest.param(truncated_batch, 1, ["data_batch_3"], nothing, id="truncated-batch-file"),
    pytest.param(a_file_as_data_dir, 2, ["is a file, not a folder"], nothing, id="data-dir-a-file"),
    pytest.param(lambda c: ["--data-dir", c.cifar / "cifar-10-batches-py"], 1,
                 ["is the dataset's own folder", lambda c: f"--data-dir {c.cifar}"], nothing,
                 id="data-dir-inside-the-dataset"),
    pytest.param(transfer_dataset_missing, 1, ["cifar-10-python.tar.gz"], before_pretraining,
                 id="transfer-dataset-missing"),
    pytest.param(higgs_cache_with_label_2, 1, ["HIGGS.npy holds a label other than 0 or 1"], nothing,
                 id="cache-label-outside-the-domain"),
    # checkpoints and runs that --resume cannot continue; a run never replaces a checkpoint unasked
    pytest.param(["--resume"], 1, ["no checkpoint"], nothing, id="resume-without-a-checkpoint"),
    pytest.param(garbage_checkpoint, 1, ["unreadable"], unchanged, id="checkpoint-garbage"),
    pytest.param(lambda c: c.copy_stopped(), 2, ["--resume", "--overwrite"], unchanged,
                 id="train-again-without-resume-or-overwrite"),
    pytest.param(lambda c: c.resume("--max-steps", "0"), 2, ["--max-steps"], unchanged, id="resume-with-max-steps-0"),
    pytest.param(finished, 1, ["the end of a finished run", "python probe.py --domain cifar10 --ckpt"], unchanged,
                 id="resume-a-finished-run"),
    # an option that would change a resumed run's numbers is refused, naming the run's value: another --max-steps or
    # --lr would restart the cosine schedule from its peak, another preset change the recipe, silently
    pytest.param(lambda c: c.resume("--embed-dim", "64"), 2, ["--embed-dim 32 (given: 64)", "--overwrite"], unchanged,
                 id="resume-with-another-embed-dim"),
    pytest.param(lambda c: c.resume_cpu("--max-steps", "1"), 2, ["--max-steps 3 (given: 1)", "--overwrite"],
                 unchanged, id="resume-with-another-max-steps"),
    pytest.param(lambda c: c.resume_cpu("--lr", "0.1"), 2, ["--lr 0.0015 (given: 0.1)"], unchanged,
                 id="resume-with-another-lr"),
    pytest.param(lambda c: c.resume_cpu("--preset", "paper"), 2, ["--preset cpu (given: paper)"], unchanged,
                 id="resume-with-another-preset"),
    pytest.param(resume_on_imagenet32, 2, ["--domain cifar10 (given: imagenet32)",
                                           "probe it on imagenet32 with probe.py --ckpt"], unchanged,
                 id="resume-on-another-dataset-of-the-same-shape"),
    # damaged checkpoints: PyTorch would load some and crash at the first step (an internal assert, then a
    # segfault), or train on NaN
    pytest.param(crafted(lambda s: s.pop("model")), 1, ["does not hold this model's weights"], unchanged,
                 id="checkpoint-without-weights"),
    pytest.param(crafted(lambda s: s.pop("optimizer")), 1, ["cannot be resumed"], unchanged,
                 id="checkpoint-without-optimizer"),
    pytest.param(crafted(lambda s: s.pop("rng_cpu")), 1, ["cannot be resumed"], unchanged,
                 id="checkpoint-without-rng-state"),
    pytest.param(crafted(lambda s: s["model"].pop("encoder.norm.weight")), 1, ["encoder.norm.weight"], unchanged,
                 id="checkpoint-missing-a-weight"),
    pytest.param(crafted(lambda s: s["model"].update({"encoder.norm.weight": torch.ones(3)})), 1,
                 ["encoder.norm.weight"], unchanged, id="checkpoint-weight-of-another-shape"),
    pytest.param(crafted(lambda s: s["model"]["encoder.norm.bias"].fill_(float("nan"))), 1,
                 ["non-finite weights (encoder.norm.bias)"], unchanged, id="checkpoint-weight-nan"),
    pytest.param(crafted(lambda s: s["optimizer"]["state"][0].update(exp_avg=torch.zeros(3))), 1,
                 ["exp_avg of parameter 0 has shape (3,)"], unchanged, id="optimizer-state-of-another-shape"),
    pytest.param(crafted(lambda s: s["optimizer"]["state"][1]["exp_avg_sq"].fill_(float("nan"))), 1,
                 ["exp_avg_sq of parameter 1 is not finite"], unchanged, id="optimizer-state-nan"),
    # a run that cannot go on stops in one line that says what exists: the last checkpoint, or none
    pytest.param(nan_loss, 1, ["non-finite loss before step 2", "the checkpoint of step 1 (", ") is intact"],
                 checkpoint_kept, id="nan-loss-on-resume"),
    pytest.param(["--lr", "1e30"], 1, ["non-finite", "no checkpoint of this run was written yet"], no_checkpoint,
                 id="lr-1e30-before-any-checkpoint"),
    # 10^8 images of 3 KB: far more than any machine's memory, refused by the allocator at once
    pytest.param(["--batch-size", "100000000"], 1, ["out of memory", "lower --batch-size"], no_checkpoint,
                 id="a-batch-that-cannot-be-allocated"),
    pytest.param(checkpoint_save_meets_a_full_disk, 1, ["could not write the checkpoint of step 3",
                                                        "the one on disk is intact"], checkpoint_kept,
                 id="disk-full-while-the-checkpoint-is-written"),
    pytest.param(out_dir_inside_a_file, 2, ["not a writable folder"], nothing, id="out-dir-inside-a-file"),
    # --overwrite removes the old run only once the new one has its data and its model
    pytest.param(lambda c: c.copy_stopped() + ["--overwrite", "--data-dir", c.tmp / "typo", "--download", "false"], 1,
                 ["cifar-10-python.tar.gz"], unchanged, id="overwrite-with-a-typo-in-data-dir"),
    # a run whose folder is no longer its own stops at its next write, and writes nothing into another run's
    pytest.param(lambda c: at_step_2(c, lambda: (c.out / ".lock").unlink()), 1,
                 ["is no longer this run's folder", "step 2"],
                 lambda c, b: logged_steps(c.out) == [1] and no_checkpoint(c, b), id="lock-removed"),
    pytest.param(lambda c: at_step_2(c, lambda: another_run_takes(c.out)), 1, ["is no longer this run's folder"],
                 lambda c, b: (c.out / ".lock").read_text() == "train.py (pid 1)" and no_checkpoint(c, b),
                 id="lock-replaced"),
    pytest.param(lambda c: at_step_2(c, lambda: folder_replaced(c)), 1, ["is no longer this run's folder"],
                 lambda c, b: snapshot(c.out) == {".lock": b"train.py (pid 1)", "ckpt.pt": b"another run's"},
                 id="folder-replaced"),
    # values the model reads in float32: the data are blamed, and a table's 1e39 (finite in float64) refused
    pytest.param(lambda c: higgs_sample_with(c, "binary.train", None, "1e38"), 1,
                 ["non-finite loss", "1e+38", "float32"], no_checkpoint, id="1e38-in-the-training-data"),
    pytest.param(lambda c: higgs_sample_with(c, "binary.test", 0, "1e39"), 1, ["binary.test row 1", "float32"],
                 nothing, id="1e39-in-a-test-table"),
    # a probe that cannot mean anything is refused before pretraining
    pytest.param(lambda c: ["--val-frac", "0.99"], 2, ["leaves 1 to train the probe"], nothing,
                 id="val-frac-leaves-one-training-row"),
    pytest.param(same_images, 1, ["are all the same"], nothing, id="every-input-the-same"),
    pytest.param(lambda c: tape_json(c, "pfam", lambda p, r: None) + ["--val-frac", "0.001"], 2,
                 ["leaves", "0 held out"], nothing, id="no-held-out-rows-of-a-label-free-domain"),
    pytest.param(lambda c: fake_cuda(c) or ["--device", "cuda:5"], 2, ["--device cuda:5", "1 CUDA device"], nothing,
                 id="device-index-beyond-the-gpus"),
    # data files that cannot be read: one line that says why, and nothing to delete when nothing is broken
    pytest.param(lambda c: speech_subset_with_a_name(c, b"0a1b2c3d\xff_nohash_0.wav"), 1, ["not UTF-8"], nothing,
                 id="wav-name-not-utf8"),
    pytest.param(speech_lists_not_utf8, 1, ["validation_list.txt", "not UTF-8"], nothing,
                 id="validation-list-not-utf8"),
    pytest.param(lambda c: pamap2_dat(c, "folder"), 1, ["subject103.dat is a folder"], nothing, id="pamap2-dat-folder"),
    pytest.param(lambda c: pamap2_dat(c, "loop"), 1, ["subject103.dat is a symbolic link that loops"], nothing,
                 id="pamap2-dat-symlink-loop"),
    pytest.param(lambda c: pamap2_dat(c, "unreadable"), 1, ["subject103.dat cannot be read by this user"], nothing,
                 id="pamap2-dat-unreadable"),
    pytest.param(lambda c: pamap2_dat(c, "empty"), 1, ["subject103.dat is empty"], nothing, id="pamap2-dat-empty"),
    pytest.param(lambda c: tape_json(c, "scop", lambda p, r: damage(p, "folder", c)), 1,
                 ["remote_homology_train.json is a folder"], nothing, id="tape-json-folder"),
    pytest.param(lambda c: tape_json(c, "scop", lambda p, r: damage(p, "loop", c)), 1,
                 ["remote_homology_train.json is a symbolic link that loops"], nothing, id="tape-json-symlink-loop"),
    pytest.param(lambda c: tape_json(c, "scop", lambda p, r: damage(p, "unreadable", c)), 1,
                 ["remote_homology_train.json cannot be read by this user"], nothing, id="tape-json-unreadable"),
    pytest.param(lambda c: tape_json(c, "scop", label("fold_label", 2**70)), 1, ["element 3", "fold_label"], nothing,
                 id="fold-label-2**70"),
    pytest.param(lambda c: tape_json(c, "pfam", label("clan", 2**70)), 1, ["element 3", "clan"], nothing,
                 id="clan-2**70"),
    pytest.param(lambda c: tape_json(c, "scop", lambda p, r: p.write_text("[" * 100_000 + "]" * 100_000)), 1,
                 ["element 0 nests"], nothing, id="deeply-nested-json"),
    pytest.param(lambda c: tape_json(c, "scop", lambda p, r: p.write_text(json.dumps(r) + "]{garbage")), 1,
                 ["after the JSON array's end"], nothing, id="trailing-garbage-after-a-json-array"),
    pytest.param(lambda c: deny(c, c.cifar / "cifar-10-batches-py" / "data_batch_2") or [], 1,
                 ["data_batch_2 cannot be read by this user (permission denied)"], nothing, id="permission-denied"),
    pytest.param(damaged_shipped_sample, 1, ["0 channels", "restore speech_commands_v0.01_sample/"], nothing,
                 id="damaged-shipped-sample"),
    pytest.param(dataset_folder_loop, 1, ["cifar-10-batches-py is a symbolic link that loops"], nothing,
                 id="dataset-folder-symlink-loop"),
    # checkpoints that cannot be resumed, each refused in one line that names it; the folder stays as it was
    pytest.param(crafted(lambda s: s.update(config="cifar10")), 1, ["config is a str"], unchanged,
                 id="checkpoint-config-a-string"),
    pytest.param(crafted(lambda s: s["optimizer"]["state"].update({999: s["optimizer"]["state"][0]})), 1,
                 ["state of parameter 999"], unchanged, id="optimizer-index-beyond-the-parameters"),
    pytest.param(crafted(lambda s: s["optimizer"]["state"][0].update(exp_avg=3.0)), 1,
                 ["exp_avg of parameter 0 is a float, not a tensor"], unchanged, id="optimizer-state-not-a-tensor"),
    pytest.param(crafted(lambda s: s["optimizer"]["state"][0]["exp_avg_sq"].fill_(-1.0)), 1,
                 ["cannot be resumed", "exp_avg_sq of parameter 0 is negative"], unchanged,
                 id="optimizer-state-crafted-negative"),
    pytest.param(crafted(lambda s: s["optimizer"]["param_groups"][0].update(weight_decay=1e30)), 1,
                 ["cannot be resumed", "weight_decay 1e+30"], unchanged, id="optimizer-settings-crafted"),
    pytest.param(crafted(lambda s: s.update(step=-5)), 1, ["step -5"], unchanged, id="checkpoint-step-negative"),
    pytest.param(crafted(lambda s: s.update(step=10)), 1, ["step 10", "3 steps"], unchanged,
                 id="checkpoint-step-beyond-its-schedule"),
    pytest.param(lambda c: c.resume("--stop-step", "1"), 1, ["--stop-step 1", "step 1 already"], unchanged,
                 id="resume-to-the-step-it-is-at"),
    pytest.param(log_line(b"\xff\xfe"), 1, ["log.jsonl line 4 is not a record"], unchanged, id="log-line-not-utf8"),
    pytest.param(log_line(b"5"), 1, ["log.jsonl line 4 is not a record"], unchanged, id="log-line-a-bare-number"),
    pytest.param(stale_part, 0, [], lambda c, b: not list(c.out.glob(".*.part")), id="stale-picture-part-removed"),
    # the run folder's own files: a folder where a file goes is refused before any work; a full disk is one line
    pytest.param(a_folder_named("log.jsonl"), 2, ["log.jsonl is a folder"], unchanged, id="log-a-folder"),
    pytest.param(a_folder_named("ckpt.pt"), 2, ["ckpt.pt is a folder"], unchanged, id="checkpoint-a-folder"),
    pytest.param(a_folder_named(".lock"), 2, [".lock is a folder"], unchanged, id="lock-a-folder"),
    pytest.param(lambda c: c.out.mkdir() or (c.out / "log.jsonl").symlink_to("/dev/full") or [], 1,
                 ["No space left on device", "no checkpoint of this run was written yet"], no_checkpoint,
                 id="disk-full-while-the-log-is-written"),
    pytest.param(lambda c: full_disk_for(c, ".png"), 1, ["No space left on device", "ckpt.pt is intact"],
                 lambda c, b: (c.out / "ckpt.pt").is_file() and not list(c.out.glob(".*.part")),
                 id="disk-full-while-the-picture-is-written"),
]


@pytest.mark.parametrize("setup,code,words,after", TRAIN_CASES)
def test_what_no_run_may_do(cifar_dir, stopped_run, stopped_cpu_run, tmp_path, monkeypatch, setup, code, words, after):
    c = Case(tmp_path, cifar_dir, stopped_run, stopped_cpu_run, monkeypatch)
    args = [*base(cifar_dir), "--out-dir", c.out, *(setup(c) if callable(setup) else setup)]
    before = snapshot(c.out)
    with warnings.catch_warnings():  # shown as a user's terminal shows them (pytest would hold them back)
        warnings.simplefilter("default")
        for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", hidden)  # Python's own defaults
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(message, category, filename, lineno, line))
        result = train_cli(*args)
    c.stdout = result[1]
    if code:
        assert_clean_error(result, code, *[w(c) if callable(w) else w for w in words])
    else:
        assert result[0] == 0, result[2]
    assert after(c, before) is not False
