"""Model folders in StepFun's layout: config.json, safetensors shards + index, tokenizer files.

Saving goes through a temporary sibling folder renamed into place; loading is strict about names and shapes.
A loaded folder's shard split, index metadata and other files can be carried to an export (StepFunLayout).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import safetensors
import safetensors.torch
import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from model.config import StepAudio2Config
from model.hf import ship_remote_code
from model.lalm import StepAudio2ForCausalLM

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
# Files a tokenizer folder may hold; StepFun's release ships added_tokens.json beside tokenizer.json.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.jinja")

_ENCODER_BLOCK = ("attn.query.weight", "attn.query.bias", "attn.key.weight", "attn.value.weight",
                  "attn.value.bias", "attn.out.weight", "attn.out.bias", "attn_ln.weight", "attn_ln.bias",
                  "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp_ln.weight", "mlp_ln.bias")
_DECODER_LAYER = ("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight",
                  "self_attn.k_proj.bias", "self_attn.v_proj.weight", "self_attn.v_proj.bias",
                  "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                  "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight")


def stepfun_param_names(config: StepAudio2Config) -> List[str]:
    """Every tensor name of a StepFun checkpoint of this config, in model order."""
    names = ["encoder.conv1.weight", "encoder.conv1.bias", "encoder.conv2.weight", "encoder.conv2.bias",
             "encoder.positional_embedding.weight"]
    for i in range(config.audio_encoder_config.n_audio_layer):
        names += [f"encoder.blocks.{i}.{suffix}" for suffix in _ENCODER_BLOCK]
    names += ["encoder.after_norm.weight", "encoder.after_norm.bias"]
    names += [f"adapter.{layer}.{p}" for layer in ("conv", "linear1", "linear2") for p in ("weight", "bias")]
    names.append("model.embed_tokens.weight")
    for i in range(int(config.text_config["num_hidden_layers"])):
        names += [f"model.layers.{i}.{suffix}" for suffix in _DECODER_LAYER]
    names += ["model.norm.weight", "lm_head.weight"]
    return names


def _shard_plan(tensors: Dict[str, torch.Tensor], max_shard_bytes: int) -> List[List[str]]:
    shards: List[List[str]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _standalone_cpu(tensor: torch.Tensor, seen_storages: set) -> torch.Tensor:
    # safetensors refuses views and tensors sharing storage (tied or sliced weights): copy those only,
    # so an 8B export does not hold a second full copy in memory.
    tensor = tensor.to("cpu")
    storage = tensor.untyped_storage()
    whole = tensor.is_contiguous() and storage.nbytes() == tensor.numel() * tensor.element_size()
    if whole and storage.data_ptr() not in seen_storages:
        seen_storages.add(storage.data_ptr())
        return tensor
    return tensor.contiguous().clone()


@dataclass
class StepFunLayout:
    """How a model folder split and labelled its tensors, and which other files it held.

    An export given a layout writes the same shard files with the same tensors, the index's metadata
    and each shard's safetensors metadata, and copies the other files (remote code, token2wav/, ...).
    """

    folder: Path
    """The folder it was read from (other files are copied from here)."""
    weight_map: Dict[str, str]
    """Tensor name -> shard file name, in the index's order."""
    index_metadata: Dict[str, Any] = field(default_factory=dict)
    """The index's "metadata" (total_size is recomputed on save)."""
    shard_metadata: Dict[str, Optional[Dict[str, str]]] = field(default_factory=dict)
    """Shard file name -> its safetensors header metadata."""
    other_files: List[str] = field(default_factory=list)
    """Top-level names in the folder that are neither weights, index nor config.json."""


def read_layout(path: Union[str, Path]) -> StepFunLayout:
    """The layout of a model folder in StepFun's layout (index, shard headers, other file names)."""
    path = Path(path)
    index = _read_json(path / INDEX_NAME)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{path / INDEX_NAME} has no 'weight_map' mapping")
    shard_metadata = {}
    for file_name in dict.fromkeys(weight_map.values()):
        if not (path / file_name).is_file():
            raise ValueError(f"model folder {path} has no {file_name} (named in {INDEX_NAME})")
        with safetensors.safe_open(str(path / file_name), framework="pt") as f:
            shard_metadata[file_name] = f.metadata()
    weights = set(weight_map.values()) | {INDEX_NAME, CONFIG_NAME}
    others = sorted(p.name for p in path.iterdir()
                    if p.name not in weights and not p.name.startswith(".") and not p.name.endswith(".safetensors"))
    return StepFunLayout(folder=path, weight_map=dict(weight_map), index_metadata=dict(index.get("metadata", {})),
                         shard_metadata=shard_metadata, other_files=others)


def _layout_plan(tensors: Dict[str, torch.Tensor], layout: StepFunLayout) -> Dict[str, List[str]]:
    missing = [n for n in layout.weight_map if n not in tensors]
    unexpected = [n for n in tensors if n not in layout.weight_map]
    if missing or unexpected:
        raise ValueError(f"the weights do not match the layout of {layout.folder}: tensors missing from the "
                         f"weights {missing}, tensors the layout does not place {unexpected}")
    plan: Dict[str, List[str]] = {}
    for name, file_name in layout.weight_map.items():
        plan.setdefault(file_name, []).append(name)
    return plan


