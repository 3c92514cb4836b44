"""The held-out speech measurement (train.rl.speech_eval): new sentences never in the demo corpus, espeak's own
styles measured as styles (slow/quick time per word, high-voice F0) raw and through a k-means codec, stop and
distinct-code figures of hand-made answers, word hits from a transcript, and batched answers of a tiny model
with their exact KL to a reference."""
from __future__ import annotations

import json
import math

import pytest
import soundfile as sf
import torch

import data.tools.demo as demo
from data.audio import read_audio
from data.codes.tokenizers import KMeansTokenizer, fit_kmeans, pooled_mel_NM
from data.text_tokenizer import build_text_tokenizer, extend_tokenizer, special_ids
from model.config import padded_vocab_size, preset_config
from model.lalm import StepAudio2ForCausalLM
from train.rl import speech_eval as se

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
    """2 new sentences x 3 styles, spoken (requests, espeak's styled and normal answers)."""
    return se.heldout_requests(str(tmp_path_factory.mktemp("requests")), num_sentences=2)


@pytest.fixture(scope="module")
def codec(requests, tmp_path_factory) -> str:
    """A 48-code k-means codec fitted on espeak's answers (every style, and the normal delivery)."""
    frames = torch.cat([pooled_mel_NM(read_audio(r[k])) for r in requests for k in ("espeak_wav", "normal_wav")])
    path = tmp_path_factory.mktemp("codec") / "kmeans.pt"
    KMeansTokenizer(fit_kmeans(frames, 48, seed=0, iterations=10)).save(str(path))
    return f"kmeans:{path}"


@pytest.fixture(scope="module")
def tiny(requests):
    """A tokenizer over the demo's texts (48 audio codes) and two different tiny random models."""
    texts = [r["text"] for r in requests] + [demo.DIALOGUE_SYSTEM, "system\n", "human\n", "assistant\n"]
    tok = extend_tokenizer(build_text_tokenizer(texts, 300), 48)
    ids = special_ids(tok)
    config = preset_config("tiny", vocab_size=padded_vocab_size(len(tok)), audio_patch_token_id=ids.audio_patch)
    torch.manual_seed(0)
    model = StepAudio2ForCausalLM(config).eval()
    torch.manual_seed(1)
    other = StepAudio2ForCausalLM(config).eval()
    return tok, ids, model, other


# ------------------------------------------------------------------------------------------ requests

def test_heldout_sentences_are_new_and_requests_cover_every_style(requests, tmp_path, monkeypatch):
    # demo_sentences() holds every sentence make_demo writes (asserted here on a small corpus, espeak muted).
    monkeypatch.setattr(demo, "speak", lambda *args, **kwargs: None)
    demo.make_demo(str(tmp_path / "corpus"), num_train=24, num_heldout=6, tasks=("asr", "tts", "s2tt", "dialogue"))
    written = {json.loads(line)["text"] for line in (tmp_path / "corpus" / "texts.jsonl").read_text().splitlines()}
    corpus = {t for t in written if len(t.split()) == 7 and t.split()[0] in demo.NUMBERS}
    assert len(corpus) >= 24 + 6 and corpus <= se.demo_sentences(num_train=24, num_heldout=6)

    new = se.heldout_requests(str(tmp_path / "eval"), num_sentences=8)
    texts = {r["text"] for r in new}
    assert len(new) == 24 and len(texts) == 8 and not texts & se.demo_sentences()
    assert {s: sum(r["style"] == s for r in new) for s in demo.STYLES} == {s: 8 for s in demo.STYLES}
    assert [r["text"] for r in new[:2]] == [r["text"] for r in requests[:2]]  # deterministic in the seed
    # Asked as data.tools.demo asks: its voices and speeds, its system prompt, its wording.
    assert all(r["request_text"] == demo.dialogue_request(r["text"], r["style"]) for r in new)
    assert {r["request_voice"] for r in new} == set(demo.VOICES)
    assert all(r["request_speed"] in demo.SPEEDS_WPM for r in new)
    assert {r["record"]["messages"][0]["text"] for r in new} == {demo.DIALOGUE_SYSTEM}
    assert all(r["request_wav"].endswith(r["record"]["messages"][1]["audio"][2:]) for r in new)
    assert all(sf.info(r["request_wav"]).duration > 1.0 for r in new)
    with pytest.raises(ValueError, match="expected some of"):
        se.heldout_requests(str(tmp_path / "eval"), 1, styles=["loudly"])


