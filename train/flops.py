"""Model FLOPs of training (per decoder token, per audio second, per loader micro-batch) and the peak FLOP/s
of the device they run on: the two halves of MFU.

What is counted: matrix multiplications only, 2 FLOPs per multiply-add. A linear layer applied to one row
costs 2 x its weight's parameters forward. Norms, activations, softmax, RoPE, biases, embedding lookups, the
loss and the optimizer are left out (together under 1% at the mini shape); so are LoRA's low-rank branches
(r x (in + out) per layer, under 1% at r=16) and the recomputation of gradient checkpointing (these are
model FLOPs, as in PaLM's MFU, not the hardware's).

Passes per part (encoder, adapter, decoder, lm_head), in units of its forward pass (training_passes):
    3  its weights train: forward, input gradient, weight gradient;
    2  frozen, but a trained part before it needs the gradient through it: forward and input gradient;
    1  frozen with nothing trained before it: forward only (a frozen encoder: its input is the mel, so
       autograd runs no backward through it at all).
Attention scores and values (no weights) cost 3 forwards when a gradient passes through, else 1.

Decoder, per sequence of n tokens (hidden H, layers Ld, heads x head_dim = A, key/value heads x head_dim =
K, intermediate I, vocabulary V):
    linear  2 x n x Ld x (2 H A + 2 H K + 3 H I)        q, k, v, o and the SwiGLU MLP
    lm_head 2 x labelled x H V                          the loss computes logits on labelled rows only
    attention 2 x Ld x A x n (n + 1)                    causal: QK^T and AV over the (i + 1) keys of token i
so full training of a sequence of length L costs per token 6 N + 6 Ld A (L + 1), N = the matmul parameters
with lm_head (flops_per_token, which counts lm_head on every token: an upper bound for data whose labels
cover part of the sequence).

Encoder + adapter, per audio chunk of F mel frames (100 per second; width C, layers Le, adapter hidden D):
    conv1 (k=3) on F frames, conv2 (k=3, stride 2) -> T2 = ceil(F / 2) frames (50 per second);
    Le blocks on T2 frames: 12 C^2 matmul parameters per frame, attention 4 C T2 per frame (bidirectional
    over the chunk's own frames, not the batch's padded length);
    average pool -> T3 = T2 // 2 (25 per second); adapter conv (k, stride) -> T4 (12.5 per second), then
    linear C x D and D x H on T4 frames.

Generation with the KV cache (generation_flops), forward only: a row's prompt of P tokens runs once, then each
of its A answer tokens but the last is fed back alone. The token at position t attends to the t + 1 keys in
the cache, so the row's attention totals one causal pass over its P + A - 1 fed tokens; logits are counted
for the A rows that choose a token.

An RL step (train.rl) adds up, per model, the passes it runs (ModelFlops): rollout generation, forward-only
scoring (old log-probabilities, reference, critic values, reward models) and the training passes.
"""
from __future__ import annotations

import functools
import re
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch

from model.config import ADAPTER_HIDDEN, StepAudio2Config

# Parameter groups from the model's input to its output (train.config.PARAM_GROUPS); the adapter and the
# embeddings both feed the decoder's input.
_ORDER = ("encoder", "adapter", "embeddings", "decoder", "lm_head")
PARTS = ("encoder", "adapter", "decoder", "lm_head")
# The paper's stages train everything but the encoder.
DEFAULT_TRAINABLE = ("adapter", "embeddings", "decoder", "lm_head")
MEL_FRAMES_PER_S = 100
# The encoder's frontend convs (not a config key: the encoder's code fixes them).
_FRONTEND_KERNEL = 3


def training_passes(trainable: Iterable[str] = DEFAULT_TRAINABLE, lora: Any = None) -> Dict[str, int]:
    """{part: passes} (see the module doc) for a run that trains the parameter groups `trainable`
    (model.trainable), or, when `lora` (a train.config.LoraConfig) is enabled, LoRA adapters on a frozen base:
    then no base weight trains and the parts holding adapters (decoder, adapter, the audio rows of the
    embeddings and lm_head) count 2 passes, as does everything after them."""
    trainable = list(trainable)
    unknown = [g for g in trainable if g not in _ORDER]
    if unknown:
        raise ValueError(f"trainable groups {unknown}: expected names from {list(_ORDER)}")
    if lora is not None and lora.enabled:
        full: set = set()
        sources = {"decoder"} if lora.target_modules else set()
        if lora.adapter:
            sources.add("adapter")
        if lora.train_audio_rows:
            sources.update({"embeddings", "lm_head"})
    else:
        full = sources = set(trainable)
    passes = {}
    for i, part in enumerate(_ORDER):
        if part == "embeddings":
            continue  # a lookup: no FLOPs
        if part in full:
            passes[part] = 3
        elif part in sources or sources & set(_ORDER[:i]):
            passes[part] = 2
        else:
            passes[part] = 1
    return passes


