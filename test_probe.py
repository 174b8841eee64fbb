"""Tests of probe.py: the linear probe's honesty (selection on validation, test scored once), its metric, and
probe.py on its own: checkpoints, the baselines, transfer, and what it refuses."""

import dataclasses
import gzip
import os
import re

import numpy as np
import pytest
import torch

import cli
import data
import probe
import train
from conftest import (TINY, assert_clean_error, make_cifar, make_imagenet32, read_log, run_cli, run_in_process,
                      write_cifar_batch, write_fake, write_fake_higgs)


def parse(argv):  # as probe.main parses: --ckpt's domain and data folder are the defaults
    return cli.parse_args([str(a) for a in argv], probe.Config, "", inherit=cli.probed_options)


def probe_cli(*args):
    """probe.py's command line, in this process: (exit code, stdout, stderr)."""
    return run_in_process(probe.main, *args)


def train_main(*args):
    return train.run(cli.parse_args([str(a) for a in args], train.Config, "", train.PRESETS))


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_cifar(root / "cifar-10-batches-py", rows_per_file=20)  # 100 train, 20 test
    return root


def separable(n, num_classes=3, seed=0, dims=8):
    """Features whose labels a linear classifier can learn (argmax of a fixed linear map), unstandardized."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dims, num_classes, generator=torch.Generator().manual_seed(99))
    f = torch.randn(n, dims, generator=g) * 5 + 3
    return f, (f @ w).argmax(1)

# ----------------------------------------------------------------------------- the linear probe


def test_linear_probe_selects_on_validation_and_scores_test_once():
    cfg = parse(["--probe-epochs", "30", "--probe-lrs", "1e-2,1e-5"])
    tr, va, te = separable(400, seed=0), separable(100, seed=1), separable(100, seed=2)
    res = probe.linear_probe(tr, va, 3, cfg, test=te)
    assert res["lr"] == 1e-2 and 1 <= res["epoch"] <= 30 and res["val_acc"] > 0.85 and res["test_acc"] > 0.85
    # the choice ignores the test split: garbage test labels change the test score, not the choice
    garbage = probe.linear_probe(tr, va, 3, cfg, test=(te[0], (te[1] + 1) % 3))
    assert (garbage["lr"], garbage["epoch"], garbage["val_acc"]) == (res["lr"], res["epoch"], res["val_acc"])
    assert garbage["test_acc"] < 0.5
    assert "test_acc" not in probe.linear_probe(tr, va, 3, cfg)  # no test unless asked


def test_weighted_f1_by_hand():
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    # per class F1 = 2 tp / (true + predicted): 4/5, 2/4, 2/3; weights 3, 2, 1 of 6; class 3 never occurs
    assert probe.weighted_f1(pred, y, 4) == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert probe.weighted_f1(y, y, 4) == pytest.approx(1.0)
    # unlike accuracy, predicting the majority class everywhere scores low
    majority = torch.zeros_like(y)
    assert (majority == y).float().mean() == 0.5 and probe.weighted_f1(majority, y, 4) == pytest.approx(3 / 6 * 2 * 3 / 9)


def test_probe_selects_and_reports_by_the_domains_metric(monkeypatch):
    # every validation score the probe computes is recorded; the (lr, epoch) it reports must be the first best
    # by the domain's metric: weighted F1 for the wafer maps, accuracy otherwise
    cfg = parse(["--probe-epochs", "6", "--probe-lrs", "3e-2,1e-3"])
    f, y = separable(600, seed=3)
    y = torch.where(torch.rand(600, generator=torch.Generator().manual_seed(4)) < 0.6, 0, y)  # imbalanced, as wafers
    tr, va, te = (f[:300], y[:300]), (f[300:500], y[300:500]), (f[500:], y[500:])
    seen, scores = [], probe.scores

    def recording(head, x, y, num_classes, metric):
        out = scores(head, x, y, num_classes, metric)
        if len(x) == len(va[0]) and x.shape[0] != len(te[0]):
            seen.append(out)
        return out
    monkeypatch.setattr(probe, "scores", recording)
    chosen = {}
    for metric, key in (("weighted_f1", "f1"), ("accuracy", "acc")):
        seen.clear()
        res = probe.linear_probe(tr, va, 3, cfg, test=te, metric=metric)
        assert len(seen) == 12  # 2 lrs x 6 epochs, in that order
        best = max(range(12), key=lambda i: (seen[i][key], -i))
        assert (res["lr"], res["epoch"]) == ((3e-2, 1e-3)[best // 6], best % 6 + 1), (metric, seen)
        assert res[f"val_{key}"] == seen[best][key]
        chosen[metric] = (res["lr"], res["epoch"])
        assert set(res) == {"val_acc", "test_acc", "lr", "epoch"} | ({"val_f1", "test_f1"} if key == "f1" else set())


# ----------------------------------------------------------------------------- probe.py on its own


def make_learnable_cifar(folder, rows_per_file=60, seed=0):
    """CIFAR-format files whose label is learnable: classes 0, 1, 2 are red, green and blue images with noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    colours = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 3, rows_per_file)
        img = colours[labels][:, :, None] + rng.normal(0, 20, (rows_per_file, 3, 1024))
        write_cifar_batch(folder / name, img.clip(0, 255).astype(np.uint8).reshape(rows_per_file, 3072), labels)


