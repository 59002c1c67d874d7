"""Pure loss functions: `projection_loss` against a hand computation; masked tokens contribute nothing."""

from __future__ import annotations

import pytest
import torch

from latentguard.errors import ConfigError
from latentguard.training import LOSSES, projection_loss


def test_projection_loss_matches_hand_computation_and_ignores_masked_tokens():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 2, 5, 8, generator=g)
    direction = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=-1)
    ref = torch.randn(3, 2, 5, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    z = torch.einsum("lbtd,ld->lbt", hidden, direction)
    hand = sum(float((z[:, b] - ref[:, b]).abs()[:, mask[b]].sum()) for b in range(2)) / 2
    assert float(projection_loss(hidden, direction, mask, ref)) == pytest.approx(hand, rel=1e-6)
    noisy_h, noisy_ref = hidden.clone(), ref.clone()
    noisy_h[:, ~mask] = 1e3 * torch.randn_like(noisy_h[:, ~mask])
    noisy_ref[:, ~mask] = -7.0
    assert float(projection_loss(noisy_h, direction, mask, noisy_ref)) == pytest.approx(hand, rel=1e-6)
    sq = sum(float((z[:, b] - ref[:, b]).square()[:, mask[b]].sum()) for b in range(2)) / 2
    assert float(projection_loss(hidden, direction, mask, ref, penalty="sq")) == pytest.approx(sq, rel=1e-6)


def test_at_its_reference_the_loss_and_gradient_are_zero():
    hidden = torch.randn(2, 1, 4, 8, requires_grad=True)
    direction = torch.randn(2, 8)
    ref = torch.einsum("lbtd,ld->lbt", hidden.detach(), direction)
    loss = projection_loss(hidden, direction, torch.ones(1, 4, dtype=torch.bool), ref, penalty="sq")
    loss.backward()
    assert float(loss) == 0 and float(hidden.grad.abs().max()) == 0


def test_registry_and_bad_penalty():
    assert LOSSES.get("projection") is projection_loss
    with pytest.raises(ConfigError, match="penalty='l3'; use 'abs' or 'sq'"):
        projection_loss(torch.zeros(1, 1, 1, 2), torch.zeros(1, 2), torch.ones(1, 1, dtype=torch.bool), penalty="l3")
