"""StepFun folders in and out file by file, bf16 loads without a second model, `python -m model.convert`
from a StepFun folder and `python -m train.export` from real DeepSpeed training checkpoints (ZeRO 0 and 3)."""
from __future__ import annotations

import filecmp
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch

import model.checkpoint as checkpoint
from data.text_tokenizer import build_text_tokenizer, extend_tokenizer
from model.checkpoint import load_stepfun, read_layout, save_stepfun, stepfun_param_names
from model.config import StepAudio2Config, preset_config
from model.convert import convert, main
from model.lalm import StepAudio2ForCausalLM
from train.export import export
from train.export import main as export_main

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
TEXTS = ["hello world, hello speech", "the quick brown fox jumps over the lazy dog"] * 4


def _stepfun_config_dict(vocab: int, patch: int) -> dict:
    """A config.json the way the release writes one: extra keys everywhere, its own key order."""
    text = preset_config("tiny", vocab_size=vocab).text_config
    text.update({"bos_token_id": 151643, "eos_token_id": 151643, "max_window_layers": 28, "sliding_window": 4096})
    audio = {"adapter_stride": 2, "kernel_size": 3, "llm_dim": 64, "n_audio_ctx": 1500, "n_audio_head": 2,
             "n_audio_layer": 2, "n_audio_state": 32, "n_mels": 128, "model_type": "step_audio_2_encoder"}
    return {"architectures": ["StepAudio2ForCausalLM"], "audio_encoder_config": audio,
            "auto_map": {"AutoConfig": "configuration_step_audio_2.StepAudio2Config",
                         "AutoModelForCausalLM": "modeling_step_audio_2.StepAudio2ForCausalLM"},
            "audio_patch_token_id": patch, "model_type": "step_audio_2", "text_config": text,
            "torch_dtype": "bfloat16", "transformers_version": "4.49.0", "use_cache": True}


@pytest.fixture(scope="module")
def stepfun_dir(tmp_path_factory) -> Path:
    """A tiny folder written independently of model.checkpoint, in StepFun's layout: bf16 tensors in
    three uneven shards, an HF-style sorted index, tokenizer files, remote code and a token2wav folder."""
    root = tmp_path_factory.mktemp("stepfun") / "Step-Audio-2-tiny"
    root.mkdir()
    tok = extend_tokenizer(build_text_tokenizer(TEXTS, vocab_size=280), 16)
    tok.save_pretrained(str(root))
    patch = tok.convert_tokens_to_ids("<audio_patch>")
    added = {t: i for t, i in sorted(tok.get_added_vocab().items(), key=lambda x: x[1])}
    (root / "added_tokens.json").write_text(json.dumps(added, indent=2) + "\n")
    (root / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}) + "\n")
    config = _stepfun_config_dict(512, patch)
    (root / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (root / "modeling_step_audio_2.py").write_text("# remote code stand-in\n")
    (root / "token2wav").mkdir()
    (root / "token2wav" / "flow.yaml").write_text("steps: 10\n")
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in StepAudio2ForCausalLM(StepAudio2Config.from_dict(config)).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    names = stepfun_param_names(StepAudio2Config.from_dict(config))
    tensors = {n: torch.randn(shapes[n], generator=gen).to(torch.bfloat16) for n in names}
    splits = {"model-00001-of-00003.safetensors": [n for n in names if n.startswith("encoder.")],
              "model-00002-of-00003.safetensors": [n for n in names if n.startswith(("adapter.", "model.embed"))],
              "model-00003-of-00003.safetensors": [n for n in names if n.startswith(("model.layers", "model.norm",
                                                                                        "lm_head"))]}
    for file_name, shard_names in splits.items():
        safetensors.torch.save_file({n: tensors[n] for n in shard_names}, str(root / file_name),
                                    metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * 2 for t in tensors.values())},
             "weight_map": {n: f for f, ns in splits.items() for n in ns}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return root


def _all_files(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_stepfun_folder_loads_exports_and_compares_equal_file_by_file(stepfun_dir, tmp_path):
    out = convert(stepfun_dir, tmp_path / "export")
    assert _all_files(out) == _all_files(stepfun_dir)
    config_in = json.loads((stepfun_dir / "config.json").read_text())
    config_out = json.loads((out / "config.json").read_text())
    assert config_out == config_in and list(config_out) == list(config_in)
    assert (json.loads((out / "model.safetensors.index.json").read_text())
            == json.loads((stepfun_dir / "model.safetensors.index.json").read_text()))
    for name in _all_files(stepfun_dir):
        if name != "config.json":  # weights, index, tokenizer files and the rest: byte for byte
            assert filecmp.cmp(stepfun_dir / name, out / name, shallow=False), name
    for shard in (f for f in os.listdir(out) if f.endswith(".safetensors")):
        a, b = safetensors.torch.load_file(str(stepfun_dir / shard)), safetensors.torch.load_file(str(out / shard))
        assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)


