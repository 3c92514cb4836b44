"""StepAudio2ForCausalLM: encoder + adapter outputs spliced into a Qwen2 decoder's <audio_patch> rows.

The training loss is computed on labelled rows only, by model.fused_loss in chunks, so the full
[tokens, vocab] fp32 logits never exist at once (158720 columns make them the largest activation).
"""
from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Tuple, Union

import torch
from torch import nn
# Imported eagerly: transformers' lazy import, if first triggered inside deepspeed.zero.Init, fails
# (it imports torch._dynamo while zero.Init has patched tensor construction).
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model
from transformers.utils.generic import ModelOutput

from data.loading.batching import packed_cu_seq_lens
from model.attention import VARLEN_SDPA, segment_lengths, varlen_layout
from model.checks import check
from model.config import ADAPTER_HIDDEN, StepAudio2Config
from model.encoder import Adaptor, AudioEncoder
from model.fused_loss import linear_cross_entropy, linear_token_logprobs

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# At most this many labelled rows per loss chunk (a large vocabulary takes fewer: fused_loss.chunk_rows).
LOSS_CHUNK_ROWS = 1024
# Shape of the stand-in audio run when a training batch has none (see _dummy_audio_term).
_DUMMY_MEL_FRAMES = 16


@dataclass
class StepAudio2Output(ModelOutput):
    """Model outputs; a ModelOutput (a dict) so DeepSpeed ZeRO-3's module hooks can find its tensors."""

    loss: Optional[torch.Tensor] = None
    """Mean cross-entropy over labelled positions (None without labels)."""
    logits: Optional[torch.Tensor] = None
    """[B, T, vocab] when no labels were given; None with labels (only chunks of it ever existed)."""
    past_key_values: Optional[Any] = None
    """The decoder's KV cache when use_cache=True."""
    num_label_tokens: Optional[int] = None
    """Positions that contributed to the loss, to re-weight means across ranks (None without labels)."""
    token_logprobs: Optional[torch.Tensor] = None
    """[B, T] fp32 with token_logprobs=True: at t, log p(labels[t] | tokens before t) at the given
    temperature; 0 where labels[t] is -100 and at t = 0. Aligned with labels, so a label mask selects it."""
    entropy: Optional[torch.Tensor] = None
    """[B, T] fp32, detached, with token_logprobs=True: the entropy of the distribution that predicted
    labels[t] (aligned like token_logprobs)."""
    scores: Optional[torch.Tensor] = None
    """[B, T] fp32 from a score model (StepAudio2ForScore): the scalar head on every position (the reward
    model reads it at the last token, the critic uses it as the value of each). (Not "values": the output
    is a dict, whose values() DeepSpeed calls.)"""
    token_losses: Optional[torch.Tensor] = None
    """[B, T] fp32, detached, with token_losses=True: at t, the cross-entropy of labels[t] (the values the loss
    averages); 0 where labels[t] is -100 and at t = 0. Aligned with labels, like token_logprobs."""


