"""Codebook neighbourhoods (LANTERN, arXiv 2410.03355): the k nearest other codes of every code of a tokenizer.

Distances are L2 in the space the tokenizer's lookup runs in (``quantizer.codebook_vectors()``: learned codebooks,
SimVQ's W(C), the implicit FSQ / LFQ / BSQ / Bernoulli grids). Each code's list excludes the code itself and is
sorted by ascending distance, ties broken by the smaller index (so it is deterministic on grids, where ties are
the rule). Squared distances are computed in float64 as ``|a|^2 + |b|^2 - 2 a.b`` and rounded to float32, and ties
are equal float32 values: the rounding merges float64 noise, so equal distances on a grid come out equal.

Memory: rows go through in blocks of at most ``max_block`` distance entries (default 2^22: 64 rows at K = 65,536),
held in two reused buffers (float64 and float32, 12 bytes an entry, 48 MiB), plus, for rows with ties at the k-th
distance (most rows of a grid), a copy of those rows, a boolean mask and its nonzero list: bounded by
``max_block`` whatever K is. Measured peak resident-memory increase, one CPU thread, k = 10: +63 MiB at K = 65,536,
d = 6 (random codes, 12.9 s of CPU) and +97 MiB for FSQ [8, 8, 8, 5, 5, 5] (64,000 codes, 19.7 s of CPU). The
result itself is K x k x 12 bytes (int64 indices, float32 distances): 7.9 MB at K = 65,536, k = 10, and
0.79 GB at k = 1000 (measured: +816 MiB, 42.5 s of CPU). Pass ``device="cuda"`` to run the search on a GPU.

The lists are cached beside the tokenizer run as ``<run>/neighbours_k{k}.safetensors`` (written atomically) with
the run's hash (``utils.runs.run_hash``) in the metadata; a tokenizer whose weights or config changed
gets its lists rebuilt, an unchanged one reuses them.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from utils.runs import Run, load_run, run_folder, run_hash
from utils.checkpoint import atomic_replace

log = logging.getLogger("tokar")

MAX_BLOCK_ELEMENTS = 1 << 22  # distance entries per block of rows


def cache_file(run_dir: str | Path, k: int) -> Path:
    """Where a tokenizer run's k-neighbour lists live."""
    return Path(run_dir) / f"neighbours_k{k}.safetensors"


@torch.no_grad()
def knn_codes(vectors: torch.Tensor, k: int, max_block: int = MAX_BLOCK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, d) code vectors -> indices (K, k) int64 and L2 distances (K, k) float32 of each code's k nearest others.

    Row i lists the k codes j != i with the smallest ||v_i - v_j||, ascending, ties by smaller j.
    """
    n = vectors.shape[0]
    if not 0 <= k < n:
        raise ValueError(f"k = {k} neighbours asked for a codebook of {n} codes; use 0 <= k <= {n - 1}")
    v = vectors.detach().to(torch.float64)
    out_idx = torch.empty(n, k, dtype=torch.int64, device=v.device)
    out_dist = torch.empty(n, k, dtype=torch.float32, device=v.device)
    if k == 0:
        return out_idx, out_dist
    sq = v.pow(2).sum(1)  # (K,)
    rows = min(n, max(1, max_block // n))
    buf64 = torch.empty(rows, n, dtype=torch.float64, device=v.device)  # reused: a fresh block per step would let
    buf32 = torch.empty(rows, n, dtype=torch.float32, device=v.device)  # the allocator's footprint creep upwards
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        r = torch.arange(stop - start, device=v.device)
        exact = torch.addmm(sq, v[start:stop], v.t(), alpha=-2, out=buf64[:stop - start])  # (R, K) float64
        d2 = buf32[:stop - start].copy_(exact.add_(sq[start:stop, None]).clamp_min_(0))  # (R, K) squared distances
        d2[r, r + start] = float("inf")  # not its own neighbour
        vals, cols = d2.topk(min(k + 1, n - 1), dim=1, largest=False, sorted=True)  # (R, k+1); order among ties unspecified
        kth = vals[:, k - 1:k]  # (R, 1) the k-th smallest distance
        cols = cols[:, :k]
        if k < n - 1:
            tied = (vals[:, k] == kth[:, 0]).nonzero().flatten()  # rows with more codes at the k-th distance than taken
            if len(tied):
                cols[tied] = _smallest_indices_at_boundary(d2[tied], vals[tied, :k], cols[tied], kth[tied])
        cols = cols.sort(1).values
        dist = d2.gather(1, cols)
        order = dist.argsort(dim=1, stable=True)  # by distance; equal distances keep their index order
        out_idx[start:stop] = cols.gather(1, order)
        out_dist[start:stop] = dist.gather(1, order).sqrt()
    return out_idx, out_dist


def _smallest_indices_at_boundary(d2: torch.Tensor, vals: torch.Tensor, cols: torch.Tensor,
                                  kth: torch.Tensor) -> torch.Tensor:
    """Rows (R, K) with ties at their k-th distance kth (R, 1): the k columns made of all those below kth (they are
    among the topk ``cols`` (R, k) with values ``vals``) and the smallest-index ones at kth; ascending, (R, k)."""
    rows, k = cols.shape
    below = vals < kth  # (R, k)
    need = k - below.sum(1)  # (R,) how many to take at kth
    at_rows, at_cols = (d2 == kth).nonzero(as_tuple=True)  # row-major: ascending column within each row
    first = torch.zeros(rows + 1, dtype=torch.int64, device=d2.device)
    first[1:] = torch.bincount(at_rows, minlength=rows).cumsum(0)
    rank = torch.arange(len(at_rows), device=d2.device) - first[at_rows]  # position among the row's ties
    take = rank < need[at_rows]
    row_ids = torch.cat([torch.arange(rows, device=d2.device)[:, None].expand(rows, k)[below], at_rows[take]])
    col_ids = torch.cat([cols[below], at_cols[take]])
    key = row_ids * d2.shape[1] + col_ids
    return (key.sort().values % d2.shape[1]).view(rows, k)


def codebook_neighbours(run: Run | str | Path, k: int, device: torch.device | str = "cpu",
                        max_block: int = MAX_BLOCK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """A tokenizer run's (or its folder's) k-neighbour lists: indices (K, k) int64, distances (K, k) float32.

    Read from ``<run>/neighbours_k{k}.safetensors`` when its recorded hash is the run's; otherwise computed from
    ``quantizer.codebook_vectors()`` (on ``device``) and written there atomically.
    """
    loaded = run if isinstance(run, Run) else None
    run_dir = loaded.run_dir if loaded else run_folder(run)
    digest = loaded.hash if loaded else run_hash(run_dir)
    path = cache_file(run_dir, k)
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("tokenizer_hash") == digest and meta.get("k") == str(k):
            state = load_file(str(path), device=str(device))
            return state["indices"], state["distances"]
        log.info("tokenizer %s changed since %s was built: rebuilding its neighbour lists", run_dir, path.name)
    model = (loaded or load_run(run_dir, "tokenizer", device)).model
    vectors = model.quantizer.codebook_vectors().to(device)  # (K, d)
    indices, distances = knn_codes(vectors, k, max_block)
    meta = {"tokenizer_hash": digest, "k": str(k), "codes": str(vectors.shape[0]), "dim": str(vectors.shape[1]),
            "quantizer": type(model.quantizer).__name__}
    state = {"indices": indices.contiguous().cpu(), "distances": distances.contiguous().cpu()}
    atomic_replace(lambda tmp: save_file(state, tmp, metadata=meta), path)
    return indices, distances
