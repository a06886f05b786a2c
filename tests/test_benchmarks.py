"""The scripts under benchmarks/ and the records the benchmark chapter reads (no timing assertions)."""

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sympy as sp

from contrastive.bench import amdahl_speedup, check_step_row, load_records
from contrastive.data import CIFAR10_FOLDER, data_root
from contrastive.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


def _side_by_side():
    path = ROOT / "benchmarks" / "lightly_side_by_side.py"
    spec = importlib.util.spec_from_file_location("lightly_side_by_side", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


side = _side_by_side()


def _env(**extra):
    return {**os.environ, "CONTRASTIVE_PROGRESS": "0", "PYTHON": sys.executable, **extra}


# ---- the GPU script -----------------------------------------------------------------------------


needs_cifar = pytest.mark.skipif(
    not (data_root() / CIFAR10_FOLDER).is_dir(), reason="CIFAR-10 is not in $CONTRASTIVE_DATA"
)
GPU_SCRIPT = str(ROOT / "benchmarks" / "gpu_reference.sh")


@needs_cifar
def test_the_gpu_script_runs_end_to_end_in_its_smoke_mode(tmp_path):
    env = _env(GPU_REFERENCE_PROFILE="smoke", OUT_DIR=str(tmp_path))
    done = subprocess.run(["bash", GPU_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_step_smoke.json").read_text())
    assert [r["method"] for r in rows] == ["simclr", "byol"]
    for row in rows:
        check_step_row(row)
        assert row["profile"] == "smoke" and row["compiled"] is False
    (compiled,) = json.loads((tmp_path / "bench_step_smoke_simclr_compiled.json").read_text())
    assert check_step_row(compiled)["compiled"] is False  # torch.compile is for CUDA: off on the CPU
    augment = json.loads((tmp_path / "bench_augment_smoke.json").read_text())
    assert {r["pipeline"] for r in augment} >= {"batched", "per_image_loop"}
    assert all(r["batch_size"] == 64 and r["images_per_second"] > 0 for r in augment)
    run = tmp_path / "simclr_smoke_short"
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["method"], summary["profile"], summary["epochs"]) == ("simclr", "smoke", 2)
    assert "linear_top1" not in summary or summary["linear_top1"] is None
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert not list(run.glob("checkpoint_*.pt"))  # weights are not part of the record
    assert "SimCLR epoch 1 (with compilation)" in done.stdout


def test_the_gpu_script_refuses_to_measure_without_a_gpu(tmp_path):
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    if subprocess.run([sys.executable, "-c", probe]).returncode == 0:
        pytest.skip("a CUDA device is visible")
    env = _env(OUT_DIR=str(tmp_path / "out"))
    done = subprocess.run(["bash", GPU_SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert "no CUDA device" in done.stderr
    assert not list((tmp_path / "out").glob("*.json"))


# ---- the lightly side-by-side ---------------------------------------------------------------------


def test_the_side_by_side_says_what_it_needs_where_lightly_is_missing():
    if not side.missing_dependencies():
        pytest.skip("lightly and torchvision are installed here")
    script = str(ROOT / "benchmarks" / "lightly_side_by_side.py")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, env=_env(), timeout=120)
    assert done.returncode == 2
    assert "needs" in done.stderr and "lightly" in done.stderr and "environment of their own" in done.stderr


SIDE_RECORDS = sorted(RESULTS.glob("lightly_side_by_side_cpu*.json"))


def _record(path=RESULTS / "lightly_side_by_side_cpu.json"):
    return json.loads(Path(path).read_text())


def test_the_side_by_side_was_run_with_three_seeds_on_one_machine():
    records = [_record(p) for p in SIDE_RECORDS]
    assert sorted(r["seed"] for r in records) == [0, 1, 2]
    assert len({(r["device"], r["torch"], r["lightly"], r["steps"]) for r in records}) == 1


@pytest.mark.parametrize("path", SIDE_RECORDS, ids=lambda p: p.stem)
def test_the_committed_side_by_side_record_is_consistent(path):
    record = side.check_record(_record(path))
    rows = {r["pipeline"]: r for r in record["rows"]}
    assert record["steps"] == rows["contrastive"]["steps"] == rows["lightly"]["steps"]
    assert record["steps"] == record["train_images"] // record["batch_size"] * record["epochs"]
    # the same seed and draw: both started from one encoder
    assert rows["contrastive"]["knn_top1_random_init"] == rows["lightly"]["knn_top1_random_init"]
    for row in rows.values():
        assert row["knn_by_epoch"][-1] == [record["epochs"], row["knn_top1"]]
    assert record["loss_gap"] < 1e-4  # nt_xent and lightly's NTXentLoss: one objective
    assert str(rows["lightly"]["num_workers"]) in rows["lightly"]["worker_probe"]
    assert "AMD EPYC" in record["device"] or "Intel" in record["device"]
    assert side.format_record(record).count("\n") == 4


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda r: r.pop("speedup"), "lacks"),
        (lambda r: r.update(speedup=r["speedup"] * 1.1), "ratio"),
        (lambda r: r.update(knn_difference=r["knn_difference"] + 0.01), "difference"),
        (lambda r: r["rows"].pop(), "one contrastive and one lightly"),
        (lambda r: r["rows"][0].update(knn_top1=1.5), "outside"),
        (lambda r: r["rows"][1].update(images_per_second=0.0), "non-positive"),
        (lambda r: r["rows"][1].pop("knn_by_epoch"), "lacks"),
    ],
)
def test_a_tampered_side_by_side_record_is_refused(tamper, message):
    record = copy.deepcopy(_record())
    tamper(record)
    with pytest.raises((ValueError, ZeroDivisionError), match=message):
        side.check_record(record)


