"""
Pretrain MetaMAE on a DABS domain, then evaluate the frozen encoder by linear probing.

    pip install -r requirements.txt
    python train.py --domain cifar10                       # the paper's run: one GPU (or CPU), downloads CIFAR-10
    python train.py --domain cifar10 --preset cpu --data-dir ../shared/data   # a short CPU run (18-21 min on 2 cores)
    torchrun --standalone --nproc_per_node=4 train.py --domain cifar10        # several GPUs (DDP)
    python train.py --domain cifar10 --cuda-graph --compile   # one GPU, the whole step as one CUDA graph
    python train.py --domain cifar10 --resume              # continue the run in --out-dir from its checkpoint
    python train.py --domain cifar10 --eval-only ckpt      # probe a checkpoint ('random': a fresh encoder, 'raw': inputs)
    python train.py --bench                                # speed of MAE vs MetaMAE first/second order, no data
    python train.py --help                                 # every knob, with its default

Every knob lives in `Config` below; override any of them as `--key value` or `--key=value`.
Evaluation follows DABS/MetaMAE: features of the frozen encoder (`model.encode`) are computed once,
standardized with training statistics, and a linear classifier is trained with AdamW. The learning rate
and the epoch are chosen on a fixed-seed validation split carved from the training split; the test split
is scored once, at the very end.
"""

import json
import math
import os
import statistics
import struct
import sys
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


@dataclass
class Config:
    # data
    domain: str = knob("cifar10", "dataset: " + ", ".join(data.DOMAINS))
    data_dir: str = knob("./data", "where datasets are downloaded / looked for")
    download: bool = knob(True, "download the dataset when it is missing")
    out_dir: str = knob("", "run folder for checkpoint, log.jsonl and pictures (default runs/<domain>)")
    # model: the DABS backbone of the paper; 'cpu' swaps in a small one that learns in minutes on 2 cores
    preset: str = knob("paper", "'paper' (these defaults) or 'cpu' (see PRESETS); options you give win over it")
    embed_dim: int = knob(256, "encoder width")
    depth: int = knob(12, "encoder blocks")
    num_heads: int = knob(8, "encoder heads")
    decoder_embed_dim: int = knob(128, "decoder width")
    decoder_depth: int = knob(4, "decoder blocks")
    decoder_num_heads: int = knob(4, "decoder heads")
    mlp_ratio: float = knob(2.0, "MLP hidden width / width")
    dropout: float = knob(0.1, "encoder dropout")
    mask_ratio: float = knob(0.0, "fraction of tokens masked (0: the domain's default)")
    inner_lr: float = knob(0.5, "step size of the latent's adaptation")
    inner_steps: int = knob(1, "adaptation steps (0 with contrast_weight 0: plain MAE)")
    first_order: bool = knob(False, "drop the second-order term of the inner loop")
    support_ratio: float = knob(0.1, "chance a masked neighbour of a visible token joins the support set")
    contrast_weight: float = knob(0.1, "weight of the amortized/adapted contrastive loss")
    temperature: float = knob(0.5, "NT-Xent temperature")
    proj_dim: int = knob(128, "projector output width")
    # optimization
    max_steps: int = knob(100_000, "pretraining steps (the paper's budget); the lr schedule spans them")
    stop_step: int = knob(0, "stop early at this step with a checkpoint (0: run to max_steps); --resume continues")
    batch_size: int = knob(0, "pretraining batch per process (0: the domain's default)")
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
    eval_only: str = knob("", "only probe: 'ckpt' (<out_dir>/ckpt.pt or --ckpt), 'random' (fresh encoder), 'raw' (inputs)")
    ckpt: str = knob("", "checkpoint path for --eval-only ckpt (default <out_dir>/ckpt.pt)")
    probe_epochs: int = knob(100, "linear-probe epochs")
    probe_lrs: str = knob("1e-3,1e-4", "linear-probe learning rates, chosen on validation")
    probe_batch_size: int = knob(64, "linear-probe batch size")
    probe_weight_decay: float = knob(1e-4, "linear-probe weight decay")
    val_frac: float = knob(0.1, "fraction of the training split held out (fixed seed) for probe selection")
    # benchmark
    bench: bool = knob(False, "benchmark MAE vs MetaMAE first/second order on synthetic inputs and exit")
    bench_data: bool = knob(False, "with --bench: draw batches from the real dataset instead")
    bench_steps: int = knob(10, "with --bench: timed steps per repeat")
    bench_repeats: int = knob(3, "with --bench: repeats (the median is reported)")


