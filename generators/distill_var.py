"""Distilled decoding (DD1) of a VAR teacher: the student ``DistilledVAR`` (kind ``dd_var``).

``train.py task=distill teacher_ckpt=<var run> 'distill.splits=[0,4]'`` builds the pairs with
``decoding.distilled.var_teacher_map`` (the flow map on every token of a scale at once, scale by scale through
the teacher's KV cache, with the CFG ramp, temperature, top-k/top-p of ``decoding=ar``) and trains this student
on them (the pairs, resume and export machinery of generators/distill_student.py).

Splits are scale indices: split m = "the first m scales are decided" (token position ``bounds[m][0]``). With
splits [0, 4] on scales 1,2,3,4,6,8 one forward from all-noise gives all 130 tokens, and a second from the
codes of scales 0..3 (30 tokens) + the same noise after refines scales 4 and 5.

The student's inputs (the design choice)
----------------------------------------
VAR feeds scale k >= 1 the upsampled, accumulated residual of the earlier scales (msvq f_hat area-downsampled
to s_k, through ``word_embed``), not the embedding of the tokens at those positions; scale 0 gets the class
(start-of-sequence). The student instead follows DD's X_t literally: every position j carries its own
variable, the noise eps_j (undecided) or the code vector c_{token_j} (decided), i.e. the start or the end
point of the flow that maps eps_j to token j:

    x           (B, L, d)   eps_j, or c_{token_j} for positions of the decided scales (< split)
    embeds      (B, L, C)   in_proj(x_j) + type_embed[decided]; scale 0 also gets VAR's start embedding
                            (class embedding + pos_start), so the copied weights see the input they know there
    VAR blocks  (B, L, C)   block-causal (full within a scale, causal across), AdaLN on the class, level and
                            position embeddings added by VAR._embed
    logits      (B, L, V)   logits[:, j] predicts token j (no shift: token j of scale k depends on eps of scales
                            <= k only, which is exactly what block-causal attention lets position j see)

Why not VAR's accumulated input for the decided scales: (1) it is a deterministic function of the decided
codes, which the block-causal attention already sees at their own positions, so it adds no information;
(2) the undecided positions have nothing to accumulate (their tokens are what the student predicts), so the
accumulated input could only describe the decided prefix, and one input convention for every split keeps one
network for all of them (DD's X_t); (3) the msvq's code vectors are the flow map's own space (the same c_v
the teacher map transports eps to). ``in_proj`` is initialised from the teacher's ``word_embed`` (both map
msvq code vectors, d = code_dim, to the width); every other weight is the teacher's. The noise enters at the
codes' scale (eps times the codes' RMS, ``noise_scale``): msvq codes are small and N(0, I) through word_embed
would start the student far from any input the teacher has seen (initial loss above log V).
"""
from __future__ import annotations

import torch

from generators.distill_student import DistilledStudent, build_student
from generators.var import VAR


class DistilledVAR(DistilledStudent):
    """A VAR that maps (noise or code vectors per token, class) to all L tokens in one forward (DD1's student)."""

    kind = "dd_var"
    layout = "multiscale"
    tokens_to_images = staticmethod(VAR.tokens_to_images)
    describe_sampling = staticmethod(VAR.describe_sampling)

    def __init__(self, var: VAR, codes: torch.Tensor, splits, sigmas: tuple[float, float] | None = None):
        super().__init__()
        self.var = var
        self._setup_inputs(codes, var.width, splits, sigmas)
        K = len(var.scales)
        if not self.splits or self.splits[0] != 0 or max(self.splits) >= K:
            raise ValueError(f"distill.splits={list(splits)}: VAR splits are scale indices; need 0 first and every "
                             f"split in 0..{K - 1} (scales {list(var.scales)})")
        if codes.shape[1] != var.code_dim:
            raise ValueError(f"code vectors of width {codes.shape[1]} for a VAR of code_dim {var.code_dim}")

    @property
    def num_tokens(self) -> int:
        """Tokens per generated sequence."""
        return self.var.L

    @staticmethod
    def resolve_splits(splits, teacher) -> list[int]:
        """distill.splits -> scale indices: an int as given, a float that fraction of the K scales (0.5 -> K/2)."""
        K = len(teacher.scales)
        out = sorted({round(s * K) if isinstance(s, float) else int(s) for s in splits})
        if not out or out[0] != 0 or out[-1] >= K:
            raise ValueError(f"distill.splits={list(splits)}: VAR splits are scale indices; need 0 first and every "
                             f"split in 0..{K - 1} (scales {list(teacher.scales)}), e.g. distill.splits=[0,{K // 2 + 1}]")
        return out

    def position(self, split: int) -> int:
        """Tokens decided before split scale index m: bounds[m][0] (m = K: all L)."""
        split = int(split)
        return self.var.L if split == len(self.var.scales) else self.var.bounds[split][0]

    def noise_scale(self) -> torch.Tensor:
        """The code vectors' RMS: eps enters the student at the scale of the codes (msvq codes are small, ~0.03 per
        dim on the demo run, so raw N(0, I) noise through the teacher's word_embed would swamp everything else)."""
        return self.codes.pow(2).mean().sqrt().clamp_min(1e-8)

    def forward_counter(self):
        """Counts student forward passes (calls of the block stack)."""
        return self.var.forward_counter()

    @torch.no_grad()
    def init_from_teacher(self, teacher: VAR) -> None:
        """Copy the teacher's weights; in_proj from its word_embed (both take msvq code vectors)."""
        self.var.load_state_dict(teacher.state_dict())
        self.in_proj.load_state_dict(teacher.word_embed.state_dict())

    def forward(self, x: torch.Tensor, is_data: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (B, L, d), is_data (L,) or (B, L) bool, cond (B,) -> logits (B, L, V); logits[:, j] predicts token j."""
        var = self.var
        embeds = self.in_proj(x) + self.type_embed(is_data.long())  # (B, L, C)
        start = var.class_emb(cond, drop=False)[:, None] + var.pos_start  # (B, first_l, C): VAR's SOS
        embeds = torch.cat([embeds[:, :var.first_l] + start, embeds[:, var.first_l:]], 1)
        return var(None, cond, embeds=embeds, drop_labels=False)  # (B, L, V), block-causal


def build_var_student(teacher_target: str, teacher_model: dict, noise_dim: int, splits, sigmas,
                      **model_args) -> DistilledVAR:
    """The VAR student from a distill run's config (see ``build_student``)."""
    return build_student(teacher_target, teacher_model, noise_dim, splits, sigmas, student=DistilledVAR, **model_args)
