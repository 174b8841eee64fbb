"""
Pretrain MetaMAE on a DABS domain, then evaluate the frozen encoder by linear probing (probe.py).

    pip install -r requirements.txt
    python train.py --domain cifar10                       # the authors' model, recipe and 100k steps: one GPU
    python train.py --domain cifar10 --preset cpu          # a small model and 3,400 steps: about 20 min on 2 CPU cores
    torchrun --standalone --nproc_per_node=4 train.py --domain cifar10   # several GPUs (DDP)
    python train.py --domain cifar10 --cuda-graph --compile   # one GPU, the whole step as one CUDA graph
    python train.py --domain cifar10 --resume              # continue the run in --out-dir with its own options
    python probe.py --ckpt runs/cifar10/ckpt.pt            # probe a checkpoint again (or a baseline)
    python train.py --help                                 # every knob, with its default

Every knob is a field of `Config` below (probe.Knobs' those a probe shares); the model's take their defaults from
MetaMAEConfig. The file reads in the order a run goes: the knobs and their checks, the optimizer and one training
step, checkpoints, the loop, the end of a run, and run() that calls them so. Where it runs is device.py's.
"""

import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import torch

import cli
import data
import device
import pictures
import probe
from cli import RunError, UsageError, knob
from metamae import MetaMAE, MetaMAEConfig

# -----------------------------------------------------------------------------
# every knob, with its default


MODEL = MetaMAEConfig()  # the model's defaults, read once from the one place that defines them
DOMAIN_SET = ("input_shape", "patch_size", "vocab_size")  # model fields that the domain decides


PRESETS = {  # a preset changes the defaults of the knobs it names; an option given on the command line wins
    # the authors' pretrain.py: AdamW at a constant 1e-4 with PyTorch's betas, weight decay 1e-4 on every
    # parameter, no warm-up, no clipping, 100k steps (their run stops at 101k, 1,000 steps "for stable termination")
    "paper": dict(lr=1e-4, min_lr=1e-4, warmup_steps=0, weight_decay=1e-4, decay_all=True, adam_beta2=0.999,
                  grad_clip=0.0),
    "mae": {},  # the knobs' defaults: MAE's recipe, warm-up and cosine, decay 0.05 on weight matrices only
    # the default backbone cannot learn much in minutes on 2 cores: a smaller one, a larger rate, a mask of
    # 0.75 (half the encoder's work) and a schedule that ends in ~20 minutes of pretraining (docs/ablation.md)
    "cpu": dict(embed_dim=192, depth=6, num_heads=6, decoder_depth=2, mask_ratio=0.75, max_steps=3400, lr=1.5e-3,
                warmup_steps=200, eval_interval=0, log_interval=50, ckpt_interval=500),  # a line every ~40 s
}


