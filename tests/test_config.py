"""The config schema: recipes load, overrides apply, bad keys and values fail naming the key."""
from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import REPO, run_cli
from train.config import ConfigError, deepspeed_config, load_config

RECIPES = sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert "recipes/demo/asr.yaml" in RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_loads_against_the_schema(recipe):
    cfg = load_config(str(REPO / recipe))
    assert cfg.max_steps >= 1 and cfg.data.shards


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
