"""
Where a run runs, set up in one place and in the order a run needs it: the device and its CPU threads, TF32 and the
precision (bf16 autocast on CUDA, fp32 on CPU), and under torchrun the process group; then, once the model and its
optimizer exist, SyncBatchNorm, torch.compile of the encoder, the DDP wrapper, and the training step itself, eager
or captured in one CUDA graph. train.py calls setup() before any work and prepare() once it has built the model;
probe.py and bench.py need setup() alone. Then what a run records of where it ran; last, the end of a run under
torchrun.
"""

import atexit
import functools
import importlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from cli import RunError, UsageError
from metamae import MetaMAE

# -----------------------------------------------------------------------------
# before any work: the device, the precision, the process group


class Device(NamedTuple):
    """Where this process runs."""
    device: torch.device
    autocast: Callable  # autocast() opens the run's precision
    rank: int = 0
    world: int = 1      # processes under torchrun, else 1

    @property
    def precision(self):
        return "bfloat16" if self.autocast.keywords["enabled"] else "float32"


def setup(cfg, distributed=False):
    """The device of cfg.device ('auto': CUDA if there is one) with cfg.threads, and the run's precision; with
    distributed and under torchrun, this rank's GPU (LOCAL_RANK) and the process group joined."""
    name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, rank, world = torch.device(name), 0, 1
    if distributed and "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        if cfg.cuda_graph:
            raise UsageError("--cuda-graph needs one CUDA device and no torchrun; drop it with several GPUs")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        # before the group exists: torch.distributed.nn's functions take group=group.WORLD as a default, evaluated when
        # it is first imported; imported later (DDP imports torch._dynamo, which imports it), they keep the group
        # alive for good, destroy_process_group() cannot free it, and gloo's threads outlive the run
        importlib.import_module("torch.distributed.nn")
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu":  # gloo, on every way out, an error's too (NCCL's shutdown may wait on peers left)
            atexit.register(end_distributed)
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":  # TF32 for what runs in fp32 (the probe, --dtype float32): ~8x the fp32 matmul rate
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    return Device(device, functools.partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16), rank,
                  world)

def memory(name):
    """Bytes of memory where --device `name` puts the model: the GPU's, or the machine's."""
    name = name if name != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(name).index or 0).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(mcfg, name, bytes_per_parameter, what):
    """Refuses a model whose parameters alone, bytes_per_parameter each, need more than the memory of --device
    `name`, before anything is allocated: PyTorch would try, and the system's OOM killer end the run minutes later.
    The parameters are counted on the meta device, where a model takes no memory."""
    fix = "lower --embed-dim, --depth or --mlp-ratio"
    try:
        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            n = sum(p.numel() for p in MetaMAE(mcfg).parameters())
    except RuntimeError:  # "Storage size calculation overflowed"
        raise UsageError(f"the model cannot be built on any machine: a weight of it would hold more than 2**63 "
                         f"numbers; {fix}") from None
    need, have = n * bytes_per_parameter, memory(name)
    if need > have:
        raise UsageError(f"the model's {n:,} parameters need {need / 2**30:,.0f} GiB {what}, more than the "
                         f"{have / 2**30:,.0f} GiB of {name if name != 'auto' else 'this machine'}: {fix}")

# -----------------------------------------------------------------------------
# once the model exists: SyncBatchNorm, compile, DDP, and the step (eager, or one CUDA graph)


def prepare(model, opt, cfg, dev, train_step):
    """The step the loop calls, step(x, lr) -> (loss, logs), of train_step(model, opt, x, cfg, autocast) once the
    model is set up for dev: under DDP on GPUs one BatchNorm statistic over all of them (as the authors); --compile
    compiles the encoder in place (the state_dict keeps its names; the decoder, differentiated twice, never is);
    torchrun wraps the model in DDP; --cuda-graph captures the whole step once and replays it. model stays what is
    saved and probed."""
    if dev.world > 1 and dev.device.type == "cuda":
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place below the top module (gloo has none: per-rank)
    if cfg.compile:
        model.encoder.compile()
    if dev.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.device.index] if dev.device.type == "cuda" else None)
    step = functools.partial(train_step, model, opt, cfg=cfg)
    if cfg.cuda_graph:
        return GraphedStep(step, model, opt, dev.autocast)

    def eager(x, lr):
        for group in opt.param_groups:  # a learned inner step size has its own multiple of the rate (lr_scale)
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return step(x=x, autocast=dev.autocast)
    return eager


