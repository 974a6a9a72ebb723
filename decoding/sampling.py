"""Turning logits into tokens: temperature, top-k, top-p, classifier-free guidance, seeded inverse-CDF sampling.

Every function works on logits (..., V) with any leading shape. The filters never sort the whole vocabulary
when top-k is on: ``nucleus`` selects the k largest logits of each row (plus any tied with the k-th), sorts
only those, applies top-p to them and returns the kept candidates; sampling draws from that short list by
inverse CDF, and ``logits_to_probs`` scatters it back into the full (..., V) distribution. Top-p without
top-k first tries the largest V/8 logits and sorts the whole row only where the nucleus reaches past them.
On CPU the selection runs through NumPy's vectorised ``argpartition`` (several times faster than
``torch.topk`` there; ``sample_from_logits`` partitions the values alone and looks the drawn token's index up
afterwards, and counts the top-p prefix in NumPy); elsewhere through ``torch.topk``.

The kept set (the definition the tests hold this module to):
- top-k keeps every logit >= the k-th largest (ties with the k-th value are kept);
- top-p then keeps a token iff the probability mass (softmax over the top-k survivors) of the tokens with a
  strictly larger logit is < p, so the top-1 always stays and tied tokens are kept or dropped together;
- temperature divides the logits first (float32), so ties it creates count as ties.
Samplers draw only from the passed ``torch.Generator`` (on the logits' device): the same seed gives the
same tokens.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SamplingConfig:
    """Sampling knobs shared by every generator and decoding method (a decoder's own settings live apart)."""

    cfg_scale: float = 1.0  # GPT/FlowAR: u + s (c - u), 1 = off. VAR: ramp t = s k/(K-1), 0 = off
    temperature: float = 1.0  # <= 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    cfg_interval: int = -1  # GPT only, LlamaGen's: guidance for tokens 0..N+1 (off after decode step N), -1 = all
    num_steps: int = 25  # FlowAR: Euler steps per scale
    guidance_until: float = 1.0  # FlowAR: guidance only while t <= this

    @classmethod
    def from_any(cls, sampling) -> "SamplingConfig":
        """A SamplingConfig, a dict or a DictConfig; an unknown key is an error listing the valid ones."""
        if isinstance(sampling, cls):
            return sampling
        if sampling is None:
            return cls()
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(dict(sampling)) - set(names))
        if unknown:
            raise ValueError(f"unknown sampling setting {unknown[0]!r}; the sampling settings are: {', '.join(names)} "
                             "(a decoding method's own settings go under decoding.*)")
        return cls(**dict(sampling))


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance uncond + scale * (cond - uncond) (scale 1 = conditional, 0 = unconditional)."""
    return uncond + scale * (cond - uncond)


def cfg_split_combine(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Logits of a [cond; uncond] batch (2B, ...) -> guided (B, ...)."""
    cond, uncond = logits.chunk(2, dim=0)
    return cfg_combine(cond, uncond, scale)


#################################################################################
#                         Candidate selection (no full sort)                    #
#################################################################################

PARTITION_BLOCK_BYTES = 4 << 20  # argpartition's int64 scratch per block of rows
VALUES_ONLY_ON_CPU = True  # sample_from_logits with top-k on CPU: select values only, look the drawn index up


