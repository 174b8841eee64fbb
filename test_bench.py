"""Tests of bench.py: it times the three variants of the very step train.py runs, and refuses bad options."""

import pytest

import bench
import cli
import train
from conftest import TINY, assert_clean_error, run_in_process


def parse(argv):
    return cli.parse_args(argv, bench.BenchConfig, "", train.PRESETS)


def test_bench_prints_three_rows_with_ratios_to_mae(capsys):
    res = bench.bench(parse([*TINY, "--bench-steps", "1", "--bench-repeats", "1"]))
    assert list(res) == ["MAE", "MetaMAE 1st-order", "MetaMAE 2nd-order"]
    assert res["MAE"]["ratio"] == 1.0 and all(r["ms_per_step"] > 0 and r["peak_mb"] > 0 for r in res.values())
    out = capsys.readouterr().out
    assert "ms/step" in out and "MetaMAE 2nd-order" in out
    bench.main([*TINY, "--bench-steps", "1", "--bench-repeats", "1", "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert "bfloat16" in out and out.count("MetaMAE") == 2
    with pytest.raises(cli.UsageError, match="--bench-steps"):  # the bench's options are its own
        cli.parse_args(["--bench-steps", "1"], train.Config, "", train.PRESETS)


@pytest.mark.parametrize("args", [["--bench-steps", "0"], ["--bench-repeats", "0"]])
def test_bad_bench_options_exit_2(args):
    assert_clean_error(run_in_process(bench.main, *TINY, *args), 2, "--bench-steps and --bench-repeats must be positive")


def test_bench_help_lists_what_shapes_a_step_and_it_says_where_it_is():
    code, out, _ = run_in_process(bench.main, "--help")
    flags = [line.split()[0] for line in out.splitlines() if line.startswith("  --")]
    assert code == 0 and "--bench-steps" in flags and "--batch-size" in flags and len(flags) < 25
    assert "--probe-epochs" not in flags and "--resume" not in flags
    code, out, _ = run_in_process(bench.main, *TINY, "--bench-steps", "1", "--bench-repeats", "2")
    assert code == 0 and ["warming up", "repeat 1 of 2", "repeat 2 of 2"] == [
        line[len("bench: "):-len(" ...")] for line in out.splitlines() if line.endswith(" ...")]
