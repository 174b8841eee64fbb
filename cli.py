"""
What the three commands (train.py, probe.py, bench.py) share, in one place: a dataclass of knobs read as
--flags, the device and precision a command runs on, and what a user sees of an expected error: one line and
an exit code (2: a bad option, before any work; 1: bad data, or a run that cannot go on; 130: interrupted).
Last, train.py's run folder: held by one run at a time, its log kept whole across a kill and a resume.
"""

import argparse
import contextlib
import fcntl
import functools
import json
import os
import signal
import sys
import tempfile
from dataclasses import field, fields
from pathlib import Path

import torch

import data


def knob(default, help):
    """A field of a config dataclass that the command line sets as --name (the help is shown by --help)."""
    return field(default=default, metadata={"help": help})


class UsageError(Exception):
    """A bad option or combination: one line, exit code 2."""


class RunError(Exception):
    """A run that cannot go on (missing or incompatible checkpoint, non-finite loss): one line, exit code 1."""


class Interrupted(Exception):
    """Ctrl-C, with what is left on disk: exit code 130."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print its whole usage block; one line says it
        raise UsageError(f"{message} (see --help)")


def boolean(text):
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"invalid bool value: {text!r}")
    return text.lower() in ("true", "1", "yes")


def parse_args(argv, config_class, doc, presets=None, shown=None):
    """`--key value` / `--key=value` overrides of the config's fields; `--flag` alone sets a bool. Knobs not
    given take the preset's value (with `presets`: a --preset knob names one), then the field's default.
    shown: the fields --help lists (None: all); the others are accepted all the same."""
    def dashed(arg):  # --max_steps as --max-steps: nanoGPT's users type underscores
        key, eq, value = arg.partition("=")
        return key.replace("_", "-") + eq + value if arg.startswith("--") else arg
    parser = ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                            allow_abbrev=False, argument_default=argparse.SUPPRESS)
    for f in fields(config_class):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        help += "" if "default" in help else f" (default: {f.default!r})"
        help = help if shown is None or f.name in shown else argparse.SUPPRESS
        if f.type is bool:
            parser.add_argument(flag, type=boolean, nargs="?", const=True, help=help, metavar="BOOL")
        else:
            parser.add_argument(flag, type=f.type, help=help, metavar=f.type.__name__.upper())
    given = vars(parser.parse_args([dashed(a) for a in argv]))
    for key in given:  # the shell leaves --data-dir=~/x as it is
        if key.endswith("_dir") or key == "ckpt":
            given[key] = os.path.expanduser(given[key])
    preset = given.get("preset", "paper")
    if presets is not None and preset not in presets:
        raise UsageError(f"unknown --preset {preset!r}; choose one of {', '.join(presets)}")
    return config_class(**{**(presets or {}).get(preset, {}), **given})


def writable_dir(path):
    """The folder a command writes to, made and proven writable before any work, so that it cannot die at
    its first save."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path) as f:  # written, not only made: a full disk makes empty files
            f.write(bytes(1 << 16))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UsageError(f"--out-dir {path} is not a writable folder ({e.strerror or data.one_line(e)}); "
                         "choose another") from None
    return path


def device_and_precision(cfg):
    """The device of cfg.device ('auto': CUDA if there is one) with cfg.threads, and autocast(): a context that
    opens the run's precision (bf16 autocast on CUDA by default, fp32 on CPU)."""
    name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if name.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and name.startswith("cuda"))
    return torch.device(name), functools.partial(torch.autocast, name.split(":")[0], dtype=torch.bfloat16,
                                                 enabled=bf16)


def setup_distributed(cfg, device):
    """Under torchrun: (device of this rank, rank, world size), the process group joined; else (device, 0, 1)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return device, 0, 1
    if cfg.cuda_graph:
        raise UsageError("--cuda-graph needs one CUDA device and no torchrun; drop it with several GPUs")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


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


def precision(autocast):
    return "bfloat16" if autocast.keywords["enabled"] else "float32"


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


PRESET_HINT = "on a CPU, --preset cpu trains a small model in about 20 minutes"


def cost_hint(preset, seconds_per_step, steps_left):
    """One line, after the first steps: what the rest of the run will take at the rate measured."""
    left = seconds_per_step * steps_left
    when = f"{left / 86400:.1f} days" if left > 2 * 86400 else f"{left / 3600:.1f} hours" if left > 2 * 3600 else \
        f"{left / 60:.0f} minutes"
    hint = f"; {PRESET_HINT}" if preset == "paper" else ""
    return (f"{1000 * seconds_per_step:.0f} ms per step on this CPU: the {steps_left:,} steps left take about "
            f"{when}{hint}")


@contextlib.contextmanager
def one_line_errors():
    """What a user sees of an expected error: one line, and exit code 2 (usage), 1 (data, run) or 130 (Ctrl-C).
    A scheduler's SIGTERM and a closed terminal's SIGHUP take Ctrl-C's way out: the run says where it stopped
    and what it kept."""
    before = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
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
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError, and so is the CPU's
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in str(e):
            raise
        print(f"error: out of memory ({data.one_line(e)[:200]}): lower --batch-size, or the model's width or depth",
              file=sys.stderr)
        sys.exit(1)
    finally:  # a caller in the same process (a test) gets its handlers back
        for sig, handler in before.items():
            signal.signal(sig, handler)

# -----------------------------------------------------------------------------
# train.py's run folder: one run's alone, its log whole


def claim_out_dir(cfg, rank):
    """The run folder, made and proven writable before any work, and this run's alone: a lock that the system
    releases when the process ends, however it ends (kill -9 too), so no dead run can leave it stuck. A new run
    never replaces another run's checkpoint unless told to; --overwrite removes the old run's checkpoint and
    log at once. Returns the folder and the lock's open file, to be kept open while the run lasts."""
    out_dir = writable_dir(cfg.out_dir or f"runs/{cfg.domain}")
    if rank:  # under torchrun only rank 0 writes
        return out_dir, None
    lock = open(out_dir / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise UsageError(f"{out_dir} is in use by a running {lock.read().strip() or 'process'}: wait for it to end, "
                         "or choose another --out-dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"train.py (pid {os.getpid()})")
    lock.flush()
    ckpt = out_dir / "ckpt.pt"
    if not cfg.resume and not cfg.overwrite and ckpt.exists():
        raise UsageError(f"{ckpt} exists: continue that run with --resume, choose another --out-dir, "
                         "or start over with --overwrite")
    if cfg.overwrite:  # now, not at the first save: an early Ctrl-C must not leave old weights beside a new log
        ckpt.unlink(missing_ok=True)
        (out_dir / "log.jsonl").unlink(missing_ok=True)
    for stale in out_dir.glob(".ckpt.pt.*.part"):  # a save cut short by a kill: never a checkpoint
        stale.unlink(missing_ok=True)
    return out_dir, lock


def log_until(path, step):
    """A resumed run's log keeps the records up to its checkpoint's step: those after it were written by a run
    that died before saving them, and the resumed run writes them again."""
    keep = []
    for line in open(path) if path.exists() else []:
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            pass
    with data.atomic_file(path) as tmp:
        tmp.write_text("".join(keep))
