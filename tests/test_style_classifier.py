"""The speaking-style classifier: its features ignore level, its pitch and rate measures read espeak's
styles, a small fit tells held-out voices' styles apart well above chance (also as the style reward,
through a k-means codec), and the `fit` command writes the model and its held-out report."""
from __future__ import annotations

import json
import math

import pytest
import torch

from data.audio import read_audio
from data.codes.tokenizers import KMeansTokenizer, fit_kmeans, pooled_mel_NM
from data.tools.demo import make_sentences
from data.features import SAMPLE_RATE, log_mel
from model.style import STYLES, StyleClassifier, style_features
from train.rl import speech_rewards as sr
from train.rl.rollout import RolloutSample
from train.style_classifier import (HELDOUT_ACCENTS, HELDOUT_VARIANTS, fit_style_classifier, main, median_f0_hz,
                                    render, speech_span_s, style_report, style_utterances, style_voices,
                                    utterance_mels)

torch.set_num_threads(1)
CHANCE = 1 / len(STYLES)


def pulses(f0_hz: float, seconds: float = 0.6) -> torch.Tensor:
    """A glottal-like pulse train at f0_hz, lightly low-passed: periodic, rich in harmonics."""
    t = torch.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    return sum(torch.cos(2 * math.pi * k * f0_hz * t) / k for k in range(1, 12)) * 0.1


def test_f0_and_span_measures():
    assert median_f0_hz(pulses(150.0)) == pytest.approx(150.0, rel=0.02)
    assert median_f0_hz(pulses(220.0)) == pytest.approx(220.0, rel=0.02)
    noise = torch.randn(SAMPLE_RATE, generator=torch.Generator().manual_seed(0)) * 0.1
    assert math.isnan(median_f0_hz(noise))
    wave = torch.cat([torch.zeros(3200), pulses(150.0, 1.0), torch.zeros(8000)])  # 0.2 s + 1 s + 0.5 s
    assert speech_span_s(wave) == pytest.approx(1.0, abs=0.02)


def test_features_ignore_level_and_need_a_minimum_length():
    mel = log_mel(pulses(140.0, 1.0) + 0.01 * torch.randn(SAMPLE_RATE, generator=torch.Generator().manual_seed(1)))
    frames, speech, stats = style_features(mel)
    louder = style_features(mel + 0.25)  # x 10 in power: log_mel's scale is (log10 power + 4) / 4
    assert torch.allclose(louder[0], frames, atol=1e-4) and torch.equal(louder[1], speech)
    assert torch.allclose(louder[2], stats, atol=1e-4)
    assert 2 ** float(stats[4]) == pytest.approx(140.0, rel=0.1)  # the mel sieve's median F0
    with pytest.raises(ValueError, match="at least 16 mel frames"):
        style_features(mel[:, :10])


@pytest.fixture(scope="module")
def small_fit(tmp_path_factory):
    """A quick fit on 10 training voices, and renders of 3 voices of held-out accents and variants saying
    held-out sentences."""
    work = tmp_path_factory.mktemp("styles")
    train_texts = make_sentences(12, 0)
    test_texts = make_sentences(4, 1, exclude=frozenset(train_texts))
    train = render(str(work), style_utterances(style_voices(10, 0, heldout=False), train_texts, 1, 0))
    test = render(str(work), style_utterances(style_voices(3, 1, heldout=True), test_texts, 1, 1))
    tokenizer = KMeansTokenizer(fit_kmeans(torch.cat([pooled_mel_NM(read_audio(r["audio"])) for r in train]), 96,
                                           seed=0, iterations=8))
    tokenizer.save(str(work / "kmeans.pt"))
    classifier = fit_style_classifier(utterance_mels(train, tokenizer), [r["style"] for r in train], steps=150,
                                      channels=48)
    classifier.save(str(work / "style.pt"))
    return {"work": work, "train": train, "test": test, "tokenizer": tokenizer, "classifier": classifier}