def _copy_other_files(layout: StepFunLayout, dst: Path, skip: Sequence[str]) -> None:
    for name in layout.other_files:
        if name in skip:
            continue
        src = layout.folder / name
        if src.is_dir():
            shutil.copytree(src, dst / name)
        else:
            shutil.copy2(src, dst / name)


def _save_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    tokenizer.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        # transformers 5 names its generic fast class "TokenizersBackend", which the transformers 4.x that
        # StepFun's inference code runs on cannot resolve; PreTrainedTokenizerFast loads in both.
        if config.get("tokenizer_class") == "TokenizersBackend":
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    added_path = out_dir / "added_tokens.json"
    if not added_path.exists() and hasattr(tokenizer, "get_added_vocab"):
        # The released folder lists every token added past the base vocabulary here, ordered by id.
        base = getattr(tokenizer, "vocab_size", 0)
        added = sorted(((t, i) for t, i in tokenizer.get_added_vocab().items() if i >= base), key=lambda x: x[1])
        added_path.write_text(json.dumps(dict(added), indent=2, ensure_ascii=False) + "\n")


def _stop_and_pad_ids(tokenizer: Any, folder: Path) -> Tuple[Optional[List[int]], Optional[int]]:
    """(ids generation stops on, pad id) of the tokenizer given or written into folder; None where unknown."""
    from data.text_tokenizer import load_tokenizer, special_ids, stop_token_ids

    if tokenizer is None and (folder / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(str(folder))
    try:
        return stop_token_ids(tokenizer), special_ids(tokenizer).end_of_text
    except (ValueError, AttributeError):  # no tokenizer, or not one of ours (no Step-Audio 2 tokens)
        return None, None


def save_stepfun(state_dict: Dict[str, torch.Tensor], config: StepAudio2Config, out_dir: Union[str, Path],
                 tokenizer: Any = None, max_shard_bytes: int = 5 * 2**30,
                 layout: Optional[StepFunLayout] = None) -> Path:
    """Write a complete model folder at out_dir (replacing one that is there) and return its path.

    With a layout (from read_layout) the shards, index metadata and other files of that folder are
    reproduced and max_shard_bytes is unused; a tokenizer given here replaces the layout's tokenizer files.
    A causal LM folder also gets our Hugging Face remote code, auto_map and generation_config.json (see
    model.hf.ship_remote_code) unless the layout brings remote code of its own, as StepFun's release does.
    """
    out_dir = Path(out_dir)
    tensors = {name: t.detach() for name, t in state_dict.items()}
    if layout is not None:
        plan = _layout_plan(tensors, layout)
    else:
        split = _shard_plan(tensors, max_shard_bytes)
        plan = {f"model-{i:05d}-of-{len(split):05d}.safetensors": names for i, names in enumerate(split, start=1)}
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    seen: set = set()
    for file_name, names in plan.items():
        metadata = layout.shard_metadata.get(file_name) if layout is not None else {"format": "pt"}
        safetensors.torch.save_file({n: _standalone_cpu(tensors[n], seen) for n in names},
                                    str(tmp_dir / file_name), metadata=metadata)
    weight_map = dict(layout.weight_map) if layout is not None else {n: f for f, ns in plan.items() for n in ns}
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    metadata = dict(layout.index_metadata) if layout is not None else {}
    metadata["total_size"] = total_size
    index = {"metadata": metadata, "weight_map": weight_map}
    (tmp_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    if layout is not None:
        _copy_other_files(layout, tmp_dir, skip=TOKENIZER_FILES if tokenizer is not None else ())
    if tokenizer is not None:
        _save_tokenizer(tokenizer, tmp_dir)
    config_dict = ship_remote_code(config.to_dict(), tmp_dir, *_stop_and_pad_ids(tokenizer, tmp_dir))
    (tmp_dir / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2) + "\n")
    # A folder replaced by another: moved aside first (a folder cannot be renamed over one that has files), so
    # this is not data.files.atomic_path, which replaces one file. PID names let train.run_folder tell stale ones.
    old_dir = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        os.rename(out_dir, old_dir)
    os.rename(tmp_dir, out_dir)
    if old_dir.exists():
        shutil.rmtree(old_dir)
    return out_dir


def _read_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"model folder {path.parent} has no {path.name}")
    with open(path) as f:
        return json.load(f)