def device_lr(opt, device):
    """Makes opt read its learning rate (and step count: capturable) from the device, where a replayed step
    can see them change; Python floats would be frozen into the graph at capture. Returns the lr tensor."""
    lr = torch.tensor(opt.param_groups[0]["lr"], device=device)
    for group in opt.param_groups:
        group.update(lr=lr, capturable=True)
    return lr


class GraphedStep:
    """A training step captured once in a CUDA graph and then replayed: one launch per step instead of the
    thousands of small kernels of a second-order step, which at batch 64 leave the GPU waiting on Python.
    PyTorch's whole-network recipe: the first steps run eagerly on a side stream (cuBLAS, the allocator and
    --compile must be warm before capture), then the step is captured on a static input buffer. Random
    draws (mask, support set, dropout) stay random across replays: CUDA's generator is graph-aware. Every
    call, warm-up included, is a real training step. Build it after loading any optimizer state.

    step(x=..., autocast=...) -> (loss, logs) is one eager step of `model` with `opt` (train.train_step with
    the model, optimizer and config bound); a GraphedStep is called as step(x, lr)."""

    def __init__(self, step, model, opt, autocast, warmup=3):
        # no autocast weight cache in a graph: it would be filled at capture and never again
        self.step = functools.partial(step, autocast=functools.partial(autocast, cache_enabled=False))
        self.lr = device_lr(opt, next(model.parameters()).device)
        self.warmup, self.graph, self.side = warmup, torch.cuda.CUDAGraph(), torch.cuda.Stream()
        self.x = self.out = None

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

def describe(dev):
    """Where this run runs, as log.jsonl's first record and the checkpoint keep it: runs reproduce bit for bit on
    one machine and torch build, not across them (docs/performance.md)."""
    if dev.device.type == "cuda":
        name = torch.cuda.get_device_name(dev.device)
    else:  # the CPU model, as Linux names it
        try:
            name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                        if line.startswith("model name"))
        except (OSError, StopIteration):
            name = platform.processor() or platform.machine()
    here = dict(cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
    try:  # the commit of the checkout this code runs from, '+dirty' when its tracked files were changed
        commit = subprocess.run(["git", "rev-parse", "HEAD"], check=True, **here).stdout.strip()
        commit += "+dirty" if subprocess.run(["git", "status", "--porcelain", "-uno"], **here).stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        commit = None  # not a git checkout, or no git
    return dict(torch=str(torch.__version__), build=f"cuda {torch.version.cuda}" if torch.version.cuda else "cpu",
                device=str(dev.device), device_name=name, dtype=dev.precision, threads=torch.get_num_threads(),
                world_size=dev.world, python=platform.python_version(), commit=commit)

# -----------------------------------------------------------------------------
# the end of a run under torchrun


def end_distributed():
    """Frees the process group, which joins gloo's worker threads, while Python is alive, not at its exit: a worker
    finishing a collective holds its tensors a moment after it returns, and letting go of a tensor Python has seen
    takes the GIL; a worker that asks for it while the interpreter shuts down is killed inside a C++ destructor
    ('terminate called without an active exception', SIGABRT)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def check_ranks_in_sync(model, dev):
    """Every rank must hold the same weights at the end: DDP averages gradients, nothing else syncs them."""
    flat = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    spread = [flat.clone() for _ in range(dev.world)]
    torch.distributed.all_gather(spread, flat)
    max_dev = max((s - flat).abs().max().item() for s in spread)
    if dev.rank == 0:
        print(f"ranks in sync: max parameter difference {max_dev:.3g}")
    end_distributed()  # the last collective: rank 0's final evaluation runs without the group
    if max_dev > 0:
        raise RunError(f"ranks diverged (max parameter difference {max_dev}); this is a bug, please report it")
