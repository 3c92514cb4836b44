"""Task templates: render a record into Step-Audio 2 token ids and loss labels.

Labels follow the Hugging Face convention: aligned with input_ids (the model shifts them), -100 where
no loss falls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from transformers import PreTrainedTokenizerFast

from data.features import num_audio_tokens
from data.tokenizer import SpecialIds

IGNORE_INDEX = -100
DEFAULT_ASR_INSTRUCTION = "Transcribe the speech."


@dataclass
class Rendered:
    """One rendered sequence: token ids and labels of the same length."""
    input_ids: List[int]
    labels: List[int]


def audio_span(mel_frames: int, ids: SpecialIds) -> List[int]:
    """`<audio_start>` + one `<audio_patch>` per adapter output + `<audio_end>` for a chunk of `mel_frames`."""
    num_patches = num_audio_tokens(mel_frames)
    if num_patches < 1:
        raise ValueError(f"an audio chunk of {mel_frames} mel frames gives {num_patches} audio tokens; "
                         f"expected at least 1 (the chunk is too short)")
    return [ids.audio_start] + [ids.audio_patch] * num_patches + [ids.audio_end]


def render_asr(text: str, mel_frames: List[int], tok: PreTrainedTokenizerFast, ids: SpecialIds,
               instruction: str = DEFAULT_ASR_INSTRUCTION, with_answer: bool = True) -> Rendered:
    """ASR in the base format (no role tags): instruction, one audio span per chunk, transcript, end.

    Loss falls on the transcript and its `<|endoftext|>` only. with_answer=False returns the prompt,
    which greedy decoding continues.
    """
    if not mel_frames:
        raise ValueError("render_asr needs at least one audio chunk, got mel_frames=[]")
    prompt = tok.encode(instruction, add_special_tokens=False)
    for frames in mel_frames:
        prompt += audio_span(frames, ids)
    if not with_answer:
        return Rendered(input_ids=prompt, labels=[IGNORE_INDEX] * len(prompt))
    text_ids = tok.encode(text, add_special_tokens=False)
    # A transcript that spells a control token ("<audio_patch>") must not become one: it would
    # desynchronise the audio spans. Text tokens all sit below <|endoftext|> in this vocabulary.
    if any(i >= ids.end_of_text for i in text_ids):
        raise ValueError(f"transcript {text[:80]!r} contains a special token string; expected plain text")
    answer = text_ids + [ids.end_of_text]
    return Rendered(input_ids=prompt + answer, labels=[IGNORE_INDEX] * len(prompt) + answer)
