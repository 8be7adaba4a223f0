"""Step 4: PerSAM-F, two learned weights that mix SAM's three mask scales.

On the reference image only: decode its three multimask logits once (SAM is
frozen, so they cannot change), then learn w = (1 - w1 - w2, w1, w2) so that
sum(w_i L_i) matches the reference mask under dice + sigmoid focal loss
(AdamW lr 1e-3 eps 1e-4, cosine schedule, 1000 steps by default). The
reference implementation re-runs the decoder at each step; the result is the
same.
"""

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

INITIAL_WEIGHT = 1.0 / 3.0


@dataclass
class FinetuneSettings:
    steps: int = 1000
    lr: float = 1e-3
    eps: float = 1e-4
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft dice loss with +1 smoothing; logits and target flattened to N."""
    prob = logits.sigmoid()
    numerator = 2 * (prob * target).sum()
    denominator = prob.sum() + target.sum()
    return 1 - (numerator + 1) / (denominator + 1)


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Mean sigmoid focal loss over pixels (RetinaNet's form)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.mean()


def scale_weights(learned: torch.Tensor) -> torch.Tensor:
    """The two learned weights (w1, w2) -> the three mixing weights (1 - w1 - w2, w1, w2)."""
    return torch.cat([1 - learned.sum(0, keepdim=True), learned])


def mix_logits(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Three logit maps 3 x ... and three weights -> their weighted sum."""
    return (logits * weights.reshape(-1, *([1] * (logits.dim() - 1)))).sum(0)


def finetune_loss(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, settings: FinetuneSettings) -> torch.Tensor:
    mixed = mix_logits(logits, weights).flatten()
    target = target.flatten()
    return dice_loss(mixed, target) + sigmoid_focal_loss(mixed, target, settings.focal_alpha, settings.focal_gamma)


def learn_scale_weights(
    reference_logits: Callable[[], Sequence[torch.Tensor]],
    targets: Sequence[torch.Tensor],
    settings: Optional[FinetuneSettings] = None,
    decode_every_step: bool = False,
) -> torch.Tensor:
    """Learn the mixing weights; returns the three weights (3,).

    reference_logits() decodes every reference's three multimask logits
    (a list of 3 x H x W tensors, one per reference); targets are the
    reference masks (H x W, float 0/1). With several references the losses
    are summed. By default the logits are decoded once; decode_every_step
    re-decodes at every step as the reference implementation does (same
    result, for testing and benchmarking).
    """
    settings = settings or FinetuneSettings()
    learned = torch.full((2,), INITIAL_WEIGHT, requires_grad=True)
    optimizer = torch.optim.AdamW([learned], lr=settings.lr, eps=settings.eps)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps)
    targets = [t.float() for t in targets]
    logits = None
    for _ in range(settings.steps):
        if logits is None or decode_every_step:
            logits = [l.detach().clone().float() for l in reference_logits()]
        weights = scale_weights(learned)
        loss = sum(finetune_loss(l, t, weights, settings) for l, t in zip(logits, targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return scale_weights(learned).detach()
