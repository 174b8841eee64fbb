"""Tests of bench.py: it times the three variants of the very step train.py runs, and refuses bad options."""

import pytest

import bench
import cli
import train
from conftest import TINY, assert_clean_error, run_in_process


def parse(argv):
    return cli.parse_args(argv, bench.BenchConfig, "", train.PRESETS)


def test_bench_times_train_py_s_step_of_each_variant_and_prints_what_it_returns(capsys, monkeypatch):
    seen = []  # (variant's config, steps) of every call of the training step the bench times

    def recording(model, opt, x, cfg, autocast):
        seen.append((model.cfg.inner_steps, model.cfg.contrast_weight, model.cfg.first_order))
        return step(model, opt, x, cfg, autocast)
    step = train.train_step
    monkeypatch.setattr(train, "train_step", recording)
    res = bench.bench(parse([*TINY, "--bench-steps", "2", "--bench-repeats", "2"]))
    assert list(res) == ["MAE", "MetaMAE 1st-order", "MetaMAE 2nd-order"]
    # each variant: 5 warm-up steps, then 2 repeats of 2 timed steps, through train.train_step, interleaved
    assert [seen.count(v) for v in [(0, 0.0, False), (1, 0.1, True), (1, 0.1, False)]] == [9, 9, 9]
    assert seen[:15] == [(0, 0.0, False)] * 5 + [(1, 0.1, True)] * 5 + [(1, 0.1, False)] * 5
    # the ratios are the times' ratios to MAE's, the rates the batch's over the time, and the table prints them
    mae = res["MAE"]["ms_per_step"]
    out = capsys.readouterr().out
    for name, r in res.items():
        assert r["ratio"] == pytest.approx(r["ms_per_step"] / mae) and 0 < r["ms_per_step"] < float("inf")
        assert r["samples_per_s"] == pytest.approx(8 * 1000 / r["ms_per_step"]) and r["peak_mb"] > 0
        row = next(line for line in out.splitlines() if line.startswith(name)).split()[-5:]
        assert [float(v) for v in row] == pytest.approx([round(r["ms_per_step"], 1), round(r["samples_per_s"]),
                                                         round(r["ratio"], 2), round(r["ms_per_step"] * 1e5 / 6e4, 1),
                                                         round(r["peak_mb"])], abs=0.51)
    monkeypatch.setattr(train, "train_step", step)
    bench.main([*TINY, "--bench-steps", "1", "--bench-repeats", "1", "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert "bfloat16" in out and out.count("MetaMAE") == 2
    # (the bench's options are its own: train.py refuses them, test_train.py's row '--bench-steps 1')


BENCH_CASES = [  # bench.py's options beyond TINY; exit code; words of the one line
    pytest.param(["--bench-steps", "0"], 2, ["--bench-steps and --bench-repeats must be positive"], id="no-steps"),
    pytest.param(["--bench-repeats", "0"], 2, ["--bench-steps and --bench-repeats must be positive"], id="no-repeats"),
]


@pytest.mark.parametrize("args,code,words", BENCH_CASES)
def test_what_no_bench_may_do(args, code, words):
    assert_clean_error(run_in_process(bench.main, *TINY, *args), code, *words)


def test_bench_help_lists_what_shapes_a_step_and_it_says_where_it_is():
    code, out, _ = run_in_process(bench.main, "--help")
    flags = [line.split()[0] for line in out.splitlines() if line.startswith("  --")]
    assert code == 0 and "--bench-steps" in flags and "--batch-size" in flags and len(flags) < 25
    assert "--probe-epochs" not in flags and "--resume" not in flags
    code, out, _ = run_in_process(bench.main, *TINY, "--bench-steps", "1", "--bench-repeats", "2")
    assert code == 0 and ["warming up", "repeat 1 of 2", "repeat 2 of 2"] == [
        line[len("bench: "):-len(" ...")] for line in out.splitlines() if line.endswith(" ...")]


def test_bench_times_a_learned_step_size_against_plain_mae(monkeypatch):
    """--learn-inner-lr: both MetaMAE variants learn their step size, MAE has none to learn (it has no step)."""
    seen = []

    def recording(model, opt, x, cfg, autocast):
        seen.append((model.cfg.inner_steps, model.cfg.learn_inner_lr, hasattr(model, "log_inner_lr")))
        return step(model, opt, x, cfg, autocast)
    step = train.train_step
    monkeypatch.setattr(train, "train_step", recording)
    res = bench.bench(parse([*TINY, "--learn-inner-lr", "--bench-steps", "1", "--bench-repeats", "1"]))
    assert list(res) == ["MAE", "MetaMAE 1st-order", "MetaMAE 2nd-order"]
    assert sorted(set(seen)) == [(0, False, False), (1, True, True)] and all(r["ms_per_step"] > 0 for r in res.values())
