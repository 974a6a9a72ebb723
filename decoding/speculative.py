"""The shared core of exact speculative decoding on the raster GPT: windows, verification, per-row progress.

A drafter proposes, for every row, the L-1 tokens after the row's accepted prefix together with the
distribution q each was drawn from. One target forward over the window ``[last accepted, drafts]`` (per-row
positions over the static KV cache) gives the target p at every window position; p is exactly what
``decoding=ar`` samples from (CFG with cfg_interval, then temperature / top-k / top-p,
``decoding/sampling.py``). An acceptance rule scans each row left to right, and the row keeps every draft it
accepts plus one more token (the residual draw at the first rejection, or the bonus token after the window).
Rows advance independently: no minimum prefix across the batch.

Pluggable parts: the acceptance rule (``SpeculativeSampling``: min(1, p/q) with the residual
norm(max(p - q, 0)); ``ExactMatch`` for greedy; a relaxed rule swaps in here) and the drafter (an object with
``first(loop)`` and ``propose(loop, result)``; decoding/sjd.py's Jacobi drafter is one).

Buffers have static shapes: a per-row canvas (B, N + L) of accepted tokens and drafts, the window's q
(B, L-1, V), positions (B, L); the only host sync is one "is any row unfinished" flag per forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from decoding.sampling import SamplingConfig, cfg_combine, logits_to_probs, sample_from_logits


#################################################################################
#                               Target distribution                             #
#################################################################################

def is_greedy(sampling: SamplingConfig) -> bool:
    """Whether ``decoding=ar`` takes the argmax (temperature <= 0 or top-k 1)."""
    return sampling.temperature <= 0 or sampling.top_k == 1


def target_probs(logits: torch.Tensor, token_index: torch.Tensor, sampling: SamplingConfig, batch: int) -> torch.Tensor:
    """The distribution ``decoding=ar`` draws token ``token_index`` from -> (B, n, V) float32.

    logits: (B, n, V), or (2B, n, V) for a [cond; uncond] batch when cfg_scale != 1; token_index: (B, n) the
    image token each output predicts (guidance only where token_index < cfg_interval, unless it is -1).
    """
    if logits.shape[0] != batch:  # [cond; uncond]
        cond, uncond = logits.chunk(2, dim=0)
        guided = cfg_combine(cond, uncond, sampling.cfg_scale)
        if sampling.cfg_interval >= 0:
            guided = torch.where((token_index < sampling.cfg_interval)[..., None], guided, cond)
        logits = guided
    if is_greedy(sampling):
        return logits_to_probs(logits, 0.0)  # one-hot argmax, the token sample_from_logits takes
    return logits_to_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)


def sample_probs(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row from unnormalised probabilities (..., V) -> (...) int64, by sampling.py's sampler."""
    return sample_from_logits(probs.log(), 1.0, 0, 1.0, generator)


#################################################################################
#                               Acceptance rules                                #
#################################################################################

