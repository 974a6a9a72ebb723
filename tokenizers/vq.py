"""Vector quantization (VQ-VAE, van den Oord et al. 2017, arXiv 1711.00937) with the usual training tricks.

Options, each off by default:
- ``l2_norm``: cosine lookup, z and codes l2-normalized (LlamaGen / ViT-VQGAN).
- ``codebook_dim``: low-dimensional lookup through 1x1 projections in and out (LlamaGen: 256 -> 8).
- ``ema``: codebook updated as an exponential moving average of its assigned vectors, no codebook loss.
- ``dead_code_threshold``: codes whose EMA hit count falls below it are restarted from batch vectors.
- ``kmeans_init``: the codebook is set by k-means on the first training batch.

Every state update (EMA, restarts, k-means) happens only in training mode and, under DDP, is fed with
all-reduced counts and sums and rank-identical samples, so the codebook stays the same on every rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tokenizers.nearest_code import nearest_code
from tokenizers.quantizer import Quantizer, QuantizerOutput, batch_code_stats, fp32

# ------------------------------------------------------------------------------------------------
# DDP helpers (no-ops in a single process)
# ------------------------------------------------------------------------------------------------


def ddp_active() -> bool:
    """True when a torch.distributed process group is up (all collectives below go through this)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum t in place over all ranks (identity without DDP) and return it."""
    if ddp_active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sample_vectors(x: torch.Tensor, n: int) -> torch.Tensor:
    """(N, d) -> (n, d) rows drawn from x; under DDP row j comes from rank j % world, same on all ranks.

    Every rank draws n local rows and all ranks gather them, so the result does not depend on which
    rank computes it. Rows are drawn without replacement when the local batch has enough of them.
    """
    pick = torch.randperm(x.shape[0], device=x.device)[:n] if x.shape[0] >= n else \
        torch.randint(0, x.shape[0], (n,), device=x.device)
    local = x[pick].contiguous()  # (n, d)
    if not ddp_active():
        return local
    world = dist.get_world_size()
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    stacked = torch.stack(gathered)  # (world, n, d)
    j = torch.arange(n, device=x.device)
    return stacked[j % world, j]  # (n, d)


# ------------------------------------------------------------------------------------------------
# VQ
# ------------------------------------------------------------------------------------------------


class VQ(Quantizer):
    """Nearest-neighbour vector quantizer with cosine/low-dim lookup, EMA, dead-code restart and k-means init.

    Loss (paper form, not taming's legacy swap): ``beta * ||sg(z_q) - z||^2 + ||z_q - sg(z)||^2`` (means);
    with ``ema`` only the commitment term ``beta * ||sg(z_q) - z||^2`` remains. Straight-through output.
    ``cluster_size`` (EMA of per-batch hit counts, summed over ranks) is tracked whenever ``ema`` or
    ``dead_code_threshold > 0``; the threshold is in the same unit (hits per global batch).
    Buffers ``cluster_size``, ``embed_avg`` (EMA only), ``embed`` (EMA only) and ``initted`` are persistent.
    """

    def __init__(self, dim: int, codebook_size: int, beta: float = 0.25, l2_norm: bool = False,
                 codebook_dim: int | None = None, ema: bool = False, decay: float = 0.99, eps: float = 1e-5,
                 dead_code_threshold: float = 0.0, kmeans_init: bool = False, kmeans_iters: int = 10):
        super().__init__()
        self.in_channels = self.out_channels = dim
        self.codebook_size = codebook_size
        self.codebook_dim = d = codebook_dim or dim
        self.beta, self.l2_norm, self.ema = beta, l2_norm, ema
        self.decay, self.eps = decay, eps
        self.dead_code_threshold = dead_code_threshold
        self.kmeans_iters = kmeans_iters
        self.project_in = nn.Conv2d(dim, d, 1) if d != dim else nn.Identity()
        self.project_out = nn.Conv2d(d, dim, 1) if d != dim else nn.Identity()

        embed = torch.empty(codebook_size, d).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)  # (K, d)
        if l2_norm:
            embed = F.normalize(embed, dim=-1)  # LlamaGen normalizes the init as well
        if ema:
            self.register_buffer("embed", embed)
            self.register_buffer("embed_avg", embed.clone())
        else:
            self.embed = nn.Parameter(embed)
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("initted", torch.tensor(not kmeans_init))

    @property
    def tracks_usage(self) -> bool:
        return self.ema or self.dead_code_threshold > 0

    @property
    def codebook(self) -> torch.Tensor:
        """The codes the lookup sees: (K, d), l2-normalized when ``l2_norm``."""
        return F.normalize(self.embed, dim=-1) if self.l2_norm else self.embed

    def _codes(self, idx: torch.Tensor) -> torch.Tensor:
        """(...) indices -> (..., d) codes; gathers rows first, so later in-place codebook updates are safe."""
        codes = F.embedding(idx, self.embed)
        return F.normalize(codes, dim=-1) if self.l2_norm else codes

    # -- training-time state updates ------------------------------------------------------------
    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        """k-means on the (N, d) batch (sums and counts all-reduced across ranks); sets the codebook."""
        k = self.codebook_size
        centroids = sample_vectors(flat, k)  # (K, d)
        counts = torch.zeros(k, device=flat.device)
        for _ in range(self.kmeans_iters):
            idx = nearest_code(flat, centroids)  # (N,)
            stats = torch.zeros(k, flat.shape[1] + 1, device=flat.device)
            stats[:, :-1].index_add_(0, idx, flat)
            stats[:, -1] = torch.bincount(idx, minlength=k).float()
            all_reduce_sum(stats)
            sums, counts = stats[:, :-1], stats[:, -1]  # (K, d), (K,)
            means = sums / counts.clamp_min(1.0).unsqueeze(1)
            if self.l2_norm:
                means = F.normalize(means, dim=-1)
            centroids = torch.where(counts.unsqueeze(1) > 0, means, centroids)  # empty clusters keep their seed
        self.embed.copy_(centroids)
        self.cluster_size.copy_(counts)
        if self.ema:
            self.embed_avg.copy_(centroids * counts.unsqueeze(1))
        self.initted.fill_(True)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        """EMA statistics, EMA codebook and dead-code restarts from the (N, d) batch and its (N,) codes."""
        k = self.codebook_size
        stats = torch.zeros(k, flat.shape[1] + 1, device=flat.device)  # [sums | counts], one all-reduce
        if self.ema:
            stats[:, :-1].index_add_(0, idx, flat)
        stats[:, -1] = torch.bincount(idx, minlength=k).float()
        all_reduce_sum(stats)
        sums, counts = stats[:, :-1], stats[:, -1]
        self.cluster_size.lerp_(counts, 1 - self.decay)
        if self.ema:
            self.embed_avg.lerp_(sums, 1 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + k * self.eps) * n  # Laplace smoothing
            self.embed.copy_(self.embed_avg / smoothed.unsqueeze(1))
        if self.dead_code_threshold > 0:
            self._restart_dead_codes(flat)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        """Replace codes with cluster_size < threshold by batch vectors (identical on all ranks)."""
        dead = self.cluster_size < self.dead_code_threshold  # (K,), identical on all ranks
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        samples = sample_vectors(flat, n_dead)  # (n_dead, d)
        self.embed[dead] = samples
        self.cluster_size[dead] = self.dead_code_threshold
        if self.ema:
            self.embed_avg[dead] = samples * self.dead_code_threshold

    # -- the contract -------------------------------------------------------------------------
    @fp32
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z (B, C, H, W) -> quantized (B, C, H, W), indices (B, H, W)."""
        b, _, h, w = z.shape
        flat = self.project_in(z).permute(0, 2, 3, 1).reshape(-1, self.codebook_dim)  # (N, d)
        if self.l2_norm:
            flat = F.normalize(flat, dim=-1)
        if self.training and not bool(self.initted):
            self._kmeans_init(flat.detach())
        idx = nearest_code(flat.detach(), self.codebook.detach())  # (N,)
        codes = self._codes(idx)  # (N, d), carries the codebook gradient unless EMA
        loss = self.beta * F.mse_loss(flat, codes.detach())  # commitment
        if not self.ema:
            loss = loss + F.mse_loss(codes, flat.detach())  # codebook
        if self.training and self.tracks_usage:
            self._update(flat.detach(), idx)
        quantized = flat + (codes - flat).detach()  # straight-through, (N, d)
        quantized = self.project_out(quantized.view(b, h, w, -1).permute(0, 3, 1, 2))  # (B, C, H, W)
        indices = idx.view(b, h, w)
        return QuantizerOutput(quantized, indices, loss, batch_code_stats(indices, self.codebook_size))

    @fp32
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B, H, W) -> quantized (B, C, H, W)."""
        return self.decode_vectors(self._codes(indices))

    def codebook_vectors(self) -> torch.Tensor:
        """(K, codebook_dim), detached: the codes the argmin compares against, in ``project_in``'s output space
        (the low-dimensional space when ``codebook_dim`` is set) and l2-normalized with ``l2_norm``, because the
        argmin runs there (on the unit sphere, L2 order is cosine order). ``project_out`` maps them to outputs."""
        return self.codebook.detach().float()

    @fp32
    def decode_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """(B, H, W, codebook_dim) lookup-space vectors -> quantized (B, C, H, W) through ``project_out``."""
        return self.project_out(vectors.permute(0, 3, 1, 2))
