"""VQ codebook state stays identical across DDP ranks (2 CPU processes, gloo) with EMA, restarts and k-means."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS = 6


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_vq(rank: int) -> tuple[dict, int]:
    """A few training steps on rank-specific data; returns the state dict and the number of restarts seen."""
    from tokenizers.vq import VQ

    torch.manual_seed(0)  # identical initial codebook on every rank (DDP would broadcast it)
    q = VQ(4, 32, ema=True, decay=0.8, dead_code_threshold=2.0, kmeans_init=True).train()
    torch.manual_seed(1000 + rank)  # rank-specific sampling RNG, as in a real multi-process run
    g = torch.Generator().manual_seed(100 + rank)
    dead_counts = []
    restart = q._restart_dead_codes

    def counting_restart(flat):
        dead_counts.append(int((q.cluster_size < q.dead_code_threshold).sum()))  # before the restart
        restart(flat)

    q._restart_dead_codes = counting_restart
    for _ in range(STEPS):
        q(torch.randn(4, 4, 4, 4, generator=g) * (rank + 1) + rank)  # different data per rank
    return {k: v.clone() for k, v in q.state_dict().items()}, sum(dead_counts)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import tokenizers.vq as vq_module

        synced, restarts = _train_vq(rank)
        real = vq_module.ddp_active
        vq_module.ddp_active = lambda: False  # the same run with every collective switched off
        try:
            unsynced, _ = _train_vq(rank)
        finally:
            vq_module.ddp_active = real
        torch.save({"synced": synced, "unsynced": unsynced, "restarts": restarts}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_vq_codebooks_identical_across_ranks(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["restarts"] > 0  # dead-code restarts really happened during the synced run
    for key in ("embed", "embed_avg", "cluster_size", "initted"):
        assert torch.equal(r0["synced"][key], r1["synced"][key]), key
    assert bool(r0["synced"]["initted"])
    # without synchronisation the ranks drift apart, so the check above can fail
    assert not torch.allclose(r0["unsynced"]["embed"], r1["unsynced"]["embed"])
    assert not torch.equal(r0["unsynced"]["cluster_size"], r1["unsynced"]["cluster_size"])
