"""
Pretrain MetaMAE on a DABS domain, then evaluate the frozen encoder by linear probing.

    pip install -r requirements.txt
    python train.py --domain cifar10                       # the paper's run: one GPU (or CPU), downloads CIFAR-10
    python train.py --domain cifar10 --preset cpu --data-dir ../shared/data   # a short CPU run (about 20 min on 2 cores)
    torchrun --standalone --nproc_per_node=4 train.py --domain cifar10        # several GPUs (DDP)
    python train.py --domain cifar10 --cuda-graph --compile   # one GPU, the whole step as one CUDA graph
    python train.py --domain cifar10 --resume              # continue the run in --out-dir from its checkpoint
    python train.py --domain cifar10 --eval-only ckpt      # probe a checkpoint ('random': a fresh encoder, 'raw': inputs)
    python bench.py                                        # speed of MAE vs MetaMAE first/second order (train.py --bench too)
    python train.py --help                                 # every knob, with its default

Every knob is a field of `Config` below; the model's knobs take their defaults from MetaMAEConfig, so the
two cannot disagree. Evaluation follows DABS/MetaMAE: features of the frozen encoder (`model.encode`) are
computed once, standardized with training statistics, and a linear classifier is trained with AdamW. Its
learning rate and epoch are chosen on a fixed-seed validation split carved from the training split; the
test split is scored once, at the very end.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import struct
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import data
from metamae import MetaMAE, MetaMAEConfig

# -----------------------------------------------------------------------------
# every knob, with its default


def knob(default, help):
    return field(default=default, metadata={"help": help})


MODEL = MetaMAEConfig()  # the model's defaults, read once from the one place that defines them
DOMAIN_SET = ("input_shape", "patch_size", "vocab_size")  # model fields that the domain decides


@dataclass
class Config:
    # data
    domain: str = knob("cifar10", "dataset: " + ", ".join(data.DOMAINS))
    probe_domains: str = knob("", "domains probed after pretraining besides the run's own (which is probed when it has "
                              "labels), comma-separated, of the same input shape, e.g. cifar10 after imagenet32; "
                              "default: the domain's DABS transfer targets; 'none': none")
    data_dir: str = knob("./data", "where datasets are downloaded / looked for")
    download: bool = knob(True, "download the dataset when it is missing")
    out_dir: str = knob("", "run folder for checkpoint, log.jsonl and pictures (default runs/<domain>)")
    # model: the DABS backbone of the paper; 'cpu' swaps in a small one that learns in minutes on 2 cores
    preset: str = knob("paper", "'paper' (MetaMAEConfig's defaults) or 'cpu' (see PRESETS); options given win")
    embed_dim: int = knob(MODEL.embed_dim, "encoder width")
    depth: int = knob(MODEL.depth, "encoder blocks")
    num_heads: int = knob(MODEL.num_heads, "encoder heads")
    decoder_embed_dim: int = knob(MODEL.decoder_embed_dim, "decoder width")
    decoder_depth: int = knob(MODEL.decoder_depth, "decoder blocks")
    decoder_num_heads: int = knob(MODEL.decoder_num_heads, "decoder heads")
    mlp_ratio: float = knob(MODEL.mlp_ratio, "MLP hidden width / width")
    dropout: float = knob(MODEL.dropout, "encoder dropout")
    mask_ratio: float = knob(None, "fraction of tokens masked (default: the domain's)")
    inner_lr: float = knob(MODEL.inner_lr, "step size of the latent's adaptation")
    inner_steps: int = knob(MODEL.inner_steps, "adaptation steps (0 with contrast_weight 0: plain MAE)")
    first_order: bool = knob(MODEL.first_order, "drop the second-order term of the inner loop")
    support_ratio: float = knob(MODEL.support_ratio, "chance a masked neighbour of a visible token joins the support")
    contrast_weight: float = knob(MODEL.contrast_weight, "weight of the amortized/adapted contrastive loss")
    temperature: float = knob(MODEL.temperature, "NT-Xent temperature")
    proj_dim: int = knob(MODEL.proj_dim, "projector output width")
    # optimization
    max_steps: int = knob(100_000, "pretraining steps (the paper's budget); the lr schedule spans them")
    stop_step: int = knob(0, "stop early at this step with a checkpoint (0: run to max_steps); --resume continues")
    batch_size: int = knob(None, "pretraining batch per process (default: the domain's)")
    lr: float = knob(5e-4, "peak AdamW learning rate")
    min_lr: float = knob(1e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = knob(2_000, "linear warm-up steps")
    weight_decay: float = knob(0.05, "AdamW decay on weight matrices (none on biases, norms, cls/mask tokens)")
    grad_clip: float = knob(1.0, "clip the gradient norm (0: off)")
    seed: int = knob(0, "random seed")
    # system
    device: str = knob("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: str = knob("auto", "'auto' (bf16 autocast on CUDA, fp32 on CPU), 'float32' or 'bfloat16'")
    compile: bool = knob(False, "torch.compile the encoder (the decoder is differentiated twice: never compiled)")
    cuda_graph: bool = knob(False, "capture the whole training step in one CUDA graph and replay it (one GPU)")
    threads: int = knob(0, "CPU threads (0: PyTorch's default)")
    # logging, checkpoints, evaluation
    log_interval: int = knob(100, "steps between log lines")
    ckpt_interval: int = knob(5_000, "steps between checkpoints (one is always written at the end)")
    eval_interval: int = knob(20_000, "steps between validation probes during pretraining (0: only at the end)")
    resume: bool = knob(False, "continue from <out_dir>/ckpt.pt")
    overwrite: bool = knob(False, "start a new run in an --out-dir whose ckpt.pt is then replaced")
    eval_only: str = knob("", "only probe: 'ckpt' (<out_dir>/ckpt.pt or --ckpt), 'random' (fresh encoder), 'raw' (inputs)")
    ckpt: str = knob("", "the checkpoint --eval-only ckpt probes (default <out_dir>/ckpt.pt); training writes there")
    probe_epochs: int = knob(100, "linear-probe epochs")
    probe_lrs: str = knob("1e-3,1e-4", "linear-probe learning rates, chosen on validation")
    probe_batch_size: int = knob(64, "linear-probe batch size")
    probe_weight_decay: float = knob(1e-4, "linear-probe weight decay")
    val_frac: float = knob(0.1, "fraction of the training split held out (fixed seed) for probe selection")


PRESETS = {  # a preset changes the defaults of the knobs it names; an option given on the command line wins
    "paper": {},
    # the default backbone cannot learn much in minutes on 2 cores: a smaller one, a larger rate, a mask of
    # 0.75 (half the encoder's work) and a schedule that ends in ~20 minutes of pretraining (see README)
    "cpu": dict(embed_dim=192, depth=6, num_heads=6, decoder_depth=2, mask_ratio=0.75, max_steps=3400, lr=1.5e-3,
                warmup_steps=200, eval_interval=0, log_interval=200),
}

# -----------------------------------------------------------------------------
# the command line: argparse over Config's fields; every bad option is one line and exit code 2


class UsageError(Exception):
    """A bad option or combination: one line, exit code 2."""


class RunError(Exception):
    """A run that cannot go on (missing or incompatible checkpoint, non-finite loss): one line, exit code 1."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print its whole usage block; one line says it
        raise UsageError(f"{message} (see --help)")


