"""Exports load with transformers' Auto classes (our remote code, trust_remote_code=True) in a fresh process:
same logits as our model with and without audio, generate, the tokenizer, a merged LoRA export and the
peft adapter on the Auto-loaded base; config.json holds every key StepFun's config reads, for every preset."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from data.text_tokenizer import build_text_tokenizer, extend_tokenizer, load_tokenizer, special_ids, stop_token_ids
from model.checkpoint import load_stepfun, read_layout, save_stepfun, stepfun_param_names
from model.config import STEPFUN_TEXT_KEYS, StepAudio2Config, padded_vocab_size, preset_config
from model.convert import convert
from model.hf import AUTO_MAP, CONFIGURATION_FILE, GENERATION_CONFIG_NAME, MODELING_FILE, ship_remote_code
from model.lalm import StepAudio2ForCausalLM
from train.config import LoraConfig
from train.lora import apply_lora, audio_rows, save_adapter
from train.merge_lora import merge

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
TEXTS = ["hello world, hello speech", "the quick brown fox jumps over the lazy dog"] * 4
PROMPT_TEXT = "hello world<audio_patch><|EOT|>"

# Runs in a fresh interpreter that imports nothing of this repository: only transformers (and peft).
HF_SIDE = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    job = json.loads(sys.argv[1])
    inputs = torch.load(job["inputs"])
    results = {}
    for name, spec in job["folders"].items():
        assert not [m for m in sys.modules if m.split(".")[0] in ("model", "data", "train", "launch")]
        config = AutoConfig.from_pretrained(spec["dir"], trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(spec["dir"], trust_remote_code=True).eval()
        if spec.get("adapter"):
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, spec["adapter"]).eval()
        tok = AutoTokenizer.from_pretrained(spec["dir"], trust_remote_code=True)
        out = {"config_class": type(config).__module__.split(".")[-1] + "." + type(config).__name__,
               "model_class": type(model).__name__, "kv_heads": config.text_config.num_key_value_heads,
               "encoded": tok.encode(job["text"], add_special_tokens=False),
               "eos": model.generation_config.eos_token_id}
        with torch.no_grad():
            out["audio_logits"] = model(**inputs["audio"]).logits
            out["text_logits"] = model(**inputs["text"]).logits
            if not spec.get("adapter"):
                out["generated"] = model.generate(**inputs["prompt"], max_new_tokens=6, do_sample=False)
        results[name] = out
    torch.save(results, job["out"])
""")


def run_hf(tmp_path: Path, folders: dict, inputs: dict) -> dict:
    """Loads each folder with the Auto classes in a fresh process; its outputs on `inputs`, per folder."""
    torch.save(inputs, tmp_path / "inputs.pt")
    job = {"folders": {k: {kk: str(vv) for kk, vv in v.items()} for k, v in folders.items()},
           "inputs": str(tmp_path / "inputs.pt"), "out": str(tmp_path / "hf_out.pt"), "text": PROMPT_TEXT}
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", HF_SIDE, json.dumps(job)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return torch.load(tmp_path / "hf_out.pt")


@pytest.fixture(scope="module")
def tok():
    return extend_tokenizer(build_text_tokenizer(TEXTS, vocab_size=280), 16)


def export(preset: str, tok, folder: Path, seed: int = 0) -> Path:
    ids = special_ids(tok)
    torch.manual_seed(seed)
    config = preset_config(preset, vocab_size=padded_vocab_size(len(tok)), audio_patch_token_id=ids.audio_patch)
    model = StepAudio2ForCausalLM(config)
    with torch.no_grad():  # fresh encoder weights are tiny next to the positions: make the audio matter
        for p in model.adapter.parameters():
            p.mul_(4.0)
    return save_stepfun(model.state_dict(), config, folder, tokenizer=tok)


