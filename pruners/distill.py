"""Knowledge distillation for fine-tuning a pruned model with the dense one as teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distill_loss"]


def distill_loss(student_out: torch.Tensor, teacher_out: torch.Tensor,
                 temperature: float = 4.0) -> torch.Tensor:
    """Hinton et al.'s soft-target loss: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, batch mean.

    The ``T^2`` keeps the gradient scale independent of the temperature, so the term mixes
    with the hard-label loss as ``(1 - a) * ce + a * distill_loss(...)``. Logits are over the
    last dim; the teacher is detached.

    Example:
        >>> s = torch.tensor([[2.0, 0.0]]); t = torch.tensor([[2.0, 0.0]])
        >>> float(distill_loss(s, t))
        0.0
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_out.shape != teacher_out.shape:
        raise ValueError(f"student and teacher outputs differ in shape: "
                         f"{tuple(student_out.shape)} vs {tuple(teacher_out.shape)}")
    s = F.log_softmax(student_out / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher_out.detach() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature ** 2
