"""train.evaluate.run_eval: each metric's value on models whose answers are known in advance.

Stub models stand in for the network: one reads the next input token off the teacher-forced sequence
(every prediction right), one always says <audio_0>, one says random codes, one replays given answers
through the real KV-cache generation loop.
"""
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data.audio import encode_flac
from data.loading.samples import render_raw
from data.loading.shard_reader import read_shard, resolve_shards
from data.shards import ShardWriter
from data.text_tokenizer import build_text_tokenizer, extend_tokenizer, special_ids
from model.config import preset_config
from model.lalm import StepAudio2ForCausalLM
from train.evaluate import run_eval

NUM_CODES = 16
ENGLISH = ["two red cats", "three blue dogs sing", "four tiny birds"]
GERMAN = ["zwei rote Katzen", "drei blaue Hunde singen", "vier winzige Vögel"]


def build_tokenizer():
    return extend_tokenizer(build_text_tokenizer(ENGLISH + GERMAN + ["Read the text aloud.", "Translate the speech."],
                                                 vocab_size=300), NUM_CODES)


@pytest.fixture(scope="module")
def tok_ids():
    tok = build_tokenizer()
    return tok, special_ids(tok)


def _codes_npy(codes):
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(codes, dtype=np.int64))
    return buffer.getvalue()


def write_shards(root):
    """tts/: 6 TTS samples with codes (one ASR sample among them, which has no codes to score);
    s2tt/: 3 speech-translation samples; asr/: 3 ASR samples."""
    rng = np.random.default_rng(0)
    codes = {f"t{i}": rng.integers(0, NUM_CODES, size=30 + 7 * i) for i in range(6)}
    with ShardWriter(str(root / "tts"), 100) as writer:
        for i, (key, c) in enumerate(codes.items()):
            writer.write(key, {"json": json.dumps({"task": "tts", "text": ENGLISH[i % 3]}).encode(),
                               "codes.npy": _codes_npy(c)})
            if i == 2:
                wave = torch.from_numpy(rng.standard_normal(4800).astype(np.float32) * 0.1)
                writer.write("asr0", {"flac": encode_flac(wave), "json": json.dumps({"text": "two"}).encode()})
    for task in ("s2tt", "asr"):
        with ShardWriter(str(root / task), 100) as writer:
            for i, (en, de) in enumerate(zip(ENGLISH, GERMAN)):
                wave = torch.from_numpy(rng.standard_normal(4800 + 1600 * i).astype(np.float32) * 0.1)
                meta = {"task": task, "text": en, "translation": de}
                writer.write(f"{task}{i}", {"flac": encode_flac(wave), "json": json.dumps(meta).encode()})
    return {"root": root, "codes": codes}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("eval"))


class TeacherForced(torch.nn.Module):
    """Predicts at every position the token that follows it in the input: a perfect teacher-forced model."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size, self.calls = vocab_size, []

    def forward(self, input_ids, mels=None, mel_lengths=None, **kwargs):
        self.calls.append((input_ids.shape[1], None if mels is None else mels.shape[0]))
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], 1.0)
        return SimpleNamespace(logits=logits)


class Constant(torch.nn.Module):
    """Scores `choose(generator, shape)` ids highest at every position."""

    def __init__(self, vocab_size, choose):
        super().__init__()
        self.vocab_size, self.choose, self.generator = vocab_size, choose, torch.Generator().manual_seed(0)

    def forward(self, input_ids, **kwargs):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits.scatter_(-1, self.choose(self.generator, input_ids.shape)[..., None], 1.0)
        return SimpleNamespace(logits=logits)


class Replay(torch.nn.Module):
    """Generates answers[i] for the i-th prompt it is given, through generate()'s KV-cache protocol;
    prompts come in left-padded batches (prompts: each one's ids; mels: the chunk count of each batch)."""

    def __init__(self, vocab_size, answers):
        super().__init__()
        self.vocab_size, self.answers, self.prompts, self.mels = vocab_size, list(answers), [], []

    def forward(self, input_ids, attention_mask=None, mels=None, mel_lengths=None, past_key_values=None, **kwargs):
        if past_key_values is None:
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            rows = list(range(len(self.prompts), len(self.prompts) + input_ids.shape[0]))
            self.prompts += [ids[m.bool()].tolist() for ids, m in zip(input_ids, mask)]
            self.mels.append(0 if mels is None else mels.shape[0])
            step = 0
        else:
            rows, step = past_key_values[0], past_key_values[1] + 1
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for b, row in enumerate(rows):
            answer = self.answers[row]
            logits[b, -1, answer[min(step, len(answer) - 1)]] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=(rows, step))