@dataclass
class Config(probe.Knobs):  # + the data, system and probe knobs: domain, data_dir, seed, device, probe_lrs, ...
    # model: the DABS backbone of the paper; 'cpu' swaps in a small one that learns in minutes on 2 cores
    preset: str = knob("paper", "'paper' (the default): the authors' recipe (" + ", ".join(
        f"{k} {v}" for k, v in PRESETS["paper"].items()) + "); 'mae': MAE's recipe, the knobs' own values; 'cpu': "
        "MAE's recipe, and " + ", ".join(f"{k} {v}" for k, v in PRESETS["cpu"].items()) + "; options given win (--help "
        "with --preset shows its values)", "start here")
    embed_dim: int = knob(MODEL.embed_dim, "encoder width", "model")
    depth: int = knob(MODEL.depth, "encoder blocks", "model")
    num_heads: int = knob(MODEL.num_heads, "encoder heads", "model")
    decoder_embed_dim: int = knob(MODEL.decoder_embed_dim, "decoder width", "model")
    decoder_depth: int = knob(MODEL.decoder_depth, "decoder blocks", "model")
    decoder_num_heads: int = knob(MODEL.decoder_num_heads, "decoder heads", "model")
    mlp_ratio: float = knob(MODEL.mlp_ratio, "MLP hidden width / width", "model")
    dropout: float = knob(MODEL.dropout, "encoder dropout", "model")
    mask_ratio: float = knob(None, "fraction of tokens masked (default: the domain's)", "model")
    inner_lr: float = knob(MODEL.inner_lr, "step size of the latent's adaptation", "model")
    inner_steps: int = knob(MODEL.inner_steps, "adaptation steps (0 with contrast_weight 0: plain MAE)", "model")
    learn_inner_lr: bool = knob(MODEL.learn_inner_lr, "learn the step size (one per inner step, through its log), "
                                "starting at --inner-lr", "model")
    first_order: bool = knob(MODEL.first_order, "drop the second-order term of the inner loop", "model")
    support_ratio: float = knob(MODEL.support_ratio, "chance a masked neighbour of a visible token joins the support",
                                "model")
    contrast_weight: float = knob(MODEL.contrast_weight, "weight of the amortized/adapted contrastive loss", "model")
    temperature: float = knob(MODEL.temperature, "NT-Xent temperature", "model")
    proj_dim: int = knob(MODEL.proj_dim, "projector output width", "model")
    # optimization
    max_steps: int = knob(100_000, "pretraining steps (the paper's budget); the lr schedule spans them", "start here")
    stop_step: int = knob(0, "stop early at this step with a checkpoint (0: run to max_steps); --resume continues",
                          "start here")
    batch_size: int = knob(None, "pretraining batch per process (default: the domain's)", "optimizer")
    lr: float = knob(5e-4, "peak AdamW learning rate", "optimizer")
    min_lr: float = knob(1e-5, "learning rate at the end of the cosine decay", "optimizer")
    warmup_steps: int = knob(2_000, "linear warm-up steps", "optimizer")
    weight_decay: float = knob(0.05, "AdamW decay on weight matrices (none on biases, norms, cls/mask tokens)",
                               "optimizer")
    decay_all: bool = knob(False, "decay biases, norms and the cls/mask tokens too, as the authors do", "optimizer")
    adam_beta2: float = knob(0.95, "AdamW's second beta (MAE's 0.95; PyTorch's and the authors' 0.999)", "optimizer")
    grad_clip: float = knob(1.0, "clip the gradient norm (0: off)", "optimizer")
    learned_lr_scale: float = knob(10.0, "--learn-inner-lr: the log step size's learning rate, as a multiple of --lr "
                                   "(its schedule too; never decayed nor clipped)", "optimizer")
    # system (device, dtype and threads are probe.Knobs')
    compile: bool = knob(False, "torch.compile the encoder (the decoder is differentiated twice: never compiled)")
    cuda_graph: bool = knob(False, "capture the whole training step in one CUDA graph and replay it (one GPU)")
    # logging, checkpoints
    log_interval: int = knob(100, "steps between log lines")
    ckpt_interval: int = knob(5_000, "steps between checkpoints (one is always written at the end)")
    eval_interval: int = knob(20_000, "steps between validation probes during pretraining (0: only at the end)",
                              "probe")
    resume: bool = knob(False, "continue <out_dir>/ckpt.pt's run, with its options", "start here")
    overwrite: bool = knob(False, "start a new run in an --out-dir whose ckpt.pt is then replaced")


# -----------------------------------------------------------------------------
# every option checked, once, before any work


