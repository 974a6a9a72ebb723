"""Distilled decoding's flow map: a deterministic map from Gaussian noise to a token distributed as p.

At one position the teacher gives p (..., V) over codes with vectors c (V, d) (the tokenizer's lookup
space). The rectified flow from N(0, I) to the discrete law Σ_v p_v δ(c_v) interpolates
x_t = (1 - t) ε + t c, t ∈ [0, 1], and has the closed-form velocity

    w_v(x, t) ∝ p_v N(x; t c_v, (1 - t)² I)                (the posterior of the code given x_t = x)
    v(x, t)   = E[c - ε | x_t = x] = (Σ_v w_v c_v - x) / (1 - t).

Integrating dx/dt = v from x_0 = ε to t = 1 pushes N(0, I) forward to Σ_v p_v δ(c_v) exactly, so the nearest
code of x_1 is a token distributed as p, and the same ε always gives the same token (../shared/reference/
decoding.md §4; issue "Distilled decoding").

Numerics
--------
* Log-weights log p_v + (t x·c_v - t²|c_v|²/2) / (1 - t)² (the |x|² term is common to all v) go through a
  softmax, in float64 by default; p_v = 0 gives weight exactly 0.
* Time grid in σ = (1 - t)/t, the noise-to-signal ratio that sets how sharp the posterior is: t_0 = 0, then
  σ from sigma_max down to sigma_min on EDM's ρ = 7 schedule (dense where σ is small, near t = 1), then
  t = 1. The default range (``flow_sigma_range``) spans from well above the codes' scale to well below
  the smallest gap between distinct codes, so near-duplicate codes are still told apart.
* Solver: classical RK4 on that grid (default, 4 velocity evaluations per step), or Heun / Euler. No
  stage ever evaluates t = 1: the last step is x_1 = Σ_v w_v(x, t_{n-1}) c_v, the exact limit of an Euler
  (= DDIM) step to t = 1, which is exact once the posterior has collapsed (x then moves on a straight line).
* Measured endpoint error against steps: ``flow_map_error_table`` (printed by benchmarks/flow_map_error.py).

Every function is batched over leading dims (...), runs on CPU or CUDA and syncs with the host only in
``flow_sigma_range`` (call it once per codebook and pass its result on).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

SOLVERS = {"euler": 1, "heun": 2, "rk4": 4}  # name -> velocity evaluations per step


class FlowMapOutput(NamedTuple):
    """The end of the flow: the final point and its token."""
    x: torch.Tensor       # (..., d) x_1, a code vector once the solve is accurate
    tokens: torch.Tensor  # (...) int64: the nearest code of x_1 within p's support


# -- the closed form -------------------------------------------------------------------------------

def _as_time(t, like: torch.Tensor) -> torch.Tensor:
    """t as a (..., 1) tensor of like's dtype and device (a float or a tensor broadcastable to like's leading dims)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.unsqueeze(-1) if t.dim() else t


