"""GRPO and RLOO formulas against numbers worked out by hand (one group of 4 completions)."""
import math

import pytest
import torch

from alignkit.objectives.grpo import (aggregate, clipped_surrogate, combine_rewards, group_advantages,
                                      importance_ratio, k3, kl_in_reward, leave_one_out_advantages, nan_std,
                                      normalize, sequence_surrogate)

NAN = float("nan")
REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0])  # one group: mean 0.25, unbiased std sqrt(0.75 / 3) = 0.5
U = 1 / (0.5 + 1e-4)                           # 1 / (std + 1e-4)
# completion i has i + 1 tokens; per-token ratios pi / pi_old, constant within a completion
LENGTHS = [1, 2, 3, 4]
RATIOS = [1.5, 0.5, 1.1, 0.9]


def completion_tensors():
    mask = torch.tensor([[1.0] * n + [0.0] * (4 - n) for n in LENGTHS])
    old = torch.full((4, 4), -2.0)
    logp = old + torch.tensor(RATIOS).log().unsqueeze(1)
    return logp, old, mask


def test_rewards_are_a_weighted_nansum_and_none_leaves_a_function_out():
    per_function = torch.tensor([[1.0, 0.5], [NAN, 1.0], [NAN, NAN]])
    total = combine_rewards(per_function, torch.tensor([2.0, 1.0]))
    assert total[:2].tolist() == [2.5, 1.0]  # 2*1 + 0.5; the missing one left out
    assert math.isnan(total[2])               # nothing scored it


@pytest.mark.parametrize("scale,expected", [
    ("group", [0.75 * U, -0.25 * U, -0.25 * U, -0.25 * U]),
    ("batch", [0.75 * U, -0.25 * U, -0.25 * U, -0.25 * U]),  # one group: the batch is the group
    ("none", [0.75, -0.25, -0.25, -0.25]),                    # Dr. GRPO: no division
])
def test_group_advantages_by_hand(scale, expected):
    assert group_advantages(REWARDS, 4, scale).tolist() == pytest.approx(expected, rel=1e-6)


def test_batch_scaling_divides_by_the_std_of_every_reward():
    rewards = torch.cat([REWARDS, torch.zeros(4)])
    # 8 rewards, mean 1/8: squares (7/8)^2 + 7 (1/8)^2 = 56/64; unbiased var = (56/64) / 7 = 1/8
    batch = group_advantages(rewards, 4, "batch")
    s = 1 / (math.sqrt(1 / 8) + 1e-4)
    assert batch.tolist() == pytest.approx([0.75 * s, -0.25 * s, -0.25 * s, -0.25 * s, 0, 0, 0, 0], abs=1e-6)
    # the second group's rewards all agree: advantage 0 however it is scaled
    assert group_advantages(rewards, 4, "group")[4:].tolist() == [0.0] * 4
    given = group_advantages(rewards, 4, "batch", batch_std=torch.tensor(2.0))  # another process's batch too
    assert given[0].item() == pytest.approx(0.75 / 2.0001)


def test_a_missing_reward_is_out_of_its_group_and_gets_no_advantage():
    rewards = torch.tensor([1.0, 0.0, NAN, 0.0])  # mean 1/3 over three, std sqrt((4/9 + 2/9) / 2)
    std = math.sqrt((4 / 9 + 1 / 9 + 1 / 9) / 2)
    got = group_advantages(rewards, 4, "group")
    assert got.tolist() == pytest.approx([(2 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4), 0.0,
                                          (-1 / 3) / (std + 1e-4)], rel=1e-6)
    assert nan_std(torch.tensor([NAN, 1.0])).isnan()  # fewer than two values: no std


def per_token_losses(scale="group", eps_high=0.2):
    logp, old, mask = completion_tensors()
    advantages = group_advantages(REWARDS, 4, scale)
    ratio = importance_ratio(logp, old, mask, "token")
    loss, low, high = clipped_surrogate(ratio, advantages, 0.2, eps_high)
    return loss, low, high, mask


def test_clipped_surrogate_by_hand():
    loss, low, high, mask = per_token_losses()
    # A = [0.75, -0.25, -0.25, -0.25] U; r = 1.5 (A > 0): clip to 1.2 -> -1.2 A1 = -0.9 U
    # r = 0.5 (A < 0): max(-0.5 A, -0.8 A) = -0.8 A = 0.2 U;  r = 1.1: 0.275 U;  r = 0.9: 0.225 U
    assert (loss * mask).sum(-1).tolist() == pytest.approx([-0.9 * U, 0.2 * U * 2, 0.275 * U * 3, 0.225 * U * 4],
                                                           rel=1e-5)
    assert (low * mask).sum().item() == 2 and (high * mask).sum().item() == 1  # completion 2's, completion 1's
    loss, _, high, mask = per_token_losses(eps_high=0.28)  # DAPO's clip-higher: r = 1.5 clipped at 1.28
    assert loss[0, 0].item() == pytest.approx(-1.28 * 0.75 * U, rel=1e-5) and (high * mask).sum().item() == 1


