"""Token objectives of the discrete generators: cross-entropy on chosen positions, distillation from a teacher.

CoDe's fine-tuning recipe (Chen et al. 2024, training code unreleased) needs both: the drafter learns only the
small scales (``generator.train_scales``), and the refiner is distilled from the large VAR's logits (KL at a
temperature, optionally plus cross-entropy), first on all scales, then on the large ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TokenObjective:
    """Which positions count and, for distillation, the frozen teacher and its weights."""

    positions: torch.Tensor | None = None  # (L,) bool: the token positions that enter the loss; None = all
    teacher: torch.nn.Module | None = None  # same token layout as the student, frozen, eval mode
    temperature: float = 1.0  # KL between softmax(teacher / T) and softmax(student / T), times T^2
    kl_weight: float = 1.0
    ce_weight: float = 0.0  # cross-entropy on the ground truth beside the KL (always 1 without a teacher)


def token_loss(logits: torch.Tensor, targets: torch.Tensor, objective: TokenObjective | None = None,
               teacher_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, token accuracy) of logits (B, L, V) against targets (B, L) over the objective's positions.

    Without a teacher: cross-entropy. With teacher_logits (B, L, V): kl_weight * T^2 * KL(p_T || q_T) (mean
    over the selected tokens) + ce_weight * cross-entropy. Accuracy is over the selected positions.
    """
    if objective is not None and objective.positions is not None:
        keep = objective.positions.to(logits.device)
        logits, targets = logits[:, keep], targets[:, keep]  # (B, L', V), (B, L')
        teacher_logits = teacher_logits[:, keep] if teacher_logits is not None else None
    flat = logits.flatten(0, 1).float()  # (B L', V)
    ce = F.cross_entropy(flat, targets.flatten())
    acc = (logits.argmax(-1) == targets).float().mean()
    if teacher_logits is None:
        return ce, acc
    T = objective.temperature
    log_q = F.log_softmax(flat / T, dim=-1)
    log_p = F.log_softmax(teacher_logits.flatten(0, 1).float() / T, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * T * T
    return objective.kl_weight * kl + objective.ce_weight * ce, acc