def load_stepfun(path: Union[str, Path], dtype: Optional[torch.dtype] = None,
                 device: Union[str, torch.device] = "cpu", build_context: Optional[ContextManager] = None,
                 gather: Optional[Callable[[List[torch.nn.Parameter]], ContextManager]] = None,
                 gradient_checkpointing: Union[bool, Sequence[str]] = False, attention: str = "sdpa",
                 model_class: Optional[type] = None, fresh: Sequence[str] = (),
                 skip: Sequence[str] = ()) -> StepAudio2ForCausalLM:
    """Build the model once and fill it from the folder's tensors, strictly; dtype=None keeps stored dtypes.

    model_class: a StepAudio2ForCausalLM subclass to build instead (model.score's score model). fresh: name
    prefixes of the model's tensors the folder may lack; they keep the initialisation the class gives them
    (model_class.init_fresh(module) re-runs it once off the meta device). skip: name prefixes of the
    folder's tensors the model does not have, ignored (a causal LM's lm_head when a score model starts
    from it). Both default to nothing: every name must match.

    By default the model is built on the meta device and the loaded tensors become its parameters, so
    an 8B folder occupies memory once. Under ZeRO-3 pass build_context=deepspeed.zero.Init(...) and
    gather=lambda ps: deepspeed.zero.GatheredParameters(ps, modifier_rank=0): the model is built
    partitioned and each tensor is copied in while its parameter is gathered (the caller owns the
    DeepSpeed imports; this module has none).
    """
    path = Path(path)
    config = StepAudio2Config.from_dict(_read_json(path / CONFIG_NAME))
    weight_map = _read_json(path / INDEX_NAME).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{path / INDEX_NAME} has no 'weight_map' mapping")
    partitioned = build_context is not None
    if partitioned and gather is None:
        raise ValueError("load_stepfun: build_context was given without gather (how to make a parameter whole)")
    fresh, skip = tuple(fresh), tuple(skip)
    weight_map = {n: f for n, f in weight_map.items() if not (skip and n.startswith(skip))}
    with build_context if partitioned else torch.device("meta"):
        model = (model_class or StepAudio2ForCausalLM)(config, gradient_checkpointing=gradient_checkpointing,
                                                       attention=attention)
    # Shapes from the parameters themselves: state_dict() tensors of a ZeRO-3 model lose ds_shape.
    full_shapes = {n: _full_shape(p) for n, p in model.named_parameters()}
    expected_shapes = {n: full_shapes.get(n, tuple(t.shape)) for n, t in model.state_dict().items()}
    missing = [n for n in expected_shapes if n not in weight_map and not (fresh and n.startswith(fresh))]
    unexpected = sorted(n for n in weight_map if n not in expected_shapes)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing tensors {missing}, "
                         f"unexpected tensors {unexpected}")
    state: Dict[str, torch.Tensor] = {}
    params = dict(model.named_parameters())
    for file_name in sorted(set(weight_map.values())):
        if not (path / file_name).is_file():
            raise ValueError(f"model folder {path} has no {file_name} (named in {INDEX_NAME})")
        with safetensors.safe_open(str(path / file_name), framework="pt", device=str(device)) as shard:
            for name in shard.keys():
                if skip and name.startswith(skip):
                    continue
                if weight_map.get(name) != file_name:
                    raise ValueError(f"{path / file_name} holds tensor '{name}', which {INDEX_NAME} maps to "
                                     f"{weight_map.get(name)}")
                tensor = shard.get_tensor(name)
                if tuple(tensor.shape) != expected_shapes[name]:
                    raise ValueError(f"tensor '{name}' has shape {tuple(tensor.shape)} in {path / file_name}, "
                                     f"the model expects {expected_shapes[name]}")
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                if partitioned:
                    _copy_into(params.get(name), model, name, tensor, gather)
                state[name] = tensor if not partitioned else torch.empty(0)
    absent = [n for n in expected_shapes if n not in state and not (fresh and n.startswith(fresh))]
    if absent:
        raise ValueError(f"checkpoint {path} does not match the model: missing tensors {absent}")
    if partitioned:
        return model  # zero.Init's config decided the parameters' dtype (fresh tensors: as built)
    new = [n for n in expected_shapes if n not in state]
    model.load_state_dict(state, strict=not new, assign=True)
    if new:  # the fresh tensors, still on the meta device: real memory, then the class's initialisation
        stored = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
        for prefix in fresh:
            module = model.get_submodule(prefix.rstrip("."))
            module.to_empty(device=device)
            module.to(stored)
            model.init_fresh(module)
    # Non-persistent buffers (RoPE frequencies) are not in the checkpoint; rebuild them off the meta device.
    with torch.device(device):
        model.model.rotary_emb = Qwen2RotaryEmbedding(config=model.model.config)
    left_on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not left_on_meta, left_on_meta
    return model


def _full_shape(tensor: torch.Tensor) -> tuple:
    # A ZeRO-3 partitioned parameter is empty locally and keeps its real shape in ds_shape.
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


def _copy_into(param: Optional[torch.nn.Parameter], model: torch.nn.Module, name: str, tensor: torch.Tensor,
               gather: Callable[[List[torch.nn.Parameter]], ContextManager]) -> None:
    if param is None:  # a persistent buffer
        with torch.no_grad():
            model.get_buffer(name).copy_(tensor)
        return
    with gather([param]), torch.no_grad():
        param.data.copy_(tensor.to(param.dtype))
