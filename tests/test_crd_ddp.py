"""CRD's memory banks under data parallelism: every rank ends each step with the same banks, equal to
one process updating them with the global batch (2 gloo processes on CPU)."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kd_lightning.losses import create_loss

N, K, B = 32, 5, 6  # bank size, negatives, samples per rank


def _crd():
    torch.manual_seed(0)  # the same embeddings and banks on every rank, as DDP's initial broadcast makes them
    crd = create_loss(
        "crd", {"student_shape": (6,), "teacher_shape": (5,), "num_samples": N}, feat_dim=4, nce_k=K
    )
    # fixed negatives per sample, so that one process and two ranks score the same pairs (and agree on Z)
    crd.draw_negatives = lambda idx: (idx.view(-1, 1) + torch.arange(1, K + 1)) % N
    return crd.train()


def _batch():
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(2 * B, 6, generator=g),
        torch.randn(2 * B, 5, generator=g),
        torch.randperm(N, generator=g)[: 2 * B],
    )


def _state(crd) -> dict:
    return {k: v.clone() for k, v in crd.state_dict().items() if k in ("memory_s", "memory_t", "z_s", "z_t")}


def _rank(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    crd = _crd()
    s, t, index = _batch()
    part = slice(rank * B, (rank + 1) * B)
    for _ in range(2):  # two steps: the second one reads banks the first one updated
        crd(s[part], t[part], index=index[part])
    torch.save(_state(crd), Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_crd_banks_are_identical_on_every_rank_and_equal_to_one_process(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    one = _crd()
    s, t, index = _batch()
    before = _state(one)
    for _ in range(2):
        one(s, t, index=index)
    single = _state(one)
    for key in single:
        torch.testing.assert_close(
            ranks[0][key], ranks[1][key], rtol=0, atol=0, msg=f"{key} differs between ranks"
        )
        torch.testing.assert_close(ranks[0][key], single[key], msg=f"{key} differs from one process")
    changed = (single["memory_s"] != before["memory_s"]).any(1)
    assert changed.sum() == 2 * B and changed[index].all()  # both ranks' samples were written
