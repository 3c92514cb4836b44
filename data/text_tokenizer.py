"""The text tokenizer: a locally trained byte-level BPE, extended with Step-Audio 2's special and audio tokens.

`python -m data.text_tokenizer build --manifest A.jsonl --out DIR` trains one from manifest transcripts.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from data import vocab

# Qwen2's pre-tokenizer split (contractions, letter runs, single digits, punctuation, whitespace),
# so that merges never cross word boundaries the way the real tokenizer's do not.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def build_text_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`; ids 0..255 are the byte alphabet, so no text is unknown."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least 256 (one per byte)")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe)


def extend_tokenizer(tok: PreTrainedTokenizerFast, num_audio_codes: int) -> PreTrainedTokenizerFast:
    """Append SPECIAL_TOKENS, then `<audio_0>`..`<audio_{num_audio_codes}>` (the last is the audio pad).

    All are special AddedTokens with consecutive ids right after the text vocabulary, in vocab.SPECIAL_TOKENS
    order (our packed layout for small tokenizers; extend_qwen2_tokenizer lays out the release's ids).
    Modifies and returns `tok`.
    """
    if num_audio_codes < 1:
        raise ValueError(f"num_audio_codes={num_audio_codes}: expected at least 1")
    present = [t for t in vocab.SPECIAL_TOKENS if t in tok.get_vocab()]
    if present:
        raise ValueError(f"tokenizer already holds {present}: extend_tokenizer expects a text-only tokenizer")
    names = list(vocab.SPECIAL_TOKENS) + [vocab.audio_code_token(i) for i in range(num_audio_codes + 1)]
    first_id = len(tok)
    tok.add_tokens([AddedToken(n, special=True, normalized=False) for n in names], special_tokens=True)
    assert tok.convert_tokens_to_ids(names) == list(range(first_id, first_id + len(names)))
    tok.eos_token = vocab.END_OF_TEXT
    tok.pad_token = vocab.END_OF_TEXT
    return tok


def extend_qwen2_tokenizer(tok: PreTrainedTokenizerFast, ids: dict | None = None,
                           first_audio_code_id: int = vocab.REFERENCE_FIRST_AUDIO_CODE_ID,
                           num_audio_codes: int = vocab.REFERENCE_NUM_AUDIO_CODES) -> PreTrainedTokenizerFast:
    """Add Step-Audio 2's special and audio tokens to a Qwen2 tokenizer at fixed ids (default: the release's).

    `ids` maps every SPECIAL_TOKENS name to its id (vocab.REFERENCE_IDS by default); `<|endoftext|>` must
    already sit at its id. Ids left free below the last token get vocab.reserved_token placeholders, since a
    tokenizer hands out added ids consecutively. Modifies and returns `tok`.
    """
    ids = dict(vocab.REFERENCE_IDS if ids is None else ids)
    if sorted(ids) != sorted(vocab.SPECIAL_TOKENS) or any(not isinstance(i, int) for i in ids.values()):
        raise ValueError(f"ids must give an int id for each of {list(vocab.SPECIAL_TOKENS)}, got {ids}")
    table = tok.get_vocab()
    if table.get(vocab.END_OF_TEXT) != ids[vocab.END_OF_TEXT]:
        raise ValueError(f"not a Qwen2 tokenizer of the expected layout: {vocab.END_OF_TEXT!r} has id "
                         f"{table.get(vocab.END_OF_TEXT)}, expected {ids[vocab.END_OF_TEXT]}")
    wanted = {i: name for name, i in ids.items() if name != vocab.END_OF_TEXT}
    wanted.update({first_audio_code_id + c: vocab.audio_code_token(c) for c in range(num_audio_codes + 1)})
    if len(wanted) != len(ids) - 1 + num_audio_codes + 1:
        raise ValueError(f"two tokens share an id: special ids {ids}, audio codes from {first_audio_code_id}")
    present = [n for n in wanted.values() if n in table]
    if present:
        raise ValueError(f"tokenizer already holds {present[:5]}: extend_qwen2_tokenizer expects a text-only tokenizer")
    start = len(tok)
    if min(wanted) < start:
        raise ValueError(f"id {min(wanted)} ({wanted[min(wanted)]}) is already taken: the tokenizer has {start} tokens")
    names = [wanted.get(i, vocab.reserved_token(i)) for i in range(start, max(wanted) + 1)]
    tok.add_tokens([AddedToken(n, special=True, normalized=False) for n in names], special_tokens=True)
    for i in (start, min(wanted), max(wanted)):
        got = tok.convert_tokens_to_ids(names[i - start])
        if got != i:
            raise ValueError(f"{names[i - start]!r} landed at id {got}, expected {i}: the tokenizer's added ids "
                             f"are not consecutive from {start}")
    tok.eos_token = vocab.END_OF_TEXT
    tok.pad_token = vocab.END_OF_TEXT
    return tok


def first_extension_id(tok: PreTrainedTokenizerFast) -> int:
    """Lowest id of a token our extensions added (specials, placeholders, audio codes): rows below are text."""
    ours = {vocab.BOT, vocab.EOT, vocab.AUDIO_START, vocab.AUDIO_END, vocab.AUDIO_PATCH, vocab.TTS_PAD,
            vocab.TTS_START, vocab.TTS_END}
    added = [i for name, i in tok.get_added_vocab().items()
             if name in ours or name.startswith(("<|step_reserved_", "<audio_")) or
             (name == vocab.END_OF_TEXT and i >= tok.vocab_size and tok.get_added_vocab().get(vocab.BOT) == i + 1)]
    if not added:
        raise ValueError("the tokenizer holds none of Step-Audio 2's added tokens: extend it first")
    return min(added)


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the tokens that templates and the model look up by role."""
    end_of_text: int
    bot: int
    eot: int
    audio_start: int
    audio_end: int
    audio_patch: int
    tts_pad: int
    tts_start: int
    tts_end: int
    first_audio_code: int
    """Id of `<audio_0>`; code c is first_audio_code + c."""
    num_audio_codes: int
    """Real codes only; the audio pad is one more."""
    audio_pad: int
    """Id of `<audio_{num_audio_codes}>`, which pads the audio side of the interleave."""


