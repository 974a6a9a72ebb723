"""Collaborative decoding for VAR (CoDe, Chen et al. 2024): a large drafter for the early scales, a small refiner
for the rest (``decoding=collaborative``).

The drafter (the run given as ``ckpt=``) samples scales 0..N-1 over its own KV cache, which is freed; the
refiner (``decoding.refiner_ckpt``) prefills [start + the N drafted scales] in one block-causal pass (the
logits of scale N come out of that pass) and decodes scales N..K-1 over its own cache. Both VARs must read one
tokenizer (checked by hash) and one dataset. Training-free with any two such VARs; the fine-tuning recipe
(drafter on the small scales, refiner distilled from the large VAR) is ``generator.train_scales`` and
``generator.distill`` (configs/experiment/code_*.yaml).

Each stage has its own sampling settings; null keeps the run's (``sampling``). CoDe's paper settings: the
drafter at temperature 1.1, the refiner at 1.0, top-k 600 and top-p 0.96 on ImageNet's 4096 codes, the CFG
ramp t = cfg k / (K-1) (k the absolute scale index, so the refiner continues the drafter's ramp).
``drafting_steps = K`` runs the drafter alone (the refiner idles): the same tokens as the drafter's ``ar``.
"""
from __future__ import annotations

import dataclasses
import resource
import sys
import time
from dataclasses import dataclass

import torch

from decoding.registry import register
from decoding.sampling import SamplingConfig
from utils.heap import release_freed_memory
from utils.timing import synchronize


@dataclass
class CollaborativeSettings:
    """decoding=collaborative's settings (per stage: null = the run's sampling setting)."""

    refiner_ckpt: str | None = None  # the small VAR run (same tokenizer and data as the drafter)
    drafting_steps: int = 4  # N: scales 0..N-1 by the drafter, N..K-1 by the refiner (1 <= N <= K)
    drafter_temperature: float | None = 1.1
    drafter_top_k: int | None = None
    drafter_top_p: float | None = None
    drafter_cfg: float | None = None
    refiner_temperature: float | None = 1.0
    refiner_top_k: int | None = None
    refiner_top_p: float | None = None
    refiner_cfg: float | None = None
    refiner: torch.nn.Module | None = dataclasses.field(default=None, init=False, repr=False)  # loaded by prepare

    def __post_init__(self):
        if self.drafting_steps < 1:
            raise ValueError(f"decoding.drafting_steps={self.drafting_steps}: the drafter runs at least scale 0 (>= 1)")
        for name in ("drafter_temperature", "refiner_temperature"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"decoding.{name}={getattr(self, name)} must be >= 0 (0 = greedy)")


def _prepare(settings: CollaborativeSettings, config: dict, device) -> CollaborativeSettings:
    """Load the refiner run and check it against the drafter's run (tokenizer hash, dataset, N)."""
    from utils.runs import check_same_tokenizer, load_generator

    if not settings.refiner_ckpt:
        raise ValueError("decoding=collaborative needs the small VAR: decoding.refiner_ckpt=<var run folder>")
    refiner, _, rconfig = load_generator(settings.refiner_ckpt, device)
    if rconfig["generator"]["name"] != "var":
        raise ValueError(f"decoding.refiner_ckpt={settings.refiner_ckpt} is a {rconfig['generator']['name']} run; "
                         "the refiner must be a VAR")
    check_same_tokenizer(config, rconfig, "the refiner", "the drafter", settings.refiner_ckpt)
    settings.refiner = refiner
    return settings


def _stage(sampling: SamplingConfig, settings: CollaborativeSettings, prefix: str) -> dict:
    """One stage's (cfg, temperature, top_k, top_p): its own settings where set, else the run's sampling."""
    own = {k: getattr(settings, f"{prefix}_{k}") for k in ("cfg", "temperature", "top_k", "top_p")}
    run = {"cfg": sampling.cfg_scale, "temperature": sampling.temperature, "top_k": sampling.top_k,
           "top_p": sampling.top_p}
    return {k: run[k] if v is None else v for k, v in own.items()}


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's max-allocated counter, or on Linux the process's VmHWM (/proc/self/clear_refs).

    On CPU the freed heap memory is handed back first (sample.py keeps it for reuse: utils/heap.py), so the
    peak starts from what is live.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (Linux >= 4.0)
            f.write("5")
    except OSError:
        pass  # elsewhere the CPU peak stays the process's lifetime peak (ru_maxrss)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated since the last reset; CPU: the peak RSS since the last reset (Linux), else of the process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2 ** 10  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)


@register("collaborative", applies_to=("var",), settings=CollaborativeSettings, prepare=_prepare)
def generate(model, cond, sampling: SamplingConfig, generator, tokenizer, settings: CollaborativeSettings):
    """Drafter (``model``) on scales 0..N-1, refiner on N..K-1 -> (index maps [(B, s_k, s_k)], stats)."""
    refiner, N, K = settings.refiner, settings.drafting_steps, len(model.scales)
    if refiner is None and N < K:
        raise ValueError("decoding=collaborative: the refiner is not loaded; pass decoding.refiner_ckpt and call "
                         "get_decoder('collaborative').prepare(settings, run_config, device) first (sample.py does)")
    if N > K:
        raise ValueError(f"decoding.drafting_steps={N} but the VAR has {K} scales: choose 1..{K} "
                         f"({K} = the drafter alone)")
    if refiner is not None and tuple(refiner.scales) != tuple(model.scales):
        raise ValueError(f"the refiner's scales {refiner.scales} differ from the drafter's {model.scales}")
    msvq = getattr(tokenizer, "quantizer", tokenizer)
    device = cond.device
    reset_peak_memory(device)  # the peak of this call: both models' weights plus what sampling allocates
    # 1. the drafter: scales 0..N-1 over its own cache (freed inside generate)
    t0 = time.perf_counter()
    d = _stage(sampling, settings, "drafter")
    with model.forward_counter() as drafter_counter:
        indices = model.generate(msvq, cond, d["cfg"], d["temperature"], d["top_k"], d["top_p"], generator, stop=N)
    synchronize(device)
    t1 = time.perf_counter()
    # 2. the refiner: prefill [start + drafted scales] in one pass, then scales N..K-1 over its cache
    refiner_passes = 0
    if N < K:
        was_training = refiner.training
        refiner.eval()
        r = _stage(sampling, settings, "refiner")
        try:
            with refiner.forward_counter() as counter:
                indices = refiner.generate(msvq, cond, r["cfg"], r["temperature"], r["top_k"], r["top_p"], generator,
                                           indices_prefix=indices)
        finally:
            refiner.train(was_training)
        refiner_passes = counter.count
    synchronize(device)
    t2 = time.perf_counter()
    stats = {"forward_passes": drafter_counter.count + refiner_passes, "drafter_forward_passes": drafter_counter.count,
             "refiner_forward_passes": refiner_passes, "drafting_steps": N,
             "drafter_seconds": t1 - t0, "refiner_seconds": t2 - t1, "peak_memory_mb": peak_memory_mb(device),
             "memory_kind": "cuda max allocated" if device.type == "cuda" else "process peak RSS during the call"}
    return indices, stats
