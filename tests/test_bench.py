"""The step benchmark: a timing helper that ignores warm-up and keeps the median window, rows that follow
one schema, every method measurable. No assertion here depends on how fast this machine is."""

import json
import math

import pytest
import torch

from contrastive.__main__ import main
from contrastive.bench import (
    STEP_FIELDS,
    bench_all,
    bench_step,
    check_step_row,
    format_step_table,
    time_steps,
)

CPU = torch.device("cpu")


def _fake_timer(durations):
    """A step that advances a fake clock by the next duration, and the clock itself."""
    state = {"now": 0.0, "calls": 0}

    def step():
        state["now"] += durations[state["calls"]]
        state["calls"] += 1

    return step, (lambda: state["now"]), state


def test_warm_up_steps_are_run_but_not_timed_and_the_median_window_is_kept():
    # 2 warm-up steps of 100 s, then 3 windows of 2 steps: 1+1 s, 2+2 s, 10+10 s (a disturbed window)
    step, clock, state = _fake_timer([100, 100, 1, 1, 2, 2, 10, 10])
    timing = time_steps(step, 64, CPU, warmup=2, windows=3, steps_per_window=2, clock=clock)
    assert state["calls"] == 8
    assert timing["window_images_per_second"] == [128 / 2, 128 / 4, 128 / 20]
    assert timing["images_per_second"] == 128 / 4  # the median, unmoved by the slow warm-up or window
    assert (timing["warmup_steps"], timing["steps_per_window"]) == (2, 2)


def test_an_even_number_of_windows_takes_the_mean_of_the_middle_two():
    step, clock, _ = _fake_timer([1, 2, 4, 8])
    timing = time_steps(step, 8, CPU, warmup=0, windows=4, steps_per_window=1, clock=clock)
    assert timing["images_per_second"] == pytest.approx((8 / 2 + 8 / 4) / 2)


@pytest.mark.parametrize("bad", [dict(warmup=-1), dict(windows=0), dict(steps_per_window=0)])
def test_impossible_timing_settings_are_refused(bad):
    with pytest.raises(ValueError, match="need warmup >= 0"):
        time_steps(lambda: None, 8, CPU, **{"warmup": 0, "windows": 1, "steps_per_window": 1, **bad})


QUICK = dict(warmup=1, windows=2, steps_per_window=1)


@pytest.mark.parametrize("method", ["simclr", "instdisc", "clip"])  # plain, per-image state, labels
def test_a_step_row_follows_the_schema(method):
    row = check_step_row(bench_step(method, "smoke", batch_size=16, **QUICK))
    assert tuple(row) == STEP_FIELDS
    assert (row["method"], row["profile"], row["batch_size"]) == (method, "smoke", 16)
    assert len(row["window_images_per_second"]) == 2 and row["steps_per_window"] == 1
    assert row["peak_memory_kind"] == "process_max_rss" and row["peak_memory_bytes"] > 0
    json.dumps(row)  # JSON-serialisable as written by --json
    assert method in format_step_table([row])


def test_rows_missing_a_field_or_with_an_impossible_rate_are_refused():
    row = bench_step("simclr", "smoke", batch_size=8, **QUICK)
    with pytest.raises(ValueError, match="lacks"):
        check_step_row({k: v for k, v in row.items() if k != "peak_memory_bytes"})
    with pytest.raises(ValueError, match="non-positive"):
        check_step_row({**row, "images_per_second": 0.0})
    with pytest.raises(ValueError, match="non-positive"):
        check_step_row({**row, "window_images_per_second": [1.0, -math.inf]})
    with pytest.raises(ValueError, match="peak_memory_kind"):
        check_step_row({**row, "peak_memory_kind": "guess"})


def test_bench_all_measures_each_method_in_its_own_process():
    rows = bench_all(["simclr", "byol"], profile="smoke", batch_size=8, **QUICK)
    assert [r["method"] for r in rows] == ["simclr", "byol"]
    assert all(check_step_row(r) for r in rows)


def test_the_command_line_writes_the_rows_as_json(tmp_path, capsys):
    out = tmp_path / "step.json"
    argv = [
        "bench",
        "step",
        "--method",
        "byol",
        "--profile",
        "smoke",
        "--batch-size",
        "8",
        "--warmup",
        "1",
        "--windows",
        "2",
        "--steps-per-window",
        "1",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and check_step_row(rows[0])["method"] == "byol"
    assert "byol" in capsys.readouterr().out


def test_bench_step_without_a_method_or_with_an_unknown_option_is_a_one_line_error(capsys):
    assert main(["bench", "step", "--profile", "smoke"]) == 2
    assert "bench step needs --method NAME" in capsys.readouterr().err
    with pytest.raises(ValueError, match="has no option"):
        bench_step("simclr", "smoke", options={"nonsense": 1}, **QUICK)
