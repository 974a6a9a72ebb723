"""Speculative Jacobi decoding (``decoding=sjd``; SJD, arXiv 2410.01699) with coupled drafts (arXiv 2510.24211).

The window holds the last accepted token and L-1 drafts. One target forward gives p at every window
position; decoding/speculative.py verifies the drafts (exact: min(1, p/q), residual norm(max(p - q, 0)),
exact match when greedy) and every row keeps what it accepts. The Jacobi drafter then refills the window:
a position the forward covered is re-drawn from its new p (independently, ``draft_coupling=none``; maximally
coupled to its previous draft, ``maximal``; or with the position's own Gumbel noise, ``gumbel``, so that it
repeats with probability about 1 - TV), and a position beyond it is initialised by ``init``:

- ``random``: a uniform token, q one-hot (acceptance = p(x)); also every scheme's first window;
- ``repeat_horizon``: the left neighbour's token, q one-hot;
- ``sample_horizon``: a draw from the left neighbour's distribution (the window's last p), q = that p;
- ``repeat_vertical``: the token one grid row above (the left neighbour on the first row), q one-hot.

Exactness holds for every scheme and coupling: a draft's q is its distribution given everything to its left,
and nothing to the left of a position ever reads that position's draft (tests/test_sjd.py checks the joint).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from decoding.registry import register
from decoding.speculative import SpeculativeLoop, couple_maximal, sample_probs

INITS = ("random", "repeat_horizon", "sample_horizon", "repeat_vertical")
COUPLINGS = ("none", "maximal", "gumbel")


@dataclass
class SjdSettings:
    """decoding=sjd's own settings."""

    window: int = 16  # L: the last accepted token + L-1 drafts per target forward (1 = plain AR)
    init: str = "random"  # random | repeat_horizon | sample_horizon | repeat_vertical
    draft_coupling: str = "none"  # none | maximal | gumbel (coupled re-draws, arXiv 2510.24211)
    compile: bool = False  # torch.compile the window forward (static shapes; CUDA)
    relax: str = "none"  # none (exact) | lantern: LANTERN's relaxed acceptance over codebook neighbourhoods
    delta: float | None = None  # relax=lantern, δ rule: at most δ of p's mass moves onto a draft (TV <= δ per token)
    lam: float | None = None  # relax=lantern, λ rule (LANTERN++): p̃ <= λ p
    k: int = 1000  # relax=lantern: neighbours per code (capped at V - 1)
    neighbours: torch.Tensor | None = dataclasses.field(default=None, init=False, repr=False)  # (V, k), by prepare

    def __post_init__(self):
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"decoding.window must be an integer >= 1 (1 = plain AR), got {self.window!r}")
        if self.init not in INITS:
            raise ValueError(f"decoding.init={self.init!r} is not an init scheme; choose one of {', '.join(INITS)}")
        if self.draft_coupling not in COUPLINGS:
            raise ValueError(f"decoding.draft_coupling={self.draft_coupling!r} is not a coupling; choose one of "
                             f"{', '.join(COUPLINGS)}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"decoding.compile must be true or false, got {self.compile!r}")
        if self.relax not in ("none", "lantern"):
            raise ValueError(f"decoding.relax={self.relax!r}: choose none (exact) or lantern")
        if self.relax == "lantern" and (self.delta is None) == (self.lam is None):
            raise ValueError("decoding.relax=lantern takes one rule: decoding.delta=<0..1> (LANTERN) or "
                             "decoding.lam=<>= 1> (LANTERN++)")
        if self.relax == "lantern" and self.k < 0:
            raise ValueError(f"decoding.k={self.k} must be >= 0 (0 = exact)")


def one_hot(tokens: torch.Tensor, V: int) -> torch.Tensor:
    """(...) int64 -> (..., V) float32 one-hot distributions."""
    return torch.zeros(*tokens.shape, V, device=tokens.device).scatter_(-1, tokens[..., None], 1.0)


def gumbel(shape, generator, device) -> torch.Tensor:
    """Standard Gumbel noise of ``shape``."""
    u = torch.rand(shape, generator=generator, device=device).clamp_(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


class JacobiDrafter:
    """SJD's drafter: Jacobi re-draws of the covered positions (optionally coupled), ``init`` beyond them."""

    def __init__(self, init: str = "random", coupling: str = "none"):
        self.init, self.coupling = init, coupling

    def first(self, loop: SpeculativeLoop):
        """The first window: uniform tokens with one-hot q -> (drafts (B, L-1), q (B, L-1, V))."""
        drafts = torch.randint(loop.V, (loop.B, loop.L - 1), generator=loop.generator, device=loop.device)
        if self.coupling == "gumbel":  # noise per window position, aligned with the window's outputs
            self.noise = gumbel((loop.B, loop.L, loop.V), loop.generator, loop.device)
        return drafts, one_hot(drafts, loop.V)

    def redraw(self, loop: SpeculativeLoop, r) -> torch.Tensor:
        """A new draft for every covered position from its new p -> (B, L) (index i: position n_old + i)."""
        p = r.probs  # (B, L, V)
        if self.coupling == "gumbel":
            return (p.log() + self.noise).argmax(-1)
        fresh = sample_probs(p, loop.generator)  # (B, L)
        if self.coupling == "none":
            return fresh
        coupled = couple_maximal(r.drafts, r.q, p[:, :-1], loop.generator)  # (B, L-1): the old drafts' positions
        return torch.cat([coupled, fresh[:, -1:]], 1)  # position n_old + L - 1 had no draft

    def propose(self, loop: SpeculativeLoop, r):
        """The next window's drafts and q after a verified step r -> ((B, L-1), (B, L-1, V))."""
        B, L, V = loop.B, loop.L, loop.V
        if L == 1:  # no drafts: plain AR (draw nothing, so window 1 takes ar's random stream)
            return r.drafts, r.q
        shift = loop.n - r.n_old  # (B,) tokens each row advanced (accepted + 1, clipped at the end)
        src = shift[:, None] + loop.offsets[None, :L - 1]  # (B, L-1) old window index of each new draft
        covered = src <= L - 1  # positions the forward saw: Jacobi re-draw
        idx = src.clamp_max(L - 1)
        new = self.redraw(loop, r).gather(1, idx)  # (B, L-1)
        q = r.probs.gather(1, idx[..., None].expand(B, L - 1, V))  # (B, L-1, V)
        if self.coupling == "gumbel":  # carry each position's noise, fresh noise for new positions
            fresh = gumbel((B, L, V), loop.generator, loop.device)
            src_all = shift[:, None] + loop.offsets[None]  # (B, L)
            carried = self.noise.gather(1, src_all.clamp_max(L - 1)[..., None].expand(B, L, V))
            self.noise = torch.where((src_all <= L - 1)[..., None], carried, fresh)
        # the left neighbour of the first new position (n_old + L - 1): the re-draw there, or the bonus token
        positions = loop.n[:, None] + loop.offsets[None, :L - 1]  # (B, L-1)
        loop.canvas.scatter_(1, positions, torch.where(covered, new, loop.canvas.gather(1, positions)))
        last = loop.canvas.gather(1, (r.n_old + L - 1).clamp_max(loop.canvas.shape[1] - 1)[:, None])  # (B, 1)
        init, init_q = self.initial(loop, r, positions, last)
        return torch.where(covered, new, init), torch.where(covered[..., None], q, init_q)

    def initial(self, loop: SpeculativeLoop, r, positions: torch.Tensor, last: torch.Tensor):
        """Drafts (and q) for positions (B, L-1) beyond what the forward covered; last (B, 1) the left neighbour."""
        B, L, V = loop.B, loop.L, loop.V
        if self.init == "random":
            tokens = torch.randint(V, (B, L - 1), generator=loop.generator, device=loop.device)
        elif self.init == "sample_horizon":  # the neighbour's distribution: the window's last p
            q = r.probs[:, -1:].expand(B, L - 1, V)
            return sample_probs(q, loop.generator), q
        elif self.init == "repeat_horizon":
            tokens = last.expand(B, L - 1)
        else:  # repeat_vertical: the token one row above if it is known (accepted or a covered draft)
            w = loop.model.grid_size[1]
            above = positions - w
            known = (above >= 0) & (above <= (r.n_old + L - 1)[:, None])
            tokens = torch.where(known, loop.canvas.gather(1, above.clamp_min(0)), last)
        return tokens, one_hot(tokens, V)


def _prepare(settings: SjdSettings, config: dict, device) -> SjdSettings:
    """relax=lantern: load the tokenizer's neighbour table (computed once, cached beside the tokenizer run)."""
    if settings.relax == "lantern" and settings.k > 0:
        from decoding.lantern import codebook_neighbours

        settings.neighbours = codebook_neighbours(config, settings.k, device)
    return settings


@register("sjd", applies_to=("gpt",), settings=SjdSettings, prepare=_prepare)
def generate(model, cond, sampling, generator, tokenizer, settings: SjdSettings):
    """Speculative Jacobi decoding -> (tokens (B, N), stats: accepted lengths, per-row forwards, ...)."""
    step_fn = model.compiled_step() if settings.compile else None  # inductor, fixed window shapes
    loop = SpeculativeLoop(model, cond, sampling, generator, settings.window,
                           JacobiDrafter(settings.init, settings.draft_coupling), rule=_rule(sampling, settings),
                           step_fn=step_fn)
    return loop.run()


def _rule(sampling, settings: SjdSettings):
    """The acceptance rule: exact (None: the loop's default) or LANTERN's relaxation against the mixture target."""
    if settings.relax == "none" or settings.k == 0:
        return None
    from decoding.lantern_accept import RelaxedSpeculativeSampling
    from decoding.speculative import is_greedy

    if is_greedy(sampling):
        raise ValueError("decoding.relax=lantern relaxes sampled acceptance; greedy decoding (temperature 0 or "
                         "top_k 1) accepts by exact match")
    if settings.neighbours is None:
        raise ValueError("decoding.relax=lantern needs the neighbour table: run through sample.py, or call "
                         "get_decoder('sjd').prepare(settings, run_config, device) first")
    return RelaxedSpeculativeSampling(settings.neighbours, delta=settings.delta, lam=settings.lam)
