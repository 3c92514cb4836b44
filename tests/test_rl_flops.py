"""Model FLOPs of RL steps (train.flops, train.rl): KV-cache generation by hand; one GRPO and one PPO step on a
tiny model count exactly the hand sum of their passes (rollout, old log-probabilities, reference, critic
values, then epochs x the policy's and the critic's training) from the config's parameter counts and the
rollout's token counts; and `python -m train` logs finite tflops_per_s and MFU for GRPO, DPO and a reward
model.

Run as a script (by the second test, one gloo rank on CPU), this file is the step's side."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("STEPAUDIO_DEVICE", "cpu")

from model.checkpoint import load_stepfun  # noqa: E402
from model.config import preset_config  # noqa: E402
from tests.conftest import run_cli  # noqa: E402
from tests.test_rl_train import base, metrics, pairs, rule, train  # noqa: E402,F401 (base, pairs: fixtures)
from train import flops as F  # noqa: E402

# tiny with a 320-token vocabulary: hidden 64, 2 layers, 4 heads x 16 (q_width 64), 2 key/value heads x 16,
# intermediate 128.
DECODER = 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128)  # q, k, v, o, gate, up, down: 73,728
HEAD = 64 * 320                                                          # lm_head: 20,480
ATTENTION = 2 * 2 * 64  # 2 x layers x q_width: a causal pass over n tokens costs ATTENTION x n (n + 1)
PROMPTS = [[10, 20, 30, 40, 50], [11, 21, 31]]
EPOCHS, MAX_NEW = 2, 6


def tiny():
    return preset_config("tiny", vocab_size=320, audio_patch_token_id=300)


def test_generation_flops_by_hand():
    config = tiny()
    # Row 1: a 5-token prompt and 3 answer tokens: 5 + 2 tokens fed, 3 logit rows. Row 2: a stop at once.
    by_hand = (2 * DECODER * 7 + 2 * HEAD * 3 + ATTENTION * 7 * 8) \
        + (2 * DECODER * 3 + 2 * HEAD * 1 + ATTENTION * 3 * 4)
    assert F.generation_flops(config, [5, 3], [3, 1]) == by_hand
    # With the KV cache the token fed at position t attends to its t + 1 cached keys: per key and layer, 2 x
    # q_width for QK^T and as many for AV. Summed, one causal pass over the fed tokens.
    assert F.generation_flops(config, [5], [3]) == sum(
        2 * DECODER + 2 * (2 * 64 + 2 * 64) * (t + 1) for t in range(7)) + 2 * HEAD * 3
    # A prompt's audio chunk of 1 s (100 mel frames), forward only, once per row that encodes it
    # (tests/test_flops.py: conv1, conv2 and 2 blocks; attention; the adapter).
    encoder = 2 * (100 * 3 * 128 * 32 + 50 * 3 * 32 * 32 + 2 * 50 * 12 * 32 * 32) + 2 * 4 * 32 * 50 * 50
    adapter = 2 * 13 * (3 * 32 * 32 + 32 * 2048 + 2048 * 64)
    assert F.generation_flops(config, [5, 5], [3, 3], [100, 100]) == 2 * F.generation_flops(config, [5], [3]) \
        + 2 * (encoder + adapter)
    with pytest.raises(ValueError, match="one per row"):
        F.generation_flops(config, [5, 3], [3])


# ------------------------------------------------------------------------------------ one step, by hand

def step_main(kind: str, out: Path) -> None:
    """One RL step of `kind` on the tiny model (ZeRO-0, CPU); writes its counted FLOPs and the rollout's
    (prompt, answer) lengths to OUT/step.json."""
    from data.text_tokenizer import SpecialIds
    from model.lalm import StepAudio2ForCausalLM
    from model.score import StepAudio2ForScore
    from train.config import RewardConfig, TrainConfig
    from train.engine import Engine, init_distributed, shutdown_distributed
    from train.rl import policy

    init_distributed()
    torch.manual_seed(0)
    model = StepAudio2ForCausalLM(tiny())
    state = model.state_dict()
    # Nearly greedy sampling, and the stop token is the first answer token of prompt 0: its answers end after
    # one token while prompt 1's run to the limit (or stop early by chance): answers of different lengths.
    with torch.no_grad():
        stop = int(model(torch.tensor([PROMPTS[0]])).logits[0, -1].argmax())
    ids = SpecialIds(end_of_text=0, bot=1, eot=stop, audio_start=3, audio_end=4, audio_patch=300, tts_pad=5,
                     tts_start=6, tts_end=7, first_audio_code=280, num_audio_codes=16, audio_pad=296)
    cfg = TrainConfig()
    cfg.kind = kind
    cfg.model.trainable = ["lm_head"] if kind == "ppo" else ["adapter", "embeddings", "decoder", "lm_head"]
    cfg.data.batch_size = len(PROMPTS)
    cfg.rl = dataclasses.replace(cfg.rl, num_generations=2, max_new_tokens=MAX_NEW, temperature=0.05,
                                 epochs=EPOCHS, num_minibatches=2, kl_coef=0.1,
                                 rewards=[RewardConfig(name="audio", function="tests.rl_rewards:audio_share")])

    def build_model(score: bool = False, init_from=None, frozen: bool = False):
        if score:  # the critic: a fresh score head on the policy's backbone
            critic = StepAudio2ForScore(tiny())
            critic.load_state_dict(state, strict=False)
            return critic
        copy = StepAudio2ForCausalLM(tiny())
        copy.load_state_dict(state)
        return copy

    class Tok:
        def decode(self, token_ids):
            return " ".join(map(str, token_ids))

    # A prompt batch as the loader gives it (data.render=prompt): right-padded, no audio.
    input_ids = torch.zeros(len(PROMPTS), max(map(len, PROMPTS)), dtype=torch.long)
    for row, prompt in enumerate(PROMPTS):
        input_ids[row, :len(prompt)] = torch.tensor(prompt)
    prompts = {"input_ids": input_ids, "attention_mask": (input_ids != 0).long(), "keys": ["p0", "p1"]}
    engine = Engine(model, cfg)
    engine.set_lr_factor(1.0)
    ctx = {"tok": Tok(), "ids": ids, "rank": 0, "world_size": 1, "build_model": build_model}
    algorithm = policy.PolicyGradient(cfg, engine, [prompts], ctx)
    rollouts = []
    sample = policy.sample_answers
    policy.sample_answers = lambda *a, **k: rollouts.append(sample(*a, **k)) or rollouts[-1]
    result = algorithm.step(1)
    rows = [[len(s.prompt_ids), len(s.answer_ids)] for s in rollouts[0].samples]
    (out / "step.json").write_text(json.dumps({"flops": result.flops, "rows": rows}))
    algorithm.close()
    engine.close()
    if algorithm.critic is not None:
        algorithm.critic.close()
    shutdown_distributed()


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_an_rl_step_counts_every_pass_by_hand(kind, tmp_path):
    run_cli(sys.executable, __file__, kind, str(tmp_path), timeout=300)
    got = json.loads((tmp_path / "step.json").read_text())
    rows = got["rows"]
    assert [p for p, _ in rows] == [5, 5, 3, 3]
    assert min(a for _, a in rows) == 1 and max(a for _, a in rows) > 1, rows  # answers of different lengths
    by_hand = 0
    for prompt, answer in rows:
        n = prompt + answer  # the training row; its labels are the answer's tokens
        fed = prompt + answer - 1  # generation: the last answer token is never fed back
        generation = 2 * DECODER * fed + 2 * HEAD * answer + ATTENTION * fed * (fed + 1)
        forward = 2 * DECODER * n + 2 * HEAD * answer + ATTENTION * n * (n + 1)
        if kind == "grpo":
            # old log-probabilities and the reference's forward; each epoch trains decoder and lm_head
            # (3 passes each, attention 3 too).
            by_hand += generation + 2 * forward + EPOCHS * 3 * forward
        else:
            # model.trainable = [lm_head]: the policy's decoder runs forward only in training (nothing before
            # lm_head trains), lm_head 3 passes; the critic (a score model, no lm_head) likewise forward only
            # (its head is not counted).
            critic = 2 * DECODER * n + ATTENTION * n * (n + 1)
            policy_train = 2 * DECODER * n + 3 * 2 * HEAD * answer + ATTENTION * n * (n + 1)
            by_hand += generation + 2 * forward + critic + EPOCHS * (policy_train + critic)
    assert got["flops"] == by_hand, (got["flops"], by_hand)


# ------------------------------------------------------------------------------------------- a real run

@pytest.mark.parametrize("kind", ["grpo", "dpo", "reward_model"])
def test_an_rl_run_logs_tflops_and_mfu(kind, espeak_data, base, pairs, tmp_path):
    run = tmp_path / kind
    if kind == "grpo":
        train(run, espeak_data, base, kind, "data.batch_size=2", "rl.num_generations=2", "rl.kl_coef=0.05",
              rule("audio_share"), "max_steps=2")
    else:
        train(run, pairs, base, kind, "data.batch_size=2", "max_steps=2")
    logged = [m for m in metrics(run) if "tokens_per_s" in m]
    assert [m["step"] for m in logged] == [1, 2]
    decoder = F.decoder_matmul_params(load_stepfun(base).config)
    for m in logged:
        for key in ("tflops_per_s", "tflops_per_s_per_device", "flops_per_token", "mfu"):
            assert math.isfinite(m[key]) and m[key] > 0, (key, m)
        if kind == "grpo":
            # Per token the decoder alone runs in the rollout (2 x its parameters), the old log-probabilities
            # (2), the reference (2) and training (6): more than the 6 of a supervised step.
            assert m["flops_per_token"] > 10 * decoder, m
        else:  # training alone (DPO's reference was computed once, before the first step)
            assert 6 * decoder < m["flops_per_token"] < 10 * decoder, m


if __name__ == "__main__":
    step_main(sys.argv[1], Path(sys.argv[2]))
    from train.engine import exit_process

    exit_process(0)  # a finished rank exits 0 (train.engine.exit_process says why)