def test_probe_py_reads_a_checkpoint_and_the_baselines_against_chance_and_shuffled_labels(tmp_path):
    make_learnable_cifar(tmp_path / "data" / "cifar-10-batches-py")
    common = ["--domain", "cifar10", "--data-dir", tmp_path / "data", "--probe-epochs", "20", "--threads", "1"]
    train_main(*common, *TINY, "--probe-epochs", "20", "--max-steps", "2", "--eval-interval", "0",
               "--out-dir", tmp_path / "run")
    ckpt = tmp_path / "run" / "ckpt.pt"
    res = {b: probe.run(parse([*common, "--baseline", b, "--ckpt", ckpt])) for b in ("raw", "random")}
    res["ckpt"] = probe.run(parse([*common, "--ckpt", ckpt]))
    for name, rec in res.items():
        assert rec["val_acc"] > 0.8 and rec["test_acc"] > 0.8, (name, rec)  # chance is 1/3
    # the same records, kept beside the checkpoint
    assert [r["encoder"] for r in read_log(tmp_path / "run" / "eval.jsonl")] == ["raw", "random", str(ckpt)]
    # the control: with the training labels shuffled nothing is learnable, and the probe says so
    shuffled = probe.linear_probe(*[(f, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))])
                                    for f, y in [separable(400)]], separable(200, seed=1), 3,
                                  parse(["--probe-epochs", "20"]), test=separable(200, seed=2))
    assert shuffled["test_acc"] < 0.6
    # the encoders probed: the checkpoint's weights for --ckpt; for --baseline random, its shape with fresh weights
    seen, evaluate = {}, probe.evaluate
    try:
        probe.evaluate = lambda model, cfg, *a: seen.setdefault(cfg.baseline, model) and evaluate(model, cfg, *a)
        for b in ("", "random"):
            probe.run(parse([*common, "--probe-epochs", "1", "--ckpt", ckpt, *(["--baseline", b] if b else [])]))
    finally:
        probe.evaluate = evaluate
    saved = torch.load(ckpt, weights_only=True)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in seen[""].state_dict().items())
    fresh = seen["random"].state_dict()
    assert fresh.keys() == saved.keys()
    assert not torch.equal(fresh["encoder.blocks.0.fc1.weight"], saved["encoder.blocks.0.fc1.weight"])


def test_probe_py_with_a_checkpoint_alone_reads_its_run_s_domain_and_data_folder(tmp_path, monkeypatch):
    write_fake("splice", tmp_path / "data", monkeypatch)
    train_main("--domain", "splice", "--data-dir", tmp_path / "data", *TINY, "--max-steps", "2", "--out-dir",
               tmp_path / "run")
    code, out, err = probe_cli("--ckpt", tmp_path / "run" / "ckpt.pt", "--probe-epochs", "1", "--threads", "1")
    assert code == 0 and not err, err  # not cifar10 in ./data, the defaults: splice, in the run's data folder
    assert read_log(tmp_path / "run" / "eval.jsonl")[-1]["encoder"] == str(tmp_path / "run" / "ckpt.pt")
    cfg = parse(["--ckpt", tmp_path / "run" / "ckpt.pt", "--data-dir", "elsewhere"])
    assert (cfg.domain, cfg.data_dir) == ("splice", "elsewhere")  # what is given wins
    assert parse(["--baseline", "raw", "--ckpt", tmp_path / "run" / "ckpt.pt"]).domain == "cifar10"  # raw reads none


