"""LANTERN / LANTERN++ relaxed speculative acceptance over codebook neighbourhoods: the model-free core.

Every function is batched over any leading shape (...): p, q (..., V), draft tokens x (...), uniforms
u (...). Neighbour lists nbrs (V, k) int64 are shared by all rows: row v lists v's k nearest codes,
nearest first, never v itself (``validate_neighbours`` checks this once, with host syncs). No Python
loop runs over rows and nothing syncs with the host, so the functions run as they are on CPU or CUDA.

The relaxation (../shared/reference/decoding.md §2)
----------------------------------------------------
For a draft token x, A(x) is the longest prefix of nbrs[x] whose cumulative target mass stays within a
budget b(x), and the aggregated set is S(x) = {x} ∪ A(x):

* δ rule (LANTERN):    b(x) = δ                  -> p̃(x) = p(x) + p(A(x)),  p(A(x)) <= δ;
* λ rule (LANTERN++):  b(x) = (λ - 1) · p(x)     -> p̃(x) <= λ · p(x).  λ is passed directly (upstream
  passes it as "δ > 1" and is off by one); λ = 1 is standard speculative sampling.

Because neighbour masses are >= 0 the cumulative sum is non-decreasing, so {j : cumsum_j <= b} is always
a prefix; zero-probability neighbours right after it join it at no cost. r_x denotes the *relaxed
target of x*: p with the mass of A(x) moved onto x (r_x(x) = p̃(x), r_x = 0 on A(x), r_x = p
elsewhere). TV(p, r_x) = p(A(x)) <= δ (δ rule) or <= (λ - 1) p(x) (λ rule).

Verification = standard speculative sampling against a relaxed target T
-----------------------------------------------------------------------
Given a target distribution T (..., V), a draft x ~ q and u ~ U[0, 1):

    accept  iff  u < min(1, T(x) / q(x));      on rejection sample from  norm(max(T - q, 0)).

This outputs a sample of exactly T whenever x is distributed as q. Two choices of T:

* ``target="pointwise"`` (LANTERN's rule): T = r_x, the relaxed target of the drafted token, so the
  acceptance probability is min(1, p̃(x) / q(x)) and the residual is norm(max(r_x - q, 0)), i.e.
  max(p - q, 0) with the aggregated neighbours A(x) removed (x's own entry is 0 whenever rejection is
  possible, since then q(x) > p̃(x)), renormalised.
  - For one-hot q at x (``q=None``: greedy / deterministic drafts, EAGLE-2's q = 1, SJD's random init)
    this is LANTERN's rule verbatim: accept with p̃(x), on rejection remove exactly S(x) from p and
    renormalise. The output is exactly r_x, so TV(p, output) = p(A(x)) <= δ; for random drafts verified
    as one-hot the output is a mixture of such r_x and the bound still holds by convexity.
  - For a *soft* q the target depends on the drafted token, and the output is no longer r_x for any x:
    every drafted token gets its own δ, so the output can drift from p by far more than δ. Example:
    p = 1/(2n) on a_1..a_n and on b_1..b_n, q = 1/n on the a_i, nbrs[a_i] = [b_i, ...], δ = 1/(2n): every
    draft is accepted, the output is q and TV(p, q) = 1/2 while δ -> 0. No residual can repair this,
    because the accepted mass min(q(y), p̃(y)) alone already exceeds p by 1/2. (Upstream's static tree,
    r <= p̃/q with residual max(p - q, 0), has the same problem.)
* ``target="mixture"`` (the default): T = p̂ = Σ_{x'} q(x') r_{x'} = E_{x'~q}[r_{x'}], one fixed target
  per position, computed in closed form as

      p̂(y) = p(y) + q(y) · p(A(y)) - p(y) · Σ_{x' : y ∈ A(x')} q(x').

  The output is exactly p̂, and TV(p, p̂) <= Σ q(x') TV(p, r_{x'}) <= δ (λ rule: <= (λ-1) Σ q(x') p(x'))
  for *any* q, mass still only moves from a code's neighbours onto the code. For one-hot q, p̂ = r_x,
  so both targets agree and reduce to LANTERN's rule; "pointwise" is then the cheaper way to compute it
  (O(k) per row instead of O(V k)). The price of the guarantee for soft q: less relaxation than the
  pointwise rule claims (in the example above the acceptance rises from 1/2 to 1/2 + δ, not to 1).

Exactness at δ = 0, λ = 1 or k = 0. A(x) then holds only zero-probability neighbours, so r_x = p and
p̂ = p bit for bit, and both rules are standard speculative sampling: the same decision
u < min(1, p(x)/q(x)) for the same u, the same residual norm(max(p - q, 0)). Upstream instead zeroes all
k neighbours of x in the residual, which removes positive mass at δ = 0 and breaks exactness.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from decoding.speculative import SpeculativeSampling

TARGETS = ("mixture", "pointwise")


class RelaxedVerdict(NamedTuple):
    """One relaxed verification step: the decision, its probability, the relaxation and the residual."""
    accept: torch.Tensor       # (...) bool: u < accept_prob
    accept_prob: torch.Tensor  # (...) min(1, target(x) / q(x))
    p_tilde: torch.Tensor      # (...) p(x) + p(A(x)), the relaxed probability of the drafted token
    aggregated: torch.Tensor   # (..., V) bool: S(x) = {x} ∪ A(x)
    target: torch.Tensor       # (..., V) the relaxed target T that the step samples exactly (r_x or p̂)
    residual: torch.Tensor     # (..., V) norm(max(T - q, 0)): the distribution to sample on rejection


# -- checks ----------------------------------------------------------------------------------------

def _check_rule(delta: float | None, lam: float | None) -> None:
    if (delta is None) == (lam is None):
        raise ValueError("pass exactly one of delta= (LANTERN's δ rule) or lam= (LANTERN++'s λ rule)")
    if delta is not None and not delta >= 0:
        raise ValueError(f"delta must be >= 0 (a total-variation budget), got {delta}")
    if lam is not None and not lam >= 1:
        raise ValueError(f"lam must be >= 1 (p̃ <= lam·p; lam = 1 is standard speculative sampling), got {lam}; "
                         "pass λ itself, not upstream's δ = λ > 1 encoding")


def _check_shapes(p: torch.Tensor, x: torch.Tensor, nbrs: torch.Tensor, q: torch.Tensor | None = None) -> None:
    if nbrs.dim() != 2 or nbrs.dtype != torch.int64 or nbrs.shape[0] != p.shape[-1]:
        raise ValueError(f"nbrs must be an int64 (V, k) table with V = p.shape[-1] = {p.shape[-1]}, got "
                         f"{tuple(nbrs.shape)} {nbrs.dtype}; build it with the tokenizer's code-vector kNN")
    if x.shape != p.shape[:-1]:
        raise ValueError(f"draft tokens x {tuple(x.shape)} must have p's leading shape {tuple(p.shape[:-1])}")
    if q is not None and q.shape != p.shape:
        raise ValueError(f"q {tuple(q.shape)} and p {tuple(p.shape)} must have the same shape (..., V)")


def validate_neighbours(nbrs: torch.Tensor) -> None:
    """Raise unless nbrs (V, k) holds, per row v, k distinct codes in [0, V) other than v (host syncs; call once)."""
    if nbrs.dim() != 2 or nbrs.dtype != torch.int64:
        raise ValueError(f"nbrs must be an int64 (V, k) table, got {tuple(nbrs.shape)} {nbrs.dtype}")
    V, k = nbrs.shape
    if k == 0:
        return
    if bool(((nbrs < 0) | (nbrs >= V)).any()):
        raise ValueError(f"nbrs holds codes outside [0, {V})")
    if bool((nbrs == torch.arange(V, device=nbrs.device)[:, None]).any()):
        raise ValueError("a code appears in its own neighbour list: drop the diagonal (it is x itself)")
    srt = nbrs.sort(-1).values
    if bool((srt[:, 1:] == srt[:, :-1]).any()):
        raise ValueError("a neighbour list repeats a code: each row must list k distinct codes")


# -- the relaxation --------------------------------------------------------------------------------

def _budget(p_x: torch.Tensor, delta: float | None, lam: float | None) -> torch.Tensor:
    """The neighbour-mass budget b(x): δ, or (λ - 1) p(x). p_x (...) -> (...)."""
    if delta is not None:
        return torch.full_like(p_x, float(delta))
    return (float(lam) - 1.0) * p_x


def aggregated_prefix(p: torch.Tensor, x: torch.Tensor, nbrs: torch.Tensor, *, delta: float | None = None,
                      lam: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """p̃(x) and the aggregated set S(x) = {x} ∪ A(x) of each row.

    p (..., V), x (...) int64, nbrs (V, k) int64 -> (p_tilde (...), aggregated (..., V) bool).
    """
    _check_rule(delta, lam)
    _check_shapes(p, x, nbrs)
    nb = nbrs[x]  # (..., k) x's neighbours, nearest first
    mass = p.gather(-1, nb)  # (..., k)
    p_x = p.gather(-1, x.unsqueeze(-1)).squeeze(-1)  # (...)
    inside = mass.cumsum(-1) <= _budget(p_x, delta, lam).unsqueeze(-1)  # (..., k) a prefix (cumsum non-decreasing)
    p_tilde = (p_x + (mass * inside).sum(-1)).clamp(max=1.0)
    aggregated = torch.zeros(p.shape, dtype=torch.bool, device=p.device).scatter_(-1, nb, inside)
    aggregated.scatter_(-1, x.unsqueeze(-1), True)
    return p_tilde, aggregated


def pointwise_target(p: torch.Tensor, x: torch.Tensor, p_tilde: torch.Tensor, aggregated: torch.Tensor) -> torch.Tensor:
    """r_x: p with the aggregated neighbours' mass moved onto x. (..., V), (...), (...), (..., V) -> (..., V)."""
    return p.masked_fill(aggregated, 0.0).scatter(-1, x.unsqueeze(-1), p_tilde.unsqueeze(-1).to(p.dtype))


