"""
Linear evaluation of a frozen encoder, as DABS and MetaMAE evaluate: train.py calls it at the end of a run,
and it runs on its own.

    python probe.py --domain cifar10 --ckpt runs/cifar10/ckpt.pt        # a pretrained encoder
    python probe.py --domain cifar10 --ckpt runs/imagenet32/ckpt.pt     # transfer: a checkpoint of another domain
    python probe.py --domain cifar10 --baseline random                  # a fresh encoder (the paper's backbone) ...
    python probe.py --domain cifar10 --baseline random --ckpt runs/cifar10/ckpt.pt   # ... or shaped like a checkpoint's
    python probe.py --domain cifar10 --baseline raw                     # the floor: a linear probe on the inputs

The protocol: features of the frozen encoder (`model.encode`: eval mode, no masking, mean of the patch tokens)
are computed once and standardized with training statistics (random-init features are nearly collinear
without it); a linear classifier is trained on them with AdamW (weight decay 1e-4, batch 64, 100 epochs) at
each learning rate of --probe-lrs. The learning rate and the epoch are chosen on a fixed-seed validation split
carved out of the training split (whole speakers or users where the data have them); the test split is
scored once, at the very end. A domain whose metric is weighted F1 (the wafer maps) is selected by it.
"""

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

import cli
import data
import device
from cli import RunError, UsageError, knob
from metamae import MetaMAE, MetaMAEConfig

# -----------------------------------------------------------------------------
# the knobs of any command that reads a domain and probes: train.py's Config starts from these


@dataclass
class Knobs:
    # data
    domain: str = knob("cifar10", "dataset: " + ", ".join(data.DOMAINS), "start here")
    probe_domains: str = knob("", "domains probed besides the run's own (which is probed when it has labels), "
                              "comma-separated, of the same input shape, e.g. cifar10 after imagenet32; default: "
                              "the domain's DABS transfer targets; 'none': none", "probe")
    data_dir: str = knob("./data", "where datasets are downloaded / looked for", "start here")
    download: bool = knob(True, "download the dataset when it is missing")
    out_dir: str = knob("", "run folder (default runs/<domain>)", "start here")
    seed: int = knob(0, "random seed")
    # system
    device: str = knob("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...", "start here")
    dtype: str = knob("auto", "'auto' (bf16 autocast on CUDA, fp32 on CPU), 'float32' or 'bfloat16'")
    threads: int = knob(0, "CPU threads (0: PyTorch's default)")
    # the linear probe
    probe_epochs: int = knob(100, "linear-probe epochs", "probe")
    probe_lrs: str = knob("1e-3,1e-4", "linear-probe learning rates, chosen on validation", "probe")
    probe_batch_size: int = knob(64, "linear-probe batch size", "probe")
    probe_weight_decay: float = knob(1e-4, "linear-probe weight decay", "probe")
    val_frac: float = knob(0.1, "fraction of the training split held out (fixed seed) for probe selection", "probe")