def test_held_out_voices_and_texts_above_chance(small_fit):
    test = small_fit["test"]
    assert {r["speaker"].split("+")[0] for r in test} <= set(HELDOUT_ACCENTS)
    assert {r["speaker"].split("+")[1] for r in test} <= set(HELDOUT_VARIANTS)
    assert not {r["text"] for r in test} & {r["text"] for r in small_fit["train"]}
    report = style_report(small_fit["classifier"], utterance_mels(test, small_fit["tokenizer"]),
                          [r["style"] for r in test])
    assert report["utterances"] == 18 and sum(map(sum, report["confusion"]["matrix"])) == 18
    assert report["accuracy"] >= CHANCE + 0.2, report
    loaded = StyleClassifier.load(str(small_fit["work"] / "style.pt"))
    mels = utterance_mels(test[:4], small_fit["tokenizer"])
    assert torch.equal(loaded.probabilities(mels), small_fit["classifier"].probabilities(mels))
    with pytest.raises(ValueError, match="is not a style classifier file"):
        StyleClassifier.load(str(small_fit["work"] / "kmeans.pt"))


def test_style_reward_is_the_probability_of_the_requested_style(small_fit):
    work, tokenizer = small_fit["work"], small_fit["tokenizer"]
    test = small_fit["test"]
    demo_names = {"slow": "slowly", "fast": "quickly", "high": "in a high voice"}
    def answers(shift: int):
        out = []
        for r in test:
            asked = STYLES[(STYLES.index(r["style"]) + shift) % len(STYLES)]
            out.append(RolloutSample(key=r["audio"], meta={"style": demo_names.get(asked, asked), "text": r["text"]},
                                     prompt_ids=[], answer_ids=[], finished=True,
                                     audio_codes=tokenizer.encode(read_audio(r["audio"])).tolist()))
        return out
    args = {"classifier": str(work / "style.pt"), "codes": f"kmeans:{work / 'kmeans.pt'}"}
    matched = sr.style(answers(0), **args)
    mismatched = sr.style(answers(1), **args)
    probs = small_fit["classifier"].probabilities(utterance_mels(test, tokenizer))
    assert matched == pytest.approx([float(probs[i, STYLES.index(r["style"])]) for i, r in enumerate(test)], abs=1e-5)
    assert all(0.0 <= x <= 1.0 for x in matched + mismatched)
    assert sum(matched) / len(matched) > sum(mismatched) / len(mismatched) + 0.2
    short = RolloutSample(key="s", meta={"style": "slowly"}, prompt_ids=[], answer_ids=[], finished=True,
                          audio_codes=[1, 2, 3])
    assert sr.style([short], **args) == [0.0]


def test_fit_command_writes_model_and_held_out_report(tmp_path, capsys):
    out = tmp_path / "style.pt"
    assert main(["fit", str(out), "--voices", "6", "--heldout-voices", "2", "--texts", "6", "--heldout-texts", "2",
                 "--heldout-per-style", "1", "--answer-voice-texts", "1", "--steps", "20", "--work", str(tmp_path), "--threads", "1"]) == 0
    report = json.loads((tmp_path / "style.json").read_text())
    assert report["train"]["utterances"] == 6 * 6 + 6  # six voices and the demo's answer voice, six styles
    held = report["heldout_voices_and_texts"]
    assert held["utterances"] == 12 and set(held["per_class"]) == set(STYLES)
    assert held["confusion"]["rows_true_cols_predicted"] == list(STYLES) and len(held["per_voice"]) == 2
    assert report["demo_voice_heldout_texts"]["utterances"] == 8  # normal, slowly, quickly, high x 2 texts
    assert report["config"]["heldout_accents"] == list(HELDOUT_ACCENTS)
    assert StyleClassifier.load(str(out)).styles == list(STYLES)
    assert "heldout_voices_and_texts: accuracy" in capsys.readouterr().out
