"""The command line, run as a user would run it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONTRACT_KEYS

from contrastive.data import CIFAR10_FOLDER, data_root


def run_cli(*args, env=None, timeout=600):
    full_env = {**os.environ, "CONTRASTIVE_PROGRESS": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "contrastive", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


needs_cifar = pytest.mark.skipif(
    not (data_root() / CIFAR10_FOLDER).is_dir(), reason="CIFAR-10 is not in $CONTRASTIVE_DATA"
)


@needs_cifar
@pytest.mark.slow
def test_train_writes_summary_and_metrics_and_resume_completes_a_longer_run(tmp_path):
    out = tmp_path / "run"
    done = run_cli("train", "--method", "simclr", "--profile", "smoke", "--epochs", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert CONTRACT_KEYS <= set(summary)
    assert summary["method"] == "simclr" and summary["profile"] == "smoke" and summary["epochs"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    again = run_cli(
        "train", "--method", "simclr", "--profile", "smoke", "--epochs", "2", "--out", str(out), "--resume"
    )
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    evaluated = run_cli("eval", "--out", str(out), "--no-linear")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert (
        result["epoch"] == 2
        and result["knn_top1"] == json.loads((out / "summary.json").read_text())["knn_top1"]
    )


def test_unknown_method_lists_the_valid_ones():
    done = run_cli("train", "--method", "simclrr", "--profile", "smoke")
    assert done.returncode == 2 and "simclr" in done.stderr and "invalid choice" in done.stderr


def test_unknown_profile_in_the_environment_is_a_clear_error(tmp_path):
    done = run_cli(
        "train", "--method", "simclr", "--out", str(tmp_path), env={"CONTRASTIVE_PROFILE": "laptop"}
    )
    assert done.returncode == 2
    assert "unknown profile 'laptop'" in done.stderr and "smoke, cpu, gpu" in done.stderr
    assert "Traceback" not in done.stderr


def test_resume_without_a_checkpoint_says_so(tmp_path):
    done = run_cli(
        "train", "--method", "simclr", "--profile", "smoke", "--out", str(tmp_path / "none"), "--resume"
    )
    assert done.returncode == 2 and "nothing to resume" in done.stderr


def test_missing_data_without_network_names_the_folder_and_the_variable(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    # An unroutable proxy makes the download fail fast, as on a machine without network.
    env = {
        "CONTRASTIVE_DATA": str(empty),
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    done = run_cli("train", "--method", "simclr", "--profile", "smoke", env=env, timeout=120)
    assert done.returncode == 2
    assert str(Path(empty) / CIFAR10_FOLDER) in done.stderr and "CONTRASTIVE_DATA" in done.stderr
    assert "cifar-10-python.tar.gz" in done.stderr


def test_bench_augment_prints_a_table(tmp_path):
    pytest.importorskip("contrastive.bench")
    from contrastive.bench import bench_augment, format_table

    table = format_table(bench_augment(batch_sizes=(8,), seconds=0.05))
    assert "batched" in table and "per_image_loop" in table