def model_inputs(tok) -> dict:
    """Two rows with an audio chunk each (61 and 100 mel frames: 8 and 12 audio rows; the first is padded, and
    an odd length is where padding could leak into a chunk's last row), a text-only batch, and a one-row
    prompt with audio for generate."""
    ids = special_ids(tok)
    gen = torch.Generator().manual_seed(1)
    text = tok.encode("hello world", add_special_tokens=False)
    rows = [[ids.bot] + text + [ids.audio_start] + [ids.audio_patch] * 8 + [ids.audio_end, ids.eot],
            [ids.audio_start] + [ids.audio_patch] * 12 + [ids.audio_end] + text]
    T = max(map(len, rows))
    input_ids = torch.full((2, T), ids.end_of_text)
    attention_mask = torch.zeros(2, T, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
    mels = torch.randn(2, 128, 100, generator=gen)
    mels[0, :, 61:] = 0.0
    lengths = torch.tensor([61, 100])
    return {"audio": {"input_ids": input_ids, "attention_mask": attention_mask, "mels": mels, "mel_lengths": lengths},
            "text": {"input_ids": torch.tensor([text + [ids.eot, ids.bot] + text])},
            "prompt": {"input_ids": torch.tensor(rows[:1]), "mels": mels[:1, :, :61], "mel_lengths": lengths[:1]}}


def our_outputs(model, inputs: dict, eos: list) -> dict:
    with torch.no_grad():
        out = {"audio_logits": model(**inputs["audio"]).logits, "text_logits": model(**inputs["text"]).logits}
        prompt = dict(inputs["prompt"])
        seq = prompt.pop("input_ids")
        for _ in range(6):  # greedy, the whole sequence each step (no cache): an independent reference
            nxt = model(seq, **prompt).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            if int(nxt) in eos:
                break
        out["generated"] = seq
    return out


def test_config_json_has_every_key_stepfuns_config_reads_for_every_preset(tmp_path):
    for preset in ("tiny", "demo", "mini"):
        text = preset_config(preset).to_dict()["text_config"]
        assert [k for k in STEPFUN_TEXT_KEYS if k not in text] == ([] if preset == "mini" else ["eos_token_id"])
        # StepFun's config class: absent keys take its defaults, and it asserts groups == key/value heads.
        assert text["num_attention_groups"] == text["num_key_value_heads"]
    assert preset_config("mini").to_dict()["text_config"]["eos_token_id"] == [151643, 151645, 151665]
    with pytest.raises(ValueError, match=r"text_config.num_attention_groups=4 must equal num_key_value_heads=2"):
        StepAudio2Config.from_dict({**preset_config("tiny").to_dict(),
                                    "text_config": {**preset_config("tiny").text_config, "num_attention_groups": 4}})
    # A config.json read from elsewhere keeps its keys, gaining num_attention_groups only where StepFun's
    # default (4) would be wrong.
    for kv, expect_added in ((2, True), (4, False)):
        d = preset_config("tiny").to_dict()
        d["text_config"] = {k: v for k, v in d["text_config"].items() if k != "num_attention_groups"}
        d["text_config"].update(num_attention_heads=4, num_key_value_heads=kv)
        again = StepAudio2Config.from_dict(json.loads(json.dumps(d))).to_dict()
        assert ("num_attention_groups" in again["text_config"]) is expect_added
        assert again["text_config"].get("num_attention_groups", 4) == kv


def test_every_preset_loads_with_the_auto_classes_with_equal_logits_and_generate(tok, tmp_path):
    folders = {p: export(p, tok, tmp_path / p) for p in ("tiny", "demo")}
    # The 8B preset at config level: our config class and a meta-device build by the Auto classes.
    mini = tmp_path / "mini"
    mini.mkdir()
    (mini / "config.json").write_text(json.dumps(ship_remote_code(preset_config("mini").to_dict(), mini, None, None)))
    for name in ("tiny", "demo"):
        files = sorted(p.name for p in folders[name].iterdir())
        assert {CONFIGURATION_FILE, MODELING_FILE, GENERATION_CONFIG_NAME, "tokenizer.json"} <= set(files)
        config = json.loads((folders[name] / "config.json").read_text())
        assert config["auto_map"] == AUTO_MAP
        assert config["text_config"]["eos_token_id"] == stop_token_ids(tok) == [special_ids(tok).end_of_text,
                                                                                special_ids(tok).eot]
        assert json.loads((folders[name] / GENERATION_CONFIG_NAME).read_text()) == {
            "eos_token_id": stop_token_ids(tok), "pad_token_id": special_ids(tok).end_of_text}

    inputs = model_inputs(tok)
    hf = run_hf(tmp_path, {name: {"dir": folder} for name, folder in folders.items()}, inputs)
    for name, folder in folders.items():
        ours = our_outputs(load_stepfun(folder).eval(), inputs, stop_token_ids(tok))
        got = hf[name]
        assert got["config_class"] == "configuration_step_audio_2.StepAudio2Config"
        assert got["model_class"] == "StepAudio2ForCausalLM"
        assert got["eos"] == stop_token_ids(tok)
        assert got["encoded"] == tok.encode(PROMPT_TEXT, add_special_tokens=False)
        for key in ("audio_logits", "text_logits"):
            assert got[key].shape == ours[key].shape
            torch.testing.assert_close(got[key], ours[key], rtol=0, atol=1e-5)
        assert torch.equal(got["generated"], ours["generated"]), (got["generated"], ours["generated"])
        assert got["generated"].shape[1] > inputs["prompt"]["input_ids"].shape[1]
    # The audio changes the answer: logits of the rows after the audio differ from a run without it.
    no_audio = dict(inputs["audio"], mels=torch.zeros_like(inputs["audio"]["mels"]))
    with torch.no_grad():
        silent = load_stepfun(folders["tiny"]).eval()(**no_audio).logits
    assert (silent - hf["tiny"]["audio_logits"]).abs().max() > 1e-3

    proc = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import json, sys, torch
        from transformers import AutoConfig, AutoModelForCausalLM
        config = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
        print(json.dumps({"shapes": {n: list(t.shape) for n, t in model.state_dict().items()},
                          "eos": config.text_config.eos_token_id, "kv": config.text_config.num_key_value_heads,
                          "patch": config.audio_patch_token_id}))
        """), str(mini)], capture_output=True, text=True, timeout=600,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_MODULES_CACHE": str(tmp_path / "hf_modules")})
    assert proc.returncode == 0, proc.stderr[-4000:]
    meta = json.loads(proc.stdout.strip().splitlines()[-1])
    with torch.device("meta"):
        expected = {n: list(t.shape) for n, t in StepAudio2ForCausalLM(preset_config("mini")).state_dict().items()}
    assert list(meta["shapes"]) == stepfun_param_names(preset_config("mini")) and meta["shapes"] == expected
    assert (meta["eos"], meta["kv"], meta["patch"]) == ([151643, 151645, 151665], 4, 151690)


def lora_model(base: Path, cfg: LoraConfig) -> StepAudio2ForCausalLM:
    """The base with LoRA (decoder linears, adapter, audio rows) set to small random values, as if trained."""
    model = load_stepfun(base)
    ids = special_ids(load_tokenizer(str(base)))
    apply_lora(model, cfg, audio_rows(ids.first_audio_code, ids.num_audio_codes))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model.eval()


def test_merged_lora_export_and_peft_adapter_on_the_auto_base_match_our_lora_model(tok, tmp_path):
    base = export("tiny", tok, tmp_path / "base")
    cfg = LoraConfig(enabled=True, r=4, adapter=True, train_audio_rows=True, init_from=str(base))
    ours = lora_model(base, cfg)
    save_adapter(ours, ours.state_dict(), tmp_path / "adapter")
    merged = merge(base, tmp_path / "adapter", tmp_path / "merged")
    assert (merged / MODELING_FILE).read_bytes() == (base / MODELING_FILE).read_bytes()
    inputs = model_inputs(tok)
    hf = run_hf(tmp_path, {"merged": {"dir": merged}, "peft": {"dir": base, "adapter": tmp_path / "adapter"}},
                inputs)
    expected = our_outputs(ours, inputs, stop_token_ids(tok))
    with torch.no_grad():
        base_logits = load_stepfun(base).eval()(**inputs["audio"]).logits
    assert (expected["audio_logits"] - base_logits).abs().max() > 1e-3  # the adapter matters
    assert hf["peft"]["model_class"] == "PeftModel"
    for name in ("merged", "peft"):
        for key in ("audio_logits", "text_logits"):
            torch.testing.assert_close(hf[name][key], expected[key], rtol=0, atol=1e-5)
    assert torch.equal(hf["merged"]["generated"], expected["generated"])


def test_stepfun_code_is_kept_ours_is_refreshed_and_score_models_get_none(tok, tmp_path):
    base = export("tiny", tok, tmp_path / "ours")
    model = load_stepfun(base)
    # A folder with remote code of its own (StepFun's release): reproduced as it is, nothing of ours added.
    theirs = tmp_path / "theirs"
    save_stepfun(model.state_dict(), model.config, theirs, layout=read_layout(base))
    for name in (CONFIGURATION_FILE, MODELING_FILE):
        (theirs / name).write_text("# StepFun's code stand-in\n")
    (theirs / GENERATION_CONFIG_NAME).unlink()
    converted = convert(theirs, tmp_path / "converted")
    assert (converted / MODELING_FILE).read_text() == "# StepFun's code stand-in\n"
    assert not (converted / GENERATION_CONFIG_NAME).exists()
    assert json.loads((converted / "config.json").read_text()) == json.loads((theirs / "config.json").read_text())
    # Our own (older) files in a source folder are replaced by the current ones.
    (base / MODELING_FILE).write_text('"""Old (stepaudio2-train remote code)."""\n')
    again = convert(base, tmp_path / "again")
    assert (again / MODELING_FILE).read_bytes() == (REPO / "model" / "hf" / MODELING_FILE).read_bytes()
    # A config naming StepFun's files without the files (a run started from the release): ours are shipped.
    started = save_stepfun(model.state_dict(), model.config, tmp_path / "started")
    assert (started / MODELING_FILE).is_file() and (started / GENERATION_CONFIG_NAME).is_file()
    # Other architectures are no causal LM for AutoModelForCausalLM: no remote code, no auto_map.
    score = dict(model.config.to_dict(), architectures=["StepAudio2ForScore"])
    assert ship_remote_code(score, tmp_path, [1], 1) == score and not (tmp_path / MODELING_FILE).exists()