def _labelled_rows(labels_BT: torch.Tensor, num_loss_tokens: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(rows of the flattened [B * T] hidden states that predict a label, the labels they predict, count).

    Position t predicts labels[t + 1], so a row r predicts the flattened label r + 1 (never across samples:
    the last position of each sample predicts nothing). No host sync when num_loss_tokens is given."""
    keep_BT = torch.zeros_like(labels_BT, dtype=torch.bool)
    keep_BT[:, :-1] = labels_BT[:, 1:] != IGNORE_INDEX
    keep_M = keep_BT.reshape(-1)
    if num_loss_tokens is None:
        count = int(keep_M.sum())
    else:
        count = int(num_loss_tokens)
        check(keep_M.sum() == count, lambda: f"num_loss_tokens={count} but labels hold "
                                             f"{int(keep_M.sum())} labelled targets")
    # The labelled rows in order, by index (a boolean mask would sync to learn its size).
    rows_N = torch.argsort((~keep_M).to(torch.int8), stable=True)[:count]
    return rows_N, labels_BT.reshape(-1).index_select(0, rows_N + 1), count


ATTENTION_CHOICES = ("auto", "sdpa", VARLEN_SDPA, "eager", "flash_attention_2")
# flash-attention computes in half precision only; in fp32 it raises at the first forward.
_FLASH_DTYPES = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def flash_attention_status() -> Tuple[bool, str]:
    """(usable, why) for flash-attention 2: a CUDA device, and flash_attn whose compiled kernel imports.

    find_spec alone is not enough: a wheel built for another torch or CUDA imports its Python part and
    fails only when the extension (flash_attn_2_cuda) loads, which would otherwise happen mid-run."""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if importlib.util.find_spec("flash_attn") is None:
        return False, "flash_attn is not installed (pip install -e '.[gpu]' --no-build-isolation, see README)"
    try:
        import flash_attn_2_cuda  # noqa: F401  (the compiled kernel)
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception as e:  # ImportError, OSError (undefined symbol), RuntimeError from a mismatched build
        return False, f"flash_attn is installed but its kernel does not load ({type(e).__name__}: {e})"
    import flash_attn

    return True, f"flash_attn {getattr(flash_attn, '__version__', '?')}"


def resolve_attention(name: str, dtype: Optional[torch.dtype] = None) -> str:
    """The decoder's attention kernel for training or inference in `dtype` (default: torch's default dtype).

    "auto" = flash-attention 2 when it is usable (flash_attention_status) and dtype is bf16/fp16, else
    varlen_sdpa (model.attention: PyTorch SDPA, with packed rows computed sample by sample); the choice and
    the reason are logged. "sdpa" keeps packed rows under one dense block-diagonal mask (the row's square).
    The encoder always uses SDPA (which picks flash kernels on GPUs itself)."""
    if name not in ATTENTION_CHOICES:
        raise ValueError(f"attention={name!r}: expected one of {ATTENTION_CHOICES}")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    usable, why = flash_attention_status()
    if name == "flash_attention_2":
        if not usable:
            raise ValueError(f"attention='flash_attention_2' is not usable here: {why}; use 'sdpa' or 'auto'")
        if dtype not in _FLASH_DTYPES:
            raise ValueError(f"attention='flash_attention_2' needs bf16 or fp16, the model computes in {dtype} "
                             f"(set engine.precision=bf16, or use 'sdpa' or 'auto')")
    if name != "auto":
        chosen, reason = name, "asked for"
    elif usable and dtype in _FLASH_DTYPES:
        chosen, reason = "flash_attention_2", why
    elif usable:
        chosen, reason = VARLEN_SDPA, f"flash-attention needs bf16/fp16, the model computes in {dtype}"
    else:
        chosen, reason = VARLEN_SDPA, f"flash-attention not used: {why}"
    logger.info("decoder attention: %s (%s)", chosen, reason)
    return chosen


def _check_segment_ids(segment_ids_BT: torch.Tensor) -> None:
    if segment_ids_BT.dim() != 2 or segment_ids_BT.is_floating_point() or segment_ids_BT.dtype == torch.bool:
        raise ValueError(f"segment_ids must be an integer tensor [B, T], got {segment_ids_BT.dtype} "
                         f"{tuple(segment_ids_BT.shape)}")


def packed_position_ids(segment_ids_BT: torch.Tensor) -> torch.Tensor:
    """Positions [B, T] that restart at 0 wherever the segment id changes (padding counts as a segment)."""
    _check_segment_ids(segment_ids_BT)
    B, T = segment_ids_BT.shape
    index_BT = torch.arange(T, device=segment_ids_BT.device).expand(B, T)
    starts_BT = torch.ones_like(segment_ids_BT, dtype=torch.bool)
    starts_BT[:, 1:] = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
    start_index_BT = torch.where(starts_BT, index_BT, torch.zeros_like(index_BT)).cummax(dim=1).values
    return index_BT - start_index_BT


def packed_attention(segment_ids_BT: torch.Tensor, implementation: str, dtype: torch.dtype,
                     cu_seq_lens: Optional[torch.Tensor] = None,
                     max_length: Optional[int] = None) -> Tuple[Optional[torch.Tensor], dict]:
    """(attention_mask, extra decoder kwargs) that keep attention causal within each segment of a packed row.

    sdpa gets a boolean [B, 1, T, T] mask and eager an additive one (transformers passes 4D masks through
    unchanged). Padding (segment 0) attends to earlier padding only, so no softmax row is empty (an empty
    row is NaN, and NaN leaks into gradients). flash_attention_2 and varlen_sdpa take no mask: every
    segment, padding included, becomes one varlen sequence of the flattened batch (cu_seq_lens, from
    packed_cu_seq_lens; given precomputed on the host, no host-device sync is spent on it), which their
    kernels isolate: flash through cu_seq_lens_q/k and max_length_q/k, varlen_sdpa through a VarlenLayout.
    (transformers would also guess packing from position_ids alone; explicit segments cannot be misread.)
    """
    _check_segment_ids(segment_ids_BT)
    B, T = segment_ids_BT.shape
    if implementation == VARLEN_SDPA:
        if cu_seq_lens is None:
            cu_seq_lens, _ = packed_cu_seq_lens(segment_ids_BT)
        return None, {"varlen_layout": varlen_layout(segment_lengths(cu_seq_lens), segment_ids_BT.device)}
    if implementation == "flash_attention_2":
        if cu_seq_lens is None or max_length is None:
            cu_seq_lens, max_length = packed_cu_seq_lens(segment_ids_BT)
        cu_seq_lens = cu_seq_lens.to(device=segment_ids_BT.device, dtype=torch.int32, non_blocking=True)
        return None, {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
                      "max_length_q": int(max_length), "max_length_k": int(max_length)}
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=segment_ids_BT.device).tril()
    allowed_B1TT = ((segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]) & causal_TT)[:, None]
    if implementation == "sdpa":
        return allowed_B1TT, {}
    if implementation == "eager":
        bias_B1TT = torch.zeros(allowed_B1TT.shape, dtype=dtype, device=segment_ids_BT.device)
        return bias_B1TT.masked_fill(~allowed_B1TT, torch.finfo(dtype).min), {}
    raise ValueError(f"segment_ids with attention {implementation!r}: expected one of "
                     f"{[name for name in ATTENTION_CHOICES if name != 'auto']}")


class StepAudio2ForCausalLM(nn.Module):
    def __init__(self, config: StepAudio2Config, gradient_checkpointing: Union[bool, Iterable[str]] = False,
                 attention: str = "sdpa"):
        super().__init__()
        self.config = config
        enc = config.audio_encoder_config
        self.encoder = AudioEncoder(enc.n_mels, enc.n_audio_ctx, enc.n_audio_state, enc.n_audio_head,
                                    enc.n_audio_layer)
        self.adapter = Adaptor(enc.n_audio_state, enc.llm_dim, enc.kernel_size, enc.adapter_stride,
                               ADAPTER_HIDDEN)
        self.model = Qwen2Model(config.qwen2_config(resolve_attention(attention)))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.set_gradient_checkpointing(gradient_checkpointing)

    @property
    def attention_implementation(self) -> str:
        """The decoder's attention kernel: sdpa, varlen_sdpa, eager or flash_attention_2."""
        return self.model.config._attn_implementation

    def set_gradient_checkpointing(self, enabled: Union[bool, Iterable[str]]) -> None:
        """Recompute encoder blocks and/or decoder layers in backward instead of storing their activations.

        `enabled` is True/False for both, or the parts to checkpoint: a subset of {"encoder", "decoder"}."""
        parts = {"encoder", "decoder"} if enabled is True else set() if enabled is False else set(enabled)
        if parts - {"encoder", "decoder"}:
            raise ValueError(f"gradient checkpointing parts {sorted(parts)}: expected encoder and/or decoder")
        self.encoder.gradient_checkpointing = "encoder" in parts
        if "decoder" in parts:
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.activation_checkpointing_disable()

    def encode_audio(self, mels: torch.Tensor, mel_lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Adapter outputs [N, T, hidden] and valid lengths [N] of N zero-padded mel chunks [N, n_mels, F]."""
        if mels.dim() != 3 or mel_lengths.shape != mels.shape[:1]:
            raise ValueError(f"expected mels [N, n_mels, F] and mel_lengths [N], got {tuple(mels.shape)} "
                             f"and {tuple(mel_lengths.shape)}")
        feats_NTC, lengths_N = self.encoder(mels, mel_lengths.to(device=mels.device, dtype=torch.long))
        return self.adapter(feats_NTC), self.adapter.output_lengths(lengths_N)

    def _splice_audio(self, input_ids: torch.Tensor, embeds_BTH: torch.Tensor, mels: Optional[torch.Tensor],
                      mel_lengths: Optional[torch.Tensor]) -> torch.Tensor:
        # No boolean indexing or .item() here: on a GPU each would stall the host once per micro-batch.
        patch_id = self.config.audio_patch_token_id
        is_patch_BT = input_ids == patch_id
        if mels is None:
            check(~is_patch_BT.any(), lambda: f"input_ids hold {int(is_patch_BT.sum())} audio patch rows (id "
                                              f"{patch_id}) but no mels were given")
            return embeds_BTH + self._dummy_audio_term(embeds_BTH)
        if mel_lengths is None:
            raise ValueError("mels were given without mel_lengths (the true frame count of each chunk)")
        feats_NTH, lengths_N = self.encode_audio(mels, mel_lengths)
        check(lengths_N.sum() == is_patch_BT.sum(), lambda: (
            f"audio patch count mismatch: input_ids hold {int(is_patch_BT.sum())} audio patch rows (id "
            f"{patch_id}) but the audio gives {int(lengths_N.sum())} adapter outputs (per chunk "
            f"{lengths_N.tolist()})"))
        # The k-th patch row (row-major) takes the k-th valid adapter output (chunk-major). A stable sort
        # lists the valid outputs first, in order, so the k-th is order[k]: an index, not a boolean mask.
        N, F_out, H = feats_NTH.shape
        valid_M = (torch.arange(F_out, device=feats_NTH.device)[None, :] < lengths_N[:, None]).reshape(-1)
        order_M = torch.argsort((~valid_M).to(torch.int8), stable=True)
        is_patch_P = is_patch_BT.reshape(-1)
        patch_rank_P = (is_patch_P.cumsum(0) - 1).clamp(0, order_M.numel() - 1)
        audio_PH = feats_NTH.reshape(N * F_out, H).index_select(0, order_M[patch_rank_P]).to(embeds_BTH.dtype)
        return torch.where(is_patch_P[:, None], audio_PH, embeds_BTH.reshape(-1, H)).view_as(embeds_BTH)

    def _dummy_audio_term(self, like_BTH: torch.Tensor) -> torch.Tensor | float:
        """Zero that depends on every encoder/adapter parameter, while training without audio.

        Every rank must run the same modules: ZeRO-3 gathers parameters module by module, so a rank
        whose batch has no audio would otherwise skip the encoder's gathers and hang the others.
        """
        if not (self.training and torch.is_grad_enabled()):
            return 0.0
        n_mels = self.config.audio_encoder_config.n_mels
        mels = torch.zeros(1, n_mels, _DUMMY_MEL_FRAMES, device=like_BTH.device, dtype=like_BTH.dtype)
        feats_NTH, _ = self.encode_audio(mels, torch.tensor([_DUMMY_MEL_FRAMES], device=like_BTH.device))
        return feats_NTH.sum().to(like_BTH.dtype) * 0.0

    def decode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
               mels: Optional[torch.Tensor] = None, mel_lengths: Optional[torch.Tensor] = None,
               position_ids: Optional[torch.Tensor] = None, past_key_values: Optional[Any] = None,
               use_cache: bool = False, segment_ids: Optional[torch.Tensor] = None,
               cu_seq_lens: Optional[torch.Tensor] = None, max_length: Optional[int] = None):
        """(last hidden states [B, T, H], KV cache or None): the decoder pass with the audio spliced in,
        before any head. See forward for the arguments."""
        embeds_BTH = self.model.embed_tokens(input_ids)
        embeds_BTH = self._splice_audio(input_ids, embeds_BTH, mels, mel_lengths)
        attention_kwargs = {}
        if segment_ids is not None:
            if past_key_values is not None or use_cache:
                raise ValueError("segment_ids (packed training rows) cannot be combined with a KV cache")
            position_ids = packed_position_ids(segment_ids) if position_ids is None else position_ids
            attention_mask, attention_kwargs = packed_attention(
                segment_ids, self.model.config._attn_implementation, embeds_BTH.dtype, cu_seq_lens, max_length)
            if "varlen_layout" in attention_kwargs:
                # Prepared masks, none: transformers would otherwise build a [B, T, T] one from position_ids.
                attention_mask = {kind: None for kind in set(self.model.config.layer_types)}
        out = self.model(inputs_embeds=embeds_BTH, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, use_cache=use_cache, **attention_kwargs)
        return out.last_hidden_state, (out.past_key_values if use_cache else None)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, mels: Optional[torch.Tensor] = None,
                mel_lengths: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                past_key_values: Optional[Any] = None, use_cache: bool = False,
                segment_ids: Optional[torch.Tensor] = None, num_loss_tokens: Optional[int] = None,
                num_loss_chunks: int = 0, cu_seq_lens: Optional[torch.Tensor] = None,
                max_length: Optional[int] = None, token_logprobs: bool = False,
                temperature: float = 1.0, token_losses: bool = False) -> StepAudio2Output:
        """Decoder pass over input_ids [B, T] with the audio chunks written into the audio patch rows.

        labels [B, T] use -100 for ignored positions; position t predicts labels[t + 1].
        segment_ids [B, T] (packed rows: 1, 2, ... per sample, 0 on padding) keep each sample's attention
        inside itself; it then replaces attention_mask, and position_ids default to restarting per sample.
        Audio chunks (mels) are listed in row-major order of their patch rows, packed or not.
        num_loss_tokens (labelled positions), cu_seq_lens and max_length (packed rows under flash-attention,
        see packed_cu_seq_lens) are host-side facts the collate already knows (data.loading.batching): given, the
        forward needs no host-device sync to learn them. num_loss_chunks: see chunked_loss (ZeRO-3).
        token_logprobs=True (with labels; RL): instead of the loss, the log-probability and entropy of every
        labelled token at `temperature`, computed in the same chunks as the loss (see token_logprobs).
        token_losses=True (with labels): the output also holds each labelled token's cross-entropy, detached
        (per-task losses of a mixture; see StepAudio2Output.token_losses).
        """
        hidden_BTH, cache = self.decode(input_ids, attention_mask, mels, mel_lengths, position_ids,
                                        past_key_values, use_cache, segment_ids, cu_seq_lens, max_length)
        if labels is None:
            if token_logprobs:
                raise ValueError("token_logprobs=True needs labels (the tokens whose log-probabilities to compute)")
            if token_losses:
                raise ValueError("token_losses=True needs labels (the tokens whose cross-entropies to compute)")
            return StepAudio2Output(logits=self.lm_head(hidden_BTH), past_key_values=cache)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape "
                             f"{tuple(input_ids.shape)}")
        if token_logprobs:
            logprobs_BT, entropy_BT, count = self.token_logprobs(hidden_BTH, labels, temperature, num_loss_tokens,
                                                                 num_loss_chunks)
            return StepAudio2Output(token_logprobs=logprobs_BT, entropy=entropy_BT, past_key_values=cache,
                                    num_label_tokens=count)
        loss, count, *losses = self.chunked_loss(hidden_BTH, labels, num_loss_tokens, num_loss_chunks, token_losses)
        return StepAudio2Output(loss=loss, past_key_values=cache, num_label_tokens=count,
                                token_losses=losses[0] if losses else None)

    def chunked_loss(self, hidden_BTH: torch.Tensor, labels_BT: torch.Tensor, num_loss_tokens: Optional[int] = None,
                     num_loss_chunks: int = 0, token_losses: bool = False):
        """(mean next-token cross-entropy over labelled positions, their count), by model.fused_loss: lm_head
        is called once, and the fusion computes the labelled rows only, their loss and its gradients in the
        forward pass, at most LOSS_CHUNK_ROWS rows at a time (fewer for a large vocabulary: chunk_rows).
        token_losses=True adds a third value: each labelled token's cross-entropy [B, T], aligned with labels
        (0 elsewhere), fp32 and detached, from the same pass.

        num_loss_tokens: the count of labelled targets (labels[:, 1:] != -100) when the caller knows it;
        otherwise it is counted here, one host-device sync. num_loss_chunks is accepted and unused: under
        ZeRO-3 each lm_head call gathers its weight (a collective), and every rank now makes exactly one per
        forward whatever its labels (with none the loss is a 0 that still reaches every parameter)."""
        rows_N, targets_N, count = _labelled_rows(labels_BT, num_loss_tokens)
        hidden_MH = hidden_BTH.reshape(-1, hidden_BTH.shape[-1])
        out = linear_cross_entropy(self.lm_head, hidden_MH, rows_N, targets_N, 1.0 / max(count, 1), LOSS_CHUNK_ROWS,
                                   row_losses=token_losses)
        if not token_losses:
            return out, count
        loss, losses_N = out
        # Row r predicts the label at r + 1: put each value there, aligned with labels.
        losses_BT = losses_N.new_zeros(labels_BT.numel()).index_copy_(0, rows_N + 1, losses_N).view_as(labels_BT)
        return loss, count, losses_BT

    def token_logprobs(self, hidden_BTH: torch.Tensor, labels_BT: torch.Tensor, temperature: float = 1.0,
                       num_loss_tokens: Optional[int] = None,
                       num_loss_chunks: int = 0) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """(log-probabilities [B, T], entropies [B, T], count) of the labelled tokens, aligned with labels.

        By model.fused_loss, like chunked_loss: lm_head runs once and the full [tokens, vocab] fp32 logits
        never exist; backward recomputes them chunk by chunk (the per-token upstream gradient is not known
        in forward). Logits are divided by `temperature` first, so a rollout sampled at temperature T is
        scored at T (otherwise the importance ratio of the first PPO step is not 1). num_loss_chunks: as in
        chunked_loss, accepted and unused."""
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 for log-probabilities, got {temperature}")
        rows_N, targets_N, count = _labelled_rows(labels_BT, num_loss_tokens)
        logprob_N, entropy_N = linear_token_logprobs(self.lm_head, hidden_BTH.reshape(-1, hidden_BTH.shape[-1]),
                                                     rows_N, targets_N, temperature, LOSS_CHUNK_ROWS)
        # Row r predicts the label at r + 1: put each value there, aligned with labels.
        flat_M = hidden_BTH.new_zeros(labels_BT.numel(), dtype=torch.float32)
        logprobs_BT = flat_M.index_copy(0, rows_N + 1, logprob_N).view_as(labels_BT)
        entropy_BT = flat_M.index_copy(0, rows_N + 1, entropy_N).view_as(labels_BT)
        return logprobs_BT, entropy_BT, count
