"""Distilled decoding (DD1, arXiv 2412.17153): one- or two-step sampling of a GPT or VAR by a student (``decoding=distilled``).

The teacher map. At position i the teacher's distribution p_i (CFG, temperature, top-k/top-p: exactly what
``decoding=ar`` draws from) and the tokenizer's code vectors c (V, d) define a rectified flow whose closed
form ``decoding.flow_map.flow_map`` integrates: noise eps_i (d,) -> token_i, deterministic, distributed as p_i.
Chaining positions through the teacher (token i fed back over the KV cache) gives a deterministic map
(eps_0 .. eps_{L-1}) -> (token_0 .. token_{L-1}) whose law is the teacher's: ``teacher_map``. Token i depends
only on eps_<=i (through p_i, which depends on tokens < i, and on eps_i itself).

The student (generators/distill_student.py, kind ``dd_gpt``) learns that map in one forward from
X_t = (code vectors of the first t tokens, noise after) for its training splits t.

* steps=1: tokens = student(X_0), one forward.
* steps=2: step 1 as above; keep its first t = split tokens, and run the student again on
  X_t = (codes of those tokens, the SAME eps_t..eps_{L-1}): two forwards.
* teacher_from=s (s < split): the student's first s tokens, then the teacher decodes positions s..split-1 with
  the flow map on the same eps (split - s teacher forwards: the prefill, then one per further position), then the student finishes
  from X_split: the paper's teacher-involved trade-off between speed and quality.

VAR teachers (``var_teacher_map``): the same map run scale by scale, every token of a scale at once (they are
conditionally independent given the earlier scales); the student (kind ``dd_var``, generators/distill_var.py)
counts split and teacher_from in scale indices: steps=2 keeps the first ``split`` scales of step 1, and
teacher_from=s lets the teacher decode scales s..split-1 (one forward per scale).

Settings: steps, split (default: the student's largest training split), teacher_from, and the flow solver's
steps for the teacher. The teacher run (recorded in the distill run's config, hash-checked) is loaded by
``prepare`` only when teacher_from is set.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from decoding.flow_map import flow_map
from decoding.registry import register
from decoding.sampling import SamplingConfig, cfg_split_combine, logits_to_probs


def code_vectors(tokenizer) -> torch.Tensor:
    """The tokenizer's code vectors (K, d) in its lookup space (float32).

    ``quantizer.codebook_vectors()`` where the quantizer has it; else (FSQ) ``indices_to_codes(arange(K))``.
    One function so the lead can switch it to codebook_vectors() once every quantizer has it.
    """
    q = getattr(tokenizer, "quantizer", tokenizer)
    if hasattr(q, "codebook_vectors"):
        return q.codebook_vectors().detach().float()
    device = next(iter(q.buffers()), torch.zeros(())).device
    ids = torch.arange(int(q.codebook_size), device=device)
    if hasattr(q, "indices_to_codes"):
        return q.indices_to_codes(ids).detach().float().reshape(ids.shape[0], -1)  # (K, d)
    raise ValueError(f"{type(q).__name__} exposes neither codebook_vectors() nor indices_to_codes(): distilled "
                     "decoding needs the code vectors of a discrete tokenizer")


@torch.no_grad()
def teacher_map(teacher, cond: torch.Tensor, eps: torch.Tensor, sampling: SamplingConfig, codes: torch.Tensor,
                sigmas: tuple[float, float], prefix: torch.Tensor | None = None, stop: int | None = None,
                flow_steps: int = 32, solver: str = "rk4", tokenizer=None) -> torch.Tensor:
    """The GPT teacher's deterministic noise -> token map over its KV cache (``tokenizer`` unused: a GPT needs none).

    cond (B,), eps (B, L, d), codes (V, d), prefix (B, t) tokens kept as given -> tokens (B, stop) with
    tokens[:, :t] = prefix and tokens[:, i] = flow_map(eps[:, i], p_i) for t <= i < stop (stop default L).
    Teacher forwards: one prefill, then one per decoded position after the first.
    """
    B, L = cond.shape[0], teacher.block_size
    stop = L if stop is None else stop
    t = 0 if prefix is None else prefix.shape[1]
    if not 0 <= t < stop <= L:
        raise ValueError(f"teacher_map decodes positions {t}..{stop - 1} of {L}: need 0 <= prefix < stop <= L")
    guided = sampling.cfg_scale != 1.0
    labels = teacher.cls_embed.with_null(cond) if guided else cond  # (B',)
    rep = labels.shape[0] // B
    tokens = torch.zeros(B, stop, dtype=torch.long, device=cond.device)
    if t:
        tokens[:, :t] = prefix
    teacher.setup_cache(labels.shape[0], L, device=cond.device)
    try:
        logits = teacher.prefill(labels, prefix.repeat(rep, 1) if t else None)[:, -1]  # (B', V): predicts token t
        for i in range(t, stop):
            if guided:
                use_cfg = sampling.cfg_interval < 0 or i <= sampling.cfg_interval + 1  # as GPT.sample
                logits = cfg_split_combine(logits, sampling.cfg_scale) if use_cfg else logits[:B]
            p = logits_to_probs(logits.float(), sampling.temperature, sampling.top_k, sampling.top_p)  # (B, V)
            tokens[:, i] = flow_map(eps[:, i], p, codes, steps=flow_steps, solver=solver, sigmas=sigmas).tokens
            if i + 1 < stop:  # token i sits at position i + 1
                logits = teacher.step(tokens[:, i:i + 1].repeat(rep, 1), i + 1)[:, -1]
    finally:
        teacher.free_cache()
    return tokens


@torch.no_grad()
def var_teacher_map(teacher, cond: torch.Tensor, eps: torch.Tensor, sampling: SamplingConfig, codes: torch.Tensor,
                    sigmas: tuple[float, float], prefix: torch.Tensor | None = None, stop: int | None = None,
                    flow_steps: int = 32, solver: str = "rk4", tokenizer=None) -> torch.Tensor:
    """The VAR teacher's deterministic noise -> token map, one cached forward per scale (as ``VAR.generate``).

    Within a scale the tokens are conditionally independent given the earlier scales, so the flow map runs on
    every token of scale k at once: tokens[:, scale k] = flow_map(eps[:, scale k], p_k) with p_k (B, s_k^2, V)
    the teacher's distribution after the CFG ramp t = cfg k/(K-1) (cfg 0 = off), temperature, top-k/top-p,
    exactly what ``decoding=ar`` samples from. Scale k+1's input is VAR's own: the msvq f_hat after scales
    <= k, area-downsampled (``msvq.next_input``). cond (B,), eps (B, L, d), codes (V, d); prefix (B, t) tokens
    of the first scales kept as given (t a scale boundary), stop a scale boundary (default L) -> tokens
    (B, stop). tokenizer: the msvq tokenizer (or its quantizer), required. Teacher forwards: one prefill (scale
    0, or scales 0..N of the prefix together), then one per further scale.
    """
    if tokenizer is None:
        raise ValueError("the VAR teacher map needs tokenizer=<the msvq tokenizer> (scale k+1's input is its f_hat)")
    msvq = getattr(tokenizer, "quantizer", tokenizer)
    B, L, K = cond.shape[0], teacher.num_tokens, len(teacher.scales)
    starts = [b for b, _ in teacher.bounds]
    stop = L if stop is None else stop
    t = 0 if prefix is None else prefix.shape[1]
    if t not in starts or (stop not in [e for _, e in teacher.bounds]) or not t < stop:
        raise ValueError(f"var_teacher_map decodes tokens {t}..{stop - 1} of {L}: prefix and stop must be scale "
                         f"boundaries {starts + [L]} with prefix < stop")
    k0, k1 = starts.index(t), starts.index(stop) if stop < L else K
    guided = sampling.cfg_scale != 0  # VAR: a ramp, 0 = off (VAR.generate)
    labels = teacher.class_emb.with_null(cond) if guided else cond  # (B',)
    rep = labels.shape[0] // B
    tokens = torch.zeros(B, stop, dtype=torch.long, device=cond.device)
    ramp = teacher.cfg_ramp(sampling.cfg_scale)  # t_k, mixed before the head as VAR.generate does: (B, s_k^2, V)
    teacher.setup_cache(labels.shape[0], L, device=cond.device)
    try:
        if t:
            tokens[:, :t] = prefix
            logits, f_hat = teacher.prefill_scales(labels, [prefix[:, b:e].view(B, n, n) for (b, e), n in
                                                            zip(teacher.bounds[:k0], teacher.scales)], msvq,
                                                   guidance=ramp[k0])
        else:
            logits, f_hat = teacher.prefill(labels, guidance=ramp[0]), None  # (B, 1, V)
        for k in range(k0, k1):
            begin, end = teacher.bounds[k]
            if k > k0:
                logits = teacher.step(next_in, k, guidance=ramp[k])  # (B, s_k^2, V)
            p = logits_to_probs(logits.float(), sampling.temperature, sampling.top_k, sampling.top_p)  # (B, s^2, V)
            idx = flow_map(eps[:, begin:end], p, codes, steps=flow_steps, solver=solver, sigmas=sigmas).tokens
            tokens[:, begin:end] = idx
            if k + 1 < k1:
                s = teacher.scales[k]
                f_hat, nxt = msvq.next_input(f_hat, k, idx.view(B, s, s))  # nxt (B, Cv, s', s')
                next_in = nxt.flatten(2).transpose(1, 2).to(teacher.word_embed.weight.dtype).repeat(rep, 1, 1)
    finally:
        teacher.free_cache()
    return tokens


TEACHER_MAPS = {"gpt": teacher_map, "var": var_teacher_map}  # teacher kind -> its noise -> tokens map


def teacher_map_of(teacher):
    """The noise -> tokens map of a teacher generator, by its kind (a ValueError for kinds DD does not distil)."""
    kind = getattr(teacher, "kind", None)
    if kind not in TEACHER_MAPS:
        raise ValueError(f"distilled decoding distils a {' or '.join(TEACHER_MAPS)} teacher, not a {kind!r} generator")
    return TEACHER_MAPS[kind]


@dataclass
class DistilledSettings:
    """decoding=distilled's settings."""

    steps: int = 1  # 1: X_0 -> tokens; 2: then keep the first `split` tokens and refine the rest from the same noise
    split: int | None = None  # the second step's t (GPT: tokens, VAR: scales); default the largest training split
    teacher_from: int | None = None  # the teacher decodes positions (VAR: scales) teacher_from..split-1 in between
    flow_steps: int = 32  # the teacher's flow-map solver steps (teacher_from only)
    teacher: torch.nn.Module | None = dataclasses.field(default=None, init=False, repr=False)  # loaded by prepare

    def __post_init__(self):
        if self.steps not in (1, 2):
            raise ValueError(f"decoding.steps={self.steps}: distilled decoding runs 1 or 2 student steps")
        if self.teacher_from is not None and self.steps != 2:
            raise ValueError("decoding.teacher_from needs decoding.steps=2 (the student finishes after the teacher)")