def mixture_target(p: torch.Tensor, q: torch.Tensor, nbrs: torch.Tensor, *, delta: float | None = None,
                   lam: float | None = None, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """p̂ = E_{x'~q}[r_{x'}] = p + q·p(A(·)) - p·Σ_{x': · ∈ A(x')} q(x'): the relaxed target for a soft q.

    p, q (..., V), nbrs (V, k) -> (..., V). Costs O(V k) per row; the vocabulary is processed in chunks of
    about ``chunk_elems`` gathered entries (a loop over code chunks, never over rows) to bound memory.
    """
    _check_rule(delta, lam)
    if q.shape != p.shape:
        raise ValueError(f"q {tuple(q.shape)} and p {tuple(p.shape)} must have the same shape (..., V)")
    V, k = nbrs.shape
    if V != p.shape[-1]:
        raise ValueError(f"nbrs has {V} rows but p has V = {p.shape[-1]}")
    P, Q = p.reshape(-1, V), q.reshape(-1, V).to(p.dtype)  # (N, V)
    N = P.shape[0]
    gain = torch.zeros_like(P)   # q(y) p(A(y))
    cover = torch.zeros_like(P)  # Σ_{x': y ∈ A(x')} q(x')
    step = max(1, chunk_elems // max(1, N * k))
    for s in range(0, V if k else 0, step):
        nb = nbrs[s:s + step]  # (C, k)
        mass = P[:, nb]  # (N, C, k)
        inside = mass.cumsum(-1) <= _budget(P[:, s:s + step], delta, lam).unsqueeze(-1)  # (N, C, k)
        gain[:, s:s + step] = Q[:, s:s + step] * (mass * inside).sum(-1)
        cover.scatter_add_(1, nb.reshape(1, -1).expand(N, -1), (Q[:, s:s + step, None] * inside).reshape(N, -1))
    p_hat = (P + gain - P * cover).clamp(min=0.0)  # cover <= Σq = 1, so only rounding can go below 0
    return p_hat.view(p.shape)


# -- one verification step -------------------------------------------------------------------------

def lantern_verify(p: torch.Tensor, q: torch.Tensor | None, x: torch.Tensor, u: torch.Tensor, nbrs: torch.Tensor, *,
                   delta: float | None = None, lam: float | None = None, target: str = "mixture") -> RelaxedVerdict:
    """Relaxed speculative verification of draft tokens x ~ q against p (see the module docstring).

    p (..., V) target probabilities (after CFG, temperature, top-k/top-p); q (..., V) the draft
    distribution x was drawn from, or None for a one-hot draft at x (q = 1); x (...) int64 drafts;
    u (...) uniforms in [0, 1); nbrs (V, k) int64. Exactly one of delta (δ >= 0) or lam (λ >= 1).
    target: "mixture" (TV <= δ for any q; the default) or "pointwise" (LANTERN's per-draft rule; the same
    for one-hot q, cheaper; unbounded TV for soft q). Returns a RelaxedVerdict.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    _check_shapes(p, x, nbrs, q)
    if u.shape != x.shape:
        raise ValueError(f"uniforms u {tuple(u.shape)} must have the drafts' shape {tuple(x.shape)}")
    p_tilde, aggregated = aggregated_prefix(p, x, nbrs, delta=delta, lam=lam)
    one_hot = q is None
    if one_hot:
        q = torch.zeros_like(p).scatter_(-1, x.unsqueeze(-1), 1.0)
    if target == "pointwise" or one_hot:  # for one-hot q the mixture target is r_x itself
        T = pointwise_target(p, x, p_tilde, aggregated)
    else:
        T = mixture_target(p, q, nbrs, delta=delta, lam=lam)
    T_x = T.gather(-1, x.unsqueeze(-1)).squeeze(-1)  # (...)
    q_x = q.gather(-1, x.unsqueeze(-1)).squeeze(-1).to(T.dtype)
    accept_prob = (T_x / q_x).nan_to_num(nan=0.0).clamp(max=1.0)  # q(x) = 0 < T(x): inf -> 1
    excess = (T - q.to(T.dtype)).clamp(min=0.0)  # (..., V)
    total = excess.sum(-1, keepdim=True)
    # total = 0 only when rejection has probability 0; the residual is then never used: return T
    residual = torch.where(total > 0, excess / total.clamp(min=torch.finfo(T.dtype).tiny), T)
    return RelaxedVerdict(u < accept_prob, accept_prob, p_tilde, aggregated, T, residual)


def sample_from_uniform(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw with given uniforms: probs (..., V) (need not sum to 1), u (...) in [0, 1) -> (...) int64."""
    cdf = probs.cumsum(-1)  # (..., V)
    idx = torch.searchsorted(cdf, (u.to(cdf.dtype) * cdf[..., -1]).unsqueeze(-1), right=True)
    idx = idx.clamp_max(probs.shape[-1] - 1)
    # rounding can land past the last nonzero entry: step back onto the support
    last = (probs > 0).long().cumsum(-1).argmax(-1, keepdim=True)
    return torch.where(probs.gather(-1, idx) > 0, idx, last).squeeze(-1)


def lantern_step(p: torch.Tensor, q: torch.Tensor | None, x: torch.Tensor, u: torch.Tensor, u_residual: torch.Tensor,
                 nbrs: torch.Tensor, **rule) -> tuple[torch.Tensor, RelaxedVerdict]:
    """One verify-or-resample step: the output token (...) (x if accepted, else a residual draw) and the verdict.

    Arguments as ``lantern_verify`` (``rule``: delta= or lam=, target=), plus u_residual (...) uniforms for
    the residual draw.
    """
    verdict = lantern_verify(p, q, x, u, nbrs, **rule)
    return torch.where(verdict.accept, x, sample_from_uniform(verdict.residual, u_residual)), verdict


# -- as an acceptance rule of the speculative loop ---------------------------------------------------

class RelaxedSpeculativeSampling(SpeculativeSampling):
    """LANTERN's relaxed acceptance for sampled drafts (``decoding=sjd decoding.relax=lantern``): exact speculative
    sampling against the mixture target p̂ = ``mixture_target(p, q, nbrs)`` instead of p. Accept x ~ q with
    min(1, p̂(x)/q(x)); on rejection draw from norm(max(p̂ - q, 0)). One verification step's output is then p̂,
    with TV(p, p̂) <= δ (δ rule) for any q; δ = 0 or k = 0 gives p̂ = p, i.e. exact speculative sampling.
    """

    def __init__(self, nbrs: torch.Tensor, *, delta: float | None = None, lam: float | None = None):
        _check_rule(delta, lam)
        self.nbrs, self.delta, self.lam = nbrs, delta, lam
        self._last = None  # (p, q, p̂) of the last call

    def target(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """p, q (..., V) -> p̂ (..., V) (the last window's is kept: ``tv`` right after ``accept`` reuses it)."""
        if self._last is not None and self._last[0] is p and self._last[1] is q:
            return self._last[2]
        p_hat = mixture_target(p, q, self.nbrs.to(p.device), delta=self.delta, lam=self.lam)
        self._last = (p, q, p_hat)
        return p_hat

    def tv(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """TV(p, p̂) per position (...)."""
        return 0.5 * (self.target(p, q) - p).abs().sum(-1)

    def accept(self, p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator) -> torch.Tensor:
        return super().accept(self.target(p, q), q, drafts, generator)

    def residual(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return super().residual(self.target(p, q), q)
