"""The voice metrics of train.evaluate.run_eval on answers known in advance: paralinguistic accuracy per
attribute (hand-built records, replayed answers), and speaker similarity between a spoken answer and the
clip an audio search returned (real espeak voices through data.tools.demo, prepare and tokenize)."""
import io
import json

import numpy as np
import pytest
import torch

from data.audio import encode_flac
from data.tools.demo import make_demo
from data.corpus.prepare import prepare_manifest
from data.loading.shard_reader import read_shard, resolve_shards
from data.shards import ShardWriter
from data.codes.encode import fit_tokenizer, tokenize_shards
from data.text_tokenizer import build_text_tokenizer, extend_tokenizer, special_ids
from model.config import preset_config
from model.lalm import StepAudio2ForCausalLM
from model.speaker import SpeakerEncoder, SpeakerNet
from model.vocoder import KMeansVocoder
from tests.test_evaluate import Replay
from train.eval_voice import match_label
from train.evaluate import run_eval

NUM_CODES = 16


# ------------------------------------------------------------------------------------ paralinguistic

PARA = [  # key, record, the answer the model gives
    ("p0", {"task": "para_qa", "gender": "male", "speed": "fast", "pitch": "low", "ask": "gender"}, "male"),
    ("p1", {"task": "para_qa", "gender": "female", "speed": "slow", "ask": "gender"}, "She sounds female."),
    ("p2", {"task": "para_qa", "speed": "fast", "ask": "speed"}, "slow"),
    ("p3", {"task": "para_qa", "speed": "slow", "pitch": "low", "ask": "speed"}, "slow"),
    ("p4", {"task": "para_qa", "pitch": "high", "ask": "pitch"}, "normal, or high"),  # two labels: unmatched
    ("x0", {"task": "asr", "text": "two"}, None),  # not a paralinguistic task: skipped
    ("p5", {"task": "para_qa", "pitch": "low", "ask": "pitch"}, "Low."),
    ("c0", {"task": "para_caption", "gender": "male", "speed": "fast"}, "Gender: male. Speed: slow."),
    ("q0", {"task": "para_qa", "question": "Is it loud?", "answer": "no"}, None),  # no "attribute": skipped
    ("q1", {"task": "para_qa", "question": "How does she feel?", "answer": "happy", "attribute": "emotion"},
     "happy"),
]


@pytest.fixture(scope="module")
def para(tmp_path_factory):
    root = tmp_path_factory.mktemp("para")
    rng = np.random.default_rng(0)
    with ShardWriter(str(root), 100) as writer:
        for key, meta, _ in PARA:
            wave = torch.from_numpy(rng.standard_normal(4800).astype(np.float32) * 0.1)
            writer.write(key, {"flac": encode_flac(wave), "json": json.dumps({"text": "x", **meta}).encode()})
    words = ["male", "female", "slow", "fast", "low", "high", "normal", "happy", "Gender: male. Speed: slow.",
             "Is the speaker male or female?", "How fast does the speaker talk?", "How high is the speaker's voice?"]
    tok = extend_tokenizer(build_text_tokenizer(words * 3, vocab_size=300), NUM_CODES)
    return root, tok, special_ids(tok)


def test_match_label_takes_one_whole_word_label():
    labels = ("male", "female")
    assert [match_label(a, labels) for a in ("Male.", "a FEMALE voice", "female or male", "neither", "")] == [
        "male", "female", None, None, None]
    assert match_label("in a high voice", ("in a high voice", "slowly")) == "in a high voice"


