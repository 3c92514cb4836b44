"""RL through `python -m train` on a tiny model (CPU): GRPO and PPO raise a rule reward on held-out prompts
while a placebo (rl.placebo: the same rewards dealt to the wrong answers) does not; DPO and the reward model learn
separable preference pairs; a reward model's export serves as PPO's reward; RL resumes exactly."""
from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from data.loading.batching import pad_mels
from data.loading.loader import iter_rendered
from data.text_tokenizer import load_tokenizer, special_ids
from model.checkpoint import load_stepfun, save_stepfun
from model.config import padded_vocab_size, preset_config
from model.generate import generate, split_ta4
from model.lalm import StepAudio2ForCausalLM
from model.score import is_score_folder
from tests.conftest import run_cli
from train.rl.rollout import left_padded

PY = sys.executable
MAX_NEW = 16


@pytest.fixture(scope="module")
def base(espeak_data, tmp_path_factory) -> Path:
    """A fresh tiny model in StepFun's layout for the espeak tokenizer: it samples nearly uniformly."""
    tok = load_tokenizer(str(espeak_data["tokenizer"]))
    ids = special_ids(tok)
    torch.manual_seed(1)
    config = preset_config("tiny", vocab_size=padded_vocab_size(len(tok)), audio_patch_token_id=ids.audio_patch)
    return save_stepfun(StepAudio2ForCausalLM(config).state_dict(), config,
                        tmp_path_factory.mktemp("rlbase") / "base", tokenizer=tok)


def train(run_dir: Path, data: dict, init: Path, kind: str, *overrides: str, nproc: int = 1, env=None):
    launcher = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 \
        else [PY]
    return run_cli(*launcher, "-m", "train", "recipes/demo/asr.yaml", f"run_dir={run_dir}", f"kind={kind}",
                   f"data.shards=[{data['train']}]", f"data.tokenizer={data['tokenizer']}", "eval.shards=[]",
                   f"model.init_from={init}", "data.num_workers=0", "metrics.log_every=1", "optim.warmup_steps=0",
                   "optim.min_lr_ratio=1.0", "checkpoint.every_steps=1000", f"rl.max_new_tokens={MAX_NEW}",
                   *overrides, env=env)


def metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def steps(run_dir: Path) -> dict:
    return {m["step"]: m for m in metrics(run_dir) if "tokens_per_s" in m}


def rule(fn: str) -> str:
    return f'rl.rewards=[{{name: audio, function: "tests.rl_rewards:{fn}"}}]'


