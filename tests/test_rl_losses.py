"""The arithmetic of RLHF against hand-computed examples (train.rl.losses)."""
from __future__ import annotations

import math

import pytest
import torch

from train.rl import losses as L


def test_gae_matches_hand_computed_values_and_ignores_prompt_and_padding():
    # One answer of three tokens at positions 1..3 (0 is prompt, 4 padding); reward on the last token.
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[9.0, 0.5, 0.25, 0.5, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    adv, ret = L.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # delta_3 = 1 - 0.5 = 0.5; delta_2 = 0 + 0.5 - 0.25 = 0.25; delta_1 = 0 + 0.25 - 0.5 = -0.25
    # A_3 = 0.5; A_2 = 0.25 + 0.5 * 0.5 = 0.5; A_1 = -0.25 + 0.5 * 0.5 = 0.0
    assert adv.tolist() == [[0.0, 0.0, 0.5, 0.5, 0.0]]
    assert ret.tolist() == [[0.0, 0.5, 0.75, 1.0, 0.0]]
    adv, _ = L.gae(rewards, values, mask, gamma=0.5, lam=1.0)
    # delta_3 = 0.5; delta_2 = 0.5 * 0.5 - 0.25 = 0; delta_1 = 0.5 * 0.25 - 0.5 = -0.375
    # A_3 = 0.5; A_2 = 0 + 0.5 * 0.5 = 0.25; A_1 = -0.375 + 0.5 * 0.25 = -0.25
    assert adv.tolist() == [[0.0, -0.25, 0.25, 0.5, 0.0]]


def test_group_advantages_centre_and_scale_within_each_prompts_group():
    rewards = torch.tensor([1.0, 3.0, 0.0, 0.0, 5.0, 5.0, 5.0, 5.0])
    adv = L.group_advantages(rewards, group_size=2)
    # group (1, 3): mean 2, std sqrt(2) -> -+1/sqrt(2); group (0, 0): no signal
    assert adv[:2].tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)], abs=1e-4)
    assert adv[2:4].tolist() == [0.0, 0.0]
    assert L.group_advantages(rewards, group_size=4, scale=False).tolist() == [-0.0, 2.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="8 rewards do not split into groups of 3"):
        L.group_advantages(rewards, group_size=3)


def test_dpo_loss_is_log2_when_the_policy_is_the_reference():
    chosen, rejected = torch.tensor([-3.0, -7.5]), torch.tensor([-4.0, -1.0])
    loss, stats = L.dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert stats["reward_margin"].item() == 0.0
    # The policy moved towards the chosen answer: loss below log 2, and the margin counts it.
    loss, stats = L.dpo_loss(chosen + 1.0, rejected, chosen, rejected, beta=0.5)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.5))), abs=1e-6)
    assert stats["reward_accuracy"].item() == 1.0


def test_kl_estimators_are_exactly_zero_where_policy_and_reference_agree():
    logp = torch.tensor([-1.0, -2.5, -0.1])
    for estimator in L.KL_ESTIMATORS:
        assert L.kl_per_token(logp, logp.clone(), estimator).tolist() == [0.0, 0.0, 0.0]
    # k3 of log q - log p = d is exp(d) - d - 1 >= 0
    k3 = L.kl_per_token(torch.tensor([-1.0]), torch.tensor([-2.0]), "k3")
    assert k3.item() == pytest.approx(math.exp(-1.0) + 1.0 - 1.0)
    with pytest.raises(ValueError, match="KL estimator 'k4'"):
        L.kl_per_token(logp, logp, "k4")


def test_reward_lands_on_the_last_answer_token_never_on_padding():
    # Right-padded rows: answers end at positions 3 and 5; row 2 has no answer token at all.
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])
    placed = L.scatter_last(torch.tensor([2.0, -1.0, 7.0]), mask)
    assert placed.tolist() == [[0, 0, 0, 2.0, 0, 0], [0, 0, 0, 0, 0, -1.0], [0, 0, 0, 0, 0, 0]]
    assert L.last_token_index(mask).tolist() == [3, 5, 0]


def test_policy_loss_at_ratio_one_is_minus_the_mean_advantage_and_clips():
    mask = torch.tensor([[1, 1, 0]])
    logp = torch.tensor([[-1.0, -2.0, 5.0]])
    adv = torch.tensor([[1.0, 3.0, 100.0]])
    loss, stats = L.policy_loss(logp, logp.clone(), adv, mask, clip=0.2)
    assert loss.item() == -2.0 and stats["ratio"].item() == 1.0 and stats["clip_fraction"].item() == 0.0
    # ratio e^0.5 > 1.2 with a positive advantage: the clipped term (1.2 A) wins the min.
    loss, stats = L.policy_loss(logp + 0.5, logp, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx(-1.2 * 2.0, abs=1e-6) and stats["clip_fraction"].item() == 1.0
    # A normaliser larger than the batch's tokens (a whole minibatch's) scales the loss down.
    loss, _ = L.policy_loss(logp, logp, adv, mask, clip=0.2, num_tokens=8)
    assert loss.item() == -0.5


def test_value_loss_clips_around_the_rollout_values():
    mask = torch.tensor([[1.0, 1.0]])
    old, ret = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    loss, stats = L.value_loss(torch.tensor([[0.5, 0.1]]), old, ret, mask, clip=0.2)
    # token 0: max((0.5-1)^2, (0.2-1)^2) = 0.64; token 1: max(0.81, 0.81); 0.5 * mean
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert stats["value_clip_fraction"].item() == 0.5


def test_whiten_and_explained_variance():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    w = L.whiten(x, mask)
    assert w[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6) and w[0, 3].item() == 0.0
    assert L.explained_variance(x, x, mask).item() == 1.0
    assert L.explained_variance(torch.full_like(x, 2.0), x, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_bradley_terry_loss_and_accuracy():
    loss, stats = L.bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx((-math.log(1 / (1 + math.e ** -1)) + math.log(2)) / 2)
    assert stats["accuracy"].item() == 0.5
    loss_c, _ = L.bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]), center_coef=0.1)
    assert loss_c.item() == pytest.approx(loss.item() + 0.1 * 0.5)
