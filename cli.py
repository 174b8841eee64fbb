"""
What the three commands (train.py, probe.py, bench.py) share, in one place: a dataclass of knobs read as
--flags and listed by --help under headings, and what a user sees of an expected error: one line and an exit
code (2: a bad option, before any work; 1: bad data, or a run that cannot go on; 130: interrupted). Then the
checkpoints train.py writes, as train.py --resume and probe.py --ckpt read them; last, train.py's run folder: held
by one run at a time, its log kept whole across a kill and a resume.
"""

import argparse
import contextlib
import fcntl
import json
import os
import pickle
import re
import signal
import sys
import tempfile
from dataclasses import field, fields
from pathlib import Path

import torch

import data
from metamae import MetaMAEConfig


GROUPS = ("start here", "model", "optimizer", "probe", "system")  # --help's headings, in this order


def knob(default, help, group="system"):
    """A field of a config dataclass that the command line sets as --name, listed by --help under its group."""
    return field(default=default, metadata={"help": help, "group": group})


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


def parse_args(argv, config_class, doc, presets=None, shown=None, inherit=None):
    """`--key value` / `--key=value` overrides of the config's fields; `--flag` alone sets a bool. Knobs not
    given take the values inherit(given) returns (a checkpoint's: the run that --resume continues or probe.py
    --ckpt reads), then the preset's (with `presets`: a --preset knob names one), then the field's default; --help
    shows the defaults of the preset on the command line (or of the default one). shown: the fields --help lists
    (None: all); the others are accepted all the same."""
    def dashed(arg):  # --max_steps as --max-steps: nanoGPT's users type underscores
        key, eq, value = arg.partition("=")
        return key.replace("_", "-") + eq + value if arg.startswith("--") else arg
    argv = [dashed(a) for a in argv]
    defaults = {f.name: f.default for f in fields(config_class)}
    preset = next((v for a, v in zip(argv, argv[1:] + [""]) if a == "--preset"), None) or next(
        (a.split("=", 1)[1] for a in argv if a.startswith("--preset=")), defaults.get("preset"))
    by_preset = (presets or {}).get(preset, {})
    parser = ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                            allow_abbrev=False, argument_default=argparse.SUPPRESS, usage="%(prog)s [--knob value ...]")
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for f in fields(config_class):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if "default" not in help:
            value = by_preset.get(f.name, f.default)
            help += f" (default: {value!r}{f', from --preset {preset}' if f.name in by_preset else ''})"
        help = help if shown is None or f.name in shown else argparse.SUPPRESS
        group = groups[f.metadata["group"]]
        if f.type is bool:
            group.add_argument(flag, type=boolean, nargs="?", const=True, help=help, metavar="BOOL")
        else:
            group.add_argument(flag, type=f.type, help=help, metavar=f.type.__name__.upper())
    given = vars(parser.parse_args(argv))
    for key in given:  # the shell leaves --data-dir=~/x as it is
        if key.endswith("_dir") or key == "ckpt":
            given[key] = os.path.expanduser(given[key])
    base = inherit(given, defaults) if inherit else {}
    preset = given.get("preset", base.get("preset", defaults.get("preset")))
    if presets is not None and preset not in presets:
        raise UsageError(f"unknown --preset {preset!r}; choose one of {', '.join(presets)}")
    return config_class(**{**(presets or {}).get(preset, {}), **base, **given})


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


@contextlib.contextmanager
def made_folder(path):
    """writable_dir(path) for the block; if the block fails, the folders made for it are removed again when it
    left them empty: a command that did no work leaves nothing behind (a typo in --data-dir, a missing --ckpt)."""
    path = Path(path)
    made = [p for p in (path, *path.parents) if not os.path.lexists(p)]  # the deepest first
    writable_dir(path)
    try:
        yield path
    except BaseException:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # it holds something: it stays, and so do the folders above it
                break
        raise


def refuse_folders(out_dir, names):
    """A run's own files must be files: a folder in the place of one would fail at its first write, after the work."""
    for name in names:
        if (out_dir / name).is_dir():
            raise UsageError(f"{out_dir / name} is a folder, where the run keeps a file: move it away, or choose "
                             "another --out-dir")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


PRESET_HINT = "on a CPU, --preset cpu trains a small model in about 20 minutes"