@torch.no_grad()
def heldout_audio_share(model_dir: Path, data: dict, answers_per_prompt: int = 8) -> float:
    """The rule reward (share of answer tokens that are audio codes) of answers sampled at temperature 1 to
    the held-out prompts, which no run trained on."""
    tok = load_tokenizer(str(data["tokenizer"]))
    ids = special_ids(tok)
    model = load_stepfun(model_dir).float().eval()
    gen = torch.Generator().manual_seed(123)
    shares = []
    for sample in iter_rendered([str(data["heldout"])], tok, ids, with_answer=False):
        prompt_ids, mask = left_padded([sample["input_ids"]] * answers_per_prompt, ids.end_of_text)
        mels, lengths = pad_mels(sample["mels"] * answers_per_prompt)
        out = generate(model, prompt_ids, mask, mels=mels, mel_lengths=lengths, max_new_tokens=MAX_NEW,
                       stop_token_ids=[ids.eot, ids.end_of_text], temperature=1.0, generator=gen, include_stop=True)
        for answer in out:
            _, codes = split_ta4(answer, ids.audio_start, ids.first_audio_code, ids.num_audio_codes)
            shares.append(len(codes) / max(len(answer), 1))
    return sum(shares) / len(shares)


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_rl_raises_a_rule_reward_on_heldout_prompts_and_a_placebo_does_not(kind, espeak_data, base, tmp_path):
    setup = {"grpo": ["data.batch_size=2", "rl.num_generations=8", "rl.kl_coef=0.05", "optim.lr=1e-3"],
             "ppo": ["data.batch_size=16", "rl.num_generations=1", "rl.kl_coef=0.05", "optim.lr=1e-3",
                     "rl.epochs=2", "rl.num_minibatches=2", "rl.critic_lr=1e-3", "rl.critic_warmup_steps=5",
                     "rl.lam=1.0"]}[kind]
    for name, extra in (("audio_share", []), ("placebo", ["rl.placebo=true"])):
        train(tmp_path / name, espeak_data, base, kind, *setup, rule("audio_share"), *extra, "max_steps=30",
              "checkpoint.export=true")
    before = heldout_audio_share(base, espeak_data)
    after = heldout_audio_share(tmp_path / "audio_share" / "export", espeak_data)
    placebo = heldout_audio_share(tmp_path / "placebo" / "export", espeak_data)
    print(f"{kind}: held-out reward before {before:.3f}, after {after:.3f}, placebo {placebo:.3f}")
    # Measured: grpo 0.06 -> 0.5, ppo 0.06 -> 0.6; the placebos stay near 0.06.
    assert after > before + 0.2, (before, after)
    assert placebo < before + 0.05, (before, placebo)
    # The placebo logs the true rewards of its answers (they stay low), not the permuted ones it learns from.
    logged_placebo = [m["reward/audio_mean"] for m in steps(tmp_path / "placebo").values()]
    assert max(logged_placebo) < before + 0.15 and abs(logged_placebo[0] - steps(tmp_path / "audio_share")[1][
        "reward/audio_mean"]) < 0.05, logged_placebo
    real = steps(tmp_path / "audio_share")
    # The KL to the reference stays bounded (k3 per answer token; measured <= 4 with kl_coef 0.05).
    assert max(m.get("kl", 0.0) for m in real.values()) < 6.0  # (PPO's critic warm-up steps log none)
    assert sorted(real) == list(range(1, 31))
    logged = real[30]
    for key in ("reward", "reward_std", "reward/audio_mean", "reward/audio_std", "kl", "entropy", "clip_fraction",
                "policy_loss", "answer_tokens", "answer_text_tokens", "answer_audio_s", "stopped",
                "generation_tokens_per_s", "rollout_share"):
        assert key in logged and math.isfinite(logged[key]), key
    if kind == "ppo":
        assert {"value_loss", "explained_variance", "value_clip_fraction"} <= set(logged)
        # The critic learns: its values explain the returns better than at the start.
        assert logged["explained_variance"] > real[2]["explained_variance"]


# ------------------------------------------------------------------------------------------ preferences

WORDS = "the cat sat on a mat and dog ran far to see big red sun in sky".split()


def _pairs_file(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(4))
            f.write(json.dumps({"id": f"p{seed}-{i}", "messages": [{"role": "user", "text": f"tell me {words}"}],
                                "chosen": {"text": f"yes {words}"}, "rejected": {"text": f"no {words}"}}) + "\n")
    return path


@pytest.fixture(scope="module")
def pairs(espeak_data, tmp_path_factory) -> dict:
    """Separable preference pairs: the chosen answer says "yes ...", the rejected one "no ..."."""
    root = tmp_path_factory.mktemp("pairs")
    for name, n, seed in (("train", 48, 0), ("heldout", 16, 1)):
        run_cli(PY, "-m", "data.corpus.prepare", "preferences", str(_pairs_file(root / f"{name}.jsonl", n, seed)),
                str(root / name), "--shard-size", "16")
    return {"train": root / "train", "heldout": root / "heldout", "tokenizer": espeak_data["tokenizer"]}


def test_reward_model_learns_separable_pairs_and_serves_as_ppo_reward(pairs, espeak_data, base, tmp_path):
    rm = tmp_path / "rm"
    train(rm, pairs, base, "reward_model", "data.batch_size=4", "optim.lr=1e-3", "max_steps=25",
          f"rl.eval_pairs=[{pairs['heldout']}]", "checkpoint.export=true")
    logged = steps(rm)
    early = sum(logged[s]["loss"] for s in (1, 2, 3)) / 3
    late = sum(logged[s]["loss"] for s in (23, 24, 25)) / 3
    assert late < 0.5 * early, (early, late)
    evals = {k: v for m in metrics(rm) for k, v in m.items() if k.startswith("eval/pairwise_accuracy")}
    assert evals["eval/pairwise_accuracy_end"] > 0.9, evals
    assert is_score_folder(rm / "export")
    # Its export is a reward: PPO on prompts, the critic starting from it too (head included).
    ppo = tmp_path / "ppo"
    train(ppo, espeak_data, base, "ppo", "data.batch_size=4", "rl.num_generations=1", "optim.lr=1e-4",
          "max_steps=2", f'rl.rewards=[{{name: rm, model: "{rm / "export"}"}}, '
                         f'{{name: audio, function: "tests.rl_rewards:audio_share", weight: 0.5}}]')
    first = steps(ppo)[1]
    assert first["ratio"] == 1.0 and first["clip_fraction"] == 0.0
    assert first["reward"] == pytest.approx(first["reward/rm_mean"] + 0.5 * first["reward/audio_mean"], abs=1e-5)