PRESETS = {  # a preset changes the defaults of the knobs it names; an option given on the command line wins
    "paper": {},
    # the default backbone cannot learn much in minutes on 2 cores: a smaller one, a larger rate, a mask of
    # 0.75 (half the encoder's work) and a schedule that ends in ~18 minutes of pretraining (see README)
    "cpu": dict(embed_dim=192, depth=6, num_heads=6, decoder_depth=2, mask_ratio=0.75, max_steps=3400, lr=1.5e-3,
                warmup_steps=200, eval_interval=0, log_interval=200),
}


class UsageError(Exception):
    """A bad option or combination: one line, exit code 2."""


class RunError(Exception):
    """A run that cannot go on (missing or incompatible checkpoint, non-finite loss): one line, exit code 1."""


def parse_args(argv):
    """`--key value` / `--key=value` overrides of Config, type-checked; `--flag` alone sets a bool. Then the
    preset's values, for the knobs not given."""
    cfg, types, given = Config(), {f.name: f.type for f in fields(Config)}, set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(__doc__.strip() + "\n\noptions:")
            for f in fields(Config):
                print(f"  --{f.name.replace('_', '-'):<20} {f.metadata['help']} (default: {f.default!r})")
            sys.exit(0)
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r}; options look like --key value (see --help)")
        key, has_value, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in types:
            raise UsageError(f"unknown option --{key.replace('_', '-')} (see --help for the list)")
        kind = types[key]
        if not has_value:
            if kind is bool and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                value = "true"
            elif i + 1 < len(argv):
                i, value = i + 1, argv[i + 1]
            else:
                raise UsageError(f"option --{key.replace('_', '-')} needs a value")
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                parsed = value.lower() in ("true", "1", "yes")
            else:
                parsed = kind(value)
        except ValueError:
            raise UsageError(f"option --{key.replace('_', '-')} expects {kind.__name__}, got {value!r}") from None
        setattr(cfg, key, parsed)
        given.add(key)
        i += 1
    if cfg.preset not in PRESETS:
        raise UsageError(f"unknown --preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    for key, value in PRESETS[cfg.preset].items():
        if key not in given:
            setattr(cfg, key, value)
    return cfg


def model_config(cfg, domain):
    """The MetaMAEConfig of a run: the domain's input, the run's knobs."""
    mask_ratio = cfg.mask_ratio or domain.mask_ratio
    if not 0 < mask_ratio < 1:
        raise UsageError(f"--mask-ratio must be in (0, 1), got {mask_ratio}")
    try:
        return MetaMAEConfig(
            input_shape=tuple(domain.input_shape), patch_size=tuple(domain.patch_size), vocab_size=domain.vocab_size,
            mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout, mask_ratio=mask_ratio, inner_lr=cfg.inner_lr,
            inner_steps=cfg.inner_steps, first_order=cfg.first_order, support_ratio=cfg.support_ratio,
            contrast_weight=cfg.contrast_weight, temperature=cfg.temperature, proj_dim=cfg.proj_dim,
            embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, decoder_embed_dim=cfg.decoder_embed_dim,
            decoder_depth=cfg.decoder_depth, decoder_num_heads=cfg.decoder_num_heads)
    except TypeError as e:
        raise UsageError(str(e)) from None


def build_model(mcfg):
    try:
        return MetaMAE(mcfg)
    except ValueError as e:  # the config names the bad field
        raise UsageError(str(e)) from None


def check_options(cfg, mcfg):
    if cfg.batch_size < 2 and mcfg.contrast_weight > 0:
        raise UsageError(f"--batch-size {cfg.batch_size} is too small for the contrastive loss (BatchNorm and "
                         "negatives need at least 2); raise it or set --contrast-weight 0")
    for name in ("max_steps", "log_interval", "probe_epochs", "probe_batch_size"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ("warmup_steps", "ckpt_interval", "eval_interval", "stop_step", "grad_clip", "threads", "lr"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not 0 < cfg.val_frac < 1:
        raise UsageError(f"--val-frac must be in (0, 1), got {cfg.val_frac}")
    if cfg.eval_only not in ("", "ckpt", "random", "raw"):
        raise UsageError(f"--eval-only must be 'ckpt', 'random' or 'raw', got {cfg.eval_only!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise UsageError(f"--dtype must be 'auto', 'float32' or 'bfloat16', got {cfg.dtype!r}")
    try:
        lrs = [float(v) for v in cfg.probe_lrs.split(",")]
    except ValueError:
        raise UsageError(f"--probe-lrs expects comma-separated numbers, got {cfg.probe_lrs!r}") from None
    if not lrs or min(lrs) <= 0:
        raise UsageError(f"--probe-lrs must be positive, got {cfg.probe_lrs!r}")

# -----------------------------------------------------------------------------
# system: device, precision, distributed


def setup_device(cfg):
    """Returns (device, rank, world_size, autocast context factory; its .dtype names the precision)."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    device = torch.device(name)
    if ddp:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast(cache=True):  # a CUDA graph must not capture autocast's weight cache (PyTorch's graph notes)
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16", cache_enabled=cache)
    autocast.dtype = dtype  # for the log
    return device, rank, world, autocast


def make_optimizer(model, cfg, state=None):
    """AdamW; no decay on biases, norms (1-D tensors) and the cls/mask tokens. state: a state_dict to resume."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or name.endswith(("cls_token", "mask_token")) else decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    try:  # the fused kernel is 4x faster on CPU than the per-tensor loop; older PyTorch lacks it on CPU
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, ValueError):
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    if state is not None:
        opt.load_state_dict(state)
    if cfg.cuda_graph:  # a replayed step must read the lr and the step count from the device, not from Python;
        lr = torch.tensor(cfg.lr, device=decay[0].device)  # set after loading, which restores the saved settings
        for group in opt.param_groups:
            group.update(lr=lr, capturable=True)
    return opt


def set_lr(opt, lr):
    for group in opt.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)  # in place: a captured step reads this tensor; no host sync
        else:
            group["lr"] = lr


def lr_at(step, cfg):
    """Linear warm-up, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t))


def train_step(model, opt, x, lr, cfg, autocast, cache=True):
    """One optimization step; returns the detached loss and the model's logs. No host sync and no
    host-to-device copy (test_metamae checks the model's part on the meta device), so CUDA graphs can
    capture it. lr=None: the caller has set it."""
    if lr is not None:
        set_lr(opt, lr)
    model.train()
    with autocast(cache):
        loss, logs = model(x)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return loss.detach(), logs


class GraphedStep:
    """train_step captured once in a CUDA graph and then replayed: one launch per step instead of the
    thousands of small kernels of a second-order step, which at batch 64 leave the GPU waiting on Python.
    PyTorch's whole-network recipe: the first steps run eagerly on a side stream (cuBLAS, the allocator and
    --compile must be warm before capture), then the step is captured on a static input buffer. Random
    draws (mask, support set, dropout) stay random across replays: CUDA's generator is graph-aware.
    Every call, warm-up included, is a real training step."""

    def __init__(self, model, opt, cfg, autocast, warmup=3):
        self.model, self.opt, self.cfg, self.autocast, self.warmup = model, opt, cfg, autocast, warmup
        self.graph, self.side, self.x, self.out = torch.cuda.CUDAGraph(), torch.cuda.Stream(), None, None

    def __call__(self, x, lr):
        set_lr(self.opt, lr)  # fills the lr tensor the captured optimizer reads
        if self.warmup:
            self.warmup -= 1
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = train_step(self.model, self.opt, x, None, self.cfg, self.autocast, cache=False)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        if self.x is None:
            self.x = x.clone()  # the static input every replay reads
            with torch.cuda.graph(self.graph):
                self.out = train_step(self.model, self.opt, self.x, None, self.cfg, self.autocast, cache=False)
        else:
            self.x.copy_(x)
        self.graph.replay()  # capturing records without running: the capturing call replays too
        return self.out  # static tensors, overwritten by the next replay


def make_step(model, opt, cfg, autocast):
    """step(x, lr) -> (loss, logs): eager, or a CUDA graph with --cuda-graph."""
    if cfg.cuda_graph:
        return GraphedStep(model, opt, cfg, autocast)
    return lambda x, lr: train_step(model, opt, x, lr, cfg, autocast)

# -----------------------------------------------------------------------------
# checkpoints: atomic, uncompiled/unwrapped keys, RNG states included


def save_checkpoint(path, model, opt, cfg, mcfg, step, data_gen):
    state = dict(model=model.state_dict(), optimizer=opt.state_dict(), config=asdict(cfg), model_config=asdict(mcfg),
                 step=step, rng_cpu=torch.get_rng_state(), rng_data=data_gen.get_state(),
                 rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash while saving leaves the previous checkpoint intact


def load_checkpoint(path, mcfg=None):
    if not path.is_file():
        raise RunError(f"no checkpoint at {path}; train first, or pass --out-dir / --ckpt of an existing run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = MetaMAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["model_config"].items()})
    except Exception as e:
        raise RunError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it or point --ckpt elsewhere") from None
    if mcfg is not None and saved != mcfg:
        diff = [f.name for f in fields(mcfg) if getattr(saved, f.name) != getattr(mcfg, f.name)]
        raise RunError(f"checkpoint {path} was trained with a different model ({', '.join(diff)}); "
                         "use the same options, or another --out-dir")
    return state, saved

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


def linear_probe(train, val, num_classes, cfg, test=None, seed=0):
    """train/val/test: (features, labels). Returns a dict with the chosen lr/epoch, val and (once) test accuracy."""
    mean, std = train[0].mean(0), train[0].std(0) + 1e-6  # training statistics only
    norm = lambda f: (f - mean) / std  # noqa: E731
    (xtr, ytr), (xva, yva) = (norm(train[0]), train[1]), (norm(val[0]), val[1])
    best = dict(val_acc=-1.0)
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
            with torch.no_grad():
                acc = (head(xva).argmax(1) == yva).float().mean().item()
            if acc > best["val_acc"]:
                best = dict(val_acc=acc, lr=lr, epoch=epoch, state={k: v.clone() for k, v in head.state_dict().items()})
    if test is not None:  # scored once, with the head chosen on validation
        head.load_state_dict(best["state"])
        with torch.no_grad():
            best["test_acc"] = (head(norm(test[0])).argmax(1) == test[1]).float().mean().item()
    best.pop("state")
    return best

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
# the run


def log_line(rec, suffix=""):
    parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()]
    print(" | ".join(parts) + suffix, flush=True)


def evaluate(model, splits, val_idx, train_idx, domain, cfg, autocast, with_test, mode="model"):
    """Linear probe on frozen features; test only when with_test (the end of a run)."""
    if mode == "raw":
        feats = lambda x: raw_features(x, domain.to_input, domain.vocab_size)  # noqa: E731
    else:
        feats = lambda x: features(model, x, domain.to_input, autocast)  # noqa: E731
    ftrain = feats(splits.train_x)
    tr = (ftrain[train_idx], splits.train_y[train_idx])
    va = (ftrain[val_idx], splits.train_y[val_idx])
    te = (feats(splits.test_x), splits.test_y) if with_test else None
    return linear_probe(tr, va, domain.num_classes, cfg, te, seed=cfg.seed)


def run(cfg):
    domain = data.get_domain(cfg.domain)
    if cfg.batch_size == 0:
        cfg.batch_size = domain.batch_size
    mcfg = model_config(cfg, domain)
    check_options(cfg, mcfg)
    out_dir = Path(cfg.out_dir or f"runs/{cfg.domain}")
    device, rank, world, autocast = setup_device(cfg)
    master = rank == 0
    if cfg.cuda_graph and (device.type != "cuda" or world > 1):
        raise UsageError("--cuda-graph needs one CUDA device and no torchrun; drop it on CPU or with several GPUs")

    if cfg.bench:
        return bench(cfg, mcfg, domain, device, autocast)

    splits = domain.load(Path(cfg.data_dir), cfg.download)
    # small datasets live on the accelerator and are batched there: no workers, no per-sample Python
    splits.train_x, splits.train_y = splits.train_x.to(device), splits.train_y.to(device)
    splits.test_x, splits.test_y = splits.test_x.to(device), splits.test_y.to(device)
    train_idx, val_idx = (i.to(device) for i in data.train_val_split(len(splits.train_x), cfg.val_frac, seed=0))
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = Path(cfg.ckpt) if cfg.ckpt else out_dir / "ckpt.pt"

    torch.manual_seed(cfg.seed)
    if cfg.eval_only:
        if cfg.eval_only == "ckpt":  # the checkpoint's own architecture, which must read this domain's inputs
            state, saved = load_checkpoint(ckpt_path)
            if (saved.input_shape, saved.patch_size, saved.vocab_size) != (mcfg.input_shape, mcfg.patch_size,
                                                                          mcfg.vocab_size):
                raise RunError(f"checkpoint {ckpt_path} was trained on inputs {saved.input_shape}, not on "
                               f"{cfg.domain}'s {mcfg.input_shape}; pass the matching --domain")
            model = MetaMAE(saved).to(device)
            model.load_state_dict(state["model"])
        else:
            model = build_model(mcfg).to(device)
        res = evaluate(model, splits, val_idx, train_idx, domain, cfg, autocast, True, cfg.eval_only)
        rec = dict(mode=f"eval-only {cfg.eval_only}", val_acc=res["val_acc"], test_acc=res["test_acc"],
                   probe_lr=res["lr"], probe_epoch=res["epoch"])
        log_line(rec)
        with open(out_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec

    model = build_model(mcfg).to(device)
    data_gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)
    step, state = 0, None
    if cfg.resume:
        state, _ = load_checkpoint(ckpt_path, mcfg)
        model.load_state_dict(state["model"])
        step = state["step"]
        torch.set_rng_state(state["rng_cpu"])
        data_gen.set_state(state["rng_data"])
        if state["rng_cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        if master:
            print(f"resumed from {ckpt_path} at step {step}")
    elif rank:
        torch.manual_seed(cfg.seed + rank)  # each rank draws its own masks
    opt = make_optimizer(model, cfg, state["optimizer"] if state else None)
    if world > 1:
        if device.type == "cuda":  # one BatchNorm statistic over all ranks, as the authors do
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # on CPU (gloo) SyncBatchNorm is unavailable: the projector's BatchNorm uses per-rank statistics
    raw_model = model
    if cfg.compile:
        raw_model.encoder.compile()  # in place: the state_dict keeps its names
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    train = make_step(model, opt, cfg, autocast)

    n_train = len(splits.train_x)
    stop = min(cfg.stop_step or cfg.max_steps, cfg.max_steps)
    log_file = open(out_dir / "log.jsonl", "a") if master else None
    if master:
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"{cfg.domain}: {n_train} training inputs of shape {tuple(domain.input_shape)}, {n_params / 1e6:.2f}M "
              f"parameters, batch {cfg.batch_size} x {world}, steps {step}..{stop}, device {device}")
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    t0, t_start, step_at_t0 = time.time(), time.time(), step
    while step < stop:
        lr = lr_at(step, cfg)
        idx = torch.randint(n_train, (cfg.batch_size,), generator=data_gen, device=device)
        loss, logs = train(domain.to_input(splits.train_x[idx]), lr)
        nonfinite |= ~torch.isfinite(loss)  # checked at log steps: no host sync per step
        step += 1
        last = step == stop
        if step % cfg.log_interval == 0 or last or step % cfg.ckpt_interval == 0:
            if nonfinite.item():
                raise RunError(f"non-finite loss before step {step}; the last good checkpoint ({ckpt_path}) is "
                                 "intact: lower --lr or --inner-lr and --resume, or start again")
        if master and (step % cfg.log_interval == 0 or last):
            dt = time.time() - t0
            ms = 1000 * dt / (step - step_at_t0)
            rec = dict(step=step, loss=loss.item(), **{k: v.item() for k, v in logs.items()}, lr=lr,
                       ms_per_step=ms, samples_per_s=cfg.batch_size * world * 1000 / ms)
            eta = (stop - step) * ms / 1000
            log_line(rec, f" | {100 * step / stop:.0f}% eta {eta / 60:.1f} min")
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            t0, step_at_t0 = time.time(), step
        if cfg.eval_interval and step % cfg.eval_interval == 0 and not last and master:
            if len(domain.input_shape) == 3:
                reconstruction_grid(raw_model, domain.to_input(splits.train_x[val_idx[:8]]),
                                    out_dir / f"reconstructions_{step}.png")
            res = evaluate(raw_model, splits, val_idx, train_idx, domain, cfg, autocast, with_test=False)
            print(f"step {step} | probe val_acc {res['val_acc']:.4f} (lr {res['lr']}, epoch {res['epoch']})")
            log_file.write(json.dumps(dict(step=step, probe_val_acc=res["val_acc"])) + "\n")
            t0, step_at_t0 = time.time(), step
        if master and (step % cfg.ckpt_interval == 0 or last):
            save_checkpoint(ckpt_path, raw_model, opt, cfg, mcfg, step, data_gen)

    if world > 1:  # every rank must hold the same weights: DDP averages gradients, nothing else syncs them
        flat = torch.cat([p.detach().flatten().float() for p in raw_model.parameters()])
        spread = [flat.clone() for _ in range(world)]
        torch.distributed.all_gather(spread, flat)
        max_dev = max((s - flat).abs().max().item() for s in spread)
        if master:
            print(f"ranks in sync: max parameter difference {max_dev:.3g}")
        torch.distributed.destroy_process_group()
        if max_dev > 0:
            raise RunError(f"ranks diverged (max parameter difference {max_dev}); this is a bug, please report it")
    if not master:
        return None
    rec = dict(step=step, train_minutes=(time.time() - t_start) / 60)
    if step == cfg.max_steps:  # the finished run: probe with test, once
        if len(domain.input_shape) == 3:
            rec["adapt_max_pixel_change"] = reconstruction_grid(raw_model, domain.to_input(splits.train_x[val_idx[:8]]),
                                                                 out_dir / f"reconstructions_{step}.png")
        res = evaluate(raw_model, splits, val_idx, train_idx, domain, cfg, autocast, with_test=True)
        rec.update(val_acc=res["val_acc"], test_acc=res["test_acc"], probe_lr=res["lr"], probe_epoch=res["epoch"],
                   total_minutes=(time.time() - t_start) / 60)
    log_line(rec)
    log_file.write(json.dumps(rec) + "\n")
    log_file.close()
    return rec

# -----------------------------------------------------------------------------
# benchmark: MAE vs MetaMAE first/second order, one process, ratios to MAE


def peak_memory_mb(device, reset=False):
    """CUDA: max allocated; CPU: the process's peak RSS (VmHWM), which Linux resets through clear_refs."""
    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def bench(cfg, mcfg, domain, device, autocast):
    """Times the training step of MAE, first-order and second-order MetaMAE with the same backbone, in one
    process, interleaved so that a noisy machine slows all three alike; prints medians and ratios to MAE."""
    B = cfg.batch_size
    if cfg.bench_data:
        splits = domain.load(Path(cfg.data_dir), cfg.download)
        pool = splits.train_x.to(device)
        batch = lambda: domain.to_input(pool[torch.randint(len(pool), (B,), device=device)])  # noqa: E731
    elif mcfg.modality == "tokens":
        batch = lambda: torch.randint(mcfg.vocab_size, (B, *mcfg.input_shape), device=device)  # noqa: E731
    else:
        batch = lambda: torch.rand(B, *mcfg.input_shape, device=device)  # noqa: E731
    variants = {"MAE": dict(inner_steps=0, contrast_weight=0.0), "MetaMAE 1st-order": dict(first_order=True),
                "MetaMAE 2nd-order": dict(first_order=False, inner_steps=max(1, mcfg.inner_steps))}
    runs = {}
    for name, change in variants.items():
        torch.manual_seed(cfg.seed)
        model = MetaMAE(replace(mcfg, **change)).to(device)
        if cfg.compile:
            model.encoder.compile()
        runs[name] = dict(step=make_step(model, make_optimizer(model, cfg), cfg, autocast), times=[], mem=0.0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for r in range(cfg.bench_repeats + 1):  # repeat 0 warms up (allocator, compile, graph capture): not timed
        for name, run_ in runs.items():
            peak_memory_mb(device, reset=True)
            x = batch()
            sync()
            t = time.perf_counter()
            for _ in range(cfg.bench_steps if r else 5):
                run_["step"](x, cfg.lr)
            sync()
            if r:
                run_["times"].append((time.perf_counter() - t) / cfg.bench_steps)
                run_["mem"] = max(run_["mem"], peak_memory_mb(device))
    print(f"bench: {cfg.domain} {tuple(mcfg.input_shape)}, {mcfg.num_tokens} tokens, mask {mcfg.mask_ratio}, batch {B}, "
          f"width {mcfg.embed_dim} depth {mcfg.depth}, decoder {mcfg.decoder_embed_dim}x{mcfg.decoder_depth}, "
          f"{device}, {autocast.dtype}, threads {torch.get_num_threads()}, compile {cfg.compile}, "
          f"cuda graph {cfg.cuda_graph}, median of {cfg.bench_repeats} x {cfg.bench_steps} steps")
    mem_kind = "CUDA max allocated" if device.type == "cuda" else "peak RSS"
    print(f"{'model':<20}{'ms/step':>10}{'samples/s':>12}{'x MAE':>8}{'min/100k steps':>16}{mem_kind + ' MB':>24}")
    base = statistics.median(runs["MAE"]["times"])
    results = {}
    for name, run_ in runs.items():
        ms = 1000 * statistics.median(run_["times"])
        results[name] = dict(ms_per_step=ms, samples_per_s=1000 * B / ms, ratio=ms / (1000 * base), peak_mb=run_["mem"])
        print(f"{name:<20}{ms:>10.1f}{1000 * B / ms:>12.0f}{ms / (1000 * base):>8.2f}{ms * 1e5 / 6e4:>16.1f}"
              f"{run_['mem']:>24.0f}")
    return results


def main(argv=None):
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        run(cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (data.DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact (--resume continues from it)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