def test_probe_py_says_what_it_computes_and_prints_percent_but_records_fractions(cifar_dir, tmp_path):
    code, out, err = probe_cli("--domain", "cifar10", "--data-dir", cifar_dir, "--baseline", "raw", "--probe-epochs", 3,
                               "--probe-lrs", "1e-2,1e-3", "--threads", 1, "--out-dir", tmp_path)
    assert code == 0, err
    lines = out.strip().splitlines()
    rec = read_log(tmp_path / "eval.jsonl")[-1]  # fractions, as before
    assert 0 <= rec["val_acc"] <= 1 and 0 <= rec["test_acc"] <= 1 and rec["encoder"] == "raw"
    assert lines[0] == "cifar10: the features of 100 training and 20 test inputs ..."
    # a line per learning rate when its epochs are done: the best validation score so far, its lr and epoch
    assert re.fullmatch(r"probe lr 0\.01: 3 epochs done; the best validation accuracy so far \d+\.\d% \(lr 0\.01, "
                        r"epoch [123]\)", lines[1]), lines[1]
    assert lines[2].startswith("probe lr 0.001: 3 epochs done; the best validation accuracy so far "
                               f"{100 * rec['val_acc']:.1f}% (lr {rec['probe_lr']:g}, epoch {rec['probe_epoch']})")
    assert lines[-2] == (f"cifar10: test accuracy {100 * rec['test_acc']:.1f}% (validation {100 * rec['val_acc']:.1f}%; "
                         f"probe lr {rec['probe_lr']}, epoch {rec['probe_epoch']})")
    assert str(tmp_path / "eval.jsonl") in lines[-1] and len(lines) == 5


def test_transfer_imagenet32_to_cifar10_then_probe_the_checkpoint_alone(tmp_path):
    make_imagenet32(tmp_path / "data")
    make_cifar(tmp_path / "data" / "cifar-10-batches-py", rows_per_file=20)
    base = ["--data-dir", tmp_path / "data", "--download", "false", "--probe-epochs", "1"]
    rec = train_main("--domain", "imagenet32", "--probe-domains", "cifar10", *base, *TINY, "--probe-epochs", "1",
                     "--max-steps", "2", "--eval-interval", "0", "--out-dir", tmp_path / "run")
    assert {"test_acc", "cifar10_test_acc"} <= set(rec)  # its own probe, then CIFAR-10's
    # the same checkpoint probed on CIFAR-10 alone: the same features and the same seeded probe, the same result
    alone = probe.run(parse(["--domain", "cifar10", "--ckpt", tmp_path / "run" / "ckpt.pt", *base]))
    assert (alone["val_acc"], alone["test_acc"]) == (rec["cifar10_val_acc"], rec["cifar10_test_acc"])


