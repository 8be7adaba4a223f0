"""PerSAM-F: the hand-written gradient equals autograd's, and training on cached logits
reaches the same weights as re-decoding at every step."""

import pytest
import torch

from persam.method.finetune import (
    FinetuneSettings,
    MixedLogitsObjective,
    finetune_loss,
    learn_scale_weights,
    scale_weights,
)


@pytest.mark.parametrize("soft_target", [False, True])
@pytest.mark.parametrize("gamma", [2.0, 1.5])
def test_analytic_gradient_matches_autograd(soft_target, gamma):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, 50, generator=g) * 4
    target = torch.rand(40, 50, generator=g)
    if not soft_target:
        target = (target > 0.6).float()
    settings = FinetuneSettings(focal_gamma=gamma)
    objective = MixedLogitsObjective(logits, target, settings.focal_alpha, gamma)
    for point in ([1 / 3, 1 / 3], [0.1, 0.7], [-0.4, 1.2]):
        learned = torch.tensor(point, requires_grad=True)
        loss = finetune_loss(logits, target, scale_weights(learned), settings)
        loss.backward()
        assert objective.loss(learned.detach()) == pytest.approx(loss.item(), rel=1e-5)
        torch.testing.assert_close(objective.gradient(learned.detach()), learned.grad, rtol=1e-4, atol=1e-6)


def test_cached_logits_reach_the_same_weights_as_decoding_every_step():
    g = torch.Generator().manual_seed(1)
    references = [torch.randn(3, 30, 30, generator=g) * 3, torch.randn(3, 20, 25, generator=g) * 3]
    targets = [(torch.rand(30, 30, generator=g) > 0.5).float(), (torch.rand(20, 25, generator=g) > 0.3).float()]
    calls = []

    def decode():
        calls.append(1)
        return [r.clone() for r in references]

    settings = FinetuneSettings(steps=200)
    cached = learn_scale_weights(decode, targets, settings)
    assert len(calls) == 1
    calls.clear()
    every_step = learn_scale_weights(decode, targets, settings, decode_every_step=True)
    assert len(calls) == 200
    assert (cached - every_step).abs().max() <= 1e-5
    assert cached.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_training_follows_autograd_adamw():
    """The whole optimisation equals a plain autograd AdamW loop on the summed loss."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 32, 32, generator=g) * 3
    target = (torch.rand(32, 32, generator=g) > 0.5).float()
    settings = FinetuneSettings(steps=100)
    ours = learn_scale_weights(lambda: [logits], [target], settings)
    learned = torch.full((2,), 1 / 3, requires_grad=True)
    optimizer = torch.optim.AdamW([learned], lr=settings.lr, eps=settings.eps)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps)
    for _ in range(settings.steps):
        loss = finetune_loss(logits, target, scale_weights(learned), settings)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    assert (ours - scale_weights(learned.detach())).abs().max() <= 1e-5


def test_settings_are_checked():
    with pytest.raises(ValueError, match="loss_resolution"):
        FinetuneSettings(loss_resolution="half")
    with pytest.raises(ValueError, match="steps"):
        FinetuneSettings(steps=0)
