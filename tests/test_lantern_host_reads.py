"""decoding=lantern reads the device back at most about once per target forward (the loop's "done?" check).

On a GPU every implicit device -> host read (``.item()``, ``bool(t)``, ``int(t)``, ``.tolist()``, ``nonzero``, a
bool-mask index) waits for the queue to drain, and the eager step is launch-bound: a handful of reads per iteration
costs more than the forward. CPU proxy: the Tensor methods that read values on the host are wrapped with counters
during one call, plus the host -> device uploads of Python data (``torch.tensor`` / ``torch.as_tensor``, a
synchronous copy on CUDA).
"""
from __future__ import annotations

import collections
import contextlib
import traceback

import pytest
import torch

from decoding import lantern
from decoding.lantern import lantern_verifier, speculative_generate
from decoding.sampling import SamplingConfig
from tests.test_lantern import toy

READS = ("item", "tolist", "nonzero", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
UPLOADS = ("tensor", "as_tensor")


@contextlib.contextmanager
def count_host_reads(monkeypatch):
    """Count host reads of tensor values and uploads of host data inside the block -> Counter {'kind @ line': n}."""
    counts = collections.Counter()

    def where():
        frame = traceback.extract_stack(limit=3)[0]  # the caller of the wrapped method
        return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"

    def wrap(owner, name):
        orig = getattr(owner, name)

        def counted(*args, **kwargs):
            counts[f"{name} @ {where()}"] += 1
            return orig(*args, **kwargs)
        monkeypatch.setattr(owner, name, counted)

    def wrap_index(name):  # a bool-mask index is a nonzero() inside the indexing op
        orig = getattr(torch.Tensor, name)

        def counted(self, index, *rest):
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in parts):
                counts[f"mask{name} @ {where()}"] += 1
            return orig(self, index, *rest)
        monkeypatch.setattr(torch.Tensor, name, counted)

    for name in READS:
        wrap(torch.Tensor, name)
    for name in UPLOADS:
        wrap(torch, name)
    wrap_index("__getitem__")
    wrap_index("__setitem__")
    try:
        yield counts
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("batch", [1, 4])
def test_chain_reads_the_host_at_most_twice_per_forward(batch, monkeypatch):
    """lantern chain (δ = 0, CFG, a real draft head): host reads + uploads per target forward after the prefill
    <= 2, counted over the whole call (setup and statistics included)."""
    torch.manual_seed(0)  # the draft head's initialisation
    model, head = toy(V=16, L=16, dim=32, depth=2)
    verify = lantern_verifier(None, 16, {"delta": 0.0})  # validates its table here, once (host reads)
    sampling = SamplingConfig(cfg_scale=2.0, temperature=1.0)
    cond = torch.arange(batch) % 3
    lantern._tree_tensors.cache_clear()  # count the tree's uploads too (once per tree and device)
    with count_host_reads(monkeypatch) as counts:
        _, stats = speculative_generate(model, head, cond, sampling, verify, 3, torch.Generator().manual_seed(0))
    iterations = stats["target_forwards"] - 1
    total = sum(counts.values())
    assert iterations >= 5, stats  # enough iterations for a per-iteration cost to dominate the fixed one
    assert total <= 2 * iterations, f"{total} host reads for {iterations} iterations: {dict(counts)}"
