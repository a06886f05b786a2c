"""MoCo across two gloo processes: the shared shuffle, one queue for all ranks, DDP's gradient.

Both ranks run every check in one spawn (starting the processes costs more than
the checks) and save what they computed; each test reads its part.
"""

import datetime
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from contrastive import distributed
from contrastive.methods import build_method

WORLD, LOCAL_BATCH, QUEUE = 2, 4, 32
# Float32 ranks against one float32 process over the same 8 images. Only reduction orders differ (BN over
# a group in place of a slice, convolutions over 4 images in place of 8): measured gaps are 0 for the loss
# and keys and about 2e-10 for gradients of size 1e-4; BN over the whole batch moves them by about 1e-4.
RTOL, ATOL = 1e-5, 1e-9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(**options):
    torch.manual_seed(0)  # every process builds the same weights and the same initial queue
    return build_method("moco", "convnet_tiny", 0, queue_size=QUEUE, **options)


def _inputs():
    gen = torch.Generator().manual_seed(1)
    n = WORLD * LOCAL_BATCH
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randn(n, 3, 32, 32, generator=gen)


def _flat_grad(model):
    return torch.cat([p.grad.flatten() for p in model._query_parameters()])


def _rank_main(rank, port, out_dir):
    torch.set_num_threads(1)  # two processes share the CPU
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        x_q, x_k = _inputs()
        out = {}

        # (a) The shuffle: rows tagged by their global index; the ranks seed differently on purpose,
        # so only the broadcast makes them agree on one permutation.
        tags = torch.arange(WORLD * LOCAL_BATCH, dtype=torch.float32)[:, None].expand(-1, 3)[mine]
        torch.manual_seed(11 + rank)
        shuffled, unshuffle = distributed.batch_shuffle(tags)
        out["shuffled"] = shuffled[:, 0].clone()
        out["restored"] = distributed.batch_unshuffle(shuffled, unshuffle)
        out["tags"] = tags

        # (b) One step with shuffled BN: the queue is the same on both ranks and holds all ranks' keys.
        model = _model(bn_splits=2)
        torch.manual_seed(7)  # rank 0's draw is the permutation; keys() and contrast() draw the same one
        keys = model.keys(x_k[mine])
        torch.manual_seed(7)
        model.contrast(x_q[mine], x_k[mine])
        out["queue"], out["queue_ptr"] = model.queue.clone(), model.queue_ptr.clone()
        out["gathered_keys"] = distributed.concat_all_gather(keys)

        # (c) Without the shuffle, one BN group per rank: the step must be one process's step over the
        # concatenated batch with bn_splits=2. Gradients averaged over ranks, as DistributedDataParallel does.
        model = _model(bn_splits=1, shuffle_bn=False)
        loss = model.contrast(x_q[mine], x_k[mine])
        loss.backward()
        grad = _flat_grad(model)
        dist.all_reduce(grad)
        out["loss"], out["grad"] = loss.detach(), grad / WORLD
        torch.save(out, out_dir / f"rank{rank}.pt")
    finally:
        distributed.cleanup()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of two gloo ranks computed; the processes are killed if they take over a minute."""
    out_dir = tmp_path_factory.mktemp("moco_ddp")
    context = mp.spawn(_rank_main, args=(_free_port(), out_dir), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two ranks did not finish within 60 s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.slow
def test_batch_shuffle_partitions_the_global_batch_and_unshuffle_restores_each_rank(ranks):
    every = torch.cat([r["shuffled"] for r in ranks])
    assert sorted(every.tolist()) == list(range(WORLD * LOCAL_BATCH))  # one permutation, shared by the ranks
    for rank, r in enumerate(ranks):
        assert torch.equal(r["restored"], r["tags"])
        own = set(range(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH))
        assert set(r["shuffled"].tolist()) - own  # this permutation moves samples between the ranks


@pytest.mark.slow
def test_after_one_step_the_queue_is_the_same_on_both_ranks_and_holds_both_ranks_keys(ranks):
    first, second = ranks
    assert torch.equal(first["queue"], second["queue"])
    assert first["queue_ptr"].item() == second["queue_ptr"].item() == WORLD * LOCAL_BATCH
    n = WORLD * LOCAL_BATCH
    assert torch.equal(first["queue"][:n], first["gathered_keys"])
    assert torch.equal(first["queue"][n:], _model().queue[n:])  # the rest is the untouched initial queue
    # One process with BN over four groups of two sees the same groups when it draws the same permutation:
    # rank r's shuffled slice is groups 2r and 2r + 1. So the cross-rank keys are the one-process keys.
    _, x_k = _inputs()
    model = _model(bn_splits=4)
    torch.manual_seed(7)
    alone = model.keys(x_k)
    assert torch.allclose(first["gathered_keys"], alone, rtol=RTOL, atol=ATOL)
    torch.manual_seed(7)
    perm = torch.randperm(n)
    with torch.no_grad():
        in_order = F.normalize(model.key_encoder(x_k[perm]), dim=1)
    assert not torch.allclose(first["gathered_keys"], in_order, atol=1e-3)  # the rows were un-permuted


@pytest.mark.slow
def test_two_ranks_without_shuffle_give_one_process_loss_and_gradient_on_the_whole_batch(ranks):
    x_q, x_k = _inputs()
    alone = _model(bn_splits=2, shuffle_bn=False)
    loss = alone.contrast(x_q, x_k)
    loss.backward()
    # Keys and queue are constants and the query BN groups are the ranks' halves, so the one-process loss
    # (mean over 8 queries) is the mean of the ranks' losses (means over 4), and its gradient is the
    # mean of the ranks' gradients: DDP's average, with no further scaling.
    ranks_mean = sum(r["loss"] for r in ranks) / WORLD
    assert torch.allclose(ranks_mean, loss.detach(), rtol=RTOL, atol=ATOL)
    assert not torch.allclose(ranks[0]["loss"], ranks[1]["loss"], rtol=1e-3)  # the halves do differ
    expected = _flat_grad(alone)
    for r in ranks:
        assert torch.allclose(r["grad"], expected, rtol=RTOL, atol=ATOL)
    assert not torch.allclose(ranks[0]["grad"] * WORLD, expected, rtol=1e-3)  # summing is twice too large
    whole = _model(bn_splits=1, shuffle_bn=False)  # one BN group over all 8: not what two ranks compute
    whole.contrast(x_q, x_k).backward()
    assert not torch.allclose(ranks[0]["grad"], _flat_grad(whole), rtol=RTOL, atol=ATOL)
