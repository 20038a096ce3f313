"""Loss functions against numbers worked out by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from alignkit.objectives import dpo_loss, sft_loss, token_logps

# two pairs, beta = 0.5
PC, PR = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
RC, RR = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
# pair 1: h = (-1 + 1.5) - (-2 + 1.5) = 1.0, beta*h = 0.5  -> -log sigmoid(0.5) = log(1 + e^-0.5) = 0.474077
# pair 2: h = (-3 + 2) - (-1 + 2) = -2.0, beta*h = -1.0 -> -log sigmoid(-1) = log(1 + e^1)    = 1.313262


def test_dpo_sigmoid_two_pairs_by_hand():
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=0.5)
    assert losses.tolist() == pytest.approx([0.474077, 1.313262], abs=1e-6)
    assert losses.mean().item() == pytest.approx((0.474077 + 1.313262) / 2, abs=1e-6)
    # rewards = beta * (policy - reference)
    assert chosen.tolist() == pytest.approx([0.25, -0.5])
    assert rejected.tolist() == pytest.approx([-0.25, 0.5])


def test_cdpo_label_smoothing_by_hand():
    # eps = 0.1: 0.9 * log(1 + e^-0.5) + 0.1 * log(1 + e^0.5) = 0.9 * 0.474077 + 0.1 * 0.974077
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    assert losses[0].item() == pytest.approx(0.9 * 0.474077 + 0.1 * 0.974077, abs=1e-6)
    # pair 2, beta*h = -1: 0.9 * log(1 + e) + 0.1 * log(1 + e^-1) = 0.9 * 1.313262 + 0.1 * 0.313262
    assert losses[1].item() == pytest.approx(0.9 * 1.313262 + 0.1 * 0.313262, abs=1e-6)


def test_dpo_at_reference_is_log2_and_gradient_pushes_apart():
    pc = torch.tensor([-4.0], requires_grad=True)
    pr = torch.tensor([-4.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, pc.detach(), pr.detach(), beta=0.1)
    assert losses.item() == pytest.approx(math.log(2))
    losses.sum().backward()
    # d/dpc = -beta * sigmoid(-beta h) = -0.05 at h = 0; the opposite for pr
    assert pc.grad.item() == pytest.approx(-0.05)
    assert pr.grad.item() == pytest.approx(0.05)


def test_token_logps_2x3_by_hand():
    logits = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]])
    labels = torch.tensor([[1, 2]])
    # row 1: uniform -> log(1/3); row 2: 3 - log(e + e^2 + e^3)
    expected = [math.log(1 / 3), 3 - math.log(math.e + math.e**2 + math.e**3)]
    assert token_logps(logits, labels)[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_token_logps_rejects_misaligned_shapes():
    with pytest.raises(ValueError, match="do not align"):
        token_logps(torch.zeros(1, 5, 3), torch.zeros(1, 4, dtype=torch.long))


def test_sft_loss_is_masked_cross_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.float)
    ce = F.cross_entropy(logits.reshape(-1, 7), labels.masked_fill(mask == 0, -100).reshape(-1))
    assert sft_loss(token_logps(logits, labels), mask).item() == pytest.approx(ce.item(), abs=1e-6)


def test_sft_loss_micro_batches_sum_to_the_big_batch():
    torch.manual_seed(1)
    lp, mask = -torch.rand(4, 6), (torch.rand(4, 6) > 0.3).float()
    whole = sft_loss(lp, mask)
    n = int(mask.sum())
    parts = sft_loss(lp[:2], mask[:2], num_tokens=n) + sft_loss(lp[2:], mask[2:], num_tokens=n)
    assert parts.item() == pytest.approx(whole.item(), abs=1e-6)


# token counts for the length-normalised losses
TC, TR = torch.tensor([2.0, 4.0]), torch.tensor([1.0, 2.0])


def test_ipo_per_token_by_hand():
    from alignkit.objectives import ipo_loss

    # beta = 0.5 -> target 1/(2 beta) = 1
    # pair 1: 0.5/2 - (-0.5)/1 = 0.75 -> (0.75 - 1)^2 = 0.0625
    # pair 2: -1/4 - 1/2 = -0.75      -> (-1.75)^2    = 3.0625
    losses, chosen, _ = ipo_loss(PC, PR, RC, RR, TC, TR, beta=0.5)
    assert losses.tolist() == pytest.approx([0.0625, 3.0625])
    assert chosen.tolist() == pytest.approx([0.25, -0.5])  # logged rewards use the summed ratios


def test_hinge_by_hand():
    from alignkit.objectives import hinge_loss

    # h = [1, -2], beta = 0.5: max(0, 1 - 0.5) = 0.5, max(0, 1 + 1) = 2
    losses, _, _ = hinge_loss(PC, PR, RC, RR, beta=0.5)
    assert losses.tolist() == pytest.approx([0.5, 2.0])


def test_simpo_by_hand_needs_no_reference():
    from alignkit.objectives import simpo_loss

    # beta 2, gamma 0.5. pair 1: r_w = 2 * -1/2 = -1, r_l = 2 * -2/1 = -4 -> -log sigmoid(3 - 0.5) = 0.078889
    # pair 2: r_w = 2 * -3/4 = -1.5, r_l = 2 * -1/2 = -1 -> -log sigmoid(-0.5 - 0.5) = 1.313262
    losses, chosen, rejected = simpo_loss(PC, PR, TC, TR, beta=2.0, gamma=0.5)
    assert losses.tolist() == pytest.approx([0.078889, 1.313262], abs=1e-6)
    assert chosen.tolist() == pytest.approx([-1.0, -1.5]) and rejected.tolist() == pytest.approx([-4.0, -1.0])


def test_bradley_terry_margin_and_centering_by_hand():
    from alignkit.objectives import bradley_terry_loss

    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # d = [1, -1]: log(1 + e^-1) = 0.313262, log(1 + e) = 1.313262
    assert bradley_terry_loss(rc, rr).tolist() == pytest.approx([0.313262, 1.313262], abs=1e-6)
    # margin 0.5 on pair 1: log(1 + e^-0.5) = 0.474077
    assert bradley_terry_loss(rc, rr, torch.tensor([0.5, 0.0]))[0].item() == pytest.approx(0.474077, abs=1e-6)
    # centering 0.01 * (r_c + r_r)^2: + 0.09 and + 0.01
    got = bradley_terry_loss(rc, rr, center_coef=0.01).tolist()
    assert got == pytest.approx([0.313262 + 0.09, 1.313262 + 0.01], abs=1e-6)
