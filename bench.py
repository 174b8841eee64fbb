"""
Speed and memory of one training step: MAE vs MetaMAE first and second order, the same backbone, one process.

    python bench.py --mask-ratio 0.75 --threads 2                  # CPU, the CIFAR-10 configuration, fp32
    python bench.py --mask-ratio 0.75 --threads 2 --dtype bfloat16  # the same under bf16 autocast
    python bench.py --device cuda --mask-ratio 0.75 --bench-steps 50 --bench-repeats 5 --cuda-graph --compile
    python bench.py --bench-data --domain cifar10 --data-dir ../shared/data   # batches from the real dataset

It takes every option of train.py (the model, the domain's input shape and batch, --dtype, --compile,
--cuda-graph) plus the three below, and times the very step that training runs (train.train_step, set up by
device.prepare). The three variants run interleaved, so that a noisy shared machine slows all of them alike; it
prints medians and ratios to MAE, and minutes per 100k steps (the paper's budget).
"""

import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import cli
import device
import train
from cli import UsageError, knob
from metamae import MetaMAE


@dataclass
class BenchConfig(train.Config):
    bench_data: bool = knob(False, "draw batches from the real dataset instead of random inputs", "start here")
    bench_steps: int = knob(10, "timed steps per repeat", "start here")
    bench_repeats: int = knob(3, "repeats (the median is reported)", "start here")


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


def bench(cfg):
    """Times the training step of MAE, first-order and second-order MetaMAE; returns their figures by name."""
    cfg, domain, _, mcfg = train.check(cfg)
    if cfg.bench_steps <= 0 or cfg.bench_repeats <= 0:
        raise UsageError(f"--bench-steps and --bench-repeats must be positive, got {cfg.bench_steps}, "
                         f"{cfg.bench_repeats}")
    dev = device.setup(cfg)
    B, on = cfg.batch_size, dev.device
    if cfg.bench_data:
        pool = domain.load(Path(cfg.data_dir), cfg.download).train_x.to(on)
        batch = lambda: domain.to_input(pool[torch.randint(len(pool), (B,), device=on)])  # noqa: E731
    elif mcfg.modality == "tokens":
        batch = lambda: torch.randint(mcfg.vocab_size, (B, *mcfg.input_shape), device=on)  # noqa: E731
    else:
        batch = lambda: torch.rand(B, *mcfg.input_shape, device=on)  # noqa: E731
    # MAE has no step, so none to learn: it drops --learn-inner-lr (the MetaMAE variants keep it)
    variants = {"MAE": dict(inner_steps=0, contrast_weight=0.0, learn_inner_lr=False),
                "MetaMAE 1st-order": dict(first_order=True),
                "MetaMAE 2nd-order": dict(first_order=False, inner_steps=max(1, mcfg.inner_steps))}
    runs = {}
    for name, change in variants.items():
        torch.manual_seed(cfg.seed)
        model = MetaMAE(replace(mcfg, **change)).to(on)
        step = device.prepare(model, train.make_optimizer(model, cfg), cfg, dev, train.train_step)  # --compile too
        runs[name] = dict(step=step, times=[], mem=0.0)
    sync = torch.cuda.synchronize if on.type == "cuda" else (lambda: None)
    for r in range(cfg.bench_repeats + 1):  # repeat 0 warms up (allocator, compile, graph capture): not timed
        print(f"bench: {'warming up' if r == 0 else f'repeat {r} of {cfg.bench_repeats}'} ...", flush=True)
        for run in runs.values():
            peak_memory_mb(on, reset=True)
            x = batch()
            sync()
            t = time.perf_counter()
            for _ in range(cfg.bench_steps if r else 5):
                run["step"](x, cfg.lr)
            sync()
            if r:
                run["times"].append((time.perf_counter() - t) / cfg.bench_steps)
                run["mem"] = max(run["mem"], peak_memory_mb(on))
    print(f"bench: {cfg.domain} {tuple(mcfg.input_shape)}, {mcfg.num_tokens} tokens, mask {mcfg.mask_ratio}, "
          f"batch {B}, "
          f"width {mcfg.embed_dim} depth {mcfg.depth}, decoder {mcfg.decoder_embed_dim}x{mcfg.decoder_depth}, "
          f"{on}, {dev.precision}, threads {torch.get_num_threads()}, compile {cfg.compile}, "
          f"cuda graph {cfg.cuda_graph}, median of {cfg.bench_repeats} x {cfg.bench_steps} steps")
    mem_kind = "CUDA max allocated" if on.type == "cuda" else "peak RSS"
    print(f"{'model':<20}{'ms/step':>10}{'samples/s':>12}{'x MAE':>8}{'min/100k steps':>16}{mem_kind + ' MB':>24}")
    base = statistics.median(runs["MAE"]["times"])
    results = {}
    for name, run in runs.items():
        ms = 1000 * statistics.median(run["times"])
        results[name] = dict(ms_per_step=ms, samples_per_s=1000 * B / ms, ratio=ms / (1000 * base), peak_mb=run["mem"])
        print(f"{name:<20}{ms:>10.1f}{1000 * B / ms:>12.0f}{ms / (1000 * base):>8.2f}{ms * 1e5 / 6e4:>16.1f}"
              f"{run['mem']:>24.0f}")
    return results


SHOWN = {"domain", "preset", "embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth", "mask_ratio",
         "batch_size", "inner_steps", "device", "dtype", "threads", "compile", "cuda_graph", "data_dir", "seed",
         "bench_data", "bench_steps", "bench_repeats"}  # what --help lists; every other knob of train.py works too


def main(argv=None):
    with cli.one_line_errors():
        bench(cli.parse_args(sys.argv[1:] if argv is None else argv, BenchConfig, __doc__, train.PRESETS, SHOWN))


if __name__ == "__main__":
    main()