def test_code_accuracy_of_perfect_constant_and_random_models(shards, tok_ids):
    tok, ids = tok_ids
    folder = [str(shards["root"] / "tts" / "*.tar")]
    perfect = TeacherForced(len(tok))
    result = run_eval("code_accuracy", perfect, tok, ids, folder, "", max_samples=5, max_new_tokens=8,
                      batch_size=1)
    assert (result["metric"], result["value"], result["num_samples"]) == ("code_accuracy", 1.0, 5)
    assert len(perfect.calls) == 5 and all(num_mels is None for _, num_mels in perfect.calls)  # one pass each
    # Batched: one right-padded pass per batch of 2, the same value.
    batched = TeacherForced(len(tok))
    assert run_eval("code_accuracy", batched, tok, ids, folder, "", max_samples=5, max_new_tokens=8,
                    batch_size=2) == result
    lengths = [n for n, _ in perfect.calls]
    assert [n for n, _ in batched.calls] == [max(lengths[0:2]), max(lengths[2:4]), lengths[4]]
    first = shards["codes"]["t0"]
    assert result["examples"][0] == {"key": "t0", "ref": " ".join(map(str, first[:16])),
                                     "hyp": " ".join(map(str, first[:16]))}

    # Always <audio_0>: right exactly where the code is 0 (the ASR sample has no codes and is skipped).
    zero = Constant(len(tok), lambda g, shape: torch.full(shape, ids.first_audio_code))
    result = run_eval("code_accuracy", zero, tok, ids, folder, "", max_samples=100, max_new_tokens=8)
    every = np.concatenate(list(shards["codes"].values()))
    assert result["num_samples"] == 6
    assert result["value"] == pytest.approx(float(np.mean(every == 0)), abs=1e-12)

    rand = Constant(len(tok), lambda g, shape: ids.first_audio_code + torch.randint(0, NUM_CODES, shape, generator=g))
    result = run_eval("code_accuracy", rand, tok, ids, folder, "", max_samples=100, max_new_tokens=8)
    assert abs(result["value"] - 1 / NUM_CODES) < 0.04  # 1/V of the code vocabulary, over ~300 positions


def test_bleu_of_perfect_and_empty_answers(shards, tok_ids):
    tok, ids = tok_ids
    folder = [str(shards["root"] / "s2tt" / "*.tar")]
    answers = [tok.encode(de, add_special_tokens=False) + [ids.eot] for de in GERMAN]
    model = Replay(len(tok), answers)
    result = run_eval("bleu", model, tok, ids, folder, "", max_samples=10, max_new_tokens=20)
    assert result["metric"] == "bleu" and result["value"] == pytest.approx(100.0)
    assert result["num_samples"] == 3
    assert result["examples"][1] == {"key": "s2tt1", "ref": GERMAN[1], "hyp": GERMAN[1]}
    # Each prompt ends at the answer's header and carries its one audio chunk; all 3 went in one batch.
    assert all(tok.decode(p).endswith("<audio_end><|EOT|><|BOT|>assistant\n") for p in model.prompts)
    assert model.mels == [3]
    # One at a time, or split 2 + 1: the same prompts, the same result.
    for batch_size, chunks in ((1, [1, 1, 1]), (2, [2, 1])):
        again = Replay(len(tok), answers)
        assert run_eval("bleu", again, tok, ids, folder, "", 10, 20, batch_size=batch_size) == result
        assert (again.prompts, again.mels) == (model.prompts, chunks)

    silent = Replay(len(tok), [[ids.eot]] * 3)
    assert run_eval("bleu", silent, tok, ids, folder, "", max_samples=10, max_new_tokens=20)["value"] == 0.0
    half = Replay(len(tok), [tok.encode("zwei rote", add_special_tokens=False) + [ids.eot]] + answers[1:])
    assert 0.0 < run_eval("bleu", half, tok, ids, folder, "", max_samples=10, max_new_tokens=20)["value"] < 100.0


def test_wer_and_unknown_metric(shards, tok_ids):
    tok, ids = tok_ids
    folder = [str(shards["root"] / "asr" / "*.tar")]
    answers = [tok.encode(en, add_special_tokens=False) + [ids.end_of_text] for en in ENGLISH]
    result = run_eval("wer", Replay(len(tok), answers), tok, ids, folder, "Transcribe the speech.", max_samples=2,
                      max_new_tokens=20)
    assert (result["metric"], result["value"], result["num_samples"]) == ("wer", 0.0, 2)
    wrong = [tok.encode("two red dogs", add_special_tokens=False) + [ids.end_of_text]] * 3
    result = run_eval("wer", Replay(len(tok), wrong), tok, ids, folder, "", max_samples=3, max_new_tokens=20)
    assert result["value"] == pytest.approx((1 + 3 + 3) / 10)  # cats->dogs; three, blue->two, red, -sing; all 3
    with pytest.raises(ValueError, match=r"^unknown eval metric 'mos': expected one of \['wer', 'code_accuracy', "
                                         r"'bleu', 'paralinguistic', 'speaker_similarity'\]$"):
        run_eval("mos", Replay(len(tok), []), tok, ids, folder, "", 1, 1)
    with pytest.raises(ValueError, match="hold no sample with audio codes"):
        run_eval("code_accuracy", TeacherForced(len(tok)), tok, ids, folder, "", 3, 1)


def test_code_accuracy_on_the_real_model_matches_its_own_logits(shards, tok_ids):
    torch.manual_seed(0)
    tok, ids = tok_ids
    model = StepAudio2ForCausalLM(preset_config("tiny", vocab_size=len(tok), audio_patch_token_id=ids.audio_patch))
    result = run_eval("code_accuracy", model, tok, ids, [str(shards["root"] / "tts" / "*.tar")], "", 2, 1)
    right = total = 0
    for raw in list(read_shard(resolve_shards([str(shards["root"] / "tts" / "*.tar")])[0]))[:2]:
        sample = render_raw(raw, tok, ids, "", None)
        with torch.no_grad():
            logits = model(torch.tensor([sample["input_ids"]])).logits[0]
        for t, label in enumerate(sample["labels"][1:]):
            if ids.first_audio_code <= label < ids.audio_pad:
                right += int(logits[t].argmax()) == label
                total += 1
    assert result["num_samples"] == 2 and result["value"] == right / total and 0.0 <= right / total < 0.5
