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
    if cfg.device != "auto" and not (cfg.device == "cpu" or cfg.device.split(":")[0] == "cuda"):
        raise UsageError(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")
    if Path(cfg.data_dir).exists() and not Path(cfg.data_dir).is_dir():
        raise UsageError(f"--data-dir {cfg.data_dir} is a file, not a folder")
    for name in ("probe_epochs", "probe_batch_size"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.threads < 0:
        raise UsageError(f"--threads must be >= 0, got {cfg.threads}")
    if not 0 <= cfg.seed < 2**32:  # torch's generators take 64 bits, and train.py derives seeds from it
        raise UsageError(f"--seed must be in 0..{2**32 - 1}, got {cfg.seed}")
    if not 0 < cfg.val_frac < 1:
        raise UsageError(f"--val-frac must be in (0, 1), got {cfg.val_frac}")
    if not 0 <= cfg.probe_weight_decay < float("inf"):  # NaN fails too
        raise UsageError(f"--probe-weight-decay must be a finite number >= 0, got {cfg.probe_weight_decay}")
    try:
        lrs = [float(v) for v in cfg.probe_lrs.split(",")]
    except ValueError:
        raise UsageError(f"--probe-lrs expects comma-separated numbers, got {cfg.probe_lrs!r}") from None
    if not all(0 < lr < float("inf") for lr in lrs):
        raise UsageError(f"--probe-lrs must be positive finite numbers, got {cfg.probe_lrs!r}")
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
    if domain.num_classes and not (len(idx[0]) and len(idx[1])):
        raise UsageError(f"--val-frac {cfg.val_frac} of {domain.name}'s {len(splits.train_x)} training inputs leaves "
                         f"{len(idx[0])} to train the probe and {len(idx[1])} to select it: choose a --val-frac that "
                         "leaves both")
    check_values(splits, domain)
    return Data(splits, *(i.to(device) for i in idx))


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


def probe(featurize, d, domain, cfg, with_test):
    """Linear probe on featurize(inputs) of one domain's data; the test split only when with_test (once, at a
    run's end)."""
    s = d.splits
    print(f"{domain.name}: the features of {len(s.train_x):,} training" + (f" and {len(s.test_x):,} test" if with_test
          else "") + " inputs ...", flush=True)
    ftrain = featurize(s.train_x)
    if not torch.isfinite(ftrain).all():  # a probe on NaN features would report the share of one class
        raise RunError(f"{domain.name}: features of its training inputs are not finite; the inputs hold NaN or "
                       "infinite values (check the dataset files and delete its caches), or the encoder's weights do")
    tr = (ftrain[d.train_idx], s.train_y[d.train_idx])
    va = (ftrain[d.val_idx], s.train_y[d.val_idx])
    te = (featurize(s.test_x), s.test_y) if with_test else None
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
    out_dir = cli.writable_dir(cfg.out_dir or (Path(cfg.ckpt).parent if cfg.ckpt else f"runs/{cfg.domain}"))
    dev = device.setup(cfg)
    datasets = {d.name: load_data(cfg, d, dev.device) for d in targets}  # every one read before any work
    torch.manual_seed(cfg.seed)  # a fresh encoder's weights
    model, mcfg = None, MetaMAEConfig(input_shape=tuple(domain.input_shape), patch_size=tuple(domain.patch_size),
                                      vocab_size=domain.vocab_size, mask_ratio=domain.mask_ratio)
    if cfg.ckpt and cfg.baseline != "raw":  # the checkpoint's architecture, which must read this domain's inputs
        state, mcfg = cli.load_checkpoint(Path(cfg.ckpt))
        if (mcfg.input_shape, mcfg.patch_size, mcfg.vocab_size) != (tuple(domain.input_shape),
                                                                     tuple(domain.patch_size), domain.vocab_size):
            raise RunError(f"checkpoint {cfg.ckpt} was trained on inputs {mcfg.input_shape}, not on "
                           f"{cfg.domain}'s {tuple(domain.input_shape)}; pass the matching --domain")
    if cfg.baseline != "raw":
        model = MetaMAE(mcfg).to(dev.device)
        if not cfg.baseline:
            cli.load_weights(model, state, Path(cfg.ckpt))
    rec = dict(encoder=cfg.baseline or str(cfg.ckpt), **evaluate(model, cfg, targets, datasets, dev.autocast))
    with open(out_dir / "eval.jsonl", "a") as f:  # fractions, as train.py's log.jsonl; percent where printed
        f.write(json.dumps(rec) + "\n")
    print("\n".join([f"{rec['encoder']}: probed (its record appended to {out_dir / 'eval.jsonl'})",
                     *results(rec, targets, cfg.domain)]), flush=True)
    return rec


def main(argv=None):
    with cli.one_line_errors():
        try:
            run(cli.parse_args(sys.argv[1:] if argv is None else argv, Config, __doc__, inherit=cli.probed_options))
        except KeyboardInterrupt as e:
            raise cli.Interrupted(f"interrupted ({str(e) or 'Ctrl-C'}) while probing; nothing was written") from None


if __name__ == "__main__":
    main()