def forward_passes() -> Dict[str, int]:
    """Passes of a forward pass alone (generation, a frozen reference or reward model)."""
    return {part: 1 for part in PARTS}


def _attention_passes(passes: int) -> int:
    return 3 if passes >= 2 else 1


def decoder_dims(config: StepAudio2Config) -> Dict[str, int]:
    """hidden, intermediate, layers, q_width (heads x head_dim), kv_width (key/value heads x head_dim), vocab."""
    text = config.text_config
    hidden, heads = int(text["hidden_size"]), int(text["num_attention_heads"])
    head_dim = int(text.get("head_dim") or hidden // heads)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    return {"hidden": hidden, "intermediate": int(text["intermediate_size"]),
            "layers": int(text["num_hidden_layers"]), "q_width": heads * head_dim,
            "kv_width": kv_heads * head_dim, "vocab": int(text["vocab_size"])}


def decoder_matmul_params(config: StepAudio2Config) -> int:
    """Weights of the decoder layers' linear layers (q, k, v, o, gate, up, down), lm_head not included."""
    d = decoder_dims(config)
    per_layer = 2 * d["hidden"] * d["q_width"] + 2 * d["hidden"] * d["kv_width"] + 3 * d["hidden"] * d["intermediate"]
    return d["layers"] * per_layer


def lm_head_params(config: StepAudio2Config) -> int:
    d = decoder_dims(config)
    return d["hidden"] * d["vocab"]


def attention_flops(config: StepAudio2Config, seq_len: Union[int, torch.Tensor]) -> Union[float, torch.Tensor]:
    """Forward FLOPs of the decoder's causal attention over one sequence of seq_len tokens (all layers):
    2 x layers x q_width x n (n + 1). A tensor of lengths gives a tensor of FLOPs."""
    d = decoder_dims(config)
    n = seq_len.double() if isinstance(seq_len, torch.Tensor) else float(seq_len)
    return 2.0 * d["layers"] * d["q_width"] * n * (n + 1)