def test_paralinguistic_accuracy_per_attribute(para, caplog):
    root, tok, ids = para
    answers = [tok.encode(a, add_special_tokens=False) + [ids.eot] for _, _, a in PARA if a is not None]
    model = Replay(len(tok), answers)
    with caplog.at_level("WARNING"):
        result = run_eval("paralinguistic", model, tok, ids, [str(root / "*.tar")], "", max_samples=20,
                          max_new_tokens=12, batch_size=3)
    # gender: p0, p1, c0 right; speed: p3 right, p2 and c0 wrong; pitch: p5 right, p4 names two labels;
    # emotion (the record's own question, labels from the references): q1 right.
    assert result["attributes"] == {"emotion": {"accuracy": 1.0, "num_answers": 1},
                                    "gender": {"accuracy": 1.0, "num_answers": 3},
                                    "pitch": {"accuracy": 0.5, "num_answers": 2},
                                    "speed": {"accuracy": pytest.approx(1 / 3), "num_answers": 3}}
    assert result["value"] == pytest.approx((1 + 1 + 0.5 + 1 / 3) / 4)
    assert (result["micro_accuracy"], result["unmatched"], result["num_samples"]) == (
        pytest.approx(6 / 9), pytest.approx(1 / 9), 8)
    assert result["examples"][1] == {"key": "p1", "ref": "gender: female", "hyp": "She sounds female."}
    assert "paralinguistic skips x0: task asr is not one of" in caplog.text
    assert "paralinguistic skips q0: sample 'q0' has its own question and answer but its field 'attribute' is " \
           "None" in caplog.text
    # Each prompt asks its question about its audio and ends where the answer starts.
    assert tok.decode(model.prompts[0]).endswith("Is the speaker male or female?<audio_start>" + "<audio_patch>" * 4
                                                 + "<audio_end><|EOT|><|BOT|>assistant\n")
    assert tok.decode(model.prompts[6]).startswith("<|BOT|>system\nDescribe the speaker's voice.<|EOT|>")
    # The same whatever the batch size.
    again = run_eval("paralinguistic", Replay(len(tok), answers), tok, ids, [str(root / "*.tar")], "", 20, 12,
                     batch_size=1)
    assert again == result


def test_paralinguistic_without_samples_names_the_shards(para, tmp_path):
    root, tok, ids = para
    with ShardWriter(str(tmp_path), 100) as writer:
        writer.write("a0", {"flac": encode_flac(torch.zeros(4800) + 0.1), "json": b'{"text": "two"}'})
    with pytest.raises(ValueError, match=r"hold no paralinguistic sample \(tasks para_qa, para_caption"):
        run_eval("paralinguistic", Replay(len(tok), []), tok, ids, [str(tmp_path / "*.tar")], "", 5, 4)


# ---------------------------------------------------------------------------------- speaker similarity

@pytest.fixture(scope="module")
def timbre(tmp_path_factory):
    """data.tools.demo's timbre corpus (3 held-out records in 3 espeak voices), prepared and tokenized with a
    16-code k-means codec; a speaker encoder (untrained: fixed random weights are enough for exact values)."""
    root = tmp_path_factory.mktemp("timbre")
    splits = make_demo(str(root / "corpus"), num_train=4, num_heldout=3, tasks=("timbre",), workers=1)
    shards = str(root / "heldout")
    prepare_manifest(str(root / "corpus" / "timbre" / "heldout.jsonl"), shards, workers=1, progress=False)
    fit_tokenizer([shards], NUM_CODES, str(root / "kmeans.pt"), progress=False)
    tokenize_shards([shards], f"kmeans:{root / 'kmeans.pt'}", workers=1, progress=False)
    torch.manual_seed(0)
    SpeakerEncoder(SpeakerNet(40, 32, 16), {"n_mels": 40, "channels": 32, "dim": 16}).save(str(root / "speaker.pt"))
    texts = [t["text"] for t in map(json.loads, (root / "corpus" / "texts.jsonl").read_text().splitlines())]
    tok = extend_tokenizer(build_text_tokenizer(texts * 2, vocab_size=400), NUM_CODES)
    raws = [raw for path in resolve_shards([shards]) for raw in read_shard(path)]
    codes = {raw["__key__"]: {m: np.load(io.BytesIO(raw[m])).tolist() for m in ("codes.npy", "target.codes.npy")}
             for raw in raws}
    return {"root": root, "shards": [shards], "tok": tok, "ids": special_ids(tok), "records": splits["timbre"],
            "codes": codes, "speaker": str(root / "speaker.pt"), "kmeans": str(root / "kmeans.pt")}


def _spoken(ids, codes):
    return [ids.first_audio_code + int(c) for c in codes] + [ids.tts_end]