# ---- the chapter's records ----------------------------------------------------------------------


def test_every_method_has_a_reference_run_and_a_throughput_row():
    rows = load_records(RESULTS)
    assert [r["method"] for r in rows] == sorted(METHODS)
    devices = {r["bench_device"] for r in rows}
    assert len(devices) == 1  # images/s and memory: every method on one machine
    for r in rows:
        scale = getattr(METHODS[r["method"]], "epoch_scale", 1.0)  # a costlier step gets fewer epochs
        assert r["epochs"] == max(2, round(10 * scale)), r["method"]
        assert 0 < r["knn_top1_random_init"] < r["knn_top1"] <= 1, r["method"]
        assert r["images_per_second"] > 0 and r["peak_memory_bytes"] > 0 and r["train_seconds"] < r["seconds"]
        assert r["linear_top1"] is None or 0 < r["linear_top1"] <= 1


def test_a_missing_record_is_named_with_the_command_that_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="bench all --profile cpu"):
        load_records(tmp_path)
    (tmp_path / "bench_step_cpu.json").write_text((RESULTS / "bench_step_cpu.json").read_text())
    with pytest.raises(FileNotFoundError, match="train --method byol --profile cpu"):
        load_records(tmp_path, methods=["byol"])


# ---- Amdahl's law, as the chapter states it -------------------------------------------------------


def test_amdahls_law():
    f, s = sp.symbols("f s", positive=True)
    speedup = 1 / ((1 - f) + f / s)
    assert sp.simplify(speedup.subs(s, 1)) == 1  # nothing faster, nothing gained
    assert sp.simplify(speedup.subs(f, 0)) == 1 and sp.simplify(speedup.subs(f, 1) - s) == 0
    assert sp.simplify(sp.limit(speedup, s, sp.oo) - 1 / (1 - f)) == 0  # the ceiling
    # the gain grows with s for any 0 < f < 1: d/ds = f / (s^2 ((1 - f) + f/s)^2) > 0
    assert sp.simplify(sp.diff(speedup, s) - f / (s**2 * ((1 - f) + f / s) ** 2)) == 0
    for fv, sv in ((0.5, 20.0), (0.9, 3.0), (0.0, 7.0), (1.0, 7.0)):
        assert abs(amdahl_speedup(fv, sv) - float(speedup.subs({f: fv, s: sv}))) < 1e-12
    with pytest.raises(ValueError, match="fraction"):
        amdahl_speedup(1.5, 2.0)
    with pytest.raises(ValueError, match="factor"):
        amdahl_speedup(0.5, 0.0)


# ---- the records of extra seeds and sweeps -------------------------------------------------------

RECORDS_SCRIPT = str(ROOT / "scripts" / "cpu_records.py")