def parse_bool(text):
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(text)
    return text.lower() in ("true", "1", "yes")


parse_bool.__name__ = "bool"  # argparse names the type in its message: "invalid bool value: 'maybe'"


def parse_args(argv, config_class=Config, doc=__doc__):
    """`--key value` / `--key=value` overrides of the config's fields; `--flag` alone sets a bool. Knobs not
    given take the preset's value, then the field's default."""
    def dashed(arg):  # --max_steps as --max-steps: nanoGPT's users type underscores
        key, eq, value = arg.partition("=")
        return key.replace("_", "-") + eq + value if arg.startswith("--") else arg
    parser = ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                            allow_abbrev=False, argument_default=argparse.SUPPRESS)
    for f in fields(config_class):
        flag, help = "--" + f.name.replace("_", "-"), f"{f.metadata['help']} (default: {f.default!r})"
        if f.type is bool:
            parser.add_argument(flag, type=parse_bool, nargs="?", const=True, help=help, metavar="BOOL")
        else:
            parser.add_argument(flag, type=f.type, help=help, metavar=f.type.__name__.upper())
    given = vars(parser.parse_args([dashed(a) for a in argv]))
    preset = given.get("preset", "paper")
    if preset not in PRESETS:
        raise UsageError(f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return config_class(**{**PRESETS[preset], **given})


def check_probe_domains(cfg, domain):
    """The transfer domains of --probe-domains (default: the domain's own list, as DABS evaluates it). A model
    reads one input shape, so each must have the pretraining domain's; each must have labels."""
    given = cfg.probe_domains
    names = list(domain.transfer) if given == "" else [] if given == "none" else given.split(",")
    out = []
    for name in names:
        if name not in data.DOMAINS:
            raise UsageError(f"unknown --probe-domains entry {name!r}; choose among {', '.join(data.DOMAINS)}")
        d = data.DOMAINS[name]
        if (d.input_shape, d.patch_size, d.vocab_size) != (domain.input_shape, domain.patch_size, domain.vocab_size):
            raise UsageError(f"--probe-domains {name}: its inputs {tuple(d.input_shape)} (patches {tuple(d.patch_size)}"
                             f", vocab {d.vocab_size}) are not {domain.name}'s {tuple(domain.input_shape)} (patches "
                             f"{tuple(domain.patch_size)}, vocab {domain.vocab_size}): the model reads one input shape")
        if not d.num_classes:
            raise UsageError(f"--probe-domains {name} has no labels: it can be pretrained on, not probed")
        if d != domain and d not in out:
            out.append(d)
    return out


def probe_targets(cfg, domain):
    """What a finished run (or --eval-only) probes: its own domain when it has labels, then the transfer domains
    (cfg.probe_domains as check() resolved it)."""
    own = [domain] if domain.num_classes else []
    return own + ([] if cfg.probe_domains == "none" else [data.DOMAINS[n] for n in cfg.probe_domains.split(",")])


def check(cfg):
    """Every option is checked here, once, before any work. Returns the config with the domain's defaults
    filled in, the domain, and the model's config."""
    if cfg.domain not in data.DOMAINS:
        raise UsageError(f"unknown --domain {cfg.domain!r}; choose one of {', '.join(data.DOMAINS)}")
    domain = data.get_domain(cfg.domain)
    cfg = replace(cfg, batch_size=domain.batch_size if cfg.batch_size is None else cfg.batch_size,
                  mask_ratio=domain.mask_ratio if cfg.mask_ratio is None else cfg.mask_ratio)
    if not 0 < cfg.mask_ratio < 1:
        raise UsageError(f"--mask-ratio must be in (0, 1), got {cfg.mask_ratio}")
    for name in ("max_steps", "log_interval", "ckpt_interval", "probe_epochs", "probe_batch_size", "batch_size"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ("warmup_steps", "eval_interval", "stop_step", "grad_clip", "threads", "lr", "min_lr", "weight_decay"):
        if not getattr(cfg, name) >= 0 or not math.isfinite(getattr(cfg, name)):  # NaN fails both
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {getattr(cfg, name)}")
    if cfg.batch_size < 2 and cfg.contrast_weight > 0:
        raise UsageError(f"--batch-size {cfg.batch_size} is too small for the contrastive loss (BatchNorm and "
                         "negatives need at least 2); raise it or set --contrast-weight 0 --inner-steps 0")
    if not 0 < cfg.val_frac < 1:
        raise UsageError(f"--val-frac must be in (0, 1), got {cfg.val_frac}")
    if cfg.eval_only not in ("", "ckpt", "random", "raw"):
        raise UsageError(f"--eval-only must be 'ckpt', 'random' or 'raw', got {cfg.eval_only!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise UsageError(f"--dtype must be 'auto', 'float32' or 'bfloat16', got {cfg.dtype!r}")
    if cfg.device != "auto" and not (cfg.device == "cpu" or cfg.device.split(":")[0] == "cuda"):
        raise UsageError(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {cfg.device!r}")
    if cfg.ckpt and cfg.eval_only != "ckpt":
        raise UsageError("--ckpt names the checkpoint that --eval-only ckpt probes; training reads and writes "
                         "<out-dir>/ckpt.pt: choose the run with --out-dir")
    if cfg.resume and (cfg.overwrite or cfg.eval_only):
        raise UsageError("--resume continues training: it goes with neither --overwrite nor --eval-only")
    if Path(cfg.data_dir).exists() and not Path(cfg.data_dir).is_dir():
        raise UsageError(f"--data-dir {cfg.data_dir} is a file, not a folder")
    try:
        lrs = [float(v) for v in cfg.probe_lrs.split(",")]
    except ValueError:
        raise UsageError(f"--probe-lrs expects comma-separated numbers, got {cfg.probe_lrs!r}") from None
    if not all(lr > 0 and math.isfinite(lr) for lr in lrs):
        raise UsageError(f"--probe-lrs must be positive finite numbers, got {cfg.probe_lrs!r}")
    cfg = replace(cfg, probe_domains=",".join(d.name for d in check_probe_domains(cfg, domain)) or "none")
    if cfg.eval_only and not probe_targets(cfg, domain):
        raise UsageError(f"{domain.name} has no labels to probe: name labelled domains of its input shape with "
                         "--probe-domains, or probe with --domain set to one")
    mcfg = MetaMAEConfig(input_shape=tuple(domain.input_shape), patch_size=tuple(domain.patch_size),
                         vocab_size=domain.vocab_size,
                         **{f.name: getattr(cfg, f.name) for f in fields(MetaMAEConfig) if f.name not in DOMAIN_SET})
    try:
        mcfg.validate()
    except ValueError as e:  # names the bad field
        raise UsageError(str(e)) from None
    return cfg, domain, mcfg

# -----------------------------------------------------------------------------
# system: device, precision, distributed


def setup_device(cfg):
    """Returns (device, rank, world_size, autocast): autocast() opens the run's precision context."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    device = torch.device(name)
    if cfg.cuda_graph and (device.type != "cuda" or world > 1):
        raise UsageError("--cuda-graph needs one CUDA device and no torchrun; drop it on CPU or with several GPUs")
    if ddp:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    return device, rank, world, functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16)


def precision(autocast):
    return "bfloat16" if autocast.keywords["enabled"] else "float32"

# -----------------------------------------------------------------------------
# optimizer, schedule, and one training step


def make_optimizer(model, cfg):
    """AdamW; no decay on biases, norms (1-D tensors) and the cls/mask tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or name.endswith(("cls_token", "mask_token")) else decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    try:  # the fused kernel is 4x faster on CPU than the per-tensor loop; older PyTorch lacks it on CPU
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


def lr_at(step, cfg):
    """Linear warm-up, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def train_step(model, opt, x, cfg, autocast):
    """One optimization step at the learning rate set in opt; returns the detached loss and the model's logs.
    No host sync and no host-to-device copy (test_metamae checks the model's part on the meta device), so
    a CUDA graph can capture it."""
    model.train()
    with autocast():
        loss, logs = model(x)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return loss.detach(), logs

# -----------------------------------------------------------------------------
# --cuda-graph: the whole step captured once and replayed. Everything the graph path needs is in this block.


def device_lr(opt, device):
    """Makes opt read its learning rate (and step count: capturable) from the device, where a replayed step
    can see them change; Python floats would be frozen into the graph at capture. Returns the lr tensor."""
    lr = torch.tensor(opt.param_groups[0]["lr"], device=device)
    for group in opt.param_groups:
        group.update(lr=lr, capturable=True)
    return lr


class GraphedStep:
    """train_step captured once in a CUDA graph and then replayed: one launch per step instead of the
    thousands of small kernels of a second-order step, which at batch 64 leave the GPU waiting on Python.
    PyTorch's whole-network recipe: the first steps run eagerly on a side stream (cuBLAS, the allocator and
    --compile must be warm before capture), then the step is captured on a static input buffer. Random
    draws (mask, support set, dropout) stay random across replays: CUDA's generator is graph-aware. Every
    call, warm-up included, is a real training step. Build it after loading any optimizer state."""

    def __init__(self, model, opt, cfg, autocast, warmup=3):
        self.step = functools.partial(train_step, model, opt, cfg=cfg,
                                      autocast=functools.partial(autocast, cache_enabled=False))  # no weight cache in a graph
        self.lr = device_lr(opt, next(model.parameters()).device)
        self.warmup, self.graph, self.side, self.x, self.out = warmup, torch.cuda.CUDAGraph(), torch.cuda.Stream(), None, None

    def __call__(self, x, lr):
        self.lr.fill_(lr)  # in place: the captured optimizer reads this tensor; no host sync
        if self.warmup:
            self.warmup -= 1
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = self.step(x=x)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        if self.x is None:
            self.x = x.clone()  # the static input every replay reads
            with torch.cuda.graph(self.graph):
                self.out = self.step(x=self.x)
        else:
            self.x.copy_(x)
        self.graph.replay()  # capturing records without running: the capturing call replays too
        return self.out  # static tensors, overwritten by the next replay


def make_step(model, opt, cfg, autocast):
    """step(x, lr) -> (loss, logs): eager, or a CUDA graph with --cuda-graph."""
    if cfg.cuda_graph:
        return GraphedStep(model, opt, cfg, autocast)

    def step(x, lr):
        for group in opt.param_groups:
            group["lr"] = lr
        return train_step(model, opt, x, cfg, autocast)
    return step

# -----------------------------------------------------------------------------
# checkpoints: atomic, uncompiled/unwrapped keys, RNG states included, tensors and plain types only


def save_checkpoint(path, model, opt, cfg, mcfg, step, data_gen):
    state = dict(model=model.state_dict(), optimizer=opt.state_dict(), config=asdict(cfg), model_config=asdict(mcfg),
                 step=step, rng_cpu=torch.get_rng_state(), rng_data=data_gen.get_state(),
                 rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash while saving leaves the previous checkpoint intact


def one_line(e):
    return " ".join(str(e).split())[:300] or type(e).__name__


def load_checkpoint(path, mcfg=None):
    """Returns (state, its MetaMAEConfig); with mcfg, refuses a checkpoint of another model."""
    if not path.is_file():
        raise RunError(f"no checkpoint at {path}; train first, or pass --out-dir / --ckpt of an existing run")
    try:  # weights_only: a checkpoint is data; unpickling anything else could run code
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = MetaMAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["model_config"].items()})
    except Exception as e:
        raise RunError(f"checkpoint {path} is unreadable or not a checkpoint of this project ({type(e).__name__}: "
                       f"{one_line(e)[:120]}); delete it or point --ckpt elsewhere") from None
    if mcfg is not None and saved != mcfg:
        diff = [f.name for f in fields(mcfg) if getattr(saved, f.name) != getattr(mcfg, f.name)]
        raise RunError(f"checkpoint {path} was trained with a different model ({', '.join(diff)}); "
                       "use the same options, or another --out-dir")
    return state, saved


def load_weights(model, state, path):
    """The checkpoint's weights into model; a missing, mis-shaped or non-finite weight is one line."""
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise RunError(f"checkpoint {path} does not hold this model's weights ({one_line(e)})") from None
    bad = [k for k, v in state["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise RunError(f"checkpoint {path} holds non-finite weights ({', '.join(bad[:3])}); it cannot be probed or "
                       "resumed: use an earlier checkpoint")

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
    if test is not None:  # scored once, with the head chosen on validation
        head.load_state_dict(best["state"])
        best.update({f"test_{k}": v for k, v in scores(head, norm(test[0]), test[1], num_classes, metric).items()})
    best.pop("state"), best.pop("score")
    return best


def probe(model, splits, domain, cfg, autocast, with_test, mode="model"):
    """Linear probe on frozen features of the run's data; the test split only when with_test (a run's end)."""
    if mode == "raw":
        feats = lambda x: raw_features(x, domain.to_input, domain.vocab_size)  # noqa: E731
    else:
        feats = lambda x: features(model, x, domain.to_input, autocast)  # noqa: E731
    ftrain = feats(splits.train_x)
    tr = (ftrain[splits.train_idx], splits.train_y[splits.train_idx])
    va = (ftrain[splits.val_idx], splits.train_y[splits.val_idx])
    te = (feats(splits.test_x), splits.test_y) if with_test else None
    res = linear_probe(tr, va, domain.num_classes, cfg, te, seed=cfg.seed, metric=domain.metric)
    res["probe_lr"], res["probe_epoch"] = res.pop("lr"), res.pop("epoch")
    return res


# -----------------------------------------------------------------------------
# pictures: originals, masked, reconstructions before/after adaptation, amplified difference


def write_png(path, img):
    """img: uint8 (H, W, 3). A minimal PNG (stdlib zlib), written atomically."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in img)

    def chunk(tag, payload):
        return struct.pack(">I", len(payload)) + tag + payload + struct.pack(">I", zlib.crc32(tag + payload))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(png)
    os.replace(tmp, path)


@torch.no_grad()
def reconstruction_grid(model, x, path):
    """Rows: originals, masked inputs, reconstructions from Z, from Z*, and |Z* recon - Z recon| amplified."""
    model.eval()
    rec = model.reconstruct(x)
    mcfg = model.cfg
    (ph, pw), (gh, gw) = mcfg.patch_size, mcfg.grid
    pixel_mask = rec["mask"].view(-1, 1, gh, gw).repeat_interleave(ph, 2).repeat_interleave(pw, 3)  # (B, 1, H, W)
    diff = (rec["adapted"] - rec["amortized"]).abs()
    rows = [x, x * (1 - pixel_mask), rec["amortized"], rec["adapted"], diff / diff.amax().clamp_min(1e-12)]
    lo, hi = x.amin(), x.amax()  # one intensity scale for all rows but the difference
    rows = [((r - lo) / (hi - lo)).clamp(0, 1) if i < 4 else r for i, r in enumerate(rows)]
    grid = torch.cat([torch.cat(list(r.float().cpu()), dim=2) for r in rows], dim=1)  # (C, 5H, B*W)
    grid = grid.expand(3, -1, -1) if grid.shape[0] == 1 else grid[:3]
    grid = grid.repeat_interleave(3, 1).repeat_interleave(3, 2) if x.shape[-1] <= 64 else grid  # small inputs x3
    write_png(path, (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    return diff.amax().item()

# -----------------------------------------------------------------------------
# the run: load the data, then either pretrain (and probe at the end) or only probe


def log_line(rec, suffix=""):
    parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()]
    print(" | ".join(parts) + suffix, flush=True)


def load_data(cfg, domain, device):
    """The domain's splits on the run's device, with the fixed-seed train/validation carve-out of train."""
    splits = domain.load(Path(cfg.data_dir), cfg.download)
    # small datasets live on the accelerator and are batched there: no workers, no per-sample Python
    for name in ("train_x", "train_y", "test_x", "test_y"):
        setattr(splits, name, getattr(splits, name).to(device))
    splits.train_idx, splits.val_idx = (i.to(device) for i in data.train_val_split(len(splits.train_x), cfg.val_frac))
    return splits


def probe_all(model, cfg, domain, splits, device, autocast, mode="model"):
    """The final probes: the run's own domain (when it has labels) with its splits, then each transfer domain,
    loaded now; each scored on its test split once. Transfer keys carry the domain's name: cifar10_test_acc."""
    rec = {}
    for d in probe_targets(cfg, domain):
        res = probe(model, splits if d == domain else load_data(cfg, d, device), d, cfg, autocast, True, mode)
        rec.update({(k if d == domain else f"{d.name}_{k}"): v for k, v in res.items()})
    return rec


def evaluate_only(cfg, domain, mcfg, splits, device, autocast, out_dir):
    """--eval-only: probe a checkpoint, a random-init encoder, or the raw inputs; appends to eval.jsonl."""
    torch.manual_seed(cfg.seed)
    if cfg.eval_only == "ckpt":  # the checkpoint's own architecture, which must read this domain's inputs
        path = Path(cfg.ckpt) if cfg.ckpt else out_dir / "ckpt.pt"
        state, saved = load_checkpoint(path)
        if (saved.input_shape, saved.patch_size, saved.vocab_size) != (mcfg.input_shape, mcfg.patch_size,
                                                                      mcfg.vocab_size):
            raise RunError(f"checkpoint {path} was trained on inputs {saved.input_shape}, not on "
                           f"{cfg.domain}'s {mcfg.input_shape}; pass the matching --domain")
        model = MetaMAE(saved).to(device)
        load_weights(model, state, path)
    else:
        model = MetaMAE(mcfg).to(device)
    rec = dict(mode=f"eval-only {cfg.eval_only}", **probe_all(model, cfg, domain, splits, device, autocast,
                                                                mode=cfg.eval_only))
    log_line(rec)
    with open(out_dir / "eval.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def check_ranks_in_sync(model, world, master):
    """Every rank must hold the same weights at the end: DDP averages gradients, nothing else syncs them."""
    flat = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    spread = [flat.clone() for _ in range(world)]
    torch.distributed.all_gather(spread, flat)
    max_dev = max((s - flat).abs().max().item() for s in spread)
    if master:
        print(f"ranks in sync: max parameter difference {max_dev:.3g}")
    torch.distributed.destroy_process_group()
    if max_dev > 0:
        raise RunError(f"ranks diverged (max parameter difference {max_dev}); this is a bug, please report it")


def build(cfg, mcfg, device, rank, ckpt_path):
    """The model, its optimizer, the batch generator and the first step: fresh, or resumed exactly from the
    checkpoint (weights, optimizer moments, step, and every random state)."""
    torch.manual_seed(cfg.seed)
    model = MetaMAE(mcfg).to(device)
    opt = make_optimizer(model, cfg)
    # batches are drawn from their own generator, so resuming restores the data order exactly
    data_gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)
    step = 0
    if cfg.resume:
        state, _ = load_checkpoint(ckpt_path, mcfg)
        load_weights(model, state, ckpt_path)
        try:
            opt.load_state_dict(state["optimizer"])
            step = int(state["step"])
            torch.set_rng_state(state["rng_cpu"])
            data_gen.set_state(state["rng_data"])
            if state.get("rng_cuda") is not None and device.type == "cuda":
                torch.cuda.set_rng_state_all(state["rng_cuda"])
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise RunError(f"checkpoint {ckpt_path} cannot be resumed ({type(e).__name__}: {one_line(e)[:120]}); "
                           "probe it with --eval-only ckpt, or start over with --overwrite") from None
        if step > cfg.max_steps:
            raise RunError(f"checkpoint {ckpt_path} is at step {step}, past --max-steps {cfg.max_steps}: raise "
                           "--max-steps to train on (the lr schedule follows it), or probe it with --eval-only ckpt")
        if rank == 0:
            print(f"resumed from {ckpt_path} at step {step}")
    elif rank:
        torch.manual_seed(cfg.seed + rank)  # each rank draws its own masks
    return model, opt, data_gen, step


def pretrain(cfg, domain, mcfg, splits, device, rank, world, autocast, out_dir):
    master, ckpt_path = rank == 0, out_dir / "ckpt.pt"
    model, opt, data_gen, step = build(cfg, mcfg, device, rank, ckpt_path)
    saved_step = step if cfg.resume else None  # the step of the checkpoint on disk that this run can continue
    if world > 1 and device.type == "cuda":  # one BatchNorm statistic over all ranks, as the authors do
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # (gloo has none: per-rank statistics on CPU)
    raw_model = model  # what is saved and probed: no compile or DDP wrapper in its keys
    if cfg.compile:
        raw_model.encoder.compile()  # in place: the state_dict keeps its names
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    train = make_step(model, opt, cfg, autocast)

    stop = min(cfg.stop_step or cfg.max_steps, cfg.max_steps)
    log_file = open(out_dir / "log.jsonl", "a" if cfg.resume else "w") if master else None
    if master:
        print(f"{cfg.domain}: {len(splits.train_x)} training inputs of shape {tuple(domain.input_shape)}, "
              f"{sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters, batch {cfg.batch_size} x "
              f"{world}, steps {step}..{stop}, device {device}, {precision(autocast)}")
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    t0, t_start, step_at_t0 = time.time(), time.time(), step
    try:
        while step < stop:
            lr = lr_at(step, cfg)
            idx = torch.randint(len(splits.train_x), (cfg.batch_size,), generator=data_gen, device=device)
            loss, logs = train(domain.to_input(splits.train_x[idx]), lr)
            # a NaN is remembered on the device and read only when the loop reads anyway: a read per step would
            # stall the GPU queue (and break CUDA-graph replay), and checkpoints must never save a NaN model
            nonfinite |= ~torch.isfinite(loss)
            step += 1
            last, log_now, ckpt_now = step == stop, step % cfg.log_interval == 0, step % cfg.ckpt_interval == 0
            if (log_now or last or ckpt_now) and nonfinite.item():
                raise RunError(f"non-finite loss before step {step}; {nonfinite_cause(splits)}; "
                               f"{checkpoint_status(ckpt_path, saved_step)}")
            if master and (log_now or last):
                ms = 1000 * (time.time() - t0) / (step - step_at_t0)
                rec = dict(step=step, loss=loss.item(), **{k: v.item() for k, v in logs.items()}, lr=lr,
                           ms_per_step=ms, samples_per_s=cfg.batch_size * world * 1000 / ms)
                log_line(rec, f" | {100 * step / stop:.0f}% eta {(stop - step) * ms / 60_000:.1f} min")
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
                t0, step_at_t0 = time.time(), step
            if master and cfg.eval_interval and step % cfg.eval_interval == 0 and not last and domain.num_classes:
                if len(domain.input_shape) == 3:
                    reconstruction_grid(raw_model, domain.to_input(splits.train_x[splits.val_idx[:8]]),
                                        out_dir / f"reconstructions_{step}.png")
                res = probe(raw_model, splits, domain, cfg, autocast, with_test=False)
                print(f"step {step} | probe val_acc {res['val_acc']:.4f} (lr {res['probe_lr']}, epoch {res['probe_epoch']})")
                log_file.write(json.dumps(dict(step=step, probe_val_acc=res["val_acc"])) + "\n")
                t0, step_at_t0 = time.time(), step  # the probe's time is not the training's
            if master and (ckpt_now or last):
                save_checkpoint(ckpt_path, raw_model, opt, cfg, mcfg, step, data_gen)
                saved_step = step
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted at step {step}; {checkpoint_status(ckpt_path, saved_step)}") from None

    if world > 1:
        check_ranks_in_sync(raw_model, world, master)
    if master:
        return finish(cfg, domain, raw_model, splits, device, autocast, out_dir, log_file, step, t_start)


def nonfinite_cause(splits):
    if splits.train_x.is_floating_point() and not torch.isfinite(splits.train_x).all():
        return "the training data hold NaN or infinite values: check the dataset files"
    return "lower --lr or --inner-lr"


def checkpoint_status(ckpt_path, saved_step):
    if saved_step is None:
        return "no checkpoint of this run was written yet"
    return f"the checkpoint of step {saved_step} ({ckpt_path}) is intact: --resume continues from it"


def diagnose(model, x, to_input, batch, autocast):
    """The model's logs (losses, shift, cosines) on held-out inputs, averaged over batches of the training
    size: a steadier read than one training batch. Eval mode (no dropout, BatchNorm's running statistics);
    the masks come from a fixed seed and the global RNG is left as it was."""
    model.eval()
    sums, starts = {}, range(0, max(len(x) - batch, 0) + 1, batch)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(0)
        for i in starts:
            with autocast():
                logs = model(to_input(x[i:i + batch]))[1]
            sums = {k: sums.get(k, 0.0) + v.float() for k, v in logs.items()}
    return {f"val_{k}": (v / len(starts)).item() for k, v in sums.items()}


def finish(cfg, domain, model, splits, device, autocast, out_dir, log_file, step, t_start):
    """The last record of a run; a finished run (step == max_steps) is probed with the test splits, once."""
    rec = dict(step=step, train_minutes=(time.time() - t_start) / 60)
    if step == cfg.max_steps:
        rec.update(diagnose(model, splits.train_x[splits.val_idx], domain.to_input, cfg.batch_size, autocast))
        if len(domain.input_shape) == 3:
            rec["adapt_max_pixel_change"] = reconstruction_grid(model, domain.to_input(splits.train_x[splits.val_idx[:8]]),
                                                                out_dir / f"reconstructions_{step}.png")
        rec.update(probe_all(model, cfg, domain, splits, device, autocast), total_minutes=(time.time() - t_start) / 60)
    log_line(rec)
    log_file.write(json.dumps(rec) + "\n")
    log_file.close()
    return rec


def prepare_out_dir(cfg):
    """The run folder, made and proven writable before any work, so that a run cannot die at its first save.
    A new run never replaces another run's checkpoint unless told to."""
    out_dir = Path(cfg.out_dir or f"runs/{cfg.domain}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise UsageError(f"--out-dir {out_dir} is not a writable folder ({e.strerror or one_line(e)}); "
                         "choose another") from None
    ckpt = out_dir / "ckpt.pt"
    if not cfg.eval_only and not cfg.resume and not cfg.overwrite and ckpt.exists():
        raise UsageError(f"{ckpt} exists: continue that run with --resume, choose another --out-dir, "
                         "or start over with --overwrite")
    ckpt.with_name("ckpt.pt.tmp").unlink(missing_ok=True)  # a save cut short by a kill: never a checkpoint
    return out_dir


def run(cfg):
    cfg, domain, mcfg = check(cfg)
    out_dir = prepare_out_dir(cfg)
    device, rank, world, autocast = setup_device(cfg)
    splits = load_data(cfg, domain, device)
    for d in (d for d in probe_targets(cfg, domain) if d != domain):  # a missing or broken transfer dataset
        d.load(Path(cfg.data_dir), cfg.download)  # stops the run now (and builds its cache), not after pretraining
    if cfg.eval_only:
        return evaluate_only(cfg, domain, mcfg, splits, device, autocast, out_dir)
    return pretrain(cfg, domain, mcfg, splits, device, rank, world, autocast, out_dir)


class Interrupted(Exception):
    """Ctrl-C, with what is left on disk: exit code 130."""


@contextlib.contextmanager
def one_line_errors():
    """What a user sees of an expected error: one line, and exit code 2 (usage), 1 (data, run) or 130 (Ctrl-C)."""
    try:
        yield
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (data.DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        print(e, file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--bench" in argv:  # the benchmark's first spelling, kept: python train.py --bench ...
        import bench
        return bench.main([a for a in argv if a != "--bench"])
    with one_line_errors():
        run(parse_args(argv))


if __name__ == "__main__":
    main()