@pytest.mark.parametrize("loss_type,expected", [
    ("grpo", (-0.9 + 0.2 + 0.275 + 0.225) * U / 4),                  # mean over completions of token means
    ("bnpo", (-0.9 + 0.2 * 2 + 0.275 * 3 + 0.225 * 4) * U / 10),     # token mean: 10 tokens
    ("dapo", (-0.9 + 0.2 * 2 + 0.275 * 3 + 0.225 * 4) * U / 10),
    ("dr_grpo", (-0.9 + 0.2 * 2 + 0.275 * 3 + 0.225 * 4) * U / (4 * 5)),  # 4 completions x max 5 tokens
])
def test_every_loss_type_by_hand(loss_type, expected):
    loss, _, _, mask = per_token_losses()
    assert aggregate(loss, mask, loss_type, sequences=4, tokens=10, max_tokens=5).item() == pytest.approx(expected,
                                                                                                        rel=1e-5)
    # in two chunks of two completions (micro-batches, or processes) the shares add up to the same loss
    halves = sum(aggregate(loss[i:i + 2], mask[i:i + 2], loss_type, 4, 10, 5) for i in (0, 2))
    assert halves.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_at_ratio_one_the_loss_is_minus_the_advantage_per_token(scale, loss_type):
    """num_iterations = 1: pi_old is the detached policy, r = 1, so each token's loss is -A of its completion."""
    _, old, mask = completion_tensors()
    advantages = group_advantages(REWARDS, 4, scale)
    loss, low, high = clipped_surrogate(importance_ratio(old, old, mask, "token"), advantages, 0.2, 0.2)
    assert torch.equal(loss, -advantages.unsqueeze(1).expand(4, 4)) and not (low | high).any()
    lengths = torch.tensor(LENGTHS, dtype=torch.float)
    expected = {"grpo": -advantages.sum() / 4, "bnpo": -(advantages * lengths).sum() / 10,
                "dapo": -(advantages * lengths).sum() / 10, "dr_grpo": -(advantages * lengths).sum() / 20}[loss_type]
    assert aggregate(loss, mask, loss_type, 4, 10, 5).item() == pytest.approx(expected.item(), abs=1e-6)


def test_sequence_level_ratio_is_the_mean_log_ratio_of_the_completion():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    logp = torch.tensor([[math.log(2.0), 0.0, 5.0]])  # the padded position must not count
    ratio = importance_ratio(logp, torch.zeros(1, 3), mask, "sequence")
    assert ratio.shape == (1, 1) and ratio.item() == pytest.approx(math.sqrt(2.0))
    loss, _, high = clipped_surrogate(ratio, torch.tensor([1.0]), 0.2, 0.2)  # sqrt 2 > 1.2: clipped
    assert loss.item() == pytest.approx(-1.2) and high.item()
    token = importance_ratio(logp, torch.zeros(1, 3), mask, "token")
    assert token[0, :2].tolist() == pytest.approx([2.0, 1.0])


def test_k3_by_hand():
    # ref - logp = -1: e^-1 + 1 - 1 = e^-1;  ref - logp = 1: e - 1 - 1 = e - 2;  equal: 0
    assert k3(torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-2.0, -1.0, -3.0])).tolist() == pytest.approx(
        [math.exp(-1), math.e - 2, 0.0], abs=1e-6)


def test_rloo_leave_one_out_baseline_by_hand():
    # baselines: (0 + 0 + 0) / 3 = 0 and (1 + 0 + 0) / 3 = 1/3
    assert leave_one_out_advantages(REWARDS, 4).tolist() == pytest.approx([1, -1 / 3, -1 / 3, -1 / 3])
    # a missing reward: out of the baselines (over the 2 other scored ones), advantage 0
    got = leave_one_out_advantages(torch.tensor([1.0, 0.0, NAN, 0.0]), 4)
    assert got.tolist() == pytest.approx([1.0, -0.5, 0.0, -0.5])
    # two groups are independent; G = 2: A = R_i - R_j
    assert leave_one_out_advantages(torch.tensor([3.0, 1.0, 2.0, 2.0]), 2).tolist() == [2.0, -2.0, 0.0, 0.0]


def test_rloo_folds_the_summed_k1_kl_into_the_reward():
    old = torch.tensor([[-1.0, -2.0, -9.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # row 0: (-1 + 1.5) + (-2 + 1) = -0.5 (the padded slot is out) -> R' = 1 - 0.1 * -0.5 = 1.05; row 1: no KL
    assert kl_in_reward(torch.tensor([1.0, 2.0]), old, ref, mask, 0.1).tolist() == pytest.approx([1.05, 2.0])


def test_rloo_sequence_ratio_and_clip_by_hand():
    logp = torch.tensor([[-1.0, -1.0], [-1.0, -3.0]])
    old = torch.tensor([[-1.2, -1.2], [-1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # row 0: r = e^0.4 = 1.4918 > 1.2, A = 1: -1.2;  row 1: r = e^0 = 1 (the masked token is out), A = -1: 1
    loss, low, high = sequence_surrogate(logp, old, torch.tensor([1.0, -1.0]), mask, 0.2, 0.2)
    assert loss.tolist() == pytest.approx([-1.2, 1.0]) and high.tolist() == [True, False] and not low.any()
    assert normalize(torch.tensor([1.0, 3.0]), torch.tensor(2.0), torch.tensor(1.0)).tolist() == pytest.approx(
        [-1 / 1.0001, 1 / 1.0001])
