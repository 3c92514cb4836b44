"""The config schema: recipes load, overrides apply, bad keys and values fail naming the key."""
from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import REPO, run_cli
from train.engine import deepspeed_config
from train.recipe import ConfigError, load_config

# Every recipe under recipes/ is loaded against the schema in tests/test_recipes.py.


def test_dotted_overrides_apply_with_types():
    cfg = load_config(str(REPO / "recipes/demo/asr.yaml"),
                      ["optim.lr=3e-4", "engine.zero_stage=3", "data.shards=[a,b]", "engine.deepspeed.foo.bar=7"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.engine.zero_stage == 3
    assert cfg.data.shards == ["a", "b"]
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}
    assert ds["foo"] == {"bar": 7}
    assert ds["train_micro_batch_size_per_gpu"] == cfg.data.batch_size


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'optim.learning_rate'"):
        load_config(str(REPO / "recipes/demo/asr.yaml"), ["optim.learning_rate=1e-4"])
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model:\n  preset: tiny\n  n_layers: 3\n")
    with pytest.raises(ConfigError, match=r"config key 'model.n_layers' in .*bad.yaml"):
        load_config(str(recipe))


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"config key 'max_steps'.*'many'"):
        load_config(str(REPO / "recipes/demo/asr.yaml"), ["max_steps=many"])


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match=r"config key 'engine.zero_stage' = 4: expected 0, 1, 2 or 3"):
        load_config(str(REPO / "recipes/demo/asr.yaml"), ["engine.zero_stage=4"])
    with pytest.raises(ConfigError, match=r"config key 'model.trainable'"):
        load_config(str(REPO / "recipes/demo/asr.yaml"), ["model.trainable=[encoder,decodr]"])


def test_print_config_shows_resolved_config_and_deepspeed_json():
    proc = run_cli(sys.executable, "-m", "train", "recipes/demo/asr.yaml", "engine.zero_stage=2",
                   "optim.grad_clip=0.5", "--print-config")
    yaml_part, ds_part = proc.stdout.split("# deepspeed:\n")
    assert "zero_stage: 2" in yaml_part
    ds = json.loads(ds_part)
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_clipping"] == 0.5


