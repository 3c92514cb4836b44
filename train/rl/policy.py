"""GRPO and PPO: one step = one rollout batch (data.batch_size prompts per rank x rl.num_generations answers),
its rewards, advantages, and rl.epochs passes of rl.num_minibatches optimizer steps over it.

GRPO: advantages are the group-normalised rewards of the answers to one prompt, the same on every token of
an answer; an optional KL-to-reference loss (k3 by default) with weight rl.kl_coef.
PPO: a critic (a score model with its own optimizer) gives a value per token; the reward lands on the
answer's last token (its <|EOT|>), minus rl.kl_coef x KL per token when rl.kl_in_reward; GAE, whitening,
clipped value loss.
Both: token-level normalisation (every answer token of a minibatch weighs the same), clipped ratio, and
the log-probabilities recomputed at the sampling temperature, so on the first minibatch of a step the
ratio is exactly 1 (and the KL exactly 0 while the policy equals its reference).
A step's model FLOPs (train.flops) count the rollout's generation, every forward-only scoring pass and the
training passes of each epoch: tflops_per_s and MFU cover all the work of RL, not only its updates.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

import torch

from train.algorithm import Algorithm, StepResult
from train.config import TrainConfig
from train.engine import Engine, FrozenModel
from train.flops import ModelFlops, training_passes
from train.rl import losses as L
from train.rl.reference import Reference, reference_mode
from train.rl.rewards import Rewards
from train.rl.rollout import answer_mask, collate_rows, prompt_rows, sample_answers


def _generator_seed(seed: int, rank: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + 17) % (2**63 - 1)


def _action_values(scores_BT: torch.Tensor) -> torch.Tensor:
    """The critic's value of the state each token is chosen in: the score at the position before it (whose
    hidden state has seen everything but that token), aligned with labels like the log-probabilities."""
    return torch.nn.functional.pad(scores_BT[:, :-1], (1, 0))


class PolicyGradient(Algorithm):
    def __init__(self, cfg: TrainConfig, engine: Engine, loader, ctx: Dict[str, Any]):
        self.cfg, self.rl, self.engine, self.loader = cfg, cfg.rl, engine, loader
        self.tok, self.ids, self.rank = ctx["tok"], ctx["ids"], ctx["rank"]
        self.ppo = cfg.kind == "ppo"
        self.batches = iter(loader)
        # Rollout sampling draws from a generator of its own, per rank, saved with the data position.
        self.generator = torch.Generator(device=engine.device)
        self.generator.manual_seed(_generator_seed(cfg.seed, self.rank))
        self.shuffle = torch.Generator()
        self.shuffle.manual_seed(_generator_seed(cfg.seed + 1, self.rank))
        self.placebo: Optional[torch.Generator] = None
        if self.rl.placebo:
            self.placebo = torch.Generator()
            self.placebo.manual_seed(_generator_seed(cfg.seed + 2, self.rank))
        build_model = ctx["build_model"]
        self.reference: Optional[Reference] = None
        if self.rl.kl_coef > 0:
            self.reference = Reference(cfg, engine, build_model, reference_mode(cfg))

        def score_model(folder: str) -> FrozenModel:
            return FrozenModel(build_model(score=True, init_from=folder, frozen=True), cfg, engine.device)

        self.rewards = Rewards(self.rl.rewards, score_model=score_model, truncated_reward=self.rl.truncated_reward)
        self.critic: Optional[Engine] = None
        if self.ppo:
            init = self.rl.critic_init or next((r.model for r in self.rl.rewards if r.model), None)
            self.critic = Engine(build_model(score=True, init_from=init), cfg, lr=self.rl.critic_lr)
            self.critic.module.train()
        # Model FLOPs: the reference is the policy's architecture; reward models and the critic have their own.
        self.policy_flops = ModelFlops.of(engine.module)
        self.critic_flops = ModelFlops.of(self.critic.module) if self.critic is not None else None
        self.reward_flops = [ModelFlops.of(m.module) for m in self.rewards.models]
        self.train_passes = training_passes(cfg.model.trainable, cfg.lora)

    # ------------------------------------------------------------------------------------------- state

    def engines(self) -> Dict[str, Engine]:
        return {"critic": self.critic} if self.critic is not None else {}

    def state_dict(self) -> Dict[str, Any]:
        state = {"loader": self.loader.state_dict(), "generator": self.generator.get_state().cpu(),
                 "shuffle": self.shuffle.get_state(), "rank": self.rank}
        if self.placebo is not None:
            state["placebo"] = self.placebo.get_state()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        ranks = state["ranks"]
        self.loader.load_state_dict({**state, "ranks": [r["loader"] for r in ranks]})
        mine = next((r for r in ranks if r.get("rank") == self.rank), None)
        if mine is not None and len(ranks) == torch.distributed.get_world_size():
            self.generator.set_state(mine["generator"].to(self.generator.get_state().device))
            self.shuffle.set_state(mine["shuffle"])
            if self.placebo is not None and "placebo" in mine:
                self.placebo.set_state(mine["placebo"])

    def close(self) -> None:
        self.rewards.close()
        if self.reference is not None:
            self.reference.close()

    # -------------------------------------------------------------------------------------------- step

    def step(self, step: int) -> StepResult:
        rl, cfg, engine = self.rl, self.cfg, self.engine
        t0 = time.perf_counter()
        prompts = prompt_rows(next(self.batches), self.ids.audio_start)
        data_wait_s = time.perf_counter() - t0
        rollout = sample_answers(engine, prompts, self.ids, self.tok, rl.num_generations, rl.max_new_tokens,
                                 rl.temperature, rl.top_p, self.generator)
        t_rollout = time.perf_counter() - t0
        rows = rollout.rows
        per_mb = len(rows) // rl.num_minibatches
        per_micro = per_mb // cfg.engine.grad_accum_steps
        micro = [collate_rows(rows[i: i + per_micro], self.ids.end_of_text) for i in range(0, len(rows), per_micro)]
        starts = list(range(0, len(rows), per_micro))
        masks = [answer_mask(b).to(engine.device) for b in micro]

        # Scoring pass, no grad: the rollout's log-probabilities, the reference's, the critic's values.
        with torch.no_grad():
            old = [engine.forward(b, token_logprobs=True, temperature=rl.temperature).token_logprobs.detach()
                   for b in micro]
            ref = [self.reference.logprobs(b, rl.temperature) for b in micro] if self.reference else None
            values = [_action_values(self.critic.forward(b).scores.detach()) for b in micro] if self.critic else None
        total, parts = self.rewards(rollout.samples, micro)
        # A placebo run learns from the same rewards dealt to the wrong answers (permuted across the rank's
        # rollout batch); the metrics keep the true rewards, which is what the placebo shows.
        trained = total[torch.randperm(len(total), generator=self.placebo)] if self.placebo is not None else total
        rewards_B = trained.to(engine.device)

        if self.ppo:
            advantages, returns = [], []
            for k, b in enumerate(micro):
                rows_B = rewards_B[starts[k]: starts[k] + b["num_samples"]]
                token_rewards = L.scatter_last(rows_B, masks[k])
                if ref is not None and rl.kl_in_reward:
                    token_rewards = token_rewards - rl.kl_coef * L.kl_per_token(old[k], ref[k], rl.kl_estimator) * masks[k]
                adv, ret = L.gae(token_rewards, values[k], masks[k], rl.gamma, rl.lam)
                advantages.append(adv)
                returns.append(ret)
            if rl.whiten_advantages:
                flat = torch.cat([a[m > 0] for a, m in zip(advantages, masks)])
                mean, std = flat.mean(), flat.std() if flat.numel() > 1 else flat.new_ones(())
                advantages = [(a - mean) / (std + 1e-8) * m for a, m in zip(advantages, masks)]
        else:
            group_B = L.group_advantages(rewards_B, rl.num_generations, rl.scale_rewards)
            advantages = [group_B[starts[k]: starts[k] + b["num_samples"], None] * masks[k]
                          for k, b in enumerate(micro)]
            returns = None

        stats: Dict[str, List[torch.Tensor]] = {}

        def note(name: str, value) -> None:
            stats.setdefault(name, []).append(torch.as_tensor(value, dtype=torch.float32, device=engine.device))

        train_policy = step > rl.critic_warmup_steps or not self.ppo
        gas = cfg.engine.grad_accum_steps
        # Token-level normalisation over each minibatch on all ranks together: every answer token of the
        # minibatch weighs the same wherever it is (the counts are host ints from the collate; one collective).
        world = torch.distributed.get_world_size()
        local = torch.tensor([float(sum(micro[k]["num_loss_tokens"] for k in range(mb * gas, (mb + 1) * gas)))
                              for mb in range(rl.num_minibatches)], dtype=torch.float64, device=engine.device)
        torch.distributed.all_reduce(local)
        # DeepSpeed averages gradients over ranks: dividing by global / world leaves exactly 1 / global.
        per_minibatch = [max(c, 1.0) / world for c in local.tolist()]
        for epoch in range(rl.epochs):
            order = list(range(rl.num_minibatches)) if epoch == 0 else \
                torch.randperm(rl.num_minibatches, generator=self.shuffle).tolist()
            for mb in order:
                ks = range(mb * gas, (mb + 1) * gas)
                mb_tokens = per_minibatch[mb]
                for k in ks:
                    if train_policy:
                        out = engine.forward(micro[k], token_logprobs=True, temperature=rl.temperature)
                        loss, st = L.policy_loss(out.token_logprobs, old[k], advantages[k], masks[k], rl.clip,
                                                 num_tokens=mb_tokens)
                        if ref is not None:
                            kl = L.kl_per_token(out.token_logprobs, ref[k], rl.kl_estimator) * masks[k]
                            if not (self.ppo and rl.kl_in_reward):
                                loss = loss + rl.kl_coef * kl.sum() / mb_tokens
                            note("kl", kl.detach().sum() / masks[k].sum().clamp(min=1))
                        # DeepSpeed divides each micro-batch's loss by engine.grad_accum_steps; the
                        # normaliser above already counts every token of the minibatch.
                        engine.backward_and_step(loss * gas)
                        note("policy_loss", loss.detach())
                        note("ratio", st["ratio"])
                        note("clip_fraction", st["clip_fraction"])
                        if epoch == 0:
                            note("entropy", L.masked_mean(out.entropy, masks[k]))
                        del out
                    if self.critic is not None:
                        v = _action_values(self.critic.forward(micro[k]).scores)
                        vloss, vst = L.value_loss(v, values[k], returns[k], masks[k], rl.value_clip,
                                                  num_tokens=mb_tokens)
                        self.critic.backward_and_step(vloss * gas)
                        note("value_loss", vloss.detach())
                        note("value_clip_fraction", vst["value_clip_fraction"])
                        del v
        metrics: Dict[str, Any] = {name: torch.stack(vs).mean() for name, vs in stats.items()}
        samples = rollout.samples
        metrics.update({"reward": total.mean().item(), "reward_std": total.std().item() if len(total) > 1 else 0.0,
                        "answer_tokens": sum(len(s.answer_ids) for s in samples) / len(samples),
                        "answer_text_tokens": sum(len(s.text_ids) for s in samples) / len(samples),
                        "answer_audio_s": sum(s.audio_s for s in samples) / len(samples),
                        "stopped": sum(s.finished for s in samples) / len(samples),
                        "generation_tokens_per_s": rollout.generated_tokens / max(rollout.generation_s, 1e-9),
                        "rollout_share": t_rollout / max(time.perf_counter() - t0, 1e-9)})
        for name, scores in parts.items():
            metrics[f"reward/{name}_mean"] = scores.mean().item()
            metrics[f"reward/{name}_std"] = scores.std().item() if len(scores) > 1 else 0.0
        if self.critic is not None:
            metrics["explained_variance"] = torch.stack([
                L.explained_variance(values[k], returns[k], masks[k]) for k in range(len(micro))]).mean()
            metrics["value_mean"] = torch.stack([L.masked_mean(values[k], masks[k]) for k in range(len(micro))]).mean()
        tokens = sum(b["num_tokens"] for b in micro)
        audio_s = sum(float(b["num_audio_s"]) for b in micro)
        flops = self.step_flops(rollout, micro, train_policy)
        return StepResult(tokens, metrics, audio_s, data_wait_s, flops)

    def step_flops(self, rollout, micro: List[Dict[str, Any]], train_policy: bool) -> float:
        """This rank's model FLOPs of a step (train.flops): the rollout's generation; forward passes for the
        old log-probabilities, the reference's, the critic's values and each reward model's scores; then
        rl.epochs passes over every micro-batch, each the policy's training (unless the critic warms up) and
        the critic's."""
        rl = self.rl
        samples = rollout.samples
        flops = self.policy_flops.generation([len(s.prompt_ids) for s in samples],
                                             [len(s.answer_ids) for s in samples],
                                             [m.shape[-1] for row in rollout.rows for m in row["mels"]])
        forward = sum(self.policy_flops.forward(b) for b in micro)
        flops += forward * (2 if self.reference is not None else 1)
        scorers = self.reward_flops + ([self.critic_flops] if self.critic_flops is not None else [])
        flops += sum(model.forward(b) for model in scorers for b in micro)
        per_epoch = 0.0
        if train_policy:
            per_epoch += sum(self.policy_flops.train(b, self.train_passes) for b in micro)
        if self.critic_flops is not None:
            per_epoch += sum(self.critic_flops.train(b, self.train_passes) for b in micro)
        return flops + rl.epochs * per_epoch