def special_ids(tok: PreTrainedTokenizerFast) -> SpecialIds:
    """Look up every special id in `tok` by name; ValueError naming the first missing token."""
    table = tok.get_vocab()

    def lookup(name: str) -> int:
        if name not in table:
            raise ValueError(f"tokenizer has no token {name!r}: was it built with "
                             "data.text_tokenizer.extend_tokenizer?")
        return table[name]

    named = dict(
        end_of_text=lookup(vocab.END_OF_TEXT), bot=lookup(vocab.BOT), eot=lookup(vocab.EOT),
        audio_start=lookup(vocab.AUDIO_START), audio_end=lookup(vocab.AUDIO_END),
        audio_patch=lookup(vocab.AUDIO_PATCH), tts_pad=lookup(vocab.TTS_PAD),
        tts_start=lookup(vocab.TTS_START), tts_end=lookup(vocab.TTS_END))
    first_audio_code = lookup(vocab.audio_code_token(0))
    # Codes are consecutive; the highest <audio_i> present is the pad.
    num_audio_codes = 0
    while vocab.audio_code_token(num_audio_codes + 1) in table:
        num_audio_codes += 1
    if num_audio_codes < 1:
        raise ValueError(f"tokenizer has no token {vocab.audio_code_token(1)!r}: expected at least one audio "
                         f"code plus the audio pad")
    for code in (1, num_audio_codes):
        if table[vocab.audio_code_token(code)] != first_audio_code + code:
            raise ValueError(f"audio code tokens are not consecutive: {vocab.audio_code_token(code)!r} has id "
                             f"{table[vocab.audio_code_token(code)]}, expected {first_audio_code + code}")
    return SpecialIds(**named, first_audio_code=first_audio_code, num_audio_codes=num_audio_codes,
                      audio_pad=first_audio_code + num_audio_codes)


def stop_token_ids(tok: PreTrainedTokenizerFast) -> list[int]:
    """Ids generation stops on, ascending: <|endoftext|>, <|im_end|> where the tokenizer has it, <|EOT|>.

    For the release's layout this is vocab.REFERENCE_EOS_IDS, the list StepFun's configs carry."""
    ids = special_ids(tok)
    im_end = tok.get_vocab().get(vocab.IM_END)
    return sorted({ids.end_of_text, ids.eot} | ({im_end} if im_end is not None else set()))


def load_tokenizer(path: str) -> PreTrainedTokenizerFast:
    """Load a tokenizer folder written by `save_pretrained` (no hub lookups)."""
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise ValueError(f"tokenizer folder {path!r} has no tokenizer.json: build one with "
                         f"`python -m data.text_tokenizer build --manifest M.jsonl --out {path}`")
    return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)


def _manifest_texts(paths: list[str]) -> Iterable[str]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{line_no}: expected an object with a string \"text\" field")
                yield record["text"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.text_tokenizer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="train a byte-level BPE on manifest texts and add audio tokens")
    build.add_argument("--manifest", action="append", required=True, help="JSONL with a \"text\" field; repeatable")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--vocab-size", type=int, default=512, help="text vocabulary size (bytes + merges)")
    build.add_argument("--num-audio-codes", type=int, default=512, help="audio codes (the pad is one more)")
    args = parser.parse_args(argv)
    for path in args.manifest:
        if not os.path.isfile(path):
            raise SystemExit(f"error: manifest {path!r} does not exist")
    tok = extend_tokenizer(build_text_tokenizer(_manifest_texts(args.manifest), args.vocab_size),
                           args.num_audio_codes)
    tok.save_pretrained(args.out)
    print(f"wrote {args.out}: vocabulary size {len(tok)}")


if __name__ == "__main__":
    main()