# ----------------------------------------------------------------------------------------- measuring

def test_espeak_styles_measure_as_styles_raw_and_through_codes(requests, codec):
    reference = se.espeak_reference(requests, codec)
    for name in ("espeak", "espeak_through_codes"):
        summary = reference[name]
        assert summary["slow_over_quick_s_per_word"] > 1.5, (name, summary)  # espeak: 110 vs 260 wpm
        assert summary["high_over_slow_quick_f0"] > 1.2 and summary["high_over_normal_f0"] > 1.2, (name, summary)
        assert summary["all"]["answers"] == 6 and summary["all"]["stop_rate"] == 1.0
    raw = reference["espeak"]["styles"]
    assert 0.35 < raw["slowly"]["s_per_word"] < 0.7 and 0.15 < raw["quickly"]["s_per_word"] < 0.3
    assert 80 < reference["espeak"]["normal_median_f0_hz"] < 130 < raw["in a high voice"]["median_f0_hz"] < 200
    # Through the codes: 25 codes a second, measured on the vocoder's wave.
    coded = se.espeak_answers(requests[:1], codec)[0]
    row = se.measure([coded], requests, codec)["answers"][0]
    assert row["audio_s"] == len(coded.audio_codes) / 25 and 0 < row["speech_span_s"] <= row["audio_s"]
    assert 0.1 < row["distinct_codes_share"] < 1.0


def test_stopped_codes_and_distinct_share_of_hand_made_answers(requests, tiny, codec):
    tok, ids, _, _ = tiny
    code = lambda c: ids.first_audio_code + c  # noqa: E731
    text = tok.encode("three", add_special_tokens=False)
    body = [ids.tts_start] + text + [code(5)] * 20 + [ids.tts_pad, code(7), ids.audio_pad, ids.tts_end]
    done = se.make_answer(requests[0], [1, 2], body + [ids.eot, code(9), code(9)], tok, ids)
    cut = se.make_answer(requests[0], [1, 2], body, tok, ids)
    assert done.stopped and not cut.stopped
    assert done.answer_ids == body + [ids.eot] and cut.answer_ids == body  # nothing after the stop counts
    assert done.audio_codes == [5] * 20 + [7] and done.text.strip() == "three"
    assert se.distinct_share([5] * 20) == 1 / 20 and se.distinct_share([1, 2, 3, 1]) == 0.75
    assert math.isnan(se.distinct_share([]))
    constant = se.make_answer(requests[0], [1], [code(5)] * 30 + [ids.eot], tok, ids)
    out = se.measure([done, cut, constant], requests, codec)
    rows = out["answers"]
    assert [r["stopped"] for r in rows] == [True, False, True] and out["summary"]["all"]["stop_rate"] == 0.6667
    assert rows[2]["distinct_codes_share"] == round(1 / 30, 4) and rows[2]["audio_s"] == 30 / 25
    assert rows[0]["words_asked"] == 7 and rows[0]["s_per_word"] == round(rows[0]["speech_span_s"] / 7, 4)