def cost_hint(preset, seconds_per_step, steps_left, threads):
    """One line, after the first steps: what the rest of the run will take at the rate measured, and with how many
    threads. PyTorch's threads wait on each other when other work holds the cores: on a 2-core machine kept busy by
    other runs, a step took 20,886 ms with the default threads and about 1,100 ms with --threads 1."""
    left = seconds_per_step * steps_left
    when = f"{left / 86400:.1f} days" if left > 2 * 86400 else f"{left / 3600:.1f} hours" if left > 2 * 3600 else \
        f"{left / 60:.0f} minutes"
    busy = "; if other work shares this CPU, --threads 1 can be several times faster" if threads > 1 else ""
    hint = f"; {PRESET_HINT}" if preset == "paper" else ""
    return (f"{1000 * seconds_per_step:.0f} ms per step on this CPU with {threads} thread{'s' * (threads > 1)}: the "
            f"{steps_left:,} steps left take about {when}{busy}{hint}")


INERT_SHIFT, INERT_GAP = 1e-3, 1e-3  # below both, the inner step does nothing measurable (docs/ablation.md)


def inert_note(rec):
    """A line when a logged step's inner step moves Z by less than INERT_SHIFT of its norm and changes the query
    loss by less than INERT_GAP of it, as at the paper's inner_lr on most samples measured (docs/ablation.md: the
    gap stayed below 0.5% everywhere, the shift went up to 1.3e-2 where the loss was large)."""
    if "shift" not in rec or not rec["amortized"]:
        return None
    gap = (rec["amortized"] - rec["adapted"]) / rec["amortized"]  # the share of the query loss the step removes
    if rec["shift"] < INERT_SHIFT and abs(gap) < INERT_GAP:
        return (f"the inner step moves Z by {rec['shift']:.1e} of its norm and changes the query loss by "
                f"{100 * gap:.3f}%: at this inner_lr it does nothing measurable (docs/ablation.md)")
    return None


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
# checkpoints, as train.py writes them, read by train.py --resume and probe.py --ckpt: with weights_only, so that
# nothing in one is executed


def load_checkpoint(path, mcfg=None):
    """Returns (state, its MetaMAEConfig); with mcfg, refuses a checkpoint of another model."""
    if not path.is_file():
        raise RunError(f"no checkpoint at {path}; train first, or pass --out-dir / --ckpt of an existing run")
    try:  # weights_only: a checkpoint is data; unpickling anything else could run code
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = MetaMAEConfig(**state["model_config"])  # its lists become the config's tuples
    except Exception as e:
        code = isinstance(e, pickle.UnpicklingError) and re.search(r"GLOBAL ([\w.]+)", str(e))
        if code:  # a pickle that calls a function (os.system, say) as it loads: what weights_only refuses
            raise RunError(f"checkpoint {path} was refused: loading it would run code ({code[1]}), which no checkpoint "
                           "of train.py holds; use one you trust") from None
        raise RunError(f"checkpoint {path} is unreadable or not a checkpoint of this project "
                       f"({data.one_line(e, 160)}); delete it or point --ckpt elsewhere") from None
    if mcfg is not None and saved != mcfg:
        diff = [f for f, v in vars(mcfg).items() if getattr(saved, f) != v]
        raise RunError(f"checkpoint {path} was trained with a different model ({', '.join(diff)}); "
                       "use the same options, or another --out-dir")
    return state, saved


RUN_DEFINING = ("max_steps", "batch_size", "lr", "min_lr", "warmup_steps", "weight_decay", "decay_all", "adam_beta2",
                "grad_clip")  # what --resume must keep: the schedule and the batches follow them


def check_resumable(state, cfg, path):
    """What --resume refuses, each with the way out: a checkpoint of another dataset, of another schedule, at a step
    that is not one of it, the end of a finished run, or one at --stop-step already."""
    saved = state.get("config", {})
    if not isinstance(saved, dict):
        raise RunError(f"checkpoint {path} holds no options of train.py (its config is a {type(saved).__name__}): "
                       "it is damaged; start over with --overwrite")
    trained_on = saved.get("domain", cfg.domain)
    if trained_on != cfg.domain:  # the same input shape does not make the same data
        raise RunError(f"checkpoint {path} was trained on {trained_on}, not {cfg.domain}: resume it with "
                       f"--domain {trained_on}, or probe it on {cfg.domain} with probe.py --ckpt")
    changed = [k for k in RUN_DEFINING if k in saved and saved[k] != getattr(cfg, k)]
    if changed:  # the schedule would restart (lr 1e-5 back to its peak), or the batches change, silently
        raise RunError(f"checkpoint {path} was trained with " + ", ".join(
            f"--{k.replace('_', '-')} {saved[k]} (now {getattr(cfg, k)})" for k in changed) + ": the learning-rate"
            " schedule and the batches follow them, so --resume takes the run's own values: give those, or start"
            " a new run with --overwrite")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= cfg.max_steps:
        raise RunError(f"checkpoint {path} is at step {step!r}, which is not one of its schedule's {cfg.max_steps} "
                       "steps: it is damaged; start over with --overwrite")
    if step == cfg.max_steps:
        raise RunError(f"checkpoint {path} is the end of a finished run (step {cfg.max_steps} of {cfg.max_steps}): "
                       f"probe it with python probe.py --domain {cfg.domain} --ckpt {path}, or train longer in a new "
                       "run")
    if 0 < cfg.stop_step <= step:  # nothing to do: its end would be logged a second time
        raise RunError(f"checkpoint {path} is at step {step} already: --stop-step {cfg.stop_step} leaves nothing to "
                       f"do; give a later one, or none to run to step {cfg.max_steps}")