def check_knobs(cfg):
    """The checks of Knobs, before any work. Returns the domain and the domains a finished run probes: its own
    when it has labels, then the transfer domains of --probe-domains (default: the domain's own list, as DABS
    evaluates it), each of the domain's input shape (a model reads one) and with labels."""
    if cfg.domain not in data.DOMAINS:
        raise UsageError(f"unknown --domain {cfg.domain!r}; choose one of {', '.join(data.DOMAINS)}")
    domain = data.DOMAINS[cfg.domain]
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise UsageError(f"--dtype must be 'auto', 'float32' or 'bfloat16', got {cfg.dtype!r}")
    kind, _, index = cfg.device.partition(":")
    if cfg.device not in ("auto", "cpu", "cuda") and not (kind == "cuda" and index.isdigit()):
        raise UsageError(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")
    if index and torch.cuda.is_available() and int(index) >= torch.cuda.device_count():
        raise UsageError(f"--device {cfg.device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if Path(cfg.data_dir).exists() and not Path(cfg.data_dir).is_dir():
        raise UsageError(f"--data-dir {cfg.data_dir} is a file, not a folder")
    for name in ("probe_epochs", "probe_batch_size"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if not 0 <= cfg.threads <= (os.cpu_count() or 1):  # more threads than cores only slow a run (100000 crashed it)
        raise UsageError(f"--threads {cfg.threads}: this machine has {os.cpu_count()} CPU cores; give 1 to "
                         f"{os.cpu_count()}, or 0 for PyTorch's default")
    if not 0 <= cfg.seed < 2**32:  # torch's generators take 64 bits, and train.py derives seeds from it
        raise UsageError(f"--seed must be in 0..{2**32 - 1}, got {cfg.seed}")
    if not 0 < cfg.val_frac < 1:
        raise UsageError(f"--val-frac must be in (0, 1), got {cfg.val_frac}")
    try:
        lrs = [float(v) for v in cfg.probe_lrs.split(",")]
    except ValueError:
        raise UsageError(f"--probe-lrs expects comma-separated numbers, got {cfg.probe_lrs!r}") from None
    if not all(0 < lr <= 1 for lr in lrs):  # AdamW moves each weight about lr a step, on standardized features
        raise UsageError(f"--probe-lrs must be positive finite numbers of at most 1, got {cfg.probe_lrs!r}")
    if not 0 <= cfg.probe_weight_decay < float("inf"):  # NaN fails too
        raise UsageError(f"--probe-weight-decay must be a finite number >= 0, got {cfg.probe_weight_decay}")
    if max(lrs) * cfg.probe_weight_decay > 1:  # AdamW scales the weights by 1 - lr x decay each step
        raise UsageError(f"--probe-weight-decay {cfg.probe_weight_decay:g} with --probe-lrs {max(lrs):g}: AdamW scales "
                         f"the head's weights by 1 - lr x decay = {1 - max(lrs) * cfg.probe_weight_decay:.3g} at each "
                         "step; keep lr x decay at most 1")
    names = list(domain.transfer) if cfg.probe_domains == "" else [] if cfg.probe_domains == "none" else \
        cfg.probe_domains.split(",")
    targets = [domain] if domain.num_classes else []
    for name in names:
        if name not in data.DOMAINS:
            raise UsageError(f"unknown --probe-domains entry {name!r}; choose among {', '.join(data.DOMAINS)}, "
                             "or 'none'")
        d = data.DOMAINS[name]
        if (d.input_shape, d.patch_size, d.vocab_size) != (domain.input_shape, domain.patch_size, domain.vocab_size):
            raise UsageError(f"--probe-domains {name}: its inputs {tuple(d.input_shape)} (patches {tuple(d.patch_size)}"
                             f", vocab {d.vocab_size}) are not {domain.name}'s {tuple(domain.input_shape)} (patches "
                             f"{tuple(domain.patch_size)}, vocab {domain.vocab_size}): the model reads one input shape")
        if not d.num_classes:
            raise UsageError(f"--probe-domains {name} has no labels: it can be pretrained on, not probed")
        if d not in targets:
            targets.append(d)
    return domain, targets

# -----------------------------------------------------------------------------
# the linear probe: frozen features, standardized, AdamW, lr and epoch chosen on validation


@torch.no_grad()
def features(model, x, to_input, autocast, batch=256):
    model.eval()
    out = []
    for i in range(0, len(x), batch):
        with autocast():
            out.append(model.encode(to_input(x[i:i + batch])).float())
    return torch.cat(out)


def raw_features(x, to_input, vocab_size):
    """The floor a learned encoder must beat: inputs as vectors (one-hot for token ids)."""
    inputs = to_input(x)
    return F.one_hot(inputs, vocab_size).flatten(1).float() if vocab_size else inputs.flatten(1).float()


def weighted_f1(pred, y, num_classes):
    """F1 of each class weighted by its share of the true labels (torchmetrics' and scikit-learn's 'weighted'):
    DABS's metric for the wafer maps, where 85% are 'none' and accuracy says little. pred, y: (N,) -> float."""
    true_n = torch.bincount(y, minlength=num_classes).float()  # (C,)
    pred_n = torch.bincount(pred, minlength=num_classes).float()  # (C,)
    hits = torch.bincount(y[pred == y], minlength=num_classes).float()  # (C,) true positives
    f1 = 2 * hits / (true_n + pred_n).clamp_min(1)  # (C,); a class never true nor predicted weighs 0 anyway
    return ((f1 * true_n).sum() / len(y)).item()


def scores(head, x, y, num_classes, metric):
    """Accuracy, and the domain's metric when it is another: {'acc': ..., 'f1': ...}."""
    with torch.no_grad():
        pred = head(x).argmax(1)
    out = dict(acc=(pred == y).float().mean().item())
    if metric == "weighted_f1":
        out["f1"] = weighted_f1(pred, y, num_classes)
    return out


def linear_probe(train, val, num_classes, cfg, test=None, seed=0, metric="accuracy"):
    """train/val/test: (features, labels). Returns a dict with the lr/epoch chosen on validation by the domain's
    metric, the validation scores and (once) the test scores: val_acc, test_acc, and val_f1, test_f1 for F1."""
    mean, std = train[0].mean(0), train[0].std(0) + 1e-6  # training statistics only
    norm = lambda f: (f - mean) / std  # noqa: E731
    (xtr, ytr), (xva, yva) = (norm(train[0]), train[1]), (norm(val[0]), val[1])
    key = "f1" if metric == "weighted_f1" else "acc"  # what selects the lr and the epoch
    best = dict(score=-1.0)
    for lr in (float(v) for v in cfg.probe_lrs.split(",")):
        g = torch.Generator(device=xtr.device).manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # the same head init whatever ran before, global RNG untouched
            torch.manual_seed(seed)
            head = torch.nn.Linear(xtr.shape[1], num_classes).to(xtr.device)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=cfg.probe_weight_decay)
        for epoch in range(1, cfg.probe_epochs + 1):
            perm = torch.randperm(len(xtr), generator=g, device=xtr.device)
            # drop_last, as DABS, but a split smaller than a batch still gets one step
            for i in range(0, max(len(perm) - cfg.probe_batch_size, 0) + 1, cfg.probe_batch_size):
                idx = perm[i:i + cfg.probe_batch_size]
                loss = F.cross_entropy(head(xtr[idx]), ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if not (torch.isfinite(loss) and all(torch.isfinite(p).all() for p in head.parameters())):
                raise RunError(f"the linear probe diverged at --probe-lrs {lr:g} (its loss or weights are not finite "
                               f"at epoch {epoch}): its accuracy would say nothing of the features; lower --probe-lrs")
            val = scores(head, xva, yva, num_classes, metric)
            if val[key] > best["score"]:
                best = dict(score=val[key], **{f"val_{k}": v for k, v in val.items()}, lr=lr, epoch=epoch,
                            state={k: v.clone() for k, v in head.state_dict().items()})
        print(f"probe lr {lr:g}: {cfg.probe_epochs} epochs done; the best validation "
              f"{'weighted F1' if key == 'f1' else 'accuracy'} so far {100 * best['score']:.1f}% (lr {best['lr']:g}, "
              f"epoch {best['epoch']})", flush=True)
    if test is not None:  # scored once, with the head chosen on validation
        head.load_state_dict(best["state"])
        best.update({f"test_{k}": v for k, v in scores(head, norm(test[0]), test[1], num_classes, metric).items()})
    best.pop("state"), best.pop("score")
    return best

# -----------------------------------------------------------------------------
# a domain's data, and its probe


class Data(NamedTuple):
    """A domain's splits on the run's device, and the probe's fixed-seed carve-out of the training split."""
    splits: data.Splits
    train_idx: torch.Tensor  # (n_train,) rows of splits.train_x the probe trains on
    val_idx: torch.Tensor    # (n_val,) rows it selects its lr and epoch on (and a run's held-out logs)


def load_data(cfg, domain, device):
    splits = domain.load(Path(cfg.data_dir), cfg.download)
    if not len(splits.train_x) or (domain.num_classes and not len(splits.test_x)):
        raise data.DataError(f"{domain.name} in {cfg.data_dir} has {len(splits.train_x)} training and "
                             f"{len(splits.test_x)} test inputs: its files are empty or damaged; get them again")
    # small datasets live on the accelerator and are batched there: no workers, no per-sample Python
    splits = dataclasses.replace(splits, **{k: getattr(splits, k).to(device) for k in ("train_x", "train_y", "test_x",
                                                                                       "test_y")})
    try:  # whole speakers or users go to validation where the data have them (splits.train_groups)
        idx = data.train_val_split(len(splits.train_x), cfg.val_frac, groups=splits.train_groups)
    except ValueError as e:
        raise UsageError(f"--val-frac {cfg.val_frac} on {domain.name}: {e}") from None
    # the probe standardizes its training features (a std needs 2 rows) and selects on held-out ones, which give
    # a run's held-out losses too (an empty batch has a NaN loss)
    if not len(idx[1]) or (domain.num_classes and len(idx[0]) < 2):
        raise UsageError(f"--val-frac {cfg.val_frac} of {domain.name}'s {len(splits.train_x)} training inputs leaves "
                         f"{len(idx[0])} to train the probe and {len(idx[1])} held out to select it: choose a "
                         "--val-frac that leaves at least 2 and 1")
    check_values(splits, domain)
    if domain.num_classes and all_alike(splits.train_x, idx[0]):  # a std of 0: no probe can tell them apart
        raise data.DataError(f"{domain.name}: the {len(idx[0])} inputs the probe trains on are all the same, so its "
                             "accuracy would be the share of one class: check the dataset's files")
    return Data(splits, *(i.to(device) for i in idx))


def all_alike(x, rows, chunk=4096):
    """Whether the rows of x are all equal to the first (read in chunks, stopping at the first that differs)."""
    first = x[rows[:1]]
    return all(bool((x[rows[i:i + chunk]] == first).all()) for i in range(0, len(rows), chunk))


def check_values(splits, domain):
    """What a loader or a cache handed over must be what the model and the probe can read: labels of the domain's
    classes, token ids of its vocabulary. A broken or stale cache says so here, not as an IndexError later."""
    fix = "the dataset's files or a cache built from them are damaged: delete the caches (*.npy) and run again"
    for name, y in (("train", splits.train_y), ("test", splits.test_y)):
        if domain.num_classes and len(y) and (y.min() < 0 or y.max() >= domain.num_classes):
            raise data.DataError(f"{domain.name}: a {name} label is {(y.min() if y.min() < 0 else y.max()).item()}, "
                                 f"but it has {domain.num_classes} classes: {fix}")
    if domain.vocab_size:
        for name, x in (("train", splits.train_x), ("test", splits.test_x)):
            if len(x) and x.max() >= domain.vocab_size:
                raise data.DataError(f"{domain.name}: a {name} token id is {x.max().item()}, but the vocabulary has "
                                     f"{domain.vocab_size}: {fix}")


def nonfinite_cause(x):
    """Who is to blame for a non-finite loss: data that hold NaN or inf, or values whose square (the loss's) is
    beyond float32, which the model computes in; else the learning rates."""
    lo, hi = (x.min().item(), x.max().item()) if x.is_floating_point() and len(x) else (0.0, 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return ("the training data hold NaN or infinite values: check the dataset files, and delete its caches "
                "(*.npy beside them) to rebuild them")
    if max(-lo, hi) ** 2 > torch.finfo(torch.float32).max:
        return (f"the training data hold values up to {max(-lo, hi):.3g}, whose squares (the reconstruction loss's) "
                "overflow float32, which the model computes in: check the dataset files, or scale the values")
    return "lower --lr or --inner-lr"


def finite(features, domain, split):
    if not torch.isfinite(features).all():  # a probe on NaN features would report the share of one class
        raise RunError(f"{domain.name}: features of its {split} inputs are not finite; the inputs hold NaN or "
                       "infinite values (check the dataset files and delete its caches), or the encoder's weights do")
    return features


def probe(featurize, d, domain, cfg, with_test):
    """Linear probe on featurize(inputs) of one domain's data; the test split only when with_test (once, at a
    run's end)."""
    s = d.splits
    print(f"{domain.name}: the features of {len(s.train_x):,} training" + (f" and {len(s.test_x):,} test" if with_test
          else "") + " inputs ...", flush=True)
    ftrain = finite(featurize(s.train_x), domain, "training")
    tr = (ftrain[d.train_idx], s.train_y[d.train_idx])
    va = (ftrain[d.val_idx], s.train_y[d.val_idx])
    te = (finite(featurize(s.test_x), domain, "test"), s.test_y) if with_test else None
    res = linear_probe(tr, va, domain.num_classes, cfg, te, seed=cfg.seed, metric=domain.metric)
    res["probe_lr"], res["probe_epoch"] = res.pop("lr"), res.pop("epoch")
    return res


def evaluate(model, cfg, targets, datasets, autocast):
    """The final probes of a model (None: the raw inputs) on each target domain, each scored on its test split
    once. The first target's keys are plain (test_acc); the others carry their name (cifar10_test_acc) unless
    it is the run's own domain."""
    rec = {}
    for d in targets:
        if model is None:
            featurize = lambda x: raw_features(x, d.to_input, d.vocab_size)  # noqa: E731
        else:
            featurize = lambda x: features(model, x, d.to_input, autocast)  # noqa: E731
        res = probe(featurize, datasets[d.name], d, cfg, with_test=True)
        rec.update({(k if d.name == cfg.domain else f"{d.name}_{k}"): v for k, v in res.items()})
    return rec

def results(rec, targets, own):
    """A line per target domain of evaluate()'s record, in percent: its test score, the validation score that chose
    the probe, and the probe's lr and epoch. own: the run's domain, whose keys carry no name."""
    lines = []
    for d in targets:
        key, (metric, score) = "" if d.name == own else f"{d.name}_", (
            ("weighted F1", "f1") if d.metric == "weighted_f1" else ("accuracy", "acc"))
        lines.append(f"{d.name}: test {metric} {100 * rec[key + 'test_' + score]:.1f}% (validation "
                     f"{100 * rec[key + 'val_' + score]:.1f}%; probe lr {rec[key + 'probe_lr']}, epoch "
                     f"{rec[key + 'probe_epoch']})")
    return lines

# -----------------------------------------------------------------------------
# python probe.py: a checkpoint, a fresh encoder or the raw inputs, probed; the record is appended to eval.jsonl


@dataclass
class Config(Knobs):
    ckpt: str = knob("", "the checkpoint to probe (train.py writes <out-dir>/ckpt.pt); its domain and data folder "
                     "are the defaults", "start here")
    baseline: str = knob("", "instead of a trained encoder: 'random' (fresh weights, of --ckpt's architecture when "
                         "given, else the paper's backbone) or 'raw' (the inputs themselves)", "start here")


def check(cfg):
    """Every option of probe.py, before any work: returns the domain and the domains to probe."""
    domain, targets = check_knobs(cfg)
    if cfg.baseline not in ("", "random", "raw"):
        raise UsageError(f"--baseline must be 'random' or 'raw', got {cfg.baseline!r}")
    if not cfg.ckpt and not cfg.baseline:
        raise UsageError("name what to probe: --ckpt PATH (a checkpoint of train.py), or --baseline random / raw")
    if not targets:
        raise UsageError(f"{domain.name} has no labels to probe: name labelled domains of its input shape with "
                         "--probe-domains, or probe with --domain set to one")
    return domain, targets


def run(cfg):
    domain, targets = check(cfg)
    if cfg.ckpt and not Path(cfg.ckpt).is_file():  # now, not after the data are read
        raise RunError(f"no checkpoint at {cfg.ckpt}; train first, or pass the --ckpt of an existing run")
    with cli.made_folder(cfg.out_dir or (Path(cfg.ckpt).parent if cfg.ckpt else f"runs/{cfg.domain}")) as out_dir:
        cli.refuse_folders(out_dir, ["eval.jsonl"])
        dev = device.setup(cfg)
        datasets = {d.name: load_data(cfg, d, dev.device) for d in targets}  # every one read before any work
        rec = dict(encoder=cfg.baseline or str(cfg.ckpt), **evaluate(encoder(cfg, domain, dev), cfg, targets,
                                                                     datasets, dev.autocast))
        print("\n".join(results(rec, targets, cfg.domain)), flush=True)  # percent; eval.jsonl keeps fractions
        try:
            with open(out_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as e:
            raise RunError(f"could not write {out_dir / 'eval.jsonl'} ({data.one_line(e, 160)}): free space there; the "
                           "results are the lines above") from None
        print(f"{rec['encoder']}: probed, its record appended to {out_dir / 'eval.jsonl'}", flush=True)
    return rec


def encoder(cfg, domain, dev):
    """The model probe.py probes: a checkpoint's, a fresh one (of a checkpoint's shape, or the paper's), or None
    (the raw inputs). A checkpoint must read the domain's inputs: its config names what differs."""
    torch.manual_seed(cfg.seed)  # a fresh encoder's weights
    mcfg = MetaMAEConfig(input_shape=tuple(domain.input_shape), patch_size=tuple(domain.patch_size),
                         vocab_size=domain.vocab_size, mask_ratio=domain.mask_ratio)
    if cfg.baseline == "raw":
        return None
    if cfg.ckpt:  # the checkpoint's architecture, which must read this domain's inputs
        state, saved = cli.load_checkpoint(Path(cfg.ckpt))
        differ = [f for f in ("input_shape", "patch_size", "vocab_size") if getattr(saved, f) != getattr(mcfg, f)]
        if differ:
            raise RunError(f"checkpoint {cfg.ckpt} reads " + ", ".join(f"{f} {getattr(saved, f)}" for f in differ) +
                           f", not {cfg.domain}'s " + ", ".join(str(getattr(mcfg, f)) for f in differ) +
                           ": pass the --domain it was trained on, or one of its input shape")
        mcfg = saved
        device.check_fits(mcfg, cfg.device, 4, "for its weights in float32")
    model = MetaMAE(mcfg).to(dev.device)
    if not cfg.baseline:
        cli.load_weights(model, state, Path(cfg.ckpt))
    return model


def main(argv=None):
    with cli.one_line_errors():
        try:
            run(cli.parse_args(sys.argv[1:] if argv is None else argv, Config, __doc__, inherit=cli.probed_options))
        except KeyboardInterrupt as e:
            raise cli.Interrupted(f"interrupted ({str(e) or 'Ctrl-C'}) while probing; nothing was written") from None


if __name__ == "__main__":
    main()
