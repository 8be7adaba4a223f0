"""Step 4: PerSAM-F, two learned weights that mix SAM's three mask scales.

On the reference image only: decode its three multimask logits once (SAM is
frozen, so they cannot change), then learn w = (1 - w1 - w2, w1, w2) so that
sum(w_i L_i) matches the reference mask under dice + sigmoid focal loss
(AdamW lr 1e-3 eps 1e-4, cosine schedule, 1000 steps by default). The
reference implementation re-runs the decoder at each of the 1000 steps; the
result is the same, as `decode_every_step=True` shows.

Where the loss is evaluated (`loss_resolution`):
    "full"    the logits at the reference image's H x W, as the reference does;
    "native"  the decoder's own 256 x 256 logits, cropped to the image, against
              the reference mask's coverage of each of those cells: the same
              objective at the resolution SAM predicts, ~(H x W / 256^2) times
              cheaper per step (the default on CPU-sized budgets).
"""

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F

INITIAL_WEIGHT = 1.0 / 3.0
LOSS_RESOLUTIONS = ("native", "full")


@dataclass
class FinetuneSettings:
    steps: int = 1000
    lr: float = 1e-3
    eps: float = 1e-4
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    loss_resolution: str = "native"

    def __post_init__(self) -> None:
        if self.loss_resolution not in LOSS_RESOLUTIONS:
            raise ValueError(f"loss_resolution must be one of {', '.join(LOSS_RESOLUTIONS)}, not {self.loss_resolution!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, not {self.steps}")


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
    """Dice + focal loss of the mixed logits (3 x ...) against the target (...), for autograd."""
    mixed = mix_logits(logits, weights).flatten()
    target = target.flatten()
    return dice_loss(mixed, target) + sigmoid_focal_loss(mixed, target, settings.focal_alpha, settings.focal_gamma)


class MixedLogitsObjective:
    """Exact gradient (and loss) of dice + focal w.r.t. (w1, w2) for fixed logits, without autograd.

    The mixed logits are L0 + w1 (L1 - L0) + w2 (L2 - L0) = sum(w_i L_i).
    The per-pixel derivative is written out and reduced with one
    matrix-vector product; every step reuses preallocated buffers (fresh
    allocations, not arithmetic, dominate the cost at these sizes on CPU).
    """

    def __init__(self, logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> None:
        logits = logits.reshape(3, -1).to(torch.float32)
        self.base = logits[0].contiguous()
        self.delta_t = torch.stack([logits[1] - logits[0], logits[2] - logits[0]], dim=1)  # N x 2
        t = target.reshape(-1).to(torch.float32).contiguous()
        n = t.numel()
        self.target = t
        self.target_sum = float(t.sum())
        self.alpha_t = alpha * t + (1 - alpha) * (1 - t)
        self.alpha_over_n = self.alpha_t / n
        self.one_minus_2t = 1 - 2 * t
        # d(1 - p_t)/dx = s (1 - s) (1 - 2 t); d(mod)/d(1 - p_t) = gamma (1 - p_t)^(gamma - 1)
        self.gamma = gamma
        self.x, self.e, self.s, self.ce, self.q, self.ds, self.grad, self.tmp = (torch.empty(n) for _ in range(8))

    def _forward(self, learned: torch.Tensor) -> None:
        """Fill x (mixed logits), e = exp(-|x|), s = sigmoid(x), ce (BCE), q = 1 - p_t, ds = s (1 - s)."""
        t, x, e, s, ce, q, ds, tmp = self.target, self.x, self.e, self.s, self.ce, self.q, self.ds, self.tmp
        torch.addmv(self.base, self.delta_t, learned.to(torch.float32), out=x)
        torch.abs(x, out=e).neg_().exp_()
        torch.sigmoid(x, out=s)
        torch.log1p(e, out=ce).add_(torch.clamp(x, min=0, out=tmp)).sub_(torch.mul(x, t, out=tmp))
        torch.mul(s, s, out=ds)
        torch.sub(s, ds, out=ds)
        torch.mul(s, self.one_minus_2t, out=q).add_(t)

    def _modulator(self, out: torch.Tensor) -> torch.Tensor:
        """(1 - p_t)^gamma."""
        return torch.mul(self.q, self.q, out=out) if self.gamma == 2 else torch.pow(self.q, self.gamma, out=out)

    def gradient(self, learned: torch.Tensor) -> torch.Tensor:
        """d(dice + focal) / d(w1, w2), shape (2,)."""
        self._forward(learned)
        t, s, ce, q, ds, grad, tmp = self.target, self.s, self.ce, self.q, self.ds, self.grad, self.tmp
        # focal: alpha_t / n * [(s - t) q^g + ce * g q^(g-1) * ds * (1 - 2t)]
        torch.sub(s, t, out=grad).mul_(self._modulator(tmp)).mul_(self.alpha_over_n)
        derivative = torch.mul(q, 2.0, out=tmp) if self.gamma == 2 else torch.pow(q, self.gamma - 1, out=tmp).mul_(self.gamma)
        derivative.mul_(ce).mul_(ds).mul_(self.one_minus_2t).mul_(self.alpha_over_n)
        grad.add_(derivative)
        # dice = 1 - (2 I + 1) / (S + T + 1): d/ds = (2 I + 1) / D^2 - 2 t / D
        numerator = 2 * float(torch.dot(s, t)) + 1
        denominator = float(s.sum()) + self.target_sum + 1
        torch.mul(t, -2.0 / denominator, out=tmp).add_(numerator / denominator**2).mul_(ds)
        grad.add_(tmp)
        return self.delta_t.t() @ grad

    def loss(self, learned: torch.Tensor) -> float:
        """dice + focal at `learned`."""
        self._forward(learned)
        numerator = 2 * float(torch.dot(self.s, self.target)) + 1
        denominator = float(self.s.sum()) + self.target_sum + 1
        focal = float(torch.dot(self.ce * self.alpha_t, self._modulator(self.tmp))) / self.target.numel()
        return 1 - numerator / denominator + focal


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread inside, restoring the previous count after.

    Each training step is a few dozen small element-wise operations: on CPU,
    waking other threads costs more than it saves, and on a busy machine it
    costs milliseconds per operation.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def learn_scale_weights(
    reference_logits: Callable[[], Sequence[torch.Tensor]],
    targets: Sequence[torch.Tensor],
    settings: Optional[FinetuneSettings] = None,
    decode_every_step: bool = False,
) -> torch.Tensor:
    """Learn the mixing weights; returns the three weights (3,).

    reference_logits() decodes every reference's three multimask logits
    (a list of 3 x h x w tensors, one per reference); targets are the
    reference masks at the same resolution (h x w, values in [0, 1]). With
    several references the losses are summed. The logits are decoded once;
    decode_every_step re-decodes at every step as the reference
    implementation does (same result; for tests and benchmarks).
    """
    settings = settings or FinetuneSettings()
    learned = torch.full((2,), INITIAL_WEIGHT, requires_grad=True)
    optimizer = torch.optim.AdamW([learned], lr=settings.lr, eps=settings.eps)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps)
    objectives: List[MixedLogitsObjective] = []
    for _ in range(settings.steps):
        if not objectives or decode_every_step:
            objectives = [
                MixedLogitsObjective(logits, target, settings.focal_alpha, settings.focal_gamma)
                for logits, target in zip(reference_logits(), targets)
            ]
        with torch.no_grad(), single_thread():
            learned.grad = sum(objective.gradient(learned.detach()) for objective in objectives)
            optimizer.step()
            scheduler.step()
    return scale_weights(learned.detach())