def top_candidates(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The m largest entries of each row of x (N, V), sorted descending -> (values (N, m), indices (N, m)).

    Ties may come in any order. m == V sorts the whole row.
    """
    n, v = x.shape
    if x.device.type != "cpu" or n == 0:
        return torch.topk(x, m, dim=-1, sorted=True)
    a = x.detach().numpy()
    if m < v:
        # row blocks: argpartition's (rows, V) int64 scratch stays in reused heap memory (a whole (N, V) one
        # above glibc's 32 MB mmap threshold would page-fault in on every call)
        rows = max(1, PARTITION_BLOCK_BYTES // (8 * v))
        idx = np.empty((n, m), dtype=np.int64)  # (N, m) the m largest, unordered
        for i in range(0, n, rows):
            idx[i:i + rows] = np.argpartition(a[i:i + rows], v - m, axis=-1)[:, v - m:]
        vals = x.gather(-1, torch.from_numpy(idx)).numpy()
    else:
        idx, vals = np.arange(v, dtype=np.int64), a
    vals, idx = _sort_descending(vals, idx)
    return torch.from_numpy(vals), torch.from_numpy(idx)


def _sort_descending(vals: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 rows (N, m) and their int64 vocabulary indices (N, m) or (m,) -> both sorted by value, descending.

    Packs (order-preserving integer of the value, index) into one int64 and sorts those keys: NumPy's SIMD
    sort of plain integers is far faster than an argsort (or ``torch.sort``) on CPU, and no gather follows.
    """
    bits = np.ascontiguousarray(vals, dtype=np.float32).view(np.int32)
    keys = (~(bits ^ ((bits >> 31) & 0x7FFFFFFF))).astype(np.int64)  # int32 in the reverse order of the floats
    keys <<= 32
    keys |= idx  # index < 2^31 in the low half
    keys.sort(axis=-1)
    high = ~(keys >> 32).astype(np.int32)  # undo the packing
    return (high ^ ((high >> 31) & 0x7FFFFFFF)).view(np.float32), keys & 0xFFFFFFFF


def top_values(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The m largest entries of each row of x (N, V) (CPU), sorted descending, without their indices.

    Returns (values, values) (N, m): the second is the companion ``_widen_ties`` carries (``top_candidates``
    returns indices there). NumPy's SIMD ``partition`` and float ``sort`` (no indices, no packed keys) cost about
    half of ``top_candidates``; ``sample_from_logits`` finds the drawn token's index afterwards.
    """
    a = x.detach().numpy()
    n, v = a.shape
    out = np.empty((n, m), dtype=np.float32)  # (N, m)
    rows = max(1, PARTITION_BLOCK_BYTES // (4 * v))  # blocks of rows: the partition's copy stays in reused heap
    for i in range(0, n, rows):
        part = np.partition(a[i:i + rows], v - m, axis=-1)[:, v - m:] if m < v else a[i:i + rows].copy()
        part.sort(axis=-1)  # ascending
        out[i:i + rows] = part[:, ::-1]
    vals = torch.from_numpy(out)
    return vals, vals


def _index_of_draw(x: torch.Tensor, comp: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The vocabulary index of each row's drawn candidate -> (N,) int64 (CPU, NumPy).

    x (N, V) the logits; comp (N, m) the candidates' unscaled logits, sorted descending; pos (N, 1) the drawn
    position. Equal logits sit in index order in the indexed candidate list, so the draw's rank inside its run of
    equal values (0 unless the value before it ties) picks the same token as that list: the rank-th entry of x
    equal to the drawn value.
    """
    a, c, p = x.detach().numpy(), comp.numpy(), pos.view(-1).numpy()
    n, v = a.shape
    r = np.arange(n)
    drawn = c[r, p]  # (N,)
    rank = np.zeros(n, dtype=np.int64)
    tied = np.flatnonzero((p > 0) & (c[r, np.maximum(p - 1, 0)] == drawn))
    if tied.size:  # rare: count the equal values before the draw
        rank[tied] = p[tied] - np.count_nonzero(c[tied] > drawn[tied, None], axis=-1)
    out = np.empty(n, dtype=np.int64)
    rows = max(1, PARTITION_BLOCK_BYTES // v)
    for i in range(0, n, rows):
        eq = a[i:i + rows] == drawn[i:i + rows, None]  # (r, V) bool
        out[i:i + rows] = eq.argmax(-1)  # the first match
        for j in np.flatnonzero(rank[i:i + rows]):  # a tie drawn past its first entry (rare)
            out[i + j] = np.flatnonzero(eq[j])[rank[i + j]]
    return torch.from_numpy(out)


def _top_p_keep(vals: torch.Tensor, probs: torch.Tensor, p: float) -> torch.Tensor:
    """Sorted candidate logits and their probabilities (N, m) -> bool (N, m): kept by the nucleus rule.

    Kept iff the mass of strictly larger logits (the mass before the entry's run of equal logits) is < p;
    the top-1 run always stays.
    """
    mass_before = probs.cumsum(-1) - probs  # (N, m) mass ranked above each entry
    tied = vals[:, 1:] == vals[:, :-1]  # (N, m-1) entry j+1 ties with entry j
    rows = tied.any(-1).nonzero().squeeze(1)
    if rows.numel():  # some rows of thousands: every entry of a run of ties takes the mass before the run
        mb, t = mass_before[rows], tied[rows]  # (R, m), (R, m-1)
        while True:  # one pass per entry of the longest run (runs are short: usually one pass and a check)
            moved = torch.where(t, mb[:, :-1], mb[:, 1:])  # (R, m-1)
            if torch.equal(moved, mb[:, 1:]):
                break
            mb[:, 1:] = moved
        mass_before[rows] = mb
    keep = mass_before < p
    keep[:, 0] = True
    if rows.numel():  # the top-1 run always stays
        keep[rows] |= vals[rows] == vals[rows, :1]
    return keep


def _top_p_count(vals: torch.Tensor, probs: torch.Tensor, cdf: torch.Tensor, p: float) -> torch.Tensor:
    """The length (N, 1) of the prefix ``_top_p_keep`` keeps, without its per-entry tie pass.

    Entries whose own mass before them is < p, then the run of equal logits across the boundary made whole
    (its first entry had less than p before it); runs elsewhere never change the kept set.
    """
    m = vals.shape[-1]
    if vals.device.type == "cpu":  # NumPy: the same comparisons without torch's per-op dispatch (GPT: 16 rows a step)
        v = vals.numpy()
        count = np.count_nonzero((cdf.numpy() - probs.numpy()) < p, axis=-1)  # (N,) SIMD popcount
        np.clip(count, 1, m, out=count)  # the top-1 always stays
        r = np.arange(len(count))
        straddle = (count < m) & (v[r, np.minimum(count, m - 1)] == v[r, count - 1])  # (N,)
        rows = np.flatnonzero(straddle)
        if rows.size:  # usually a few rows: the run across the boundary made whole
            count[rows] = np.count_nonzero(v[rows] >= v[rows, count[rows] - 1][:, None], axis=-1)
        return torch.from_numpy(count.astype(np.int64)).view(-1, 1)
    below = (cdf - probs) < p  # (N, m)
    count = below.sum(-1, keepdim=True).clamp(1, m)  # the top-1 always stays
    nxt = count.clamp_max(m - 1)
    straddle = (count < m) & (vals.gather(-1, nxt) == vals.gather(-1, count - 1))  # (N, 1)
    # no host sync: every row's run end, used where the run straddles
    whole = (vals >= vals.gather(-1, count - 1)).sum(-1, keepdim=True)
    return torch.where(straddle, whole, count)


def _widen_ties(x: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, k: int, temperature: float,
                select=top_candidates):
    """Rows whose k-th and (k+1)-th candidates tie may hold more tied logits beyond the list: re-select them.

    x (N, V) raw logits; vals (N, m) scaled candidates (m > k); idx (N, m) their companion from ``select``
    (``top_candidates``: vocabulary indices; ``top_values``: the unscaled values). Returns (vals, idx), padded
    with -inf (and index 0, or -inf for values) where a row needs fewer than the widest row.
    """
    tie = vals[:, k] == vals[:, k - 1]
    if not bool(tie.any()):
        return vals, idx
    rows = tie.nonzero().squeeze(1)
    xs = _scale(x[rows], temperature)  # (R, V)
    need = int((xs >= vals[rows, k - 1:k]).sum(-1).max()) + 1  # the whole tie group and one entry below it
    m = min(need, x.shape[-1])
    if m > vals.shape[-1]:
        pad = m - vals.shape[-1]
        vals = torch.cat([vals, vals.new_full((vals.shape[0], pad), float("-inf"))], dim=-1)
        fill = float("-inf") if idx.is_floating_point() else 0
        idx = torch.cat([idx, idx.new_full((idx.shape[0], pad), fill)], dim=-1)
    wide_vals, wide_idx = select(x[rows], m)
    vals[rows, :m], idx[rows, :m] = _scale(wide_vals, temperature), wide_idx
    return vals, idx


def _scale(x: torch.Tensor, temperature: float) -> torch.Tensor:
    return x / temperature if temperature > 0 and temperature != 1.0 else x


def nucleus(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Temperature, top-k then top-p on logits (..., V) -> (logits (N, m), indices (N, m)), N = rows.

    The candidates of each row sorted by logit, descending; dropped ones are -inf (softmax gives them zero
    probability). The list holds the k largest logits (with ties) under top-k, else the nucleus and a
    few more; without either filter, every token.
    """
    x = logits.float().reshape(-1, logits.shape[-1])  # (N, V)
    n, v = x.shape
    if 0 < top_k < v:
        vals, idx = _top_k_list(x, temperature, top_k, top_candidates)
        if top_p < 1.0:  # top-p on the survivors' renormalised probabilities
            vals = vals.masked_fill(~_top_p_keep(vals, vals.softmax(-1), top_p), float("-inf"))
        return vals, idx
    if top_p >= 1.0:
        idx = torch.arange(v, device=x.device).expand(n, v)
        return _scale(x, temperature), idx
    return _nucleus_only(x, temperature, top_p)


def _top_k_list(x: torch.Tensor, temperature: float, k: int, select):
    """Top-k of x (N, V), 0 < k < V -> (vals (N, m), companion (N, m)), sorted descending and scaled.

    m > k: the k largest and every logit tied with the k-th, -inf after them; the companion is ``select``'s
    (see ``_widen_ties``).
    """
    vals, idx = select(x, min(k + 1, x.shape[-1]))  # the extra one shows whether the k-th value ties beyond the list
    vals, idx = _widen_ties(x, _scale(vals, temperature), idx, k, temperature, select)
    # sorted: the first k stay; past them only values equal to the k-th. In place on the short tail of the
    # list ``select`` made (fresh; where it also holds the companion, the tail's dropped values are never read)
    tail = vals[:, k:]  # (N, m - k)
    tail.masked_fill_(tail < vals[:, k - 1:k], float("-inf"))
    return vals, idx


def _nucleus_only(x: torch.Tensor, temperature: float, top_p: float):
    """Top-p without top-k on x (N, V): the largest V/8 first; rows whose nucleus reaches further sort all V."""
    n, v = x.shape
    xs = _scale(x, temperature)
    probs = xs.softmax(-1)  # (N, V) normalised over the whole vocabulary
    out_vals = xs.new_full((n, v), float("-inf"))
    out_idx = torch.zeros(n, v, dtype=torch.long, device=x.device)
    rows, width = torch.arange(n, device=x.device), 0
    for m in (v // 8, v):
        if m < 64 and m < v:
            continue
        vals, idx = top_candidates(xs[rows], m)
        keep = _top_p_keep(vals, probs[rows].gather(-1, idx), top_p)
        done = ~keep[:, -1] if m < v else torch.ones_like(keep[:, -1])  # the nucleus ends inside the list
        sel = rows[done]
        out_vals[sel, :m] = vals[done].masked_fill(~keep[done], float("-inf"))
        out_idx[sel, :m] = idx[done]
        width, rows = max(width, m), rows[~done]
        if rows.numel() == 0:
            break
    return out_vals[:, :width], out_idx[:, :width]


#################################################################################
#                        Filters, distribution, sampling                        #
#################################################################################

def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits / temperature, then top-k, then top-p (float32, -inf where dropped). temperature <= 0 is the sampler's."""
    vals, idx = nucleus(logits, temperature, top_k, top_p)
    full = vals.new_full((vals.shape[0], logits.shape[-1]), float("-inf"))
    # amax: padded duplicates of index 0 carry -inf and never overwrite a kept logit
    return full.scatter_reduce_(-1, idx, vals, reduce="amax").view(*logits.shape[:-1], -1)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of the last dim (ties with the k-th are kept), -inf elsewhere; k <= 0: no-op."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    return filter_logits(logits, top_k=k).to(logits.dtype)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep a token iff the mass of strictly larger logits is < p (always the top-1); p >= 1: no-op."""
    if p >= 1.0:
        return logits
    return filter_logits(logits, top_p=p).to(logits.dtype)


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution that ``sample_from_logits`` draws from: (..., V) float32, rows sum to 1.

    temperature <= 0 gives the one-hot argmax (greedy decoding).
    """
    if temperature <= 0:
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    vals, idx = nucleus(logits, temperature, top_k, top_p)
    probs = vals.softmax(-1)  # (N, m)
    full = probs.new_zeros(probs.shape[0], logits.shape[-1])
    return full.scatter_add_(-1, idx, probs).view(*logits.shape[:-1], -1)  # padded duplicates add 0


def sample_from_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row: logits (..., V) -> (...) int64. temperature <= 0 (or top_k == 1) is argmax."""
    if temperature <= 0 or top_k == 1:
        return logits.argmax(-1)
    v = logits.shape[-1]
    x = logits.float().reshape(-1, v)  # (N, V)
    values_only = VALUES_ONLY_ON_CPU and x.device.type == "cpu" and 0 < top_k < v
    if 0 < top_k < v:
        vals, comp = _top_k_list(x, temperature, top_k, top_values if values_only else top_candidates)
        pos = _draw(vals, top_p, generator)  # (N, 1)
    else:
        vals, comp = nucleus(x, temperature, 0, top_p)  # top-p alone: the list is already cut
        pos = _draw(vals, 1.0, generator)
    if not values_only:
        return comp.gather(-1, pos).view(logits.shape[:-1])
    return _index_of_draw(x, comp, pos).view(logits.shape[:-1])  # comp holds the candidates' unscaled logits


def _draw(vals: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Candidate logits (N, m), largest first (-inf = dropped), top-p still to apply -> the drawn position (N, 1).

    Inverse-CDF draw over the sorted candidates: one uniform per row times the kept mass, against the cumulative
    probabilities (top-p keeps a prefix, so they serve both). Exact, and 14-19x faster than torch.multinomial on
    CPU (benchmarks/RESULTS.md, "Generators").
    """
    probs = vals.softmax(-1)  # (N, m)
    cdf = probs.cumsum(-1)
    if top_p < 1.0:
        total = cdf.gather(-1, _top_p_count(vals, probs, cdf, top_p) - 1)  # (N, 1) the kept mass
    else:
        total = cdf[:, -1:].contiguous()
    u = torch.rand(vals.shape[0], 1, generator=generator, device=vals.device, dtype=cdf.dtype) * total
    pos = torch.searchsorted(cdf, u, right=True)  # (N, 1)
    # rounding can land u on the total; step back to the last kept candidate (where the cdf first reaches it)
    return torch.minimum(pos, torch.searchsorted(cdf, total))
