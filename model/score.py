"""StepAudio2ForScore: the Step-Audio 2 backbone (encoder, adapter, decoder) with a scalar head instead of
the language-model head. One class serves as the reward model (the score at the answer's last token) and
as PPO's critic (a value at every token).

It is built from a causal LM export (the head starts fresh, lm_head is dropped: for the mini shape that
is 0.57 B parameters a critic or reward model does not need) or from a score export of its own, which is
a StepFun-layout folder whose tensors are the backbone's plus `score.weight` / `score.bias`, with
"StepAudio2ForScore" in config.json's architectures.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn

from model.config import StepAudio2Config
from model.lalm import StepAudio2ForCausalLM, StepAudio2Output

SCORE_ARCHITECTURE = "StepAudio2ForScore"
SCORE_PREFIX = "score."


class StepAudio2ForScore(StepAudio2ForCausalLM):
    """scores [B, T] = score(last hidden state) at every position; see last_token_scores for one per row."""

    def __init__(self, config: StepAudio2Config, gradient_checkpointing: Union[bool, Iterable[str]] = False,
                 attention: str = "sdpa"):
        super().__init__(config, gradient_checkpointing=gradient_checkpointing, attention=attention)
        del self.lm_head
        self.score = nn.Linear(config.hidden_size, 1, bias=True)
        self.init_score_head()

    def init_score_head(self) -> None:
        """Small random weights (std 1/sqrt(hidden + 1)) and a zero bias: the scores start near 0."""
        with torch.no_grad():
            if self.score.weight.numel():  # (empty when ZeRO-3 built it partitioned: zero.Init initialised it)
                self.score.weight.normal_(0.0, 1.0 / math.sqrt(self.config.hidden_size + 1))
                self.score.bias.zero_()

    def init_fresh(self, module: nn.Module) -> None:
        """load_stepfun's hook for tensors the folder lacked: only the head can be new."""
        if module is not self.score:
            raise ValueError(f"StepAudio2ForScore can start only its score head fresh, not {module}")
        self.init_score_head()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                mels: Optional[torch.Tensor] = None, mel_lengths: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None,
                cu_seq_lens: Optional[torch.Tensor] = None, max_length: Optional[int] = None,
                **unused: Any) -> StepAudio2Output:
        """scores [B, T] (fp32) for input_ids [B, T]; the other arguments as StepAudio2ForCausalLM.forward.
        Loss-related keywords a batch carries (labels, num_loss_tokens, ...) are ignored."""
        hidden_BTH, _ = self.decode(input_ids, attention_mask, mels, mel_lengths, position_ids,
                                    segment_ids=segment_ids, cu_seq_lens=cu_seq_lens, max_length=max_length)
        return StepAudio2Output(scores=self.score(hidden_BTH).squeeze(-1).float())


def last_token_scores(values_BT: torch.Tensor, last_B: torch.Tensor) -> torch.Tensor:
    """values_BT[b, last_B[b]]: one score per row, read at each row's last real token (an index, so a
    right-padded row is read at its end, never on padding)."""
    return values_BT.gather(1, last_B[:, None].to(torch.long)).squeeze(1)


def is_score_folder(path: Union[str, Path]) -> bool:
    """True when the model folder holds a score model (its config.json lists StepAudio2ForScore)."""
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    return SCORE_ARCHITECTURE in (config.get("architectures") or [])


def load_score_model(path: Union[str, Path], **load_kwargs: Any) -> StepAudio2ForScore:
    """A score model from `path`: a score export as it is, or a causal LM export's backbone with a fresh head
    (its lm_head is not loaded). load_kwargs as model.checkpoint.load_stepfun (dtype, device, ZeRO-3
    build_context/gather, gradient_checkpointing, attention)."""
    from model.checkpoint import load_stepfun

    if is_score_folder(path):
        return load_stepfun(path, model_class=StepAudio2ForScore, **load_kwargs)
    return load_stepfun(path, model_class=StepAudio2ForScore, fresh=(SCORE_PREFIX,), skip=("lm_head.",),
                        **load_kwargs)


def score_config(config: StepAudio2Config) -> StepAudio2Config:
    """The config a score export writes: the backbone's, with StepAudio2ForScore as its architecture."""
    extra = {k: v for k, v in config.extra.items() if k != "auto_map"}  # HF's Auto classes load causal LMs
    return dataclasses.replace(config, extra={**extra, "architectures": [SCORE_ARCHITECTURE]})