class SpeculativeSampling:
    """Exact speculative sampling: accept x ~ q with probability min(1, p(x)/q(x)); else draw norm(max(p - q, 0))."""

    def accept(self, p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator) -> torch.Tensor:
        """p, q: (B, n, V) target and draft distributions, drafts (B, n) -> accepted (B, n) bool (one coin each)."""
        p_at = p.gather(-1, drafts[..., None])[..., 0]  # (B, n)
        q_at = q.gather(-1, drafts[..., None])[..., 0]
        coin = torch.rand(drafts.shape, generator=generator, device=drafts.device)
        return coin * q_at < p_at  # u < p/q without dividing (q_at > 0: x was drawn from q)

    def residual(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The distribution after a rejection, (..., V) unnormalised: max(p - q, 0) (p itself where that is 0)."""
        res = (p - q).clamp_min(0)
        return torch.where(res.sum(-1, keepdim=True) > 0, res, p)

    def tv(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor | None:
        """TV(p, the distribution a verified position outputs) (...) for p, q (..., V); None: exact (0)."""
        return None


class ExactMatch(SpeculativeSampling):
    """Greedy verification: a draft is accepted iff it is the target's argmax; after a mismatch, the argmax."""

    def accept(self, p, q, drafts, generator):
        return drafts == p.argmax(-1)

    def residual(self, p, q):
        return p  # one-hot argmax


def acceptance_rule(sampling: SamplingConfig) -> SpeculativeSampling:
    """ExactMatch for greedy sampling, else exact speculative sampling."""
    return ExactMatch() if is_greedy(sampling) else SpeculativeSampling()


def couple_maximal(x_old: torch.Tensor, q_old: torch.Tensor, q_new: torch.Tensor, generator) -> torch.Tensor:
    """A draw from q_new maximally coupled to x_old ~ q_old: x_old kept with probability min(1, q_new/q_old).

    x_old (...), q_old / q_new (..., V) -> (...) int64. The same rule as verification, so its marginal is q_new.
    """
    rule = SpeculativeSampling()
    keep = rule.accept(q_new, q_old, x_old, generator)
    return torch.where(keep, x_old, sample_probs(rule.residual(q_new, q_old), generator))


#################################################################################
#                                 The loop                                      #
#################################################################################

@dataclass
class StepResult:
    """What one verified window gives the drafter: the target p over the window and what each row accepted."""

    probs: torch.Tensor  # (B, L, V): p of the tokens at positions n_old .. n_old + L - 1
    n_old: torch.Tensor  # (B,) accepted tokens before this forward
    accepted: torch.Tensor  # (B,) drafts accepted (0 .. L-1)
    token: torch.Tensor  # (B,) the extra token at n_old + accepted
    drafts: torch.Tensor  # (B, L-1) the verified drafts
    q: torch.Tensor  # (B, L-1, V) their distributions
    hidden: torch.Tensor  # (B', L, D) the target's final hidden states (for draft heads)


class SpeculativeLoop:
    """Per-row speculative decoding of a raster GPT: ``start()``, then ``step()`` until ``done()``.

    State per row b: ``n[b]`` accepted tokens in ``canvas[b, :n[b]]``, followed by the window's drafts
    ``canvas[b, n[b] : n[b]+L-1]`` with their distributions ``q[b]`` (L-1, V). The KV cache of row b holds
    positions [0, n[b]) (class + accepted tokens but the last) after every step.
    """

    def __init__(self, model, cond: torch.Tensor, sampling: SamplingConfig, generator, window: int, drafter,
                 rule: SpeculativeSampling | None = None, step_fn=None):
        self.model, self.sampling, self.generator, self.drafter = model, sampling, generator, drafter
        self.rule = rule or acceptance_rule(sampling)
        self.B, self.N, self.V = cond.shape[0], model.num_tokens, model.vocab_size
        self.L = max(1, min(int(window), self.N))  # a window past the last token predicts nothing
        self.device = cond.device
        self.guided = sampling.cfg_scale != 1.0
        self.labels = model.cls_embed.with_null(cond) if self.guided else cond  # (B',)
        self.step_fn = step_fn or model.step
        self.offsets = torch.arange(self.L, device=self.device)  # (L,)
        self.rows = torch.arange(self.B, device=self.device)
        # statistics, on the device (no sync): per row forwards while unfinished and accepted + 1 summed
        self.row_forwards = torch.zeros(self.B, dtype=torch.long, device=self.device)
        self.accepted_sum = torch.zeros(self.B, dtype=torch.long, device=self.device)
        self.accepted_at = torch.zeros(max(self.L - 1, 0), dtype=torch.long, device=self.device)  # per draft index
        self.tv_sum = torch.zeros(self.B, dtype=torch.float64, device=self.device)  # summed TV of verified positions
        self.verified = torch.zeros(self.B, dtype=torch.long, device=self.device)  # verified positions

    # -- helpers -----------------------------------------------------------------------------------
    def both(self, x: torch.Tensor) -> torch.Tensor:
        """Rows (B, ...) -> the model batch (B', ...) ([cond; uncond] under CFG)."""
        return torch.cat([x, x]) if self.guided else x

    def window_drafts(self) -> torch.Tensor:
        """The drafts of the current window, (B, L-1)."""
        return self.canvas.gather(1, self.n[:, None] + self.offsets[None, :self.L - 1])

    def done(self) -> bool:
        """Every row holds all N tokens (the one host sync per forward)."""
        return bool((self.n >= self.N).all())

    # -- the loop --------------------------------------------------------------------------------
    def start(self) -> None:
        """Allocate the cache and buffers; the first drafts come from ``drafter.first(self)``."""
        self.model.setup_cache(self.labels.shape[0], device=self.device)
        self.canvas = torch.zeros(self.B, self.N + self.L, dtype=torch.long, device=self.device)  # (B, N + L)
        self.n = torch.zeros(self.B, dtype=torch.long, device=self.device)
        drafts, self.q = self.drafter.first(self)  # (B, L-1), (B, L-1, V)
        self.canvas[:, :self.L - 1] = drafts
        self.started = False

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One target forward over every row's window -> (p (B, L, V), hidden (B', L, D))."""
        drafts = self.window_drafts()  # (B, L-1)
        if not self.started:  # the first window: [class, drafts] at positions 0 .. L-1
            logits, hidden = self.model.prefill(self.labels, self.both(drafts), return_hidden=True)
            self.started = True
        else:  # [last accepted, drafts] at positions n .. n+L-1 (clamped: position N predicts nothing)
            inputs = self.canvas.gather(1, self.n[:, None] - 1 + self.offsets)  # (B, L)
            positions = (self.n[:, None] + self.offsets).clamp_max(self.N)  # (B, L)
            logits, hidden = self.step_fn(self.both(inputs), self.both(positions), return_hidden=True)
        index = self.n[:, None] + self.offsets  # (B, L) image token each output predicts
        return target_probs(logits, index, self.sampling, self.B), hidden

    def step(self) -> StepResult:
        """Forward, verify, advance every row by what it accepts, roll the cache back, ask for new drafts."""
        probs, hidden = self.forward()
        drafts, n_old, active = self.window_drafts(), self.n.clone(), self.n < self.N
        # 1. verification (the rule), drafts past the last image token never accepted
        ok = self.rule.accept(probs[:, :-1], self.q, drafts, self.generator)  # (B, L-1)
        inside = (n_old[:, None] + self.offsets[None, :self.L - 1]) < self.N
        ok &= inside
        prefix = ok.long().cumprod(1)  # (B, L-1) 1 while every draft so far is accepted
        accepted = prefix.sum(1)  # (B,)
        tv = self.rule.tv(probs[:, :-1], self.q)  # (B, L-1) or None (exact)
        if tv is not None:  # a verified position (accepted, or the first rejection) outputs the relaxed target
            reached = inside & (self.offsets[None, :self.L - 1] <= accepted[:, None]) & active[:, None]
            self.tv_sum += (tv * reached).sum(1)
            self.verified += reached.sum(1)
        # 2. one more token: the residual at the first rejection, or p of the bonus position
        q_ext = torch.cat([self.q, torch.zeros_like(probs[:, :1])], 1)  # (B, L, V): q = 0 after the drafts
        p_k, q_k = probs[self.rows, accepted], q_ext[self.rows, accepted]  # (B, V)
        token = sample_probs(self.rule.residual(p_k, q_k), self.generator)  # (B,)
        self.canvas.scatter_(1, (n_old + accepted)[:, None], token[:, None])
        self.n = torch.minimum(n_old + accepted + 1, torch.full_like(n_old, self.N))
        # 3. cache: row b keeps [class, tokens < n - 1], i.e. n slots
        self.model.rollback(self.both(self.n))
        # 4. statistics of the rows that were unfinished
        self.row_forwards += active
        self.accepted_sum += torch.where(active, self.n - n_old, 0)
        self.accepted_at += (prefix * active[:, None]).sum(0)
        result = StepResult(probs, n_old, accepted, token, drafts, self.q, hidden)
        # 5. the next window's drafts (their q): the drafter's choice
        new_drafts, self.q = self.drafter.propose(self, result)  # (B, L-1), (B, L-1, V)
        self.canvas.scatter_(1, self.n[:, None] + self.offsets[None, :self.L - 1], new_drafts)
        return result

    def run(self) -> tuple[torch.Tensor, dict]:
        """start, step until done -> (tokens (B, N), stats); frees the cache."""
        self.start()
        try:
            forwards = 0
            while True:
                self.step()
                forwards += 1
                if self.done():
                    break
        finally:
            self.model.free_cache()
        return self.canvas[:, :self.N].clone(), self.stats(forwards)

    def stats(self, forwards: int) -> dict:
        """Accepted lengths (mean of accepted + 1 per row forward), per-row forwards, acceptance per draft index."""
        row_forwards = self.row_forwards.float()
        return {"window": self.L, "batch_forwards": forwards,
                "mean_accepted_length": float(self.accepted_sum.sum() / row_forwards.sum()),
                "row_forward_passes": float(row_forwards.mean()),
                "row_step_compression": float((self.N / row_forwards).mean()),
                "acceptance_by_draft_index": (self.accepted_at.float() / row_forwards.sum()).tolist(),
                # the measured TV budget (relaxed rules): TV(p, relaxed target) per verified position, and its sum
                # along a sequence (mean over rows), which bounds TV(output joint, target joint)
                "tv_per_position": float(self.tv_sum.sum() / self.verified.sum().clamp(min=1)),
                "tv_composed": float(self.tv_sum.mean())}