def flops_per_token(config: StepAudio2Config, seq_len: int, passes: Optional[Dict[str, int]] = None,
                    lm_head: bool = True) -> float:
    """Training FLOPs per decoder token of sequences of seq_len tokens:

        p_dec x 2 x decoder_matmul_params + p_head x 2 x lm_head_params + p_att x 2 x layers x q_width x (seq_len + 1)

    passes: training_passes(...) (default: the paper's full fine-tuning, everything but the encoder trained,
    giving 6 N + 6 x layers x q_width x (seq_len + 1)); lm_head=False for a score model (critic, reward
    model), whose head is one row. Audio is extra: see encoder_flops_per_audio_second."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}: expected an integer >= 1")
    passes = training_passes() if passes is None else passes
    flops = passes["decoder"] * 2.0 * decoder_matmul_params(config)
    if lm_head:
        flops += passes["lm_head"] * 2.0 * lm_head_params(config)
    return flops + _attention_passes(passes["decoder"]) * attention_flops(config, seq_len) / seq_len


def encoder_chunk_flops(config: StepAudio2Config, mel_frames: Union[int, torch.Tensor],
                        passes: Optional[Dict[str, int]] = None) -> float:
    """Training FLOPs of the encoder and adapter on audio chunks of `mel_frames` mel frames each (an int, or
    a tensor of every chunk's frames: the sum is returned). Formulas in the module doc."""
    passes = training_passes() if passes is None else passes
    enc = config.audio_encoder_config
    C, M, layers, D, H = enc.n_audio_state, enc.n_mels, enc.n_audio_layer, ADAPTER_HIDDEN, enc.llm_dim
    F = torch.as_tensor(mel_frames, dtype=torch.float64).reshape(-1)
    T2 = torch.div(F + 1, 2, rounding_mode="floor")
    T3 = torch.div(T2, 2, rounding_mode="floor")
    T4 = torch.div(T3 + 2 - enc.kernel_size, enc.adapter_stride, rounding_mode="floor") + 1
    encoder_linear = 2.0 * (F * _FRONTEND_KERNEL * M * C + T2 * _FRONTEND_KERNEL * C * C + layers * T2 * 12 * C * C)
    encoder_attention = layers * 4.0 * C * T2 * T2
    adapter = 2.0 * T4 * (enc.kernel_size * C * C + C * D + D * H)
    total = (passes["encoder"] * encoder_linear + _attention_passes(passes["encoder"]) * encoder_attention
             + passes["adapter"] * adapter)
    return float(total.sum())


def encoder_flops_per_audio_second(config: StepAudio2Config, chunk_s: float = 25.0,
                                   passes: Optional[Dict[str, int]] = None) -> float:
    """Training FLOPs of the encoder and adapter per second of input audio cut into chunks of chunk_s seconds
    (100 mel frames per second; the attention term grows with the chunk: 25 s is the longest the data makes,
    so the default is an upper bound). Default passes: the paper's, a frozen encoder (forward only) and a
    trained adapter."""
    if chunk_s <= 0:
        raise ValueError(f"chunk_s={chunk_s}: expected a positive number of seconds")
    return encoder_chunk_flops(config, round(MEL_FRAMES_PER_S * chunk_s), passes) / chunk_s


def sequence_lengths(batch: Dict[str, Any], varlen: bool) -> torch.Tensor:
    """Lengths [S] of the sequences attention runs over in a loader batch: each packed sample (segment_ids)
    when `varlen`, else each row's real tokens (attention_mask), one causal sequence per row."""
    if varlen and batch.get("segment_ids") is not None:
        seg_BT = batch["segment_ids"].cpu()
        width = int(seg_BT.max()) + 1
        ids_BT = seg_BT + width * torch.arange(seg_BT.shape[0])[:, None]
        counts = torch.bincount(ids_BT[seg_BT > 0])
        return counts[counts > 0]
    return batch["attention_mask"].cpu().sum(dim=1)


def _labelled_tokens(batch: Dict[str, Any]) -> int:
    count = batch.get("num_loss_tokens")
    return int((batch["labels"][:, 1:] != -100).sum()) if count is None else int(count)


def flops_breakdown(config: StepAudio2Config, batch: Dict[str, Any], varlen: bool = False,
                    passes: Optional[Dict[str, int]] = None, lm_head: bool = True) -> Dict[str, float]:
    """{"decoder", "attention", "lm_head", "encoder"} training FLOPs of one loader micro-batch
    (data.loading.batching: input_ids, attention_mask, labels, optional segment_ids, num_loss_tokens, mel_lengths).

    Padding costs nothing here. varlen: the decoder's attention isolates packed samples (flash-attention 2
    through cu_seq_lens, or another variable-length path), so each sample's attention is counted at its own
    length; False (a dense masked kernel): each row's at the row's real length. lm_head counts labelled
    tokens (num_loss_tokens); the encoder each chunk's true mel frames (mel_lengths)."""
    passes = training_passes() if passes is None else passes
    lengths = sequence_lengths(batch, varlen)
    tokens = int(lengths.sum())
    out = {"decoder": passes["decoder"] * 2.0 * decoder_matmul_params(config) * tokens,
           "attention": _attention_passes(passes["decoder"]) * float(attention_flops(config, lengths).sum()),
           "lm_head": passes["lm_head"] * 2.0 * lm_head_params(config) * _labelled_tokens(batch) if lm_head else 0.0,
           "encoder": 0.0}
    mel_lengths = batch.get("mel_lengths")
    if mel_lengths is not None and mel_lengths.numel():
        out["encoder"] = encoder_chunk_flops(config, mel_lengths.cpu(), passes)
    return out


def step_flops(config: StepAudio2Config, batch: Dict[str, Any], varlen: bool = False,
               passes: Optional[Dict[str, int]] = None, lm_head: bool = True) -> float:
    """Training FLOPs of one loader micro-batch: the sum of flops_breakdown."""
    return sum(flops_breakdown(config, batch, varlen, passes, lm_head).values())


def generation_flops(config: StepAudio2Config, prompt_tokens: Iterable[int], answer_tokens: Iterable[int],
                     mel_frames: Iterable[int] = ()) -> float:
    """Forward FLOPs of sampling answers with the KV cache (model.generate), summed over rows: row i has a
    prompt of prompt_tokens[i] tokens and answer_tokens[i] generated tokens (its stop token included);
    mel_frames lists every audio chunk the rows' prompts encode (a prompt answered n times is encoded n times).

    Per row (module doc): decoder and attention over P + A - 1 fed tokens, lm_head on A rows. Left padding, the
    prefill's logits at the prompt's other positions and the steps a row rides along after it stopped are
    the hardware's waste, not model FLOPs, and are left out."""
    prompts, answers = [int(n) for n in prompt_tokens], [int(n) for n in answer_tokens]
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompt lengths for {len(answers)} answer lengths: expected one per row")
    bad = [(p, a) for p, a in zip(prompts, answers) if p < 1 or a < 0]
    if bad:
        raise ValueError(f"(prompt, answer) lengths {bad[0]}: expected a prompt of >= 1 token, an answer of >= 0")
    fed = torch.tensor([p + max(a - 1, 0) for p, a in zip(prompts, answers)], dtype=torch.float64)
    total = (2.0 * decoder_matmul_params(config) * float(fed.sum())
             + 2.0 * lm_head_params(config) * sum(answers)
             + float(attention_flops(config, fed).sum()))
    frames = [int(f) for f in mel_frames]
    if frames:
        total += encoder_chunk_flops(config, torch.tensor(frames), forward_passes())
    return total


class ModelFlops:
    """FLOPs of one model of a run (policy, reference, critic, reward model) on loader batches: its config,
    whether its attention kernel isolates packed samples (varlen), and whether it has an lm_head (a score
    model's head is one column, not counted). RL steps sum these over the passes they run."""

    def __init__(self, config: StepAudio2Config, varlen: bool = False, lm_head: bool = True):
        self.config, self.varlen, self.lm_head = config, varlen, lm_head

    @classmethod
    def of(cls, module: torch.nn.Module) -> "ModelFlops":
        """The counts of the StepAudio2 model inside `module` (peft- or DeepSpeed-wrapped, or a score model)."""
        from model.attention import VARLEN_KERNELS
        from model.lalm import StepAudio2ForCausalLM
        from model.score import StepAudio2ForScore

        model = next((m for m in module.modules() if isinstance(m, StepAudio2ForCausalLM)), None)
        if model is None:
            raise ValueError(f"{type(module).__name__} holds no StepAudio2ForCausalLM: no model FLOPs to count")
        return cls(model.config, model.attention_implementation in VARLEN_KERNELS,
                   lm_head=not isinstance(model, StepAudio2ForScore))

    def forward(self, batch: Dict[str, Any]) -> float:
        """One forward pass over a loader batch, no gradient (log-probabilities, values, rewards)."""
        return step_flops(self.config, batch, self.varlen, forward_passes(), self.lm_head)

    def train(self, batch: Dict[str, Any], passes: Dict[str, int]) -> float:
        """Forward and backward over a loader batch; passes: training_passes(model.trainable, lora)."""
        return step_flops(self.config, batch, self.varlen, passes, self.lm_head)

    def generation(self, prompt_tokens: Iterable[int], answer_tokens: Iterable[int],
                   mel_frames: Iterable[int] = ()) -> float:
        """Sampling answers with the KV cache: generation_flops."""
        return generation_flops(self.config, prompt_tokens, answer_tokens, mel_frames)


# ------------------------------------------------------------------------------------------------ peaks

# Dense (no 2:4 sparsity) tensor-core peaks from the vendors' datasheets, FLOP/s. fp32: plain FP32 (CUDA
# cores; MI300X: its matrix cores); tf32: fp32 matmuls on tensor cores (torch.backends.cuda.matmul.allow_tf32
# or set_float32_matmul_precision("high")). First matching pattern wins, so variants come before the base.
GPU_PEAKS: List[Tuple[str, str, Dict[str, float]]] = [
    ("h100-nvl", r"\bH100\b.*\bNVL\b", {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("h100-pcie", r"\bH100\b.*\bPCIe\b", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
    ("h100", r"\bH100\b", {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12}),
    ("h200-nvl", r"\bH200\b.*\bNVL\b", {"bf16": 835e12, "fp16": 835e12, "tf32": 417.5e12, "fp32": 60e12}),
    ("h200", r"\bH200\b", {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12}),
    ("h800", r"\bH800\b", {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12}),
    ("h20", r"\bH20\b", {"bf16": 148e12, "fp16": 148e12, "tf32": 74e12, "fp32": 44e12}),
    ("b200", r"\bB200\b", {"bf16": 2250e12, "fp16": 2250e12, "tf32": 1100e12, "fp32": 75e12}),
    ("a100", r"\bA100\b", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("a800", r"\bA800\b", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("a10", r"\bA10\b", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    ("l40s", r"\bL40S\b", {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("l40", r"\bL40\b", {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12}),
    ("l4", r"\bL4\b", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    ("4090", r"\bRTX 4090\b", {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    ("3090", r"\bRTX 3090\b", {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12}),
    ("v100", r"\bV100\b", {"fp16": 125e12, "fp32": 15.7e12}),
    ("mi300x", r"\bMI300X\b", {"bf16": 1307.4e12, "fp16": 1307.4e12, "tf32": 653.7e12, "fp32": 163.4e12}),
]
GPU_KEYS = tuple(key for key, _, _ in GPU_PEAKS)


def dtype_key(dtype: torch.dtype, tf32: bool = False) -> str:
    """bf16, fp16, tf32 or fp32: the column of GPU_PEAKS a matmul in `dtype` runs at."""
    keys = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "tf32" if tf32 else "fp32"}
    if dtype not in keys:
        raise ValueError(f"dtype {dtype}: expected torch.bfloat16, torch.float16 or torch.float32")
    return keys[dtype]


def gpu_peak_flops(name: str, dtype: torch.dtype, tf32: bool = False) -> Optional[float]:
    """Dense peak FLOP/s of the GPU called `name` (torch.cuda.get_device_name, or a GPU_KEYS entry such as
    "h100") for matmuls in `dtype`; None for a GPU or a dtype the table does not know."""
    column = dtype_key(dtype, tf32)
    for key, pattern, peaks in GPU_PEAKS:
        if name.lower() == key or re.search(pattern, name, flags=re.IGNORECASE):
            return peaks.get(column)
    return None


def _tf32_enabled() -> bool:
    return torch.get_float32_matmul_precision() != "highest" or bool(torch.backends.cuda.matmul.allow_tf32)


def measured_cpu_flops(dtype: torch.dtype = torch.float32, threads: Optional[int] = None) -> float:
    """The best FLOP/s of a few 1024 x 1024 matmuls in `dtype` on this CPU with `threads` torch threads
    (default: the current number), measured once per (dtype, threads) and cached (under a second): on a CPU,
    MFU is measured against what its own matmuls reach, for which no datasheet speaks."""
    return _measure_cpu(dtype, torch.get_num_threads() if threads is None else int(threads))


@functools.lru_cache(maxsize=None)
def _measure_cpu(dtype: torch.dtype, threads: int, n: int = 1024) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=generator).to(dtype)
        b = torch.randn(n, n, generator=generator).to(dtype)
        out = torch.mm(a, b)  # warm-up: allocations, kernel choice
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    return 2.0 * n**3 / best


def device_peak_flops(device: Union[str, torch.device], dtype: torch.dtype) -> Optional[float]:
    """Peak FLOP/s of `device` for matmuls in `dtype`: a CUDA GPU's from GPU_PEAKS by its name (fp32 at the
    TF32 figure when TF32 matmuls are on), the CPU's measured (measured_cpu_flops); None where unknown (an
    unlisted GPU, another device type): then no MFU is reported."""
    device = torch.device(device)
    if device.type == "cpu":
        return measured_cpu_flops(dtype)
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), dtype, tf32=_tf32_enabled())
    return None


def mfu(flops_per_s: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak (None when the peak is unknown)."""
    if peak is None:
        return None
    if not peak > 0:
        raise ValueError(f"peak={peak}: expected a positive FLOP/s figure")
    return flops_per_s / peak