@pytest.mark.slow
@needs_cifar
def test_the_records_script_trains_seeds_and_sweep_points_once_each(tmp_path):
    results = tmp_path / "results"
    common = ["--profile", "smoke", "--results", str(results), "--jobs", "2"]
    sweep = [sys.executable, RECORDS_SCRIPT, "sweep", "--method", "simclr", "--set", "lr=0.1,0.3"]
    sweep += ["--set", "option.temperature=0.5", "--epochs", "1", *common]
    done = subprocess.run(sweep, capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("kNN") == 2 and "[2/2]" in done.stdout  # one progress line per run
    rows = [json.loads(line) for line in (results / "sweeps" / "simclr_smoke.jsonl").read_text().splitlines()]
    assert sorted(r["settings"]["lr"] for r in rows) == [0.1, 0.3]
    assert all(r["settings"]["option.temperature"] == 0.5 and r["epochs"] == 1 for r in rows)
    assert all(r["knn_gain"] == pytest.approx(r["knn_top1"] - r["knn_top1_random_init"]) for r in rows)
    again = subprocess.run(sweep, capture_output=True, text=True, env=_env(), timeout=600)
    assert again.stdout.count("skipped") == 2 and len(rows) == 2  # nothing trained twice

    seeds = [sys.executable, RECORDS_SCRIPT, "seeds", "--runs", "simsiam_nosg", "--seeds", "1", *common]
    done = subprocess.run(seeds, capture_output=True, text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads((results / "simsiam_nosg_smoke_seed1" / "summary.json").read_text())
    assert (summary["seed"], summary["method"], summary["method_options"]) == (
        1,
        "simsiam",
        {"stop_gradient": False},
    )
    assert not list((results / "simsiam_nosg_smoke_seed1").glob("checkpoint_*.pt"))


def test_the_records_script_refuses_an_unknown_run_or_setting(tmp_path):
    for args, said in (
        (["seeds", "--runs", "simclrr"], "unknown runs"),
        (["sweep", "--method", "simclr", "--set", "momentum=0.9"], "cannot sweep"),
        (["sweep", "--method", "simclr", "--set", "lr"], "NAME=V1,V2"),
    ):
        done = subprocess.run(
            [sys.executable, RECORDS_SCRIPT, *args, "--results", str(tmp_path)],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=120,
        )
        assert done.returncode != 0 and said in done.stderr, (args, done.stderr)


def test_the_records_of_a_run_are_read_by_seed_and_a_missing_or_doubled_one_is_named(tmp_path):
    from contrastive.bench import mean_and_spread, run_records

    for name, seed in (("byol_cpu", 0), ("byol_cpu_seed2", 2), ("byol_cpu_seed1", 1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(
            json.dumps({"seed": seed, "knn_top1": 0.4 + seed / 100})
        )
    assert [s["seed"] for s in run_records(tmp_path, "byol")] == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match="cpu_records.py seeds --runs simsiam"):
        run_records(tmp_path, "simsiam")
    (tmp_path / "byol_cpu_seed3").mkdir()
    (tmp_path / "byol_cpu_seed3" / "summary.json").write_text(json.dumps({"seed": 1}))
    with pytest.raises(ValueError, match="same seed"):
        run_records(tmp_path, "byol")
    mean, spread = mean_and_spread([0.40, 0.41, 0.42])
    assert abs(mean - 0.41) < 1e-12 and abs(spread - 0.02) < 1e-12


def test_the_method_table_averages_the_seeds_and_refuses_seeds_of_another_recipe(tmp_path):
    import shutil

    (tmp_path / "bench_step_cpu.json").write_text((RESULTS / "bench_step_cpu.json").read_text())
    shutil.copytree(RESULTS / "simclr_cpu", tmp_path / "simclr_cpu")
    seed0 = json.loads((RESULTS / "simclr_cpu" / "summary.json").read_text())
    other = dict(seed0, seed=1, knn_top1=seed0["knn_top1"] + 0.02)
    (tmp_path / "simclr_cpu_seed1").mkdir()
    (tmp_path / "simclr_cpu_seed1" / "summary.json").write_text(json.dumps(other))
    (row,) = load_records(tmp_path, methods=["simclr"])
    assert row["seeds"] == 2 and abs(row["knn_top1"] - (seed0["knn_top1"] + 0.01)) < 1e-12
    assert abs(row["knn_top1_spread"] - 0.02) < 1e-12
    # control: a seed trained at another batch size is not averaged in
    (tmp_path / "simclr_cpu_seed1" / "summary.json").write_text(json.dumps(dict(other, batch_size=128)))
    with pytest.raises(ValueError, match="another batch_size"):
        load_records(tmp_path, methods=["simclr"])
