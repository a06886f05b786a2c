"""Two gloo processes on the CPU must compute what one process computes on the whole batch."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from contrastive import distributed
from contrastive.losses import nt_xent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_process_gradient(x1, x2, weight):
    w = weight.clone().requires_grad_(True)
    nt_xent(x1 @ w, x2 @ w, temperature=0.5).backward()
    return w.grad


def _rank_main(rank, world, port, x1, x2, weight, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        w = weight.clone().requires_grad_(True)
        shard = slice(rank * len(x1) // world, (rank + 1) * len(x1) // world)
        z1 = distributed.gather_with_grad(x1[shard] @ w)
        z2 = distributed.gather_with_grad(x2[shard] @ w)
        loss = nt_xent(z1, z2, temperature=0.5)
        loss.backward()
        # DistributedDataParallel averages gradients over ranks; do the same by hand.
        grad = w.grad.clone()
        dist.all_reduce(grad)
        out[rank] = grad / world
        out[world + rank] = loss.detach().expand_as(grad)
    finally:
        distributed.cleanup()


@pytest.mark.slow
def test_simclr_loss_gathered_over_two_ranks_matches_one_process():
    gen = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(8, 6, generator=gen), torch.randn(8, 6, generator=gen)
    weight = torch.randn(6, 4, generator=gen)
    out = torch.zeros(4, 6, 4).share_memory_()
    mp.spawn(_rank_main, args=(2, _free_port(), x1, x2, weight, out), nprocs=2, join=True)
    expected = _one_process_gradient(x1, x2, weight)
    full_loss = nt_xent(x1 @ weight, x2 @ weight, temperature=0.5)
    assert torch.allclose(out[0], expected, atol=1e-6) and torch.allclose(out[1], expected, atol=1e-6)
    assert torch.allclose(out[2], full_loss.expand(6, 4)) and torch.allclose(out[3], full_loss.expand(6, 4))


def test_helpers_are_the_identity_without_a_process_group():
    x = torch.randn(3, 2)
    assert distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.gather_with_grad(x) is x
    assert distributed.setup() is None  # not launched by torchrun


@pytest.mark.slow
def test_torchrun_with_two_gloo_ranks_trains_and_only_rank_zero_writes(tmp_path):
    """The training loop's DDP branch end to end: two CPU processes share each global batch."""
    import json
    import os
    import subprocess
    import sys

    from contrastive.data import CIFAR10_FOLDER, data_root

    if not (data_root() / CIFAR10_FOLDER).is_dir():
        pytest.skip("CIFAR-10 is not in $CONTRASTIVE_DATA")
    out = tmp_path / "ddp"
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={port}",
        "-m",
        "contrastive",
        "train",
        "--method",
        "simclr",
        "--profile",
        "smoke",
        "--epochs",
        "1",
        "--no-linear",
        "--out",
        str(out),
    ]
    env = {**os.environ, "CONTRASTIVE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 1
    assert 0 < summary["knn_top1"] <= 1
    assert done.stdout.count("epoch 1/1") == 1  # one rank reports, not both