def _prepare(settings: DistilledSettings, config: dict, device) -> DistilledSettings:
    """Load the teacher run recorded in the distill run's config (hash-checked), when teacher_from is set."""
    if settings.teacher_from is None:
        return settings
    from generators.distill_student import load_teacher

    settings.teacher = load_teacher(config["distill"]["teacher"]["path"], device,
                                    config["distill"]["teacher"]["hash"])[0]
    return settings


def resolve_split(student, settings: DistilledSettings) -> int:
    """The second step's split t: settings.split or the student's largest training split; must be trained."""
    split = settings.split if settings.split is not None else max(student.splits)
    if split not in student.splits or split <= 0:
        raise ValueError(f"decoding.split={split}: the student was trained on splits {list(student.splits)}; "
                         "pick a positive one of them (train more with distill.splits=[...])")
    if settings.teacher_from is not None and not 0 <= settings.teacher_from < split:
        raise ValueError(f"decoding.teacher_from={settings.teacher_from} must lie in 0..{split - 1} (split {split})")
    return split


@register("distilled", applies_to=("dd_gpt", "dd_var"), settings=DistilledSettings, prepare=_prepare)
def generate(model, cond, sampling: SamplingConfig, generator, tokenizer, settings: DistilledSettings):
    """Student (``model``) in 1 or 2 steps, optionally the teacher in between -> (tokens (B, L), stats).

    split and teacher_from are in the student's split units (token positions for a GPT student, scale indices
    for a VAR student); ``model.position`` turns them into token counts.
    """
    eps = model.noise(cond.shape[0], generator, cond.device)  # (B, L, d)
    tokens = model.predict(eps, None, 0, cond)  # step 1: X_0 -> (B, L)
    stats = {"student_forward_passes": 1, "teacher_forward_passes": 0}
    if settings.steps == 2:
        split = resolve_split(model, settings)
        if settings.teacher_from is not None:
            if settings.teacher is None:
                raise ValueError("decoding.teacher_from: the teacher is not loaded; call get_decoder('distilled')"
                                 ".prepare(settings, run_config, device) first (sample.py does)")
            s, t = model.position(settings.teacher_from), model.position(split)
            with settings.teacher.forward_counter() as counter:
                tokens[:, :t] = teacher_map_of(settings.teacher)(
                    settings.teacher, cond, eps, sampling, model.codes, model.sigmas, tokens[:, :s] if s else None,
                    t, settings.flow_steps, tokenizer=tokenizer)
            stats["teacher_forward_passes"] = counter.count
        tokens = model.predict(eps, tokens, split, cond)  # step 2: X_split, the same noise after the split
        stats["student_forward_passes"] = 2
    stats["forward_passes"] = stats["student_forward_passes"] + stats["teacher_forward_passes"]
    return tokens, stats