def test_word_hits_and_wer_from_transcripts(requests, codec, monkeypatch):
    answers = se.espeak_answers(requests[:3], codec)
    asked = [r["text"].split() for r in requests[:3]]
    heard = {}

    def fake_transcribe(waves, asr_model, device, max_new_tokens, batch_size):
        heard["n"] = len(waves)
        return [" ".join(asked[0]).upper() + ".", " ".join(asked[1][:3] + ["zebra"]), ""]
    monkeypatch.setattr(se, "transcribe", fake_transcribe)
    out = se.measure(answers, requests, codec, asr_model="unused")
    rows = out["answers"]
    assert heard["n"] == 3 and [r["words_hit"] for r in rows] == [7, 3, 0]
    assert [r["wer"] for r in rows] == [0.0, round(4 / 7, 4), 1.0]
    assert out["summary"]["all"]["words_asked"] == 21 and out["summary"]["all"]["word_hit_rate"] == round(10 / 21, 4)
    assert se.word_hits("two two cats", "two cats two dogs") == 3

    # espeak's own answers heard by the ASR: the ceiling of the words measure, raw and through the codes.
    spoken = {}

    def hears_the_first_word_wrong(waves, asr_model, device, max_new_tokens, batch_size):
        spoken.setdefault("calls", []).append(len(waves))
        return ["zebra " + " ".join(r["text"].split()[1:]) for r in requests[:len(waves)]]
    monkeypatch.setattr(se, "transcribe", hears_the_first_word_wrong)
    reference = se.espeak_reference(requests, codec, asr_model="unused")
    assert spoken["calls"] == [6, 6]  # the styled answers, raw then through the codes; not the normal ones
    for name in ("espeak", "espeak_through_codes"):
        assert reference[name]["all"]["word_hit_rate"] == round(6 * 6 / (6 * 7), 4)
        assert reference[name]["all"]["wer"] == round(1 / 7, 4)
    assert "wer" not in se.espeak_reference(requests[:1])["espeak"]["all"]


def test_write_wavs(requests, codec, tmp_path):
    answers = se.espeak_answers(requests, codec)
    paths = se.write_wavs(answers, str(tmp_path), codec, limit=2)
    assert len(paths) == 2
    assert [sf.info(p).frames for p in paths] == [640 * len(a.audio_codes) for a in answers[:2]]


# ------------------------------------------------------------------------------------------- answers

def test_answers_of_a_tiny_model_shapes_stops_sampling_and_kl(requests, tiny, codec):
    tok, ids, model, other = tiny
    prompt = se.render_prompt(requests[0], tok, ids)
    assert prompt["input_ids"][-1] == ids.tts_start and prompt["input_ids"].count(ids.audio_start) == 1
    assert len(prompt["mels"]) == 1 and prompt["mels"][0].shape[0] == 128

    greedy = se.answer(model, tok, ids, requests[:3], max_new_tokens=10, batch_size=2, keep_logprobs=True)
    assert [a.key for a in greedy] == [r["key"] for r in requests[:3]]
    assert [len(a.answer_ids) for a in greedy] == [10, 10, 10]  # a random model never says <|EOT|> here
    assert not any(a.stopped for a in greedy)
    assert all(a.logprobs_TV.shape == (10, model.lm_head.out_features) for a in greedy)
    # Batched, left-padded decoding gives each row what it gets alone; greedy picks the argmax it measures.
    alone = se.answer(model, tok, ids, requests[2:3], max_new_tokens=10)
    assert alone[0].answer_ids == greedy[2].answer_ids
    assert all(a.logprobs_TV.argmax(-1).tolist() == a.answer_ids for a in greedy)

    sampled = se.answer(model, tok, ids, requests[:2], max_new_tokens=6, temperature=1.0, seed=3, num_samples=2)
    again = se.answer(model, tok, ids, requests[:2], max_new_tokens=6, temperature=1.0, seed=3, num_samples=2)
    assert [(a.key, a.sample) for a in sampled] == [(requests[0]["key"], 0), (requests[0]["key"], 1),
                                                  (requests[1]["key"], 0), (requests[1]["key"], 1)]
    assert [a.answer_ids for a in sampled] == [a.answer_ids for a in again]
    assert sampled[0].answer_ids != sampled[1].answer_ids

    # KL: exactly 0 to itself, positive to another model; both the exact and the sampled-token figure.
    same = se.measure(greedy, requests, codec, reference_model=model)
    assert all(r["kl"] == 0.0 and r["kl_sampled"] == 0.0 for r in same["answers"])
    assert same["summary"]["all"]["kl_per_token"] == 0.0
    diff = se.measure(greedy, requests, codec, reference_model=other)
    assert all(r["kl"] > 0 for r in diff["answers"]) and diff["summary"]["all"]["kl_per_token"] > 0
    with pytest.raises(ValueError, match="keep_logprobs=True"):
        se.measure(alone, requests, codec, reference_model=other)