ADAMW_SETTINGS = ("betas", "eps", "weight_decay", "amsgrad", "maximize", "lr_scale")  # a group's, as this run sets them


def saved_options(path):
    """The options a checkpoint was trained with, {} when there is none to read (train.py and probe.py say why)."""
    try:
        return dict(torch.load(path, map_location="cpu", weights_only=True)["config"])
    except Exception:  # any unreadable or foreign file: load_checkpoint will name what is wrong
        return {}


NOT_INHERITED = ("resume", "overwrite", "stop_step", "out_dir", "device", "threads", "compile", "cuda_graph")


def resumed_options(given, defaults):
    """train.py --resume continues the run as it was started: the options its checkpoint holds are the defaults
    (all but where and how fast it runs, NOT_INHERITED), and one given that would change its numbers (its preset,
    model, schedule, batches, data, seed or precision) is refused, naming the run's value."""
    if not given.get("resume"):
        return {}
    path = Path(given.get("out_dir") or f"runs/{given.get('domain', defaults['domain'])}") / "ckpt.pt"
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in saved_options(path).items()
             if k in defaults and k not in NOT_INHERITED}
    free = ("data_dir", "download", "log_interval", "ckpt_interval", "eval_interval", "probe_domains", "probe_epochs",
            "probe_lrs", "probe_batch_size", "probe_weight_decay", "val_frac")  # a run may change these on the way
    changed = [k for k in given if k in saved and k not in free and given[k] != saved[k]]
    if changed:
        raise UsageError(f"{path} was trained with " + ", ".join(f"--{k.replace('_', '-')} {saved[k]} (given: "
                         f"{given[k]})" for k in changed) + ": --resume continues the run with its own options; drop "
                         f"{'them' if len(changed) > 1 else 'it'}, or start a new run with --overwrite" + (
                         f" (or probe it on {given['domain']} with probe.py --ckpt)" if "domain" in changed else ""))
    return saved


def probed_options(given, defaults):
    """probe.py --ckpt reads the domain and the data folder of the checkpoint's run unless they are given."""
    if not given.get("ckpt") or given.get("baseline") == "raw":
        return {}
    return {k: v for k, v in saved_options(Path(given["ckpt"])).items() if k in ("domain", "data_dir")}


def checkpoint_status(ckpt_path, saved_step):
    """What a run that stops now leaves: the step its checkpoint on disk holds, or none."""
    if saved_step is None:
        return "no checkpoint of this run was written yet"
    return f"the checkpoint of step {saved_step} ({ckpt_path}) is intact: --resume continues from it"


def check_optimizer_state(saved, opt):
    """AdamW's state must be what this run's AdamW would hold: moments of its parameters' shapes, finite (the
    second moment >= 0) and its groups' settings. PyTorch would load a wrong shape and crash (an internal assert,
    then a segfault) at the first step; a NaN or negative moment, or another decay or beta, poisons every later
    one, which would read as a too-large learning rate."""
    params = [p for group in opt.param_groups for p in group["params"]]  # the order of the saved state's ids
    for k, (group, ours) in enumerate(zip(saved["param_groups"], opt.param_groups)):
        for name in ADAMW_SETTINGS:
            if name in ours and (tuple(group.get(name, ())) if name == "betas" else group.get(name)) != ours[name]:
                raise ValueError(f"the optimizer's {name} {group.get(name)!r} in group {k} is not this run's "
                                 f"{ours[name]!r}")
    for i, moments in saved["state"].items():
        if not isinstance(i, int) or not 0 <= i < len(params):
            raise ValueError(f"the optimizer holds the state of parameter {i!r}, but the model has {len(params)}")
        for name in ("exp_avg", "exp_avg_sq", "step"):
            m = moments.get(name) if isinstance(moments, dict) else None
            if not torch.is_tensor(m):
                raise ValueError(f"the optimizer's {name} of parameter {i} is a {type(m).__name__}, not a tensor")
            if name != "step" and m.shape != params[i].shape:
                raise ValueError(f"the optimizer's {name} of parameter {i} has shape {tuple(m.shape)}, the "
                                 f"parameter {tuple(params[i].shape)}")
            if not torch.isfinite(m).all():
                raise ValueError(f"the optimizer's {name} of parameter {i} is not finite")
            if name != "exp_avg" and (m < 0).any():
                raise ValueError(f"the optimizer's {name} of parameter {i} is negative")


