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

import math
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
    The per-pixel derivative is written out and reduced with two dot
    products; every step reuses preallocated buffers (fresh
    allocations, not arithmetic, dominate the cost at these sizes on CPU).
    """

    def __init__(self, logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> None:
        logits = logits.reshape(3, -1).to(torch.float32)
        self.base = logits[0].contiguous()
        self.delta = [(logits[1] - logits[0]).contiguous(), (logits[2] - logits[0]).contiguous()]
        t = target.reshape(-1).to(torch.float32).contiguous()
        n = t.numel()
        self.target = t
        self.target_sum = float(t.sum())
        self.alpha_t = alpha * t + (1 - alpha) * (1 - t)
        self.alpha_over_n = self.alpha_t / n
        self.one_minus_2t = 1 - 2 * t
        # d(1 - p_t)/dx = s (1 - s) (1 - 2 t); d(mod)/d(1 - p_t) = gamma (1 - p_t)^(gamma - 1)
        self.gamma = gamma
        self.focal_chain = gamma * self.alpha_over_n * self.one_minus_2t
        self.x, self.e, self.s, self.ce, self.q, self.ds, self.grad, self.tmp = (torch.empty(n) for _ in range(8))

    def _forward(self, learned: torch.Tensor) -> None:
        """Fill x (mixed logits), e = exp(-|x|), s = sigmoid(x), ce (BCE), q = 1 - p_t, ds = s (1 - s)."""
        t, x, e, s, ce, q, ds, tmp = self.target, self.x, self.e, self.s, self.ce, self.q, self.ds, self.tmp
        w1, w2 = learned.tolist()
        torch.add(self.base, self.delta[0], alpha=w1, out=x).add_(self.delta[1], alpha=w2)
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
        """d(dice + focal) / d(w1, w2), shape (2,).

        Per pixel, with q = 1 - p_t and ds = s (1 - s):
            focal'  = alpha_t / n * [(s - t) q^g + g q^(g-1) ce (1 - 2t) ds]
            dice'   = [(2 I + 1) / D^2 - 2 t / D] ds
        """
        self._forward(learned)
        t, s, ce, q, ds, grad, tmp = self.target, self.s, self.ce, self.q, self.ds, self.grad, self.tmp
        numerator = 2 * float(torch.dot(s, t)) + 1
        denominator = float(s.sum()) + self.target_sum + 1
        # the terms carrying ds: g q^(g-1) ce * alpha_t (1 - 2t) / n + dice's (2 I + 1) / D^2 - 2 t / D
        if self.gamma == 2:
            torch.mul(q, ce, out=tmp)
        else:
            torch.pow(q, self.gamma - 1, out=tmp).mul_(ce)
        tmp.mul_(self.focal_chain).add_(t, alpha=-2.0 / denominator).add_(numerator / denominator**2).mul_(ds)
        # (s - t) q^g alpha_t / n
        torch.sub(s, t, out=grad)
        if self.gamma == 2:
            grad.mul_(q).mul_(q)
        else:
            grad.mul_(torch.pow(q, self.gamma, out=self.e))
        grad.mul_(self.alpha_over_n).add_(tmp)
        return torch.stack([torch.dot(self.delta[0], grad), torch.dot(self.delta[1], grad)])

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
    optimizer = AdamWCosine(settings.lr, settings.eps, settings.steps)
    learned = torch.full((2,), INITIAL_WEIGHT)
    objectives: List[MixedLogitsObjective] = []
    with torch.no_grad(), single_thread():
        for _ in range(settings.steps):
            if not objectives or decode_every_step:
                objectives = [
                    MixedLogitsObjective(logits, target, settings.focal_alpha, settings.focal_gamma)
                    for logits, target in zip(reference_logits(), targets)
                ]
            gradient = sum(objective.gradient(learned) for objective in objectives)
            learned = optimizer.step(learned, gradient)
    return scale_weights(learned)


class AdamWCosine:
    """torch.optim.AdamW (default betas and weight decay) under CosineAnnealingLR, for a few scalars.

    The same arithmetic as torch's, in float64 Python scalars: torch's
    optimizer and scheduler cost more per step than the whole gradient here.
    """

    def __init__(self, lr: float, eps: float, total_steps: int, betas=(0.9, 0.999), weight_decay: float = 0.01) -> None:
        self.base_lr, self.eps, self.total_steps = lr, eps, total_steps
        self.beta1, self.beta2 = betas
        self.weight_decay = weight_decay
        self.step_count = 0
        self.exp_avg: Optional[List[float]] = None
        self.exp_avg_sq: Optional[List[float]] = None

    def learning_rate(self, step: int) -> float:
        """Cosine annealing from base_lr to 0 over total_steps (closed form)."""
        return self.base_lr * (1 + math.cos(math.pi * step / self.total_steps)) / 2

    def step(self, params: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        lr = self.learning_rate(self.step_count)
        self.step_count += 1
        values, grads = params.tolist(), gradient.tolist()
        if self.exp_avg is None:
            self.exp_avg, self.exp_avg_sq = [0.0] * len(values), [0.0] * len(values)
        correction1 = 1 - self.beta1**self.step_count
        correction2_sqrt = math.sqrt(1 - self.beta2**self.step_count)
        updated = []
        for i, (value, grad) in enumerate(zip(values, grads)):
            value *= 1 - lr * self.weight_decay
            self.exp_avg[i] = self.beta1 * self.exp_avg[i] + (1 - self.beta1) * grad
            self.exp_avg_sq[i] = self.beta2 * self.exp_avg_sq[i] + (1 - self.beta2) * grad * grad
            denominator = math.sqrt(self.exp_avg_sq[i]) / correction2_sqrt + self.eps
            updated.append(value - (lr / correction1) * self.exp_avg[i] / denominator)
        return torch.tensor(updated, dtype=params.dtype)
