"""
What the three commands (train.py, probe.py, bench.py) share, in one place: a dataclass of knobs read as
--flags, the device and precision a command runs on, and what a user sees of an expected error: one line and
an exit code (2: a bad option, before any work; 1: bad data, or a run that cannot go on; 130: interrupted).
"""

import argparse
import contextlib
import functools
import os
import signal
import sys
from dataclasses import field, fields
from pathlib import Path
import tempfile

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


def parse_args(argv, config_class, doc, presets=None):
    """`--key value` / `--key=value` overrides of the config's fields; `--flag` alone sets a bool. Knobs not
    given take the preset's value (with `presets`: a --preset knob names one), then the field's default."""
    def dashed(arg):  # --max_steps as --max-steps: nanoGPT's users type underscores
        key, eq, value = arg.partition("=")
        return key.replace("_", "-") + eq + value if arg.startswith("--") else arg
    parser = ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                            allow_abbrev=False, argument_default=argparse.SUPPRESS)
    for f in fields(config_class):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        help += "" if "default" in help else f" (default: {f.default!r})"
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


def precision(autocast):
    return "bfloat16" if autocast.keywords["enabled"] else "float32"


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def one_line_errors():
    """What a user sees of an expected error: one line, and exit code 2 (usage), 1 (data, run) or 130 (Ctrl-C).
    A scheduler's SIGTERM and a closed terminal's SIGHUP take Ctrl-C's way out: the run says where it stopped
    and what it kept."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
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
    except (MemoryError, torch.OutOfMemoryError) as e:  # PyTorch's CPU allocator raises a RuntimeError of its own
        print(f"error: out of memory ({data.one_line(e)[:200]}): lower --batch-size, or the model's width or depth",
              file=sys.stderr)
        sys.exit(1)
    except RuntimeError as e:
        if "can't allocate memory" not in str(e):
            raise
        print(f"error: out of memory ({data.one_line(e)[:200]}): lower --batch-size, or the model's width or depth",
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