def code_log_posterior(x: torch.Tensor, t, log_p: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Unnormalised log w_v(x, t) = log p_v + (t x·c_v - t² |c_v|²/2) / (1 - t)² for t ∈ [0, 1).

    x (..., d), t float or (...), log_p (..., V) (-inf for p_v = 0), codes (V, d) -> (..., V).
    """
    t = _as_time(t, x)  # (..., 1) or scalar
    scale = t / (1 - t) ** 2
    return (log_p - (0.5 * t * scale) * (codes * codes).sum(-1)) + (scale * x) @ codes.T  # (..., V)


def posterior_mean(x: torch.Tensor, t, log_p: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """E[c | x_t = x] = Σ_v w_v(x, t) c_v: x (..., d), t float or (...), log_p (..., V), codes (V, d) -> (..., d)."""
    log_w = code_log_posterior(x, t, log_p, codes)  # (..., V)
    w = (log_w - log_w.amax(-1, keepdim=True)).exp()  # largest weight 1; 5x faster than .softmax for small V on CPU
    return (w @ codes) / w.sum(-1, keepdim=True)


def flow_velocity(x: torch.Tensor, t, p: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """v(x, t) = (E[c | x_t = x] - x) / (1 - t) = E[c - ε | x_t = x] for t ∈ [0, 1).

    x (..., d), t float or (...), p (..., V) probabilities, codes (V, d) -> (..., d), in x's dtype.
    """
    codes = codes.to(x.dtype)
    log_p = p.to(x.dtype).log()
    return (posterior_mean(x, t, log_p, codes) - x) / (1 - _as_time(t, x))


# -- the solver ------------------------------------------------------------------------------------

def flow_sigma_range(codes: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
    """Default (sigma_min, sigma_max) of the time grid for a codebook (V, d); host syncs, call once per codebook.

    sigma_max = 10 (max |c_v| + sqrt(d)): the posterior still equals the prior there.
    sigma_min = 0.02 × the smallest distance between two distinct codes: the posterior has collapsed onto
    one code. Exact duplicates are ignored (no flow can tell them apart; see ``flow_map``).
    """
    c = codes.double()
    V, d = c.shape
    sigma_max = 10.0 * (float(c.norm(dim=-1).max()) + math.sqrt(d))
    gap = math.inf
    for s in range(0, V, chunk):
        # the direct difference, not the |a|² + |b|² - 2ab shortcut, whose rounding makes 0 look like 1e-8
        dist = torch.cdist(c[s:s + chunk], c, compute_mode="donot_use_mm_for_euclid_dist")  # (C, V)
        dist = dist.masked_fill(dist == 0, math.inf)  # the code itself and exact duplicates
        gap = min(gap, float(dist.min()))
    if not math.isfinite(gap):  # a single distinct code
        gap = max(float(c.abs().max()), 1.0)
    return 0.02 * gap, sigma_max


def flow_time_grid(steps: int, sigma_min: float, sigma_max: float, dtype=torch.float64,
                   device=None, rho: float = 7.0) -> torch.Tensor:
    """The solver's times (steps + 1,): 0, then t = 1/(1+σ) for σ from sigma_max to sigma_min (EDM's ρ-schedule), then 1."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (one step from t = 0, one to t = 1), got {steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    i = torch.linspace(0, 1, steps - 1, dtype=torch.float64)
    sigma = (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho  # (steps - 1,)
    t = torch.cat([torch.zeros(1, dtype=torch.float64), 1 / (1 + sigma), torch.ones(1, dtype=torch.float64)])
    return t.to(dtype=dtype, device=device)


def nearest_code(x: torch.Tensor, codes: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """The nearest code of each point (within p's support if p is given): x (..., d), codes (V, d) -> (...) int64."""
    codes = codes.to(x.dtype)
    dist = (codes * codes).sum(-1) - 2 * (x @ codes.T)  # (..., V) |x - c|² - |x|²
    if p is not None:
        dist = dist.masked_fill(p <= 0, math.inf)
    return dist.argmin(-1)


def flow_map(eps: torch.Tensor, p: torch.Tensor, codes: torch.Tensor, *, steps: int = 32, solver: str = "rk4",
             sigmas: tuple[float, float] | None = None, dtype: torch.dtype = torch.float64) -> FlowMapOutput:
    """Integrate the flow from x_0 = eps to t = 1: eps (..., d), p (..., V), codes (V, d) -> FlowMapOutput.

    Deterministic: the same eps, p and settings give the same x_1 and token. steps: solver steps on
    ``flow_time_grid`` (RK4 with 32 steps = 125 velocity evaluations; see ``flow_map_error_table``).
    sigmas: (sigma_min, sigma_max) from ``flow_sigma_range(codes)``, computed here (with a host sync) if
    None. Computation in ``dtype`` (float64 by default); outputs in that dtype. Exactly duplicated codes
    cannot be told apart by any flow: the token is then the lowest index in p's support; merge duplicates'
    mass beforehand if that matters.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    if eps.shape[-1] != codes.shape[-1] or p.shape[-1] != codes.shape[0]:
        raise ValueError(f"shapes disagree: eps {tuple(eps.shape)} must end in d = {codes.shape[-1]} and p "
                         f"{tuple(p.shape)} in V = {codes.shape[0]} for codes {tuple(codes.shape)}")
    if sigmas is None:
        sigmas = flow_sigma_range(codes)
    lead = torch.broadcast_shapes(eps.shape[:-1], p.shape[:-1])
    x = eps.to(dtype).expand(*lead, eps.shape[-1]).clone()  # (..., d)
    p = p.expand(*lead, p.shape[-1])
    log_p = p.to(dtype).log()  # (..., V)
    c = codes.to(device=x.device, dtype=dtype)
    ts = flow_time_grid(steps, *sigmas, dtype=dtype, device=x.device)

    def vel(y, t):
        return (posterior_mean(y, t, log_p, c) - y) / (1 - t)

    for i in range(steps - 1):  # every stage stays at t <= t_{steps-1} < 1
        t0, t1 = ts[i], ts[i + 1]
        h = t1 - t0
        if solver == "euler":
            x = x + h * vel(x, t0)
        elif solver == "heun":
            k1 = vel(x, t0)
            x = x + 0.5 * h * (k1 + vel(x + h * k1, t1))
        else:
            tm = 0.5 * (t0 + t1)
            k1 = vel(x, t0)
            k2 = vel(x + 0.5 * h * k1, tm)
            k3 = vel(x + 0.5 * h * k2, tm)
            k4 = vel(x + h * k3, t1)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    x = posterior_mean(x, ts[steps - 1], log_p, c)  # the Euler step to t = 1, in its exact limit form
    return FlowMapOutput(x, nearest_code(x, c, p))


def flow_map_error_table(p: torch.Tensor, codes: torch.Tensor, eps: torch.Tensor,
                         steps: tuple[int, ...] = (4, 8, 16, 32, 64), solvers: tuple[str, ...] = ("euler", "heun", "rk4"),
                         reference_steps: int = 1024, sigmas: tuple[float, float] | None = None) -> list[dict]:
    """Endpoint error of ``flow_map`` against a reference solve (RK4, ``reference_steps``) on the same grid family.

    p (..., V), codes (V, d), eps (..., d). One row per (solver, steps): velocity evaluations ``nfe``,
    ``mean_error`` and ``max_error`` of |x_1 - x_1_ref|, ``token_mismatch`` (fraction of tokens that differ
    from the reference's) and ``token_tv`` (TV between the two token histograms).
    """
    if sigmas is None:
        sigmas = flow_sigma_range(codes)
    ref = flow_map(eps, p, codes, steps=reference_steps, solver="rk4", sigmas=sigmas)
    V = codes.shape[0]
    ref_hist = torch.bincount(ref.tokens.flatten(), minlength=V).double() / ref.tokens.numel()
    rows = []
    for solver in solvers:
        for n in steps:
            out = flow_map(eps, p, codes, steps=n, solver=solver, sigmas=sigmas)
            err = (out.x - ref.x).norm(dim=-1)
            hist = torch.bincount(out.tokens.flatten(), minlength=V).double() / out.tokens.numel()
            rows.append(dict(solver=solver, steps=n, nfe=SOLVERS[solver] * (n - 1) + 1, mean_error=float(err.mean()),
                             max_error=float(err.max()),
                             token_mismatch=float((out.tokens != ref.tokens).double().mean()),
                             token_tv=float(0.5 * (hist - ref_hist).abs().sum())))
    return rows
