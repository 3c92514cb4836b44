"""The arithmetic of RLHF, as pure tensor functions: KL estimators, advantages (GAE, group-normalised),
whitening, and the DPO, Bradley-Terry, clipped policy and clipped value losses.

Shapes: B rows (answers), T positions; `mask_BT` is 1 on the answer's tokens (the positions whose
log-probabilities count), 0 on the prompt and on padding. Tensors aligned with labels, as
StepAudio2ForCausalLM's token_logprobs are.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

KL_ESTIMATORS = ("k1", "k2", "k3")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x where mask is 1 (over all of it, or along dim); 0 where the mask is empty."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of x where mask is 1 (0 for fewer than two entries)."""
    mean = masked_mean(x, mask)
    n = mask.to(x.dtype).sum()
    return ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (shift_mean=False: the mean is kept), 0 outside the mask."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """An estimate of KL(policy || reference) per sampled token, from log p (policy) and log q (reference)
    of the token the policy drew (Schulman's estimators): k1 = log p - log q (unbiased, can be negative),
    k2 = (log p - log q)^2 / 2, k3 = exp(log q - log p) - (log q - log p) - 1 (unbiased, >= 0).
    All three are exactly 0 where the two models agree."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"KL estimator {estimator!r}: expected one of {KL_ESTIMATORS}")
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    # Clamped so one wild token cannot overflow exp() into inf.
    neg = (-log_ratio).clamp(-20.0, 20.0)
    return torch.exp(neg) - neg - 1.0


def last_token_index(mask_BT: torch.Tensor) -> torch.Tensor:
    """[B] the position of each row's last masked token (the answer's <|EOT|>, or its last token when
    cut at the length limit): where a sequence-level reward lands. Rows with an empty mask give 0."""
    T = mask_BT.shape[1]
    positions_BT = torch.arange(T, device=mask_BT.device).expand_as(mask_BT)
    return torch.where(mask_BT.bool(), positions_BT, torch.zeros_like(positions_BT)).max(dim=1).values


def scatter_last(scores_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """[B, T]: each row's score on its last masked token, 0 everywhere else (never on padding)."""
    out_BT = torch.zeros(mask_BT.shape, dtype=scores_B.dtype, device=scores_B.device)
    has_any_B = mask_BT.bool().any(dim=1)
    return out_BT.scatter(1, last_token_index(mask_BT)[:, None], (scores_B * has_any_B)[:, None])


def gae(rewards_BT: torch.Tensor, values_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> Tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, T] by generalised advantage estimation over each row's masked tokens.

    The masked tokens of a row are taken as one contiguous episode (an answer); the value after its last
    token is 0 (the episode ends). delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1},
    returns = A + V. Outside the mask both are 0."""
    mask = mask_BT.to(values_BT.dtype)
    values = values_BT * mask
    rewards = rewards_BT * mask
    B, T = values.shape
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        # Padding after the answer passes "nothing follows" on; inside the answer the chain continues.
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_adv = torch.where(m > 0, adv, next_adv)
    return advantages, (advantages + values) * mask


def group_advantages(rewards_B: torch.Tensor, group_size: int, scale: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantage of each answer: its reward minus the mean of its group (the group_size answers to
    the same prompt, consecutive rows), divided by the group's std when `scale` (Dr. GRPO: scale=False).
    A group whose answers all scored the same gets 0: it carries no signal."""
    if rewards_B.numel() % group_size:
        raise ValueError(f"{rewards_B.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards_B.view(-1, group_size).float()
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        std = grouped.std(dim=1, keepdim=True, unbiased=True) if group_size > 1 else torch.ones_like(centred[:, :1])
        centred = centred / (std + eps)
    return centred.view(-1)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip: float, num_tokens: torch.Tensor | float | None = None
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, token-level: -sum(min(r A, clip(r) A)) / num_tokens over the masked tokens,
    r = exp(logprobs - old_logprobs). num_tokens: the normaliser (default: this batch's masked tokens; a
    step's total across micro-batches and ranks keeps every token's weight equal).
    Returns (loss, {"ratio": mean r, "clip_fraction": share of tokens whose r left [1-clip, 1+clip]})."""
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip, 1.0 + clip) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    denominator = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    loss = (per_token * mask).sum() / denominator
    with torch.no_grad():
        stats = {"ratio": masked_mean(ratio, mask),
                 "clip_fraction": masked_mean(((ratio - 1.0).abs() > clip).to(ratio.dtype), mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float, num_tokens: torch.Tensor | float | None = None
               ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """PPO's clipped value loss: 0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2), token-level like
    policy_loss (clip <= 0: unclipped). Returns (loss, {"value_clip_fraction"})."""
    mask = mask.to(values.dtype)
    unclipped = (values - returns) ** 2
    if clip > 0:
        clipped_values = old_values + (values - old_values).clamp(-clip, clip)
        per_token = 0.5 * torch.maximum(unclipped, (clipped_values - returns) ** 2)
        with torch.no_grad():
            fraction = masked_mean(((values - old_values).abs() > clip).to(values.dtype), mask)
    else:
        per_token = 0.5 * unclipped
        fraction = torch.zeros((), device=values.device)
    denominator = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    return (per_token * mask).sum() / denominator, {"value_clip_fraction": fraction}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over the masked tokens: 1 = a perfect critic, 0 = no better
    than a constant, < 0 = worse."""
    return 1.0 - masked_var(returns - values, mask) / masked_var(returns, mask).clamp(min=1e-8)


def sequence_logprobs(token_logprobs_BT: torch.Tensor, mask_BT: torch.Tensor,
                      length_normalised: bool = False) -> torch.Tensor:
    """[B] the answer's log-probability: the sum over its masked tokens (or their mean)."""
    total = (token_logprobs_BT * mask_BT.to(token_logprobs_BT.dtype)).sum(dim=1)
    return total / mask_BT.sum(dim=1).clamp(min=1) if length_normalised else total


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, label_smoothing: float = 0.0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """DPO (sigmoid) over [B] sequence log-probabilities of the chosen and rejected answers under the policy
    and the reference: -log sigmoid(beta * ((pc - rc) - (pr - rr))), mean over pairs; with label smoothing
    eps the conservative form (1 - eps) * that + eps * -log sigmoid(-...). Equals log 2 when the policy is
    the reference. Returns (loss, {"reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward"})."""
    chosen_reward = beta * (chosen - ref_chosen)
    rejected_reward = beta * (rejected - ref_rejected)
    logits = chosen_reward - rejected_reward
    loss = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    with torch.no_grad():
        stats = {"reward_margin": logits.mean(), "reward_accuracy": (logits > 0).float().mean(),
                 "chosen_reward": chosen_reward.mean(), "rejected_reward": rejected_reward.mean()}
    return loss.mean(), stats


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                       center_coef: float = 0.0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Reward-model loss on [B] scores: -log sigmoid(s_chosen - s_rejected), mean over pairs, plus
    center_coef * mean((s_chosen + s_rejected)^2) to keep scores near 0 (reward centring).
    Returns (loss, {"accuracy": share of pairs ranked right, "margin": mean s_chosen - s_rejected})."""
    margin = chosen_scores - rejected_scores
    loss = -F.logsigmoid(margin).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen_scores + rejected_scores) ** 2).mean()
    with torch.no_grad():
        stats = {"accuracy": (margin > 0).float().mean(), "margin": margin.mean()}
    return loss, stats