def test_dpo_starts_at_log2_and_learns_separable_pairs(pairs, base, tmp_path):
    run = tmp_path / "dpo"
    train(run, pairs, base, "dpo", "data.batch_size=4", "optim.lr=1e-3", "max_steps=20", "rl.beta=0.5",
          f"rl.eval_pairs=[{pairs['heldout']}]")
    logged = steps(run)
    # The policy starts as its reference: the loss is log 2 and every implicit reward 0.
    assert logged[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logged[1]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert logged[20]["loss"] < 0.3
    evals = {k: v for m in metrics(run) for k, v in m.items() if k.startswith("eval/pairwise_accuracy")}
    assert evals["eval/pairwise_accuracy_start"] == 0.0  # all margins exactly 0 at the start
    assert evals["eval/pairwise_accuracy_end"] > 0.9, evals
    assert (run / "reference_logprobs.pt").is_file()


@pytest.mark.parametrize("kind,nproc", [("grpo", 1), ("ppo", 2)])
def test_rl_killed_mid_run_resumes_to_the_same_weights(kind, nproc, espeak_data, base, tmp_path):
    """ZeRO-0 (one process for GRPO, two gloo ranks for PPO): the rollout generators, the data position and
    the actor's and critic's optimizer states come back; the final weights are bit-equal."""
    setup = ["data.batch_size=2", "rl.num_generations=2", "rl.kl_coef=0.05", "optim.lr=1e-3", "rl.epochs=2",
             "rl.num_minibatches=2", rule("audio_share"), "checkpoint.every_steps=2", "checkpoint.export=true"]
    train(tmp_path / "whole", espeak_data, base, kind, *setup, "max_steps=5", nproc=nproc)
    with pytest.raises(AssertionError, match="exited"):
        train(tmp_path / "split", espeak_data, base, kind, *setup, "max_steps=5", nproc=nproc,
              env={"STEPAUDIO_FAULT": f"kill:3:{nproc - 1}"})
    train(tmp_path / "split", espeak_data, base, kind, *setup, "max_steps=5", nproc=nproc)
    whole, split = steps(tmp_path / "whole"), steps(tmp_path / "split")
    for step in (3, 4, 5):
        for key in ("reward", "kl", "policy_loss") + (("value_loss",) if kind == "ppo" else ()):
            assert split[step][key] == whole[step][key], (step, key)
    a = load_stepfun(tmp_path / "whole" / "export").state_dict()
    b = load_stepfun(tmp_path / "split" / "export").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_rl_from_an_existing_adapter_uses_a_frozen_copy_of_it_as_reference(espeak_data, base, tmp_path):
    """TRL #3194: with an adapter tuned further, 'adapters off' is the wrong reference (a spurious KL from
    step 1). rl.reference=auto then holds a frozen copy of base + that adapter: KL exactly 0 at step 1."""
    from train.config import LoraConfig
    from train.lora import apply_lora, audio_rows, save_adapter

    tok = load_tokenizer(str(espeak_data["tokenizer"]))
    ids = special_ids(tok)
    cfg = LoraConfig(enabled=True, r=4, init_from=str(base))
    model = load_stepfun(base)
    apply_lora(model, cfg, audio_rows(ids.first_audio_code, ids.num_audio_codes))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)  # as if trained
    save_adapter(model, model.state_dict(), tmp_path / "adapter")
    common = ["data.batch_size=2", "rl.num_generations=2", "rl.kl_coef=0.1", "optim.lr=1e-3", "max_steps=1",
              rule("audio_share"), "lora.enabled=true", f"lora.init_from={base}", "lora.r=4", "model.init_from=null",
              f"lora.adapter_init={tmp_path / 'adapter'}"]
    train(tmp_path / "auto", espeak_data, base, "grpo", *common)
    assert steps(tmp_path / "auto")[1]["kl"] == 0.0
    train(tmp_path / "off", espeak_data, base, "grpo", *common, "rl.reference=adapters_off")
    assert steps(tmp_path / "off")[1]["kl"] > 1e-4  # the base without the adapter is another policy
