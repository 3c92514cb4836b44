"""Every recipe under recipes/ loads against the schema (every curriculum stage merged and validated), and
the paper's and the demo's curricula carry the budgets, rates and data their comments promise."""
from __future__ import annotations

import pytest

from tests.conftest import REPO
from train.recipe import load_config, stage_config
from train.schedule import Schedule

RECIPES = sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").rglob("*.yaml"))


def test_the_expected_recipes_exist():
    for name in ("recipes/demo/asr.yaml", "recipes/demo/curriculum.yaml", "recipes/lora/custom_voice.yaml",
                 "recipes/lora/s2st.yaml", "recipes/step_audio2/curriculum.yaml", "recipes/step_audio2/sft.yaml"):
        assert name in RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_loads_against_the_schema(recipe):
    cfg = load_config(str(REPO / recipe))  # merges and validates every stage too
    runs = [stage_config(cfg, i) for i in range(len(cfg.stages))] or [cfg]
    for one in runs:
        assert one.max_steps or one.max_tokens
        assert one.data.shards or one.data.datasets
        assert one.data.tokenizer


def paper_stages():
    cfg = load_config(str(REPO / "recipes/step_audio2/curriculum.yaml"))
    return cfg, {s.name: stage_config(cfg, i) for i, s in enumerate(cfg.stages)}


def start_and_end_lr(one) -> tuple:
    s = Schedule.from_config(one)
    return one.optim.lr * s.factor(s.warmup_steps, 0), one.optim.lr * s.factor(10**9, one.max_tokens)


def test_paper_curriculum_budgets_rates_and_sequence_lengths():
    cfg, st = paper_stages()
    assert list(st) == ["align", "extend", "main", "cooldown", "sft", "ppo_length", "reward_model",
                        "ppo_reward_model", "grpo_perception"]
    rl = {n: st.pop(n) for n in ["ppo_length", "reward_model", "ppo_reward_model", "grpo_perception"]}
    assert [st[n].max_tokens for n in st] == [100e9, 256e9, 800e9, 200e9, 4e9]
    assert [st[n].data.max_seq_len for n in st] == [8192, 16384, 16384, 16384, 8192]
    # RL (the report): PPO 60 iterations (binary reward), PPO 120 with a reward model (global batch 64 on
    # 8 x 8 GPUs, actor lr 1e-6, critic lr 2.5e-6), GRPO 400.
    assert [(rl[n].kind, rl[n].max_steps) for n in rl] == [("ppo", 60), ("reward_model", 2000), ("ppo", 120),
                                                            ("grpo", 400)]
    ppo = rl["ppo_reward_model"]
    assert 8 * 8 * ppo.data.batch_size * ppo.rl.num_generations == 64
    assert (ppo.optim.lr, ppo.rl.critic_lr) == (1e-6, 2.5e-6)
    assert ppo.rl.rewards[0].model == "stage:reward_model"  # resolved to that stage's export by the runner
    assert start_and_end_lr(st["align"]) == pytest.approx((1e-4, 2e-5))
    assert start_and_end_lr(st["main"]) == pytest.approx((2e-5, 2e-5))
    assert start_and_end_lr(st["cooldown"]) == pytest.approx((2e-5, 5e-6))
    assert start_and_end_lr(st["sft"]) == pytest.approx((1e-5, 1e-6))
    ext = st["extend"]
    group_lrs = {g: ext.optim.lr * ext.lr_multipliers.get(g, 1.0) for g in ext.model.trainable}
    assert group_lrs == pytest.approx({"adapter": 5e-5, "embeddings": 5e-5, "decoder": 2e-5, "lm_head": 4e-5})
    assert st["align"].model.trainable == ["adapter"]
    assert all("encoder" not in one.model.trainable for one in st.values())  # frozen throughout the report
    assert all(one.engine.zero_stage == 3 and one.engine.precision == "bf16" for one in st.values())
    assert cfg.model.init_parts.qwen and cfg.model.init_parts.audio_encoder and cfg.model.init_from is None
    # Stage 1: 100B tokens in ~12K steps on 8 nodes x 8 GPUs.
    align = st["align"]
    tokens_per_step = 8 * 8 * align.engine.grad_accum_steps * align.data.max_tokens
    assert align.max_tokens / tokens_per_step == pytest.approx(12_000, rel=0.01)


def test_the_rl_recipe_is_the_curriculums_rl_from_an_sft_model():
    """recipes/step_audio2/rl.yaml holds the same RL stages as the curriculum (kept identical here), started
    from an SFT export, with the curriculum's model and engine settings."""
    import yaml

    rl_raw = yaml.safe_load((REPO / "recipes/step_audio2/rl.yaml").read_text())
    full_raw = yaml.safe_load((REPO / "recipes/step_audio2/curriculum.yaml").read_text())
    assert rl_raw["stages"] == full_raw["stages"][-4:]
    cfg = load_config(str(REPO / "recipes/step_audio2/rl.yaml"))
    stages = {s.name: stage_config(cfg, i) for i, s in enumerate(cfg.stages)}
    _, paper = paper_stages()
    assert list(stages) == ["ppo_length", "reward_model", "ppo_reward_model", "grpo_perception"]
    assert cfg.model.init_from.endswith("/stages/4-sft/export") and not cfg.model.init_parts.qwen
    for name, one in stages.items():
        theirs = paper[name]
        assert (one.kind, one.max_steps, one.optim.lr, one.rl.critic_lr, one.rl.num_generations, one.data.batch_size) \
            == (theirs.kind, theirs.max_steps, theirs.optim.lr, theirs.rl.critic_lr, theirs.rl.num_generations,
                theirs.data.batch_size), name
        assert (one.engine.zero_stage, one.engine.precision, one.model.trainable) == (3, "bf16", theirs.model.trainable)
        assert one.data.tokenizer == theirs.data.tokenizer and one.data.audio_tokenizer == theirs.data.audio_tokenizer