def check(cfg):
    """Every option is checked here, once, before any work. Returns the config with the domain's defaults
    filled in, the domain, the domains to probe at the end, and the model's config."""
    domain, targets = probe.check_knobs(cfg)
    cfg = replace(cfg, batch_size=domain.batch_size if cfg.batch_size is None else cfg.batch_size,
                  mask_ratio=domain.mask_ratio if cfg.mask_ratio is None else cfg.mask_ratio)
    if not 0 < cfg.mask_ratio < 1:
        raise UsageError(f"--mask-ratio must be in (0, 1), got {cfg.mask_ratio}")
    for name in ("max_steps", "log_interval", "ckpt_interval", "batch_size"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if not 0 <= cfg.adam_beta2 < 1:
        raise UsageError(f"--adam-beta2 must be in [0, 1), got {cfg.adam_beta2}")
    for name in ("warmup_steps", "eval_interval", "stop_step", "grad_clip", "lr", "min_lr", "weight_decay"):
        if not getattr(cfg, name) >= 0 or not math.isfinite(getattr(cfg, name)):  # NaN fails both
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {getattr(cfg, name)}")
    if cfg.batch_size < 2 and cfg.contrast_weight > 0:
        raise UsageError(f"--batch-size {cfg.batch_size} is too small for the contrastive loss (BatchNorm and "
                         "negatives need at least 2); raise it or set --contrast-weight 0 --inner-steps 0")
    if not 0 < cfg.learned_lr_scale < float("inf"):
        raise UsageError(f"--learned-lr-scale must be a positive finite number, got {cfg.learned_lr_scale}")
    if cfg.cuda_graph and cfg.learn_inner_lr:  # a captured step reads one device lr, and this group has its own
        raise UsageError("--cuda-graph does not take --learn-inner-lr yet: drop one of them")
    if cfg.cuda_graph and (cfg.device == "cpu" or not torch.cuda.is_available()):
        raise UsageError("--cuda-graph needs one CUDA device and no torchrun; drop it on CPU or with several GPUs")
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume continues the run in --out-dir; --overwrite starts a new one there: choose one")
    try:  # the model's own checks name the bad field
        knobs = {f.name: getattr(cfg, f.name) for f in fields(MetaMAEConfig) if f.name not in DOMAIN_SET}
        mcfg = MetaMAEConfig(input_shape=tuple(domain.input_shape), patch_size=tuple(domain.patch_size),
                             vocab_size=domain.vocab_size, **knobs)
    except ValueError as e:
        raise UsageError(str(e)) from None
    device.check_fits(mcfg, cfg.device, 16, "to train (weights, gradients and AdamW's two moments, in float32)")
    return cfg, domain, targets, mcfg

# -----------------------------------------------------------------------------
# optimizer, schedule, and one training step


def make_optimizer(model, cfg):
    """AdamW; no decay on biases, norms (1-D tensors) and the cls/mask tokens, unless --decay-all. A learned inner step
    size has a group of its own, never decayed nor clipped (the others clip as with a fixed step), at --learned-lr-scale
    x the rate: Adam moves a parameter ~its rate a step, too slow for the 100x the inner_lr sweep needed to bite."""
    decay, no_decay, step_size = [], [], []
    for name, p in model.named_parameters():
        exempt = p.dim() < 2 or name.endswith(("cls_token", "mask_token"))
        (step_size if name.endswith("log_inner_lr") else no_decay if exempt and not cfg.decay_all else decay).append(p)
    groups = [dict(params=decay, weight_decay=cfg.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    if step_size:
        groups.append(dict(params=step_size, weight_decay=0.0, lr_scale=cfg.learned_lr_scale))
    try:  # the fused kernel is 4x faster on CPU than the per-tensor loop; older PyTorch lacks it on CPU
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.adam_beta2))


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
    if cfg.grad_clip:  # in the model's order (the norm's sum is rounded in it); a learned step size is not clipped
        torch.nn.utils.clip_grad_norm_([p for n, p in model.named_parameters() if not n.endswith("log_inner_lr")],
                                       cfg.grad_clip)
    opt.step()
    return loss.detach(), logs

# -----------------------------------------------------------------------------
# checkpoints: atomic, uncompiled/unwrapped keys, RNG states included, tensors and plain types only


def save_checkpoint(path, model, opt, cfg, mcfg, step, data_gen, env):
    state = dict(model=model.state_dict(), optimizer=opt.state_dict(), config=asdict(cfg), model_config=asdict(mcfg),
                 step=step, environment=env, rng_cpu=torch.get_rng_state(), rng_data=data_gen.get_state(),
                 rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        with data.atomic_file(path) as tmp:  # a crash while saving leaves the previous checkpoint intact
            torch.save(state, tmp)
    except (OSError, RuntimeError) as e:  # a full disk: PyTorch says "unexpected pos ..." or "No space left"
        kept = "the one on disk is intact: --resume continues from it" if path.exists() else "none was written yet"
        raise RunError(f"could not write the checkpoint of step {step} to {path} ({data.one_line(e, 160)}); "
                       f"free space there; {kept}") from None


def build(cfg, mcfg, dev, ckpt_path):
    """The model, its optimizer, the batch generator and the first step: fresh, or resumed exactly from the
    checkpoint (weights, optimizer moments, step, and every random state)."""
    torch.manual_seed(cfg.seed)
    model = MetaMAE(mcfg).to(dev.device)
    opt = make_optimizer(model, cfg)
    # batches are drawn from their own generator, so resuming restores the data order exactly
    data_gen = torch.Generator(device=dev.device).manual_seed(cfg.seed * 1000 + dev.rank)
    step = 0
    if cfg.resume:
        state, _ = cli.load_checkpoint(ckpt_path, mcfg)
        cli.check_resumable(state, cfg, ckpt_path)  # its dataset, schedule and step, each refusal with the way out
        cli.load_weights(model, state, ckpt_path)
        try:
            cli.check_optimizer_state(state["optimizer"], opt)
            opt.load_state_dict(state["optimizer"])
            step = int(state["step"])
            torch.set_rng_state(state["rng_cpu"])
            data_gen.set_state(state["rng_data"])
            if state.get("rng_cuda") is not None and dev.device.type == "cuda":
                torch.cuda.set_rng_state_all(state["rng_cuda"])
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise RunError(f"checkpoint {ckpt_path} cannot be resumed ({data.one_line(e, 160)}); probe it with "
                           "probe.py --ckpt, or start over with --overwrite") from None
        if dev.rank == 0:
            print(f"resumed from {ckpt_path} at step {step}")
    elif dev.rank:
        torch.manual_seed(cfg.seed + dev.rank)  # each rank draws its own masks
    return model, opt, data_gen, step

# -----------------------------------------------------------------------------
# the training loop


class Run(NamedTuple):
    """What the checks and the set-up decided before any work (see run() at the bottom)."""
    cfg: Config
    domain: data.Domain
    targets: list             # the domains probed at the end: the run's own when it has labels, then transfer
    mcfg: MetaMAEConfig
    dev: device.Device        # where it runs: device, precision, rank and world size under torchrun
    env: dict                 # and what it records of it: torch build, device name, threads, commit (device.describe)
    out_dir: Path
    lock: object = None       # the open .lock that makes out_dir this run's (rank 0; cli.claim_out_dir)


def pretrain(r, d):
    """Steps until --stop-step or --max-steps, logging, probing and saving on the way; returns the model (its
    compile/DDP wrappers left behind) and the last step. r: the Run; d: its domain's probe.Data."""
    cfg, domain, dev, out_dir = r.cfg, r.domain, r.dev, r.out_dir
    master, ckpt_path, x = dev.rank == 0, out_dir / "ckpt.pt", d.splits.train_x
    model, opt, data_gen, step = build(cfg, r.mcfg, dev, ckpt_path)
    saved_step = step if cfg.resume else None  # the step of the checkpoint on disk that this run can continue
    train = device.prepare(model, opt, cfg, dev, train_step)  # compiled, wrapped, graphed: model is what is saved
    stop, start = min(cfg.stop_step or cfg.max_steps, cfg.max_steps), step
    nonfinite = torch.zeros((), dtype=torch.bool, device=dev.device)
    log_file, t0, step_at_t0 = None, time.time(), step
    try:
        log_file = open_log(r, model, len(x), step, stop) if master else None
        while step < stop:
            lr = lr_at(step, cfg)
            idx = torch.randint(len(x), (cfg.batch_size,), generator=data_gen, device=dev.device)
            loss, logs = train(domain.to_input(x[idx]), lr)
            # a NaN is remembered on the device and read only when the loop reads anyway: a read per step would
            # stall the GPU queue (and break CUDA-graph replay), and checkpoints must never save a NaN model
            nonfinite |= ~torch.isfinite(loss)
            step += 1
            last, log_now, ckpt_now = step == stop, step % cfg.log_interval == 0, step % cfg.ckpt_interval == 0
            eval_now = master and cfg.eval_interval and not step % cfg.eval_interval and not last and domain.num_classes
            if (log_now or last or ckpt_now) and nonfinite.item():
                raise RunError(f"non-finite loss before step {step}; {probe.nonfinite_cause(x)}; "
                               f"{cli.checkpoint_status(ckpt_path, saved_step)}")
            if master and (log_now or last or ckpt_now or eval_now):  # about to write: is the folder still its own?
                cli.check_own_folder(out_dir, r.lock, step, cli.checkpoint_status(ckpt_path, saved_step))
            if master and step == start + 10 and dev.device.type == "cpu" and not last:  # what the whole run costs
                print(cli.cost_hint(cfg.preset, (time.time() - t0) / 10, stop - step, torch.get_num_threads()),
                      flush=True)
            if master and (log_now or last):
                log_step(r, log_file, step, stop, (time.time() - t0) / (step - step_at_t0), loss, logs, lr,
                         first=step <= start + cfg.log_interval)
                t0, step_at_t0 = time.time(), step
            if eval_now:
                probe_during_training(r, model, d, step, log_file)
                t0, step_at_t0 = time.time(), step  # the probe's time is not the training's
            if master and (ckpt_now or last):
                save_checkpoint(ckpt_path, model, opt, cfg, r.mcfg, step, data_gen, r.env)
                saved_step = step
                pictures.write_curves(out_dir)  # curves.svg, as far as the run has come
    except KeyboardInterrupt as e:
        hint = f" ({cli.PRESET_HINT})" if cfg.preset == "paper" and dev.device.type == "cpu" else ""
        raise cli.Interrupted(f"interrupted ({str(e) or 'Ctrl-C'}) at step {step}; "
                              f"{cli.checkpoint_status(ckpt_path, saved_step)}{hint}") from None
    except OSError as e:  # a full disk while the log or a picture is written (a checkpoint's save says so itself)
        raise RunError(f"could not write in {out_dir} at step {step} ({data.one_line(e, 160)}): free space there; "
                       f"{cli.checkpoint_status(ckpt_path, saved_step)}") from None
    finally:
        if log_file:  # closed however the loop ended; a write that failed is said above
            with contextlib.suppress(OSError):
                log_file.close()
    return model, step


def open_log(r, model, n, step, stop):
    """log.jsonl, opened for the run (a new run's first record holds its options), and the run's first line."""
    path = r.out_dir / "log.jsonl"
    if r.cfg.resume:
        cli.log_until(path, step)
    if r.cfg.overwrite:  # only now that the data are read and the model built: a typo must not cost the old run
        (r.out_dir / "ckpt.pt").unlink(missing_ok=True)
    log_file = open(path, "a" if r.cfg.resume else "w")  # a new run's options, or where a resumed one goes on
    first = dict(resumed_at=step) if r.cfg.resume else dict(config=asdict(r.cfg), model_config=asdict(r.mcfg))
    log_file.write(json.dumps(dict(**first, environment=r.env)) + "\n")
    print(f"{r.domain.name}: {n} training inputs of shape {tuple(r.domain.input_shape)}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, batch {r.cfg.batch_size} x "
          f"{r.dev.world}, steps {step}..{stop}, device {r.dev.device}, {r.dev.precision}", flush=True)
    return log_file


def log_line(rec, suffix=""):
    parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()]
    print(" | ".join(parts) + suffix, flush=True)


def log_step(r, log_file, step, stop, seconds, loss, logs, lr, first):
    """A step's line and log.jsonl record (its values read from the device: log steps only); the run's first says
    whether its inner step does anything measurable."""
    ms = 1000 * seconds  # per step, since the last record
    rec = dict(step=step, loss=loss.item(), **{k: v.item() for k, v in logs.items()}, lr=lr, ms_per_step=ms,
               samples_per_s=r.cfg.batch_size * r.dev.world * 1000 / ms)
    log_line(rec, f" | {100 * step / stop:.0f}% eta {(stop - step) * ms / 60_000:.1f} min")
    if first and (note := cli.inert_note(rec)):
        print(note, flush=True)
    log_file.write(json.dumps(rec) + "\n")
    log_file.flush()  # a record a kill cannot take back


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


def probe_during_training(r, model, d, step, log_file):
    """--eval-interval: the held-out logs, pictures and a validation probe (never the test split) while
    pretraining goes on."""
    cfg, domain, autocast = r.cfg, r.domain, r.dev.autocast
    held_out = d.splits.train_x[d.val_idx]
    rec = dict(step=step, **diagnose(model, held_out, domain.to_input, cfg.batch_size, autocast))
    if len(domain.input_shape) == 3:
        pictures.reconstruction_grid(model, domain.to_input(held_out[:8]), r.out_dir / f"reconstructions_{step}.png")
    featurize = lambda x: probe.features(model, x, domain.to_input, autocast)  # noqa: E731
    res = probe.probe(featurize, d, domain, cfg, with_test=False)
    rec.update(probe_val_acc=res["val_acc"], probe_lr=res["probe_lr"], probe_epoch=res["probe_epoch"])
    log_line(rec)
    log_file.write(json.dumps(rec) + "\n")
    log_file.flush()


# -----------------------------------------------------------------------------
# the end of a run: held-out logs, pictures, and the probes (the test splits are scored here, once)


def finish(r, model, datasets, step, t_start):
    """The last record of a run and its pictures (at --stop-step too); a finished run (step == max_steps) is probed
    with the test splits, once."""
    cfg, domain, autocast = r.cfg, r.domain, r.dev.autocast
    rec = dict(step=step, train_minutes=(time.time() - t_start) / 60)
    held_out = datasets[domain.name].splits.train_x[datasets[domain.name].val_idx]
    if len(domain.input_shape) == 3:  # its own masks and RNG: the held-out logs and the probe below do not move
        rec["adapt_max_pixel_change"] = pictures.reconstruction_grid(model, domain.to_input(held_out[:8]),
                                                                  r.out_dir / f"reconstructions_{step}.png")
    if step == cfg.max_steps:
        rec.update(diagnose(model, held_out, domain.to_input, cfg.batch_size, autocast))
        if r.targets:
            print(f"probing the frozen encoder on {', '.join(d.name for d in r.targets)}: a linear probe at each "
                  f"lr of {cfg.probe_lrs}, {cfg.probe_epochs} epochs, chosen on validation ...", flush=True)
        rec.update(probe.evaluate(model, cfg, r.targets, datasets, autocast))
        rec["total_minutes"] = (time.time() - t_start) / 60
    with open(r.out_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    pictures.write_curves(r.out_dir)
    print(summary(r, rec), flush=True)
    return rec


def summary(r, rec):
    """The end of a run, at a glance: where its files are, and the probes' results in percent."""
    files = ["ckpt.pt", "log.jsonl", "curves.svg"] + (
        [f"reconstructions_{rec['step']}.png"] if "adapt_max_pixel_change" in rec else [])
    lines = [f"step {rec['step']} of {r.cfg.max_steps} after {rec['train_minutes']:.1f} min: "
             + ", ".join(str(r.out_dir / f) for f in files)]
    if "total_minutes" in rec:
        lines += probe.results(rec, r.targets, r.cfg.domain)
    lines.append("ran on " + ", ".join(f"{k} {v}" for k, v in r.env.items()))
    return "\n".join(lines + ([] if "total_minutes" in rec else ["stopped early: --resume continues the run"]))

# -----------------------------------------------------------------------------
# a run, in order: options, device, run folder, data, pretraining, the end


def run(cfg):
    cfg, domain, targets, mcfg = check(cfg)
    dev = device.setup(cfg, distributed=True)
    with cli.claim_out_dir(cfg, dev.rank) as (out_dir, lock):  # the run folder is this run's until it ends
        r = Run(cfg, domain, targets, mcfg, dev, device.describe(dev), out_dir, lock)
        try:  # the run's data, then every probe domain's: a missing or broken one stops the run now, not at its end
            datasets = {d.name: probe.load_data(cfg, d, dev.device)
                        for d in [domain, *(t for t in targets if t != domain)]}
        except KeyboardInterrupt as e:
            raise cli.Interrupted(f"interrupted ({str(e) or 'Ctrl-C'}) while reading the data, before the first step") \
                from None
        t_start = time.time()
        model, step = pretrain(r, datasets[domain.name])
        if dev.world > 1:
            device.check_ranks_in_sync(model, dev)
        if dev.rank == 0:
            kept = (f"the checkpoint {out_dir / 'ckpt.pt'} is intact: probe it with python probe.py --domain "
                    f"{domain.name} --ckpt {out_dir / 'ckpt.pt'}")
            try:
                return finish(r, model, datasets, step, t_start)
            except KeyboardInterrupt as e:
                raise cli.Interrupted(f"interrupted ({str(e) or 'Ctrl-C'}) after step {step}, in the final evaluation; "
                                      f"{kept}") from None
            except OSError as e:  # a full disk while the picture or the last record is written
                raise RunError(f"could not write in {out_dir} after step {step} ({data.one_line(e, 160)}): free "
                               f"space there; {kept}") from None
            except RunError as e:  # a probe that cannot be scored
                raise RunError(f"{e}; {kept}") from None


def main(argv=None):
    with cli.one_line_errors():
        run(cli.parse_args(sys.argv[1:] if argv is None else argv, Config, __doc__, PRESETS, None, cli.resumed_options))


if __name__ == "__main__":
    main()