class Payload:
    """A pickle that runs a shell command when loaded: what a crafted checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_the_real_entry_point_exits_2_with_one_line(cifar_dir, tmp_path):
    assert_clean_error(run_cli("probe.py", "--domain", "cifar10", "--data-dir", cifar_dir, "--baseline", "best"), 2,
                       "--baseline must be 'random' or 'raw'")


def test_ctrl_c_while_probing_or_reading_data_says_where_it_stopped(cifar_dir, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(probe, "evaluate", interrupted)
    assert_clean_error(probe_cli("--domain", "cifar10", "--data-dir", cifar_dir, "--baseline", "raw", "--out-dir",
                                 tmp_path), 130, "interrupted (Ctrl-C) while probing; nothing was written")
    monkeypatch.setattr(probe, "load_data", interrupted)
    assert_clean_error(run_in_process(train.main, "--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--out-dir",
                                      tmp_path / "run"), 130, "while reading the data, before the first step")


# ----------------------------------------------------------------------------- the table: what no probe may do
# As train.py's (test_train.py): each row builds its case and runs probe.py; the exit code, the one line and its
# words, and what is on disk afterwards (a probe that did no work leaves nothing, and makes no folder).


@pytest.fixture(scope="module")
def trained(cifar_dir, tmp_path_factory):
    """A checkpoint of one step (of a small model), for the rows that read one."""
    out = tmp_path_factory.mktemp("trained")
    train_main("--domain", "cifar10", "--data-dir", cifar_dir, *TINY, "--max-steps", "1", "--eval-interval", "0",
               "--probe-epochs", "1", "--out-dir", out)
    return out / "ckpt.pt"


def with_config(trained, tmp_path, **change):
    state = torch.load(trained, weights_only=True)
    state["model_config"].update(change)
    torch.save(state, tmp_path / "other.pt")
    return ["--ckpt", tmp_path / "other.pt"]


def higgs_with_nan_in_a_test_row(tmp_path, monkeypatch):
    from conftest import serve
    rows = write_fake_higgs(tmp_path / "data")
    rows[data.seeded_split(len(rows), "")[1][0], 5] = float("nan")  # a row of the test split
    with gzip.open(tmp_path / "data" / "HIGGS.csv.gz", "wt") as f:
        np.savetxt(f, rows, fmt="%.18e", delimiter=",")
    serve(monkeypatch, "HIGGS", tmp_path / "data" / "HIGGS.csv.gz")
    return ["--domain", "higgs", "--data-dir", tmp_path / "data", "--download", "false", "--baseline", "raw"]


def evil(tmp_path):
    torch.save(dict(model={}, model_config={}, payload=Payload(tmp_path / "pwned")), tmp_path / "evil.pt")
    return ["--ckpt", tmp_path / "evil.pt"]


def eval_log(tmp_path, how):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "eval.jsonl").mkdir() if how == "folder" else (tmp_path / "run" / "eval.jsonl").symlink_to(
        "/dev/full")
    return ["--baseline", "raw", "--out-dir", tmp_path / "run"]


def no_folder(name):
    def after(tmp_path):
        assert not os.path.lexists(tmp_path / name)
    return after


def damaged(trained, tmp_path, change):
    """The checkpoint with change(state) made to it."""
    state = torch.load(trained, weights_only=True)
    change(state)
    torch.save(state, tmp_path / "damaged.pt")
    return ["--ckpt", tmp_path / "damaged.pt"]


def garbage_checkpoint(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"garbage")
    return ["--ckpt", tmp_path / "broken.pt"]


def no_inputs(tmp_path):
    make_cifar(tmp_path / "empty" / "cifar-10-batches-py", rows_per_file=0)
    return ["--data-dir", tmp_path / "empty", "--baseline", "raw"]


def read_only_parent(tmp_path):
    tmp_path.chmod(0o555)
    return ["--baseline", "raw", "--out-dir", tmp_path / "run"]


def loaded(monkeypatch, name, splits):
    """The raw baseline of a domain whose loader hands over splits, as a stale or broken cache would."""
    monkeypatch.setitem(data.DOMAINS, name, dataclasses.replace(data.DOMAINS[name], load=lambda *args: splits))
    return ["--domain", name, "--baseline", "raw"]


def label_free_alone(tmp_path, monkeypatch):
    write_fake("librispeech", tmp_path / "data", monkeypatch)
    return ["--domain", "librispeech", "--baseline", "random", "--probe-domains", "none", "--data-dir",
            tmp_path / "data"]


def cuda_beside(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    return ["--baseline", "raw", "--device", "cuda:5"]


def refused_before_work(args, words, id=None):
    """An option that cannot work: exit 2 before any work, no folder made."""
    return pytest.param(args, 2, [words], no_folder("run"), id=id or " ".join(args))


PROBE_CASES = [  # setup(tmp_path, monkeypatch, trained) -> probe.py's options (or those options); exit code; words;
    # after(tmp_path)
    # options that cannot work, refused before any work
    refused_before_work([], "name what to probe: --ckpt PATH", id="nothing-named"),
    refused_before_work(["--baseline", "best"], "--baseline must be 'random' or 'raw'"),
    refused_before_work(["--baseline", "raw", "--probe-lrs", "0"], "--probe-lrs must be positive finite numbers"),
    refused_before_work(["--baseline", "raw", "--val-frac", "0"], "--val-frac must be in (0, 1)"),
    refused_before_work(["--baseline", "raw", "--probe-domains", "google_speech"], "the model reads one input shape"),
    refused_before_work(["--baseline", "raw", "--eval-only", "raw"], "unrecognized arguments: --eval-only"),
    refused_before_work(["--baseline", "raw", "--probe-lrs", "1e30"],
                        "--probe-lrs must be positive finite numbers of at most 1"),
    refused_before_work(["--baseline", "raw", "--probe-weight-decay", "5e3"],
                        "--probe-weight-decay 5000 with --probe-lrs 0.001"),
    refused_before_work(["--baseline", "raw", "--threads", "100000"],
                        "--threads 100000: this machine has"),  # was a segmentation fault
    pytest.param(lambda t, mp, ck: label_free_alone(t, mp), 2, ["has no labels to probe"], no_folder("run"),
                 id="a-label-free-domain-alone"),
    pytest.param(lambda t, mp, ck: cuda_beside(mp), 2, ["--device cuda:5", "1 CUDA device"], lambda t: None,
                 id="device-index-beyond-the-gpus"),
    pytest.param(lambda t, mp, ck: read_only_parent(t), 2, ["not a writable folder"], lambda t: t.chmod(0o755),
                 id="out-dir-in-a-read-only-folder",
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")),
    # checkpoints that cannot be probed: a crafted one runs no code (checkpoints are read with weights_only)
    pytest.param(lambda t, mp, ck: ["--ckpt", t / "none.pt"], 1, ["no checkpoint"], lambda t: None,
                 id="checkpoint-missing"),
    pytest.param(lambda t, mp, ck: ["--ckpt", t / "missing" / "ckpt.pt"], 1, ["no checkpoint at"],
                 no_folder("missing"), id="checkpoint-in-a-missing-folder"),
    pytest.param(lambda t, mp, ck: ["--baseline", "raw", "--ckpt", t / "missing" / "ckpt.pt"], 1, ["no checkpoint at"],
                 no_folder("missing"), id="raw-baseline-beside-a-missing-checkpoint"),
    pytest.param(lambda t, mp, ck: evil(t), 1, ["refused: loading it would run code", "posix.system"],
                 lambda t: not (t / "pwned").exists(), id="checkpoint-that-would-run-code"),
    pytest.param(lambda t, mp, ck: garbage_checkpoint(t), 1, ["unreadable"], lambda t: None, id="checkpoint-garbage"),
    pytest.param(lambda t, mp, ck: with_config(ck, t, input_shape=[3, 16, 16]), 1, ["--domain"], lambda t: None,
                 id="checkpoint-of-another-domain"),
    pytest.param(lambda t, mp, ck: with_config(ck, t, patch_size=[8, 8]), 1, ["patch_size (8, 8)", "(4, 4)"],
                 lambda t: None, id="checkpoint-of-other-patches"),
    *[pytest.param(lambda t, mp, ck, change=change: with_config(ck, t, **change), 1,
                   ["unreadable or not a checkpoint", f"MetaMAEConfig.{field}"], lambda t: None,
                   id=f"checkpoint-config-{field}-{value}")
      for field, value in [("embed_dim", 33), ("depth", "one"), ("mlp_ratio", float("inf")), ("mask_ratio", 0.999)]
      for change in [{field: value}]],
    pytest.param(lambda t, mp, ck: damaged(ck, t, lambda s: s.pop("model")), 1, ["does not hold this model's weights"],
                 lambda t: None, id="checkpoint-without-weights"),
    pytest.param(lambda t, mp, ck: damaged(ck, t, lambda s: s["model"].pop("encoder.norm.weight")), 1,
                 ["encoder.norm.weight"], lambda t: None, id="checkpoint-missing-a-weight"),
    pytest.param(lambda t, mp, ck: damaged(ck, t, lambda s: s["model"].update({"encoder.norm.weight": torch.ones(3)})),
                 1, ["encoder.norm.weight"], lambda t: None, id="checkpoint-weight-of-another-shape"),
    pytest.param(lambda t, mp, ck: damaged(ck, t, lambda s: s["model"]["encoder.norm.bias"].fill_(float("nan"))), 1,
                 ["non-finite weights (encoder.norm.bias)"], lambda t: None, id="checkpoint-weight-nan"),
    # data that cannot be probed: nothing written, no folder made
    pytest.param(lambda t, mp, ck: ["--baseline", "raw", "--out-dir", t / "new" / "run", "--data-dir", t / "typo",
                                    "--download", "false"], 1, ["cifar-10-python.tar.gz"], no_folder("new"),
                 id="data-error-leaves-no-folder"),
    pytest.param(lambda t, mp, ck: no_inputs(t), 1, ["has 0 training and 0 test inputs"], no_folder("run"),
                 id="no-training-inputs"),
    pytest.param(lambda t, mp, ck: higgs_with_nan_in_a_test_row(t, mp), 1, ["test inputs are not finite"],
                 lambda t: not (t / "run" / "eval.jsonl").exists(), id="nan-in-a-test-row"),
    pytest.param(lambda t, mp, ck: loaded(mp, "cifar10", data.Splits(
        torch.zeros(20, 3, 32, 32, dtype=torch.uint8), torch.tensor([0] * 19 + [10]),
        torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(1, dtype=torch.long))), 1,
        ["a train label is 10, but it has 10 classes"], no_folder("run"), id="a-label-outside-the-classes"),
    pytest.param(lambda t, mp, ck: loaded(mp, "genomics", data.Splits(
        torch.full((20, 250), 7, dtype=torch.uint8), torch.zeros(20, dtype=torch.long),
        torch.zeros(1, 250, dtype=torch.uint8), torch.zeros(1, dtype=torch.long))), 1,
        ["a train token id is 7, but the vocabulary has 4"], no_folder("run"), id="a-token-id-outside-the-vocabulary"),
    # the record: a folder where it goes is refused before any work; a full disk is one line
    pytest.param(lambda t, mp, ck: eval_log(t, "folder"), 2, ["eval.jsonl is a folder"],
                 lambda t: (t / "run" / "eval.jsonl").is_dir(), id="eval-log-a-folder"),
    pytest.param(lambda t, mp, ck: eval_log(t, "full"), 1, ["could not write", "No space left on device"],
                 lambda t: None, id="disk-full-while-eval-log-is-written"),
]


@pytest.mark.parametrize("setup,code,words,after", PROBE_CASES)
def test_what_no_probe_may_do(cifar_dir, trained, tmp_path, monkeypatch, setup, code, words, after):
    args = [str(a) for a in (setup(tmp_path, monkeypatch, trained) if callable(setup) else setup)]
    if "--ckpt" not in args and "--out-dir" not in args:  # else the results go beside the checkpoint, or runs/cifar10
        args += ["--out-dir", tmp_path / "run"]
    args = ["--domain", "cifar10", "--data-dir", cifar_dir, "--probe-epochs", "1", *args]
    assert_clean_error(probe_cli(*args), code, *words)
    assert after(tmp_path) is not False


def raw(x):
    return x.flatten(1).float()


def nan_features(x):
    return torch.full((len(x), 4), float("nan"))


@pytest.mark.parametrize("train_features,test_features,lr,needle", [
    (nan_features, raw, "1e-3", "features of its training inputs are not finite"),
    (raw, nan_features, "1e-3", "features of its test inputs are not finite"),
    (raw, raw, "1e30", "the linear probe diverged at --probe-lrs 1e+30"),  # a NaN head (probe.py refuses the lr)
])
def test_no_accuracy_from_non_finite_values(cifar_dir, train_features, test_features, lr, needle):
    # what the encoder hands the probe, and a learning rate the command line cannot give: refused, not reported
    d = probe.load_data(parse(["--data-dir", cifar_dir]), data.DOMAINS["cifar10"], torch.device("cpu"))
    featurize = lambda x: (test_features if len(x) == len(d.splits.test_x) else train_features)(x)  # noqa: E731
    with pytest.raises(cli.RunError, match=re.escape(needle)):
        probe.probe(featurize, d, data.DOMAINS["cifar10"], parse(["--probe-lrs", lr, "--probe-epochs", "2"]), True)
