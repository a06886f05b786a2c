"""Faults the training survives: a killed process, damaged checkpoints, non-finite steps, a failed rank.

Each fault is injected for real (SIGKILL, cut or random files, a patched step, a rank that raises
or stalls). A survivable fault must resume to exactly what an uninterrupted run reaches; any other
must stop with an error that says where it happened and which checkpoint is intact.
"""

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import contrastive.methods.simclr as simclr_module
from contrastive.__main__ import main
from contrastive.data import CIFAR10_FOLDER
from contrastive.methods.simclr import SimCLR
from contrastive.train import NonFiniteLossError, evaluate_checkpoint, load_checkpoint, train

QUIET = dict(progress=False, linear_probe=False)


def _parameters(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _without_timing(metrics):
    return [{k: v for k, v in m.items() if k not in ("seconds", "images_per_second")} for m in metrics]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs) -> None:
    """Kill whatever is still running, so a failing test never leaves processes behind."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


# ---- SIGKILL mid-epoch, then resume -----------------------------------------------------


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory) -> Path:
    """A CIFAR-10 folder in the python-pickle layout: random images, 1,000 train and 500 test, balanced."""
    root = tmp_path_factory.mktemp("data")
    folder = root / CIFAR10_FOLDER
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 200) for i in range(1, 6)] + [("test_batch", 500)]:
        batch = {
            "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            "labels": [int(c) for c in rng.permutation(np.arange(n) % 10)],
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return root


def _train_cmd(method, out, *extra):
    return [
        sys.executable,
        "-m",
        "contrastive",
        "train",
        "--method",
        method,
        "--profile",
        "smoke",
        "--epochs",
        "3",
        "--no-linear",
        "--out",
        str(out),
        *extra,
    ]


def _wait_for_epoch_one(proc, metrics: Path, timeout: float) -> dict:
    """Epoch 1's metrics row, once written: checkpoint_0001.pt is then on disk and epoch 2 has begun."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists():  # written atomically after the checkpoint: never seen half-written
            return json.loads(metrics.read_text().splitlines()[0])
        assert proc.poll() is None, f"the run exited with {proc.returncode} before finishing epoch 1"
        time.sleep(0.01)
    raise AssertionError(f"epoch 1 did not finish within {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_a_run_killed_mid_epoch_resumes_to_the_weights_and_metrics_of_an_uninterrupted_run(
    method, fake_cifar, tmp_path
):
    env = {
        **os.environ,
        "CONTRASTIVE_DATA": str(fake_cifar),
        "CONTRASTIVE_PROGRESS": "0",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",  # the log shows how far the run got before the kill
    }
    killed = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(_train_cmd(method, killed), env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            first = _wait_for_epoch_one(proc, killed / "metrics.jsonl", timeout=300)
            time.sleep(0.3 * first["seconds"])  # about a third into epoch 2's steps
            assert not (killed / "checkpoint_0002.pt").exists()
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            _stop([proc])
    said = (tmp_path / "killed.log").read_text()
    assert "epoch 1/3" in said and "epoch 2/3" not in said, said  # killed before epoch 2's last step
    assert sorted(p.name for p in killed.glob("checkpoint_*.pt")) == ["checkpoint_0001.pt"]

    resumed = subprocess.run(
        _train_cmd(method, killed, "--resume"), env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {killed / 'checkpoint_0001.pt'} (epoch 1 of 3)" in resumed.stdout
    full = subprocess.run(
        _train_cmd(method, tmp_path / "full"), env=env, capture_output=True, text=True, timeout=600
    )
    assert full.returncode == 0, full.stderr[-3000:]

    a = torch.load(killed / "checkpoint_0003.pt", weights_only=True)
    b = torch.load(tmp_path / "full" / "checkpoint_0003.pt", weights_only=True)
    if method == "moco":  # the state a resume must restore beyond the trained weights
        assert {"queue", "queue_ptr"} <= a["model"].keys()
        assert any(k.startswith("key_encoder.") for k in a["model"])
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["step"] == b["step"] == 30
    assert _without_timing(a["metrics"]) == _without_timing(b["metrics"])
    rows = [
        [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        for d in (killed, tmp_path / "full")
    ]
    assert [r["epoch"] for r in rows[0]] == [1, 2, 3]
    assert _without_timing(rows[0]) == _without_timing(rows[1])
    summaries = [json.loads((d / "summary.json").read_text()) for d in (killed, tmp_path / "full")]
    assert summaries[0]["knn_top1"] == summaries[1]["knn_top1"]


# ---- damaged checkpoints ------------------------------------------------------------------


def _damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncated":  # cut in half, as by a crash during a write that is not atomic
        path.write_bytes(raw[: len(raw) // 2])
    else:  # same size, random content, as by a bad disk or a wrong file copied over it
        path.write_bytes(np.random.default_rng(0).bytes(len(raw)))


@pytest.mark.parametrize("how", ["truncated", "random-bytes"])
def test_a_damaged_latest_checkpoint_is_named_and_resume_and_eval_fall_back_to_the_previous_one(
    tmp_path, tiny_data, tiny_profile, how
):
    first = train("simclr", tiny_profile, out_dir=tmp_path, data=tiny_data, log=lambda *_: None, **QUIET)
    latest = tmp_path / "checkpoint_0002.pt"
    _damage(latest, how)

    with pytest.warns(UserWarning, match=r"checkpoint_0002\.pt is unreadable"):
        result = evaluate_checkpoint(tmp_path, data=tiny_data, linear_probe=False)
    assert result["checkpoint"] == str(tmp_path / "checkpoint_0001.pt") and result["epoch"] == 1
    assert result["knn_top1"] == first.metrics[0]["knn_top1"]  # epoch 1's encoder, evaluated again

    said = []
    with pytest.warns(UserWarning, match=r"checkpoint_0002\.pt is unreadable"):
        resumed = train(
            "simclr", tiny_profile, out_dir=tmp_path, data=tiny_data, resume=True, log=said.append, **QUIET
        )
    assert f"resumed from {tmp_path / 'checkpoint_0001.pt'} (epoch 1 of 2)" in said
    assert _same_weights(first.method.state_dict(), resumed.method.state_dict())  # epoch 2 redone exactly
    assert _without_timing(first.metrics) == _without_timing(resumed.metrics)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the damaged file has been replaced by a readable one
        ckpt, path = load_checkpoint(tmp_path, "cpu")
    assert path == latest and ckpt["epoch"] == 2


def test_when_every_checkpoint_is_damaged_resume_and_eval_refuse_naming_each_file(
    tmp_path, tiny_data, tiny_profile, capsys
):
    train("simclr", tiny_profile, out_dir=tmp_path, data=tiny_data, log=lambda *_: None, **QUIET)
    _damage(tmp_path / "checkpoint_0001.pt", "random-bytes")
    _damage(tmp_path / "checkpoint_0002.pt", "truncated")
    with pytest.warns(UserWarning, match="unreadable"), pytest.raises(ValueError) as err:
        train(
            "simclr",
            tiny_profile,
            out_dir=tmp_path,
            data=tiny_data,
            resume=True,
            log=lambda *_: None,
            **QUIET,
        )
    assert "every checkpoint" in str(err.value)
    assert "checkpoint_0001.pt" in str(err.value) and "checkpoint_0002.pt" in str(err.value)
    with pytest.warns(UserWarning, match="unreadable"):
        assert main(["eval", "--out", str(tmp_path), "--no-linear"]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: every checkpoint") and "Traceback" not in stderr


class _RunsAShellCommand:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, tiny_data, tiny_profile):
    train("simclr", tiny_profile, out_dir=tmp_path, data=tiny_data, epochs=1, log=lambda *_: None, **QUIET)
    marker, planted = tmp_path / "MARKER", tmp_path / "checkpoint_0009.pt"
    torch.save({"model": _RunsAShellCommand(marker), "epoch": 9}, planted)
    torch.load(planted, weights_only=False)  # the payload is live: an unrestricted load runs it
    assert marker.exists()
    marker.unlink()
    with pytest.warns(UserWarning, match=r"checkpoint_0009\.pt is unreadable"):
        ckpt, path = load_checkpoint(tmp_path, "cpu")
    assert path.name == "checkpoint_0001.pt" and ckpt["epoch"] == 1
    assert not marker.exists()


# ---- non-finite steps ---------------------------------------------------------------------


REAL_FORWARD = SimCLR.forward


def _times_inf(self, images, indices):
    return REAL_FORWARD(self, images, indices) * float("inf")


def _times_minus_inf(self, images, indices):
    return REAL_FORWARD(self, images, indices) * float("-inf")


def _nan_projections(self, images, indices):
    """The real step, with three rows of each view's projections replaced by NaN before the loss."""

    def nan_rows(z):
        z = z.clone()
        z[:3] = float("nan")
        return z

    real_gather = simclr_module.gather_with_grad
    simclr_module.gather_with_grad = nan_rows
    try:
        return REAL_FORWARD(self, images, indices)
    finally:
        simclr_module.gather_with_grad = real_gather


@pytest.mark.parametrize(
    "fault, message",
    [
        (_times_inf, r"loss became inf at epoch 2, step 2 \(global step 6\)"),
        (_times_minus_inf, r"loss became -inf at epoch 2, step 2 \(global step 6\)"),
        (
            _nan_projections,
            r"non-finite input \(z1 \(50, 128\) has 384 non-finite .*\) at epoch 2, step 2 "
            r"\(global step 6\)",
        ),
    ],
    ids=["inf", "minus-inf", "nan-projections"],
)
def test_a_non_finite_step_stops_with_the_step_named_no_update_and_the_checkpoint_untouched(
    tmp_path, tiny_data, tiny_profile, monkeypatch, fault, message
):
    seen = {}

    def faulty(self, images, indices=None):
        seen["calls"] = seen.get("calls", 0) + 1
        if seen["calls"] != 6:  # 4 steps per epoch: the second step of epoch 2
            return REAL_FORWARD(self, images, indices)
        seen["model"], seen["weights"] = self, _parameters(self)
        seen["checkpoint"] = (tmp_path / "checkpoint_0001.pt").read_bytes()
        return fault(self, images, indices)

    monkeypatch.setattr(SimCLR, "forward", faulty)
    with pytest.raises(NonFiniteLossError, match=message) as err:
        train("simclr", tiny_profile, out_dir=tmp_path, data=tiny_data, log=lambda *_: None, **QUIET)
    assert "checkpoint_0001.pt is intact" in str(err.value)
    assert _same_weights(seen["weights"], _parameters(seen["model"]))  # the bad step updated no weight
    assert (tmp_path / "checkpoint_0001.pt").read_bytes() == seen["checkpoint"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pt")) == ["checkpoint_0001.pt"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1

    monkeypatch.setattr(SimCLR, "forward", REAL_FORWARD)
    resumed = train(
        "simclr", tiny_profile, out_dir=tmp_path, data=tiny_data, resume=True, log=lambda *_: None, **QUIET
    )
    assert [m["epoch"] for m in resumed.metrics] == [1, 2]
    assert all(torch.isfinite(v).all() for v in resumed.method.state_dict().values() if v.is_floating_point())


# ---- a rank that fails --------------------------------------------------------------------

COLLECTIVE_WORKER = """
import sys, time
import torch
import torch.distributed as dist
from contrastive import distributed

distributed.setup(timeout_s=float(sys.argv[2]))
x = torch.ones(4)
dist.all_reduce(x)
print("first collective done", flush=True)
if distributed.rank() == 1:
    if sys.argv[1] == "raise":
        raise RuntimeError("rank 1 fails before the second collective")
    time.sleep(600)  # alive, but never joins the second collective
dist.all_reduce(x)
print("second collective done", flush=True)
"""

TRAIN_WORKER = """
import sys
import torch
from contrastive import distributed
from contrastive.data import ImageDataset
from contrastive.methods.simclr import SimCLR
from contrastive.profiles import get_profile
from contrastive.train import train

out, fail_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume"
distributed.setup(timeout_s=10)
data = ImageDataset(*torch.load(sys.argv[4]), classes=[f"c{i}" for i in range(10)], name="tiny",
                    source="synthetic")
if distributed.rank() == 1 and fail_at:
    real, calls = SimCLR.forward, []

    def failing(self, images, indices=None):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError(f"rank 1 fails in its step {fail_at}")
        return real(self, images, indices)

    SimCLR.forward = failing
profile = get_profile("smoke", train_size=None, test_size=None, batch_size=50, epochs=2, eval_batch_size=100)
train("simclr", profile, out_dir=out, data=data, resume=resume, progress=False, linear_probe=False)
distributed.cleanup()
"""


def _launch_two_ranks(tmp_path, script: str, *args, timeout: float = 120, grace: float = 30):
    """Run `script` as ranks 0 and 1 of a gloo group; (returncode, stdout, stderr, seconds) per rank.

    Rank 0 gets `timeout` seconds and rank 1 `grace` more after it; whatever still runs then is
    killed, so the test cannot hang.
    """
    path = tmp_path / "worker.py"
    path.write_text(script)
    port, procs, started = _free_port(), [], time.monotonic()
    try:
        for rank in range(2):
            env = {
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
                "CONTRASTIVE_PROGRESS": "0",
            }
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(path), *map(str, args)],
                    env=env,
                    text=True,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )
        results = []
        for rank, proc in enumerate(procs):
            left = max(1.0, timeout - (time.monotonic() - started)) if rank == 0 else grace
            try:
                out, err = proc.communicate(timeout=left)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            results.append((proc.returncode, out, err, time.monotonic() - started))
        return results
    finally:
        _stop(procs)


@pytest.mark.slow
def test_when_rank_one_raises_before_a_collective_rank_zero_exits_with_an_error_instead_of_hanging(tmp_path):
    (rc0, out0, err0, seconds0), (rc1, _, err1, _) = _launch_two_ranks(
        tmp_path, COLLECTIVE_WORKER, "raise", 5
    )
    assert rc1 == 1 and "rank 1 fails before the second collective" in err1
    assert "first collective done" in out0 and "second collective done" not in out0
    assert rc0 not in (0, None, -signal.SIGKILL) and "RuntimeError" in err0, err0[-2000:]
    assert seconds0 < 60


@pytest.mark.slow
def test_when_rank_one_stalls_rank_zero_times_out_after_the_setup_timeout(tmp_path):
    (rc0, out0, err0, seconds0), (rc1, _, _, _) = _launch_two_ranks(
        tmp_path, COLLECTIVE_WORKER, "stall", 5, timeout=90, grace=0.5
    )
    assert "first collective done" in out0 and "second collective done" not in out0
    assert rc0 not in (0, None, -signal.SIGKILL), err0[-2000:]
    assert "5000ms" in err0, err0[-2000:]  # the timeout given to distributed.setup, not a default
    assert 5 <= seconds0 < 60
    assert rc1 == -signal.SIGKILL  # the stalled rank had to be killed: it would have waited forever


@pytest.mark.slow
def test_a_rank_failing_mid_training_stops_rank_zero_and_a_resume_matches_an_uninterrupted_run(
    tmp_path, tiny_data
):
    data = tmp_path / "data.pt"
    torch.save(
        [tiny_data.train_images, tiny_data.train_labels, tiny_data.test_images, tiny_data.test_labels], data
    )
    failed = tmp_path / "failed"
    # 4 steps of 50 images (25 per rank) per epoch: rank 1's 6th step is the second of epoch 2.
    (rc0, out0, err0, seconds0), (rc1, _, err1, _) = _launch_two_ranks(
        tmp_path, TRAIN_WORKER, failed, 6, "new", data
    )
    assert rc1 == 1 and "rank 1 fails in its step 6" in err1
    assert rc0 not in (0, None, -signal.SIGKILL) and "RuntimeError" in err0, err0[-2000:]
    assert seconds0 < 120
    assert "epoch 1/2" in out0 and "epoch 2/2" not in out0
    assert sorted(p.name for p in failed.glob("checkpoint_*.pt")) == ["checkpoint_0001.pt"]

    results = _launch_two_ranks(tmp_path, TRAIN_WORKER, failed, 0, "resume", data)
    assert [r[0] for r in results] == [0, 0], results[0][2][-2000:]
    assert f"resumed from {failed / 'checkpoint_0001.pt'} (epoch 1 of 2)" in results[0][1]
    results = _launch_two_ranks(tmp_path, TRAIN_WORKER, tmp_path / "full", 0, "new", data)
    assert [r[0] for r in results] == [0, 0], results[0][2][-2000:]
    a = torch.load(failed / "checkpoint_0002.pt", weights_only=True)
    b = torch.load(tmp_path / "full" / "checkpoint_0002.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert _without_timing(a["metrics"]) == _without_timing(b["metrics"])