def test_bf16_load_builds_the_model_once_on_the_meta_device(stepfun_dir, monkeypatch):
    built = []

    class Recording(StepAudio2ForCausalLM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(str(self.lm_head.weight.device))

    monkeypatch.setattr(checkpoint, "StepAudio2ForCausalLM", Recording)
    model = load_stepfun(stepfun_dir, dtype=torch.bfloat16)
    assert built == ["meta"]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    shard = safetensors.torch.load_file(str(stepfun_dir / "model-00003-of-00003.safetensors"))
    assert torch.equal(model.lm_head.weight, shard["lm_head.weight"])
    assert model.config.audio_patch_token_id == json.loads((stepfun_dir / "config.json").read_text())["audio_patch_token_id"]


def test_cast_on_convert_changes_dtype_and_config_only(stepfun_dir, tmp_path):
    out = convert(stepfun_dir, tmp_path / "fp32", dtype=torch.float32)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == read_layout(stepfun_dir).weight_map
    assert index["metadata"]["total_size"] == 2 * read_layout(stepfun_dir).index_metadata["total_size"]
    a = safetensors.torch.load_file(str(stepfun_dir / "model-00002-of-00003.safetensors"))
    b = safetensors.torch.load_file(str(out / "model-00002-of-00003.safetensors"))
    assert all(b[k].dtype == torch.float32 and torch.equal(b[k].bfloat16(), a[k]) for k in a)


def test_layout_refuses_weights_it_does_not_place(stepfun_dir, tmp_path):
    model = load_stepfun(stepfun_dir)
    state = dict(model.state_dict())
    state["extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"tensors missing from the weights \[\], tensors the layout does not "
                                         r"place \['extra.weight'\]"):
        save_stepfun(state, model.config, tmp_path / "x", layout=read_layout(stepfun_dir))


def test_convert_rejects_an_unknown_folder(tmp_path, capsys):
    with pytest.raises(SystemExit, match="is neither a model folder in StepFun's layout"):
        main([str(tmp_path), str(tmp_path / "out")])


_TRAIN_SCRIPT = textwrap.dedent("""
    import sys, torch, safetensors.torch
    torch.set_num_threads(1)
    from omegaconf import OmegaConf
    from data.text_tokenizer import load_tokenizer
    from train.checkpoint import Checkpointer
    from train.config import TrainConfig
    from train.engine import Engine, init_distributed
    from train.loop import build_model
    from train.recipe import to_yaml
    tok_dir, root, stage = sys.argv[1], sys.argv[2], int(sys.argv[3])
    init_distributed()
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), {
        "run_dir": f"{root}/run{stage}", "model": {"preset": "tiny", "trainable": ["adapter", "decoder", "lm_head"]},
        "data": {"tokenizer": tok_dir}, "engine": {"zero_stage": stage}, "optim": {"warmup_steps": 1}}))
    tok = load_tokenizer(tok_dir)
    torch.manual_seed(0)
    engine = Engine(build_model(cfg, tok), cfg)
    ids = torch.randint(0, 250, (2, 12))
    for _ in range(2):  # moved weights, so the export cannot pass by matching the initialisation
        engine.backward_and_step(engine.ds(input_ids=ids, labels=ids).loss)
    Checkpointer(cfg.run_dir, cfg.checkpoint, 0, 1).save(engine, 2, {}, to_yaml(cfg))
    state = engine.full_state_dict()
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, f"{root}/expected{stage}.safetensors")
""")


@pytest.mark.parametrize("stage", [0, 3])
def test_convert_a_deepspeed_training_checkpoint(stage, tmp_path):
    tok = extend_tokenizer(build_text_tokenizer(TEXTS, vocab_size=280), 16)
    tok.save_pretrained(str(tmp_path / "tok"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), WANDB_MODE="offline")
    proc = subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT, str(tmp_path / "tok"), str(tmp_path), str(stage)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = safetensors.torch.load_file(str(tmp_path / f"expected{stage}.safetensors"))
    out = export(tmp_path / f"run{stage}", tmp_path / "export")  # RUN_DIR: the step `latest` names
    model = load_stepfun(out)
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)
    assert model.config.vocab_size == 320 and model.config.audio_patch_token_id == tok.convert_tokens_to_ids("<audio_patch>")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert json.loads((out / "added_tokens.json").read_text())["<audio_16>"] == len(tok) - 1
    assert filecmp.cmp(tmp_path / "tok" / "tokenizer.json", out / "tokenizer.json", shallow=False)
    # The command, from RUN_DIR/checkpoints, cast to bf16: the same weights rounded, and config.json says so.
    export_main([str(tmp_path / f"run{stage}" / "checkpoints"), str(tmp_path / "bf16"), "--dtype", "bf16"])
    cast = load_stepfun(tmp_path / "bf16")
    assert all(torch.equal(cast.state_dict()[k], expected[k].bfloat16()) for k in expected)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_each_command_names_the_other_for_the_other_kind_of_folder(stepfun_dir, tmp_path):
    step_dir = tmp_path / "run" / "checkpoints" / "step_00000002"
    step_dir.mkdir(parents=True)
    (step_dir / "train_state.json").write_text(json.dumps({"step": 2, "world_size": 1}))
    with pytest.raises(SystemExit) as err:
        main([str(step_dir), str(tmp_path / "out")])
    assert str(err.value) == (f"error: {step_dir} is neither a model folder in StepFun's layout (config.json + "
                              f"model.safetensors.index.json) nor anything else model.convert reads; a training run "
                              f"or checkpoint of ours is exported by `python -m train.export {step_dir} "
                              f"{tmp_path / 'out'}`")
    with pytest.raises(SystemExit) as err:
        export_main([str(stepfun_dir), str(tmp_path / "out")])
    assert str(err.value) == (f"error: {stepfun_dir} is not a training checkpoint (a step folder with "
                              f"train_state.json, or a run or its checkpoints folder with `latest`); a model folder "
                              f"in StepFun's layout is converted by `python -m model.convert`")
    assert not (tmp_path / "out").exists()


def test_model_convert_imports_neither_deepspeed_nor_training_code():
    """model/ reads and writes model folders only: DeepSpeed's files are train.export's business."""
    probe = ("import sys, model.convert; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('deepspeed', 'train')))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
