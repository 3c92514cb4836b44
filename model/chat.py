"""Try a checkpoint: one chat turn with speech and/or text in, text (and speech, with a vocoder) out.

    python -m model.chat CKPT --audio in.wav [--text "..."] [--system "..."] [--speech --vocoder kmeans:FILE.pt]
        --out answer.wav [--max-new-tokens N] [--temperature T --top-p P --seed S]

CKPT is a folder in StepFun's layout with the tokenizer inside it, as training exports write it.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Tuple

import soundfile as sf
import torch

from data.audio import AudioError, read_audio
from data.features import log_mel, num_audio_tokens, split_chunks
from data.tasks.base import RenderOptions, Sample
from data.tasks.chat import Message, render_chat
from data.text_tokenizer import load_tokenizer, special_ids
from model.checkpoint import CONFIG_NAME, load_stepfun
from model.generate import generate, split_ta4
from model.vocoder import Vocoder, load_vocoder

_AUDIO_MEMBER = "input"


@dataclass
class Prompt:
    """A rendered chat prompt: ids [1, T], and the mel chunks [N, 128, F] with their lengths [N] (or None)."""
    input_ids: torch.Tensor
    mels: Optional[torch.Tensor]
    mel_lengths: Optional[torch.Tensor]


def audio_mels(wave_T: torch.Tensor, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zero-padded log-mel chunks [N, 128, F] and frame counts [N] of a 16 kHz waveform, as the loader cuts them."""
    chunks = [log_mel(c) for c in split_chunks(wave_T)]
    chunks = [m for m in chunks if num_audio_tokens(m.shape[1]) >= 1]  # a tail too short for one audio token
    if not chunks:
        raise ValueError(f"{name}: {len(wave_T)} samples is too short for one audio token")
    lengths_N = torch.tensor([m.shape[1] for m in chunks])
    mels_NMF = torch.zeros(len(chunks), chunks[0].shape[0], int(lengths_N.max()))
    for i, m in enumerate(chunks):
        mels_NMF[i, :, :m.shape[1]] = m
    return mels_NMF, lengths_N


def build_prompt(tok, text: str = "", wave_T: Optional[torch.Tensor] = None, system: Optional[str] = None,
                 speech: bool = False, audio_name: str = "audio") -> Prompt:
    """The chat prompt: [system turn], a human turn (text, then audio), the assistant header; with
    speech=True `<tts_start>` ends it, which asks for a TA4 speech answer."""
    if not text and wave_T is None:
        raise ValueError("a chat turn needs --audio or --text (both were empty)")
    ids = special_ids(tok)
    messages: List[Message] = [Message("system", system)] if system else []
    messages.append(Message("human", text, audio=_AUDIO_MEMBER if wave_T is not None else None))
    # The codes member is never read with with_answer=False; naming one only asks for <tts_start>.
    messages.append(Message("assistant", codes="answer" if speech else None))
    mels = lengths = None
    sample = Sample(key=audio_name, meta={})
    if wave_T is not None:
        mels, lengths = audio_mels(wave_T, audio_name)
        sample.mel_frames[_AUDIO_MEMBER] = lengths.tolist()
    rendered = render_chat(messages, sample, tok, ids, RenderOptions(with_answer=False))
    return Prompt(torch.tensor([rendered.input_ids]), mels, lengths)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.chat", description=__doc__.split("\n")[0])
    p.add_argument("ckpt", help="model folder in StepFun's layout, tokenizer inside")
    p.add_argument("--audio", help="speech input (any soundfile-readable file; resampled to 16 kHz)")
    p.add_argument("--text", default="", help="text of the human turn (before the audio)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--speech", action="store_true", help="ask for a spoken answer (TA4); needs --vocoder")
    p.add_argument("--vocoder", default=None, help="kmeans:FILE.pt or token2wav:MODULE:ATTR")
    p.add_argument("--prompt-wav", default=None, help="voice prompt passed to a token2wav vocoder")
    p.add_argument("--out", default="answer.wav", help="where the spoken answer is written")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    p.add_argument("--device", default="cpu")
    return p


def main(argv: Optional[List[str]] = None, vocoder: Optional[Vocoder] = None) -> int:
    """Run one turn and print the answer's text; `vocoder` overrides --vocoder (for Python callers)."""
    args = _parser().parse_args(argv)
    if not os.path.isfile(os.path.join(args.ckpt, CONFIG_NAME)):
        raise SystemExit(f"error: checkpoint {args.ckpt!r} is not a model folder (no {CONFIG_NAME}); expected a "
                         f"StepFun-layout export with the tokenizer inside")
    if args.speech and vocoder is None and args.vocoder is None:
        raise SystemExit("error: --speech needs --vocoder (kmeans:FILE.pt or token2wav:MODULE:ATTR) to write the "
                         "spoken answer")
    try:
        wave_T = read_audio(args.audio) if args.audio else None
        if vocoder is None and args.vocoder is not None:
            vocoder = load_vocoder(args.vocoder, prompt_wav=args.prompt_wav)
        tok = load_tokenizer(args.ckpt)
        prompt = build_prompt(tok, args.text, wave_T, args.system, args.speech, audio_name=args.audio or "audio")
    except AudioError as exc:
        raise SystemExit(f"error: --audio {exc}")
    except ValueError as exc:
        raise SystemExit(f"error: {exc}")
    ids = special_ids(tok)
    model = load_stepfun(args.ckpt, device=args.device).eval()
    dtype = next(model.parameters()).dtype
    mels = prompt.mels.to(args.device, dtype) if prompt.mels is not None else None
    lengths = prompt.mel_lengths.to(args.device) if prompt.mel_lengths is not None else None
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    new_ids = generate(model, prompt.input_ids.to(args.device), mels=mels, mel_lengths=lengths,
                       max_new_tokens=args.max_new_tokens, stop_token_ids=[ids.eot, ids.end_of_text],
                       temperature=args.temperature, top_p=args.top_p, generator=generator)[0]
    text_ids, codes = split_ta4(new_ids, ids.audio_start, ids.first_audio_code, ids.num_audio_codes)
    print(tok.decode(text_ids, skip_special_tokens=True))
    if codes and vocoder is not None:
        wave_T = vocoder.codes_to_wave(codes)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        sf.write(args.out, wave_T.detach().cpu().float().numpy(), vocoder.sample_rate, subtype="PCM_16")
        print(f"wrote {args.out}: {len(codes)} audio codes, {len(wave_T) / vocoder.sample_rate:.2f} s",
              file=sys.stderr)
    elif args.speech:
        print("no audio codes were generated; nothing written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
