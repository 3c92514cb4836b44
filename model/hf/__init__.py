"""Our Hugging Face remote code, shipped in every export so transformers' Auto classes load it.

configuration_step_audio_2.py and modeling_step_audio_2.py are self-contained (torch and transformers only):
they are copied into the export folder, and config.json's auto_map names them. A folder that already
carries remote code of its own (StepFun's release) keeps it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

CONFIGURATION_FILE = "configuration_step_audio_2.py"
MODELING_FILE = "modeling_step_audio_2.py"
GENERATION_CONFIG_NAME = "generation_config.json"
AUTO_MAP = {"AutoConfig": "configuration_step_audio_2.StepAudio2Config",
            "AutoModelForCausalLM": "modeling_step_audio_2.StepAudio2ForCausalLM"}
# Our files say so in their first line: an export carried over from one of ours gets the current version.
_OURS_MARKER = "(stepaudio2-train remote code)"
_HERE = Path(__file__).resolve().parent


def _module_files(auto_map: Any) -> List[str]:
    if not isinstance(auto_map, dict):
        return []
    refs = [v for value in auto_map.values() for v in (value if isinstance(value, list) else [value]) if v]
    # "module.Class", or "repo--module.Class" for code that lives in another repository.
    return sorted({ref.split("--")[-1].rsplit(".", 1)[0] + ".py" for ref in refs if isinstance(ref, str)})


def _is_ours(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        return _OURS_MARKER in f.readline()


def foreign_remote_code(config_dict: Dict[str, Any], folder: Path) -> bool:
    """Whether folder holds a file of remote code that config.json's auto_map names and that is not ours."""
    return any((folder / f).is_file() and not _is_ours(folder / f) for f in _module_files(config_dict.get("auto_map")))


def write_remote_code(folder: Path) -> None:
    """Copy our configuration and modeling files into folder."""
    for name in (CONFIGURATION_FILE, MODELING_FILE):
        shutil.copyfile(_HERE / name, folder / name)


def generation_config(eos_token_ids: Optional[List[int]], pad_token_id: Optional[int]) -> Dict[str, Any]:
    """generation_config.json content: where generate stops, and what it pads finished rows with."""
    out: Dict[str, Any] = {}
    if eos_token_ids:
        out["eos_token_id"] = list(eos_token_ids)
    if pad_token_id is not None:
        out["pad_token_id"] = pad_token_id
    return out


def ship_remote_code(config_dict: Dict[str, Any], folder: Path, stop_ids: Optional[List[int]],
                     pad_token_id: Optional[int]) -> Dict[str, Any]:
    """Make folder loadable by the Auto classes; returns the config.json content to write (changed copy).

    A causal LM folder without remote code of its own gets our two files, auto_map naming them, the
    decoder's eos ids joined with stop_ids (the tokenizer's, when known) and generation_config.json unless
    it has one.
    Other architectures (a score model) and folders with StepFun's code are left as they are.
    """
    from model.config import ARCHITECTURES

    if config_dict.get("architectures") != ARCHITECTURES or foreign_remote_code(config_dict, folder):
        return config_dict
    config_dict = dict(config_dict)
    write_remote_code(folder)
    config_dict["auto_map"] = dict(AUTO_MAP)
    text = dict(config_dict["text_config"])
    eos = text.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if stop_ids:
        # Like StepFun's config class, which adds its three to any eos_token_id: <|EOT|> always stops.
        eos = sorted(set(eos) | set(stop_ids))
    if eos:
        text["eos_token_id"] = eos
    config_dict["text_config"] = text
    if not (folder / GENERATION_CONFIG_NAME).exists():
        gen = generation_config(eos, pad_token_id if pad_token_id is not None else (eos[0] if eos else None))
        (folder / GENERATION_CONFIG_NAME).write_text(json.dumps(gen, indent=2) + "\n")
    return config_dict