def load_weights(model, state, path):
    """The checkpoint's weights into model; a missing, mis-shaped or non-finite weight is one line."""
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise RunError(f"checkpoint {path} does not hold this model's weights ({' '.join(str(e).split())[:300]})") \
            from None
    bad = [k for k, v in state["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise RunError(f"checkpoint {path} holds non-finite weights ({', '.join(bad[:3])}); it cannot be probed or "
                       "resumed: use an earlier checkpoint")

# -----------------------------------------------------------------------------
# train.py's run folder: one run's alone, its log whole


@contextlib.contextmanager
def claim_out_dir(cfg, rank):
    """The run folder, made and proven writable before any work, and this run's alone while the block runs: a lock
    that the system releases when the process ends, however it ends (kill -9 too), so no dead run can leave it
    stuck. A new run never replaces another run's checkpoint unless told to (--overwrite: train.py removes it once
    the new run has its data and its model). A run refused before it wrote anything leaves no folder or lock of
    its own. Yields the folder and the lock's open file."""
    with made_folder(cfg.out_dir or f"runs/{cfg.domain}") as out_dir:
        if rank:  # under torchrun only rank 0 writes
            yield out_dir, None
            return
        refuse_folders(out_dir, (".lock", "ckpt.pt", "log.jsonl"))
        path, new = out_dir / ".lock", not os.path.lexists(out_dir / ".lock")
        try:
            lock = open(path, "a+")
        except OSError as e:
            raise UsageError(f"{path} cannot be opened ({data.one_line(e)}): remove it, or choose another --out-dir") \
                from None
        with lock:
            try:
                take(lock, out_dir, cfg)
                yield out_dir, lock
            except BaseException:  # nothing done: the lock this run made goes, and made_folder removes the folder
                if new and os.listdir(out_dir) == [".lock"] and is_ours(path, lock):
                    path.unlink()
                raise


def take(lock, out_dir, cfg):
    """The run folder's lock taken, or the running train.py named; then what a new run refuses, and what a killed
    one left removed: its temporary files (.ckpt.pt.<random>.part, a picture's, a log's) are never files of a run."""
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
    for stale in out_dir.glob(".*.part"):
        if stale.is_file():
            stale.unlink(missing_ok=True)


def is_ours(path, lock):
    """Whether path is still the lock file this run holds open (not removed, nor replaced by another's)."""
    try:
        st, held = os.stat(path), os.fstat(lock.fileno())
    except OSError:
        return False
    return (st.st_ino, st.st_dev) == (held.st_ino, held.st_dev)


def check_own_folder(out_dir, lock, step, kept):
    """Before a running training writes in its folder: is it still its own? Its .lock removed or replaced, or the
    folder moved and another made in its place: the run stops, and writes nothing into what may be another run's."""
    if lock is not None and not is_ours(out_dir / ".lock", lock):
        raise RunError(f"{out_dir} is no longer this run's folder (its .lock was removed or replaced, or the folder "
                       f"was moved): stopped at step {step} without writing there again; {kept}")


def log_until(path, step):
    """A resumed run's log keeps the records up to its checkpoint's step: those after it were written by a run
    that died before saving them, and the resumed run writes them again. The last line may be one cut short by a
    kill (dropped); any other line that is no record of train.py is refused, not dropped unseen."""
    lines, keep = path.read_bytes().splitlines(keepends=True) if path.exists() else [], []
    for n, line in enumerate(lines, start=1):
        try:
            rec = json.loads(line)
        except ValueError:  # invalid JSON or not UTF-8
            if n == len(lines) and line.startswith(b"{"):  # the line a kill cut short
                continue
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("step", 0), (int, float)):
            raise RunError(f"{path} line {n} is not a record of train.py ({line[:40]!r}): the log is damaged; remove "
                           "that line, or move the log away, and --resume again")
        if rec.get("step", 0) <= step:
            keep.append(line if line.endswith(b"\n") else line + b"\n")
    with data.atomic_file(path) as tmp:
        tmp.write_bytes(b"".join(keep))