def test_cli_rejects_unknown_key_before_any_work():
    import subprocess
    proc = subprocess.run([sys.executable, "-m", "train", "recipes/demo/asr.yaml", "engine.zero=2"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "config key 'engine.zero'" in proc.stderr


# ---------------------------------------------------------------------------------------------- stages

STAGED = """
run_dir: runs/x
data: {shards: [a], tokenizer: t}
optim: {lr: 1.0e-3}
stages:
  - name: one
    max_steps: 5
    overrides: {model: {trainable: [adapter]}, optim: {lr: 1.0e-4, schedule: wsd}}
  - name: two
    max_tokens: 1000
    lr_multipliers: {adapter: 2.5, lm_head: 2.0}
    overrides: {optim.lr: 2.0e-5, eval.metric: bleu, data: {batch_size: 3}}
"""


def staged(tmp_path, text: str = STAGED, *overrides: str):
    recipe = tmp_path / "staged.yaml"
    recipe.write_text(text)
    return load_config(str(recipe), list(overrides)), str(recipe)


def test_stages_merge_overrides_over_the_top_level(tmp_path):
    from train.recipe import stage_config
    cfg, _ = staged(tmp_path, STAGED, "data.batch_size=7")
    one, two = stage_config(cfg, 0), stage_config(cfg, 1)
    assert (one.run_dir, two.run_dir) == ("runs/x/stages/0-one", "runs/x/stages/1-two")
    assert one.model.trainable == ["adapter"] and two.model.trainable == cfg.model.trainable
    assert (one.optim.lr, one.optim.schedule, two.optim.lr, two.optim.schedule) == (1e-4, "wsd", 2e-5, "cosine")
    assert (one.max_steps, one.max_tokens, two.max_steps, two.max_tokens) == (5, None, None, 1000)
    assert (one.data.batch_size, two.data.batch_size) == (7, 3)  # the command line sets the top level
    assert two.lr_multipliers == {"adapter": 2.5, "lm_head": 2.0} and one.lr_multipliers == {}
    assert two.eval.metric == "bleu" and two.stages == [] and cfg.run_stages == []


def test_stage_errors_name_the_stage_key(tmp_path):
    bad_key = STAGED.replace("optim.lr: 2.0e-5", "optim.learning_rate: 2.0e-5")
    with pytest.raises(ConfigError, match=r"config key 'stages\[1\].overrides.optim.learning_rate' in .*staged.yaml"):
        staged(tmp_path, bad_key)
    bad_type = STAGED.replace("batch_size: 3", "batch_size: three")
    with pytest.raises(ConfigError, match=r"config key 'stages\[1\].overrides.data.batch_size'.*'three'"):
        staged(tmp_path, bad_type)
    bad_value = STAGED.replace("schedule: wsd", "schedule: step")
    with pytest.raises(ConfigError, match=r"stage 'one' \(stages\[0\]\): config key 'optim.schedule' = 'step'"):
        staged(tmp_path, bad_value)
    with pytest.raises(ConfigError, match=r"config key 'stages\[1\].max_steps'.*stage 'two' needs a budget"):
        staged(tmp_path, STAGED.replace("max_tokens: 1000", "max_tokens: null"))
    with pytest.raises(ConfigError, match=r"'stages\[1\].name' = 'one': stage names must be unique"):
        staged(tmp_path, STAGED.replace("name: two", "name: one"))
    with pytest.raises(ConfigError, match=r"'stages\[0\].overrides.max_steps'.*stages\[i\].max_steps"):
        staged(tmp_path, STAGED.replace("{model: {trainable", "{max_steps: 3, model: {trainable"))
    with pytest.raises(ConfigError, match=r"'lr_multipliers.decoder' = 2.0: expected a group that trains"):
        staged(tmp_path, STAGED.replace("max_steps: 5", "max_steps: 5\n    lr_multipliers: {decoder: 2.0}"))
    with pytest.raises(ConfigError, match=r"'lr_multipliers.llm' = 2.0: expected group names from"):
        staged(tmp_path, STAGED.replace("adapter: 2.5", "llm: 2.0"))


def test_stage_selection_from_the_command_line(tmp_path):
    cfg, _ = staged(tmp_path, STAGED, "stages=[two]")
    assert cfg.run_stages == ["two"] and [s.name for s in cfg.stages] == ["one", "two"]
    with pytest.raises(ConfigError, match=r"no stage named 'three'; the recipe's stages are \['one', 'two'\]"):
        staged(tmp_path, STAGED, "stages=[three]")
    with pytest.raises(ConfigError, match=r"the recipe has no stages to select"):
        load_config(str(REPO / "recipes/demo/asr.yaml"), ["stages=[asr]"])


def test_one_stage_changed_from_the_command_line(tmp_path):
    from train.recipe import stage_config
    cfg, _ = staged(tmp_path, STAGED, "stages[1].max_tokens=50", "stages.0.overrides.optim.lr=5e-4",
                    "stages[1].lr_multipliers.decoder=3")
    assert cfg.stages[1].max_tokens == 50 and stage_config(cfg, 0).optim.lr == 5e-4
    assert stage_config(cfg, 1).lr_multipliers == {"adapter": 2.5, "lm_head": 2.0, "decoder": 3.0}
    with pytest.raises(ConfigError, match=r"config key 'stages\[1\].max_token' in .*staged.yaml"):
        staged(tmp_path, STAGED, "stages[1].max_token=5")
    with pytest.raises(ConfigError, match=r"'stages\[2\].max_steps=5': the recipe has 2 stages"):
        staged(tmp_path, STAGED, "stages[2].max_steps=5")


def test_print_config_of_a_curriculum_shows_every_stage(tmp_path):
    _, recipe = staged(tmp_path)
    proc = run_cli(sys.executable, "-m", "train", recipe, "--print-config")
    assert "# stage 0 one: resolved config:" in proc.stdout and "# stage 1 two: deepspeed:" in proc.stdout
    two_yaml = proc.stdout.split("# stage 1 two: resolved config:\n")[1].split("# stage 1 two: deepspeed:")[0]
    assert "run_dir: runs/x/stages/1-two" in two_yaml and "max_tokens: 1000" in two_yaml


_GRPO = ["kind=grpo", "data.batch_size=2", 'rl.rewards=[{name: r, function: "tests.rl_rewards:constant"}]']


@pytest.mark.parametrize("overrides, message", [
    (["kind=ppo_v2"], r"config key 'kind' = 'ppo_v2': expected sft, "),
    (["kind=grpo", "data.batch_size=2"], r"config key 'rl.rewards' = \[\]: expected at least one reward component "
                                          r"for kind=grpo"),
    ([*_GRPO, "rl.num_generations=1"], r"config key 'rl.num_generations' = 1: expected an integer >= 2 for grpo"),
    ([*_GRPO, "rl.num_minibatches=3"], r"config key 'rl.num_minibatches' = 3: expected an integer >= 1 dividing the "
                                       r"answers per rank per step \(data.batch_size x rl.num_generations = 8\)"),
    ([*_GRPO, "rl.kl_estimator=k4"], r"config key 'rl.kl_estimator' = 'k4': expected k1, k2 or k3"),
    ([*_GRPO, "rl.kl_coef=0.1", "rl.reference=none"], r"config key 'rl.reference' = 'none': expected a reference"),
    ([*_GRPO, 'rl.rewards=[{name: "a b", function: "m:f"}]'], r"config key 'rl.rewards\[0\].name' = 'a b'"),
    ([*_GRPO, 'rl.rewards=[{name: r, function: "m:f", model: dir}]'], r"config key 'rl.rewards\[0\]' = .*: expected "
                                                                        r"exactly one of function"),
    (["kind=dpo", "data.batch_size=2", "rl.placebo=true"], r"config key 'rl.placebo' = True: expected false for "
                                                           r"kind=dpo"),
    (["kind=dpo", "data.batch_size=2", "rl.beta=0"], r"config key 'rl.beta' = 0.0: expected a positive number"),
])
def test_rl_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(REPO / "recipes/demo/asr.yaml"), overrides)


def test_an_rl_kind_sets_its_rendering_and_a_wrong_one_is_named():
    assert load_config(str(REPO / "recipes/demo/asr.yaml"), _GRPO).data.render == "prompt"
    assert load_config(str(REPO / "recipes/demo/asr.yaml"), ["kind=dpo", "data.batch_size=2"]).data.render == "pairs"
    with pytest.raises(ConfigError, match=r"config key 'data.render' = 'pairs': expected prompt for kind=grpo"):
        load_config(str(REPO / "recipes/demo/asr.yaml"), [*_GRPO, "data.render=pairs"])
