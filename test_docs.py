"""The commands in README.md and docs/ run as written: each python command of their bash blocks is parsed
and checked by the script it names, as a run would before any work (nothing is trained or downloaded)."""

import re
import shlex
from pathlib import Path

import pytest
import torch

import bench
import cli
import probe
import train

HERE = Path(__file__).resolve().parent
PAGES = [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]


def commands(page):
    """(line, script, argv) of every python/torchrun command in the page's bash blocks, with the block's shell
    variables expanded (a loop variable takes its first value)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        env = {}
        for part in (p for line in block.splitlines() for p in line.split(" #")[0].split(";")):
            line = re.sub(r"^(do|done)\b", "", part.strip()).strip()
            if m := re.fullmatch(r'(\w+)="(.*)"', line):
                env[m[1]] = re.sub(r"\$(\w+)", lambda v: env.get(v[1], v[0]), m[2])
            elif re.fullmatch(r"(\w+=\S*\s*)+", line):  # d=splice S=1700 ...: several plain assignments
                env.update(w.split("=", 1) for w in line.split())
            elif m := re.fullmatch(r"for (\w+) in (\S+).*", line):
                env[m[1]] = m[2]
                continue
            words = shlex.split(re.sub(r"\$\{?(\w+)\}?", lambda v: env.get(v[1], v[0]), line)) if line else []
            script = next((w for w in words if w.endswith((".py",))), None)
            if script in ("train.py", "probe.py", "bench.py"):
                out.append((line, script, words[words.index(script) + 1:]))
    return out


ALL = [(page.name, *c) for page in PAGES for c in commands(page)]


def test_the_pages_have_commands():
    assert len([c for c in ALL if c[0] == "README.md"]) >= 8 and {c[0] for c in ALL} >= {"ablation.md", "domains.md"}


@pytest.mark.parametrize("page,line,script,argv", ALL, ids=[f"{c[0]}:{c[1][:60]}" for c in ALL])
def test_every_command_parses_and_passes_its_checks(page, line, script, argv):
    if not torch.cuda.is_available() and ("cuda" in argv or "--cuda-graph" in argv):
        pytest.skip("a GPU command, on a machine without one")
    if "--help" in argv:
        with pytest.raises(SystemExit, match="0"):
            cli.parse_args(argv, train.Config, "", train.PRESETS)
    elif script == "train.py":
        train.check(cli.parse_args(argv, train.Config, "", train.PRESETS))
    elif script == "probe.py":
        probe.check(cli.parse_args(argv, probe.Config, ""))
    else:
        train.check(cli.parse_args(argv, bench.BenchConfig, "", train.PRESETS))