def test_speaker_similarity_of_known_answers(timbre):
    tok, ids, codes = timbre["tok"], timbre["ids"], timbre["codes"]
    keys = [r["id"] for r in timbre["records"]["heldout"]]
    assert list(codes) == keys
    args = (tok, ids, timbre["shards"], "", 10, 400)

    # Answering in the clip's own codes is the clip's voice exactly: 1 (both go through the same codec).
    echo = Replay(len(tok), [_spoken(ids, codes[k]["codes.npy"]) for k in keys])
    result = run_eval("speaker_similarity", echo, *args, speaker_model=timbre["speaker"], batch_size=2)
    assert result["metric"] == "speaker_similarity" and result["num_samples"] == 3
    assert result["value"] == pytest.approx(1.0, abs=1e-5)
    # The chance level: each answer against the clips of the two other voices, computed here by hand.
    encoder, vocoder = SpeakerEncoder.load(timbre["speaker"]), KMeansVocoder(timbre["kmeans"])
    emb = encoder.embed([vocoder.codes_to_wave(codes[k]["codes.npy"]) for k in keys], 16000)
    assert [r["speaker"] for r in timbre["records"]["heldout"]] == ["en-us+m3", "en+f2", "en-us+m1"]
    cos = emb @ emb.T
    assert result["other_voices"] == pytest.approx(float((cos.sum() - cos.trace()) / 6), abs=1e-5)
    # The reference answers (the same voice saying another sentence) score what the data allows.
    gold = Replay(len(tok), [_spoken(ids, codes[k]["target.codes.npy"]) for k in keys])
    by_gold = run_eval("speaker_similarity", gold, *args, speaker_model=timbre["speaker"])
    assert by_gold["value"] == pytest.approx(result["reference"], abs=1e-6) == by_gold["reference"]
    first = encoder.embed([vocoder.codes_to_wave(codes[keys[0]]["target.codes.npy"])], 16000)[0]
    assert by_gold["examples"][0]["hyp"].endswith(f"similarity {float(first @ emb[0]):.3f}]")
    # Too short to have a voice: 0.
    short = Replay(len(tok), [_spoken(ids, [1, 2, 3])] * 3)
    assert run_eval("speaker_similarity", short, *args, speaker_model=timbre["speaker"])["value"] == 0.0

    # The prompt: the request, the search call and the clip as the tool's result, up to <tts_start>.
    prompt = tok.decode(echo.prompts[0])
    assert '<tool_call>function\naudio_search\n{"query": "the American male voice m3"}</tool_call><|EOT|>' \
           '<|BOT|>input\n<audio_start>' in prompt
    assert prompt.endswith("<audio_end><|EOT|><|BOT|>assistant\n<tts_start>") and echo.mels == [2, 1]


def test_speaker_similarity_on_the_real_model_and_its_errors(timbre, tmp_path):
    tok, ids = timbre["tok"], timbre["ids"]
    torch.manual_seed(0)
    model = StepAudio2ForCausalLM(preset_config("tiny", vocab_size=len(tok), audio_patch_token_id=ids.audio_patch))
    result = run_eval("speaker_similarity", model, tok, ids, timbre["shards"], "", 2, 12,
                      speaker_model=timbre["speaker"])
    assert result["num_samples"] == 2 and -1.0 <= result["value"] <= 1.0 and -1.0 <= result["reference"] <= 1.0

    with pytest.raises(ValueError, match="^speaker_similarity needs a speaker encoder at '/nowhere/s.pt': train one "
                                         "with `python -m train.speaker_encoder fit /nowhere/s.pt`$"):
        run_eval("speaker_similarity", model, tok, ids, timbre["shards"], "", 2, 4, speaker_model="/nowhere/s.pt")
    # Shards with no record of their codec (no data.codes): say so, or take the codec named.
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in resolve_shards(timbre["shards"]) + [f"{timbre['shards'][0]}/index.json"]:
        (bare / path.rsplit("/", 1)[1]).write_bytes(open(path, "rb").read())
    with pytest.raises(ValueError, match=r"tokenizer\.json files name the codecs \['None'\]; speaker_similarity "
                                         r"needs the one codec that made their codes"):
        run_eval("speaker_similarity", model, tok, ids, [str(bare)], "", 2, 4, speaker_model=timbre["speaker"])
    named = run_eval("speaker_similarity", model, tok, ids, [str(bare)], "", 2, 12, speaker_model=timbre["speaker"],
                     vocoder=f"kmeans:{timbre['kmeans']}")
    assert named == result
    with pytest.raises(ValueError, match="hold no sample with a spoken final answer"):
        run_eval("speaker_similarity", model, tok, ids, timbre["shards"], "", 0, 4, speaker_model=timbre["speaker"])


def test_the_loop_logs_each_attribute_and_the_metrics_extras():
    from train.loop import eval_details

    result = {"value": 0.7, "num_samples": 9, "micro_accuracy": 0.667, "unmatched": 0.111, "examples": [],
              "attributes": {"gender": {"accuracy": 1.0, "num_answers": 3}, "pitch": {"accuracy": 0.5,
                                                                                      "num_answers": 2}}}
    assert eval_details(result) == {"micro_accuracy": 0.667, "unmatched": 0.111, "gender_accuracy": 1.0,
                                    "pitch_accuracy": 0.5}
    assert eval_details({"value": 0.4, "num_samples": 3, "nll": 2.5, "num_codes": 120, "examples": []}) == \
        {"nll": 2.5, "num_codes": 120.0}
