"""The Step-Audio 2 vocabulary beyond text: special token names, audio code tokens, reference ids.

Code looks special tokens up by name in the tokenizer it is given; the released model's ids are kept
here to lay out a Qwen2 tokenizer's extension (data.text_tokenizer.extend_qwen2_tokenizer) and to check a real
tokenizer. An id no public file shows is our choice, listed in UNVERIFIED_IDS: one edit here fixes it.
"""
from __future__ import annotations

END_OF_TEXT = "<|endoftext|>"   # Qwen2's end of document; the base format's end of sequence
BOT = "<|BOT|>"                 # begins a chat turn: <|BOT|>role\n ... <|EOT|>
EOT = "<|EOT|>"                 # ends a chat turn; the chat model's stop token
AUDIO_START = "<audio_start>"
AUDIO_END = "<audio_end>"
AUDIO_PATCH = "<audio_patch>"   # one row per adapter output; the model writes audio features here
TTS_START = "<tts_start>"
TTS_END = "<tts_end>"
TTS_PAD = "<tts_pad>"           # pads the text side of the TA4 interleave
IM_END = "<|im_end|>"           # Qwen2's end of a chat turn: never emitted by our templates, but a stop id of the release


def audio_code_token(code: int) -> str:
    """The token that carries audio code `code` (`<audio_0>` ...); code == num_codes is the audio pad."""
    return f"<audio_{code}>"


# Special tokens in the order data.text_tokenizer.extend_tokenizer packs them right after a small text vocabulary.
# The order is ours and stays fixed (tokenizers and golden tests built with it keep their ids); the release's
# ids, REFERENCE_IDS below, are laid out by extend_qwen2_tokenizer.
SPECIAL_TOKENS = (END_OF_TEXT, BOT, EOT, AUDIO_START, AUDIO_END, AUDIO_PATCH, TTS_PAD, TTS_START, TTS_END)


def reserved_token(token_id: int) -> str:
    """Placeholder that fills an id the extension skips, so later tokens land at their reference ids."""
    return f"<|step_reserved_{token_id}|>"


# The released Step-Audio-2-mini tokenizer's ids. Qwen2.5's own specials run 151643..151664.
REFERENCE_IDS = {
    END_OF_TEXT: 151643,
    EOT: 151665,       # StepFun's configs list eos ids [151643, 151645, 151665] and its inference stops on <|EOT|>
    BOT: 151686,
    AUDIO_START: 151688,
    AUDIO_END: 151689,
    AUDIO_PATCH: 151690,
    TTS_START: 151693,
    TTS_END: 151694,
    TTS_PAD: 151695,   # where a model derived from Step-Audio 2 has it
}
# Ids no public file shows, so our choice: <|BOT|> keeps 151686, where this project has always put it. The
# ids the extension leaves free (151666-151685, 151687, 151691, 151692) hold reserved_token placeholders.
UNVERIFIED_IDS = (BOT,)
# The ids generation stops on, as StepFun's configs list them: <|endoftext|>, <|im_end|>, <|EOT|>.
REFERENCE_EOS_IDS = (151643, 151645, 151665)
REFERENCE_NUM_AUDIO_CODES = 6561          # CosyVoice 2 S3Tokenizer v2 (FSQ 3^8)
REFERENCE_FIRST_AUDIO_CODE_ID = 151696    # <audio_0>; <audio_6561> (158257) is the audio pad
REFERENCE_VOCAB_SIZE = 158720