def test_paper_curriculum_holds_the_reports_whole_mixture():
    # The report's token shares in billions, per stage: every data type, text included, and their sums are
    # the stage budgets (stage 2: 128B text + 128B audio; stage 3: 800B; stage 4: 200B).
    _, st = paper_stages()
    mixture = {n: sorted((d.name, d.task, d.weight) for d in st[n].data.datasets)
               for n in ("align", "extend", "main", "cooldown")}
    assert mixture == {
        "align": [("asr", "asr", 1.0)],
        "extend": sorted([("text", "text", 128.0), ("tts", "tts", 80.0), ("conversation", "dialogue", 32.0),
                          ("interleaved", "interleaved_continuation", 16.0)]),
        "main": sorted([("text", "text", 400.0), ("asr", "asr", 42.0), ("tts", "tts", 120.0),
                        ("s2tt", "s2tt", 8.0), ("t2st", "t2st", 30.0),
                        ("speech_to_text_continuation", "speech_to_text_continuation", 5.0),
                        ("interleaved", "interleaved_continuation", 45.0),
                        ("conversation", "dialogue", 150.0)]),
        "cooldown": sorted([("asr", "asr", 24.6), ("tts", "tts", 12.4), ("paralinguistic", "para_caption", 2.4),
                            ("s2tt", "s2tt", 3.6), ("s2st", "s2st", 6.0),
                            ("interleaved_conversation", "dialogue", 15.0), ("conversation", "dialogue", 36.0),
                            ("text", "text", 100.0)]),
    }
    for name in ("extend", "main", "cooldown"):
        assert sum(w for _, _, w in mixture[name]) * 1e9 == pytest.approx(st[name].max_tokens)


def test_demo_curriculum_stages_data_and_metrics():
    cfg = load_config(str(REPO / "recipes/demo/curriculum.yaml"))
    st = [stage_config(cfg, i) for i in range(len(cfg.stages))]
    assert [s.name for s in cfg.stages] == ["asr", "tts", "mix", "dialogue", "para"]
    assert [one.eval.metric for one in st] == ["wer", "code_accuracy", "bleu", "code_accuracy", "paralinguistic"]
    assert [one.eval.shards for one in st] == [[f"runs/demo/shards/{t}/heldout"] for t in ("asr", "tts", "s2tt",
                                                                                        "dialogue", "para")]
    assert st[0].data.shards == ["runs/demo/shards/asr/train"] and st[3].data.task == "dialogue"
    assert {d.name: d.shards for d in st[2].data.datasets} == {
        t: [f"runs/demo/shards/{t}/train"] for t in ("asr", "tts", "s2tt", "para")}
    assert (st[2].data.datasets[3].task, st[4].data.task, st[4].eval.max_samples) == ("para_qa", "para_qa", 24)
    assert [one.run_dir for one in st] == [f"runs/demo/curriculum/stages/{i}-{n}"
                                           for i, n in enumerate(["asr", "tts", "mix", "dialogue", "para"])]
    # The CPU budget: ~1.3 steps/s at batch 16 -> at most ~16 minutes of steps for the whole curriculum (ASR
    # needs its 600 steps: at 360 its held-out WER was 67%; the dialogue 300 for answers that stop).
    assert sum(one.max_steps * one.data.batch_size for one in st) / 16 / 1.3 <= 16 * 60
    assert all(one.model.preset == "demo" and one.data.audio_tokenizer == "kmeans:runs/demo/kmeans.pt" for one in st)


def test_lora_s2st_recipe_trains_speech_translation_from_the_release():
    cfg = load_config(str(REPO / "recipes/lora/s2st.yaml"))
    assert cfg.lora.enabled and cfg.lora.init_from and cfg.model.init_from is None
    assert cfg.lora.train_audio_rows and cfg.lora.adapter  # it hears a new language and speaks another
    assert (cfg.data.task, cfg.data.shards, cfg.data.tokenizer) == ("s2st", ["runs/s2st/shards/train"],
                                                                    cfg.lora.init_from)
    assert (cfg.eval.metric, cfg.eval.shards) == ("code_accuracy", ["runs/s2st/shards/heldout"])
    assert cfg.engine.zero_stage == 2 and cfg.checkpoint.export
    # The data command its comments give is the one data.corpus.prepare has.
    text = (REPO / "recipes/lora/s2st.yaml").read_text()
    assert "python -m data.corpus.prepare s2st /data/pairs/train.parquet runs/s2st/shards/train" in text
