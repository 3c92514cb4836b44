"""The Step-Audio 2 vocabulary beyond text: special token names, audio code tokens, reference ids.

Code looks special tokens up by name in the tokenizer it is given; the released model's ids are kept
here only to check a real tokenizer and to build the reference-sized configs. Ids marked UNVERIFIED in
shared/reference/step-audio-2.md are None until checked against the real files.
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


def audio_code_token(code: int) -> str:
    """The token that carries audio code `code` (`<audio_0>` ...); code == num_codes is the audio pad."""
    return f"<audio_{code}>"


# Special tokens in the order our tokenizer extension adds them after the text vocabulary.
SPECIAL_TOKENS = (END_OF_TEXT, BOT, EOT, AUDIO_START, AUDIO_END, AUDIO_PATCH, TTS_PAD, TTS_START, TTS_END)

# The released Step-Audio-2-mini tokenizer (reference file). None = not verified.
REFERENCE_IDS = {
    END_OF_TEXT: 151643,
    BOT: None,
    EOT: None,
    AUDIO_START: 151688,
    AUDIO_END: 151689,
    AUDIO_PATCH: 151690,
    TTS_START: 151693,
    TTS_END: 151694,
    TTS_PAD: None,
}
REFERENCE_NUM_AUDIO_CODES = 6561          # CosyVoice 2 S3Tokenizer v2 (FSQ 3^8)
REFERENCE_FIRST_AUDIO_CODE_ID = 151696    # <audio_0>; <audio_6561> (158257) is the audio pad
REFERENCE_VOCAB_SIZE = 158720
