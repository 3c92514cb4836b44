"""data.render: "prompt" (the prompt part of any task, with each record's metadata, for RL rollouts) and
"pairs" (a preference record's chosen and rejected sequences as one sample, for DPO and reward models),
through the real loader over real tar shards: batch layout, skips, rank shares, exact resume, config checks."""
import io
import json
import math

import numpy as np
import pytest
import soundfile
import torch
import webdataset

from data.features import SAMPLE_RATE, log_mel, mel_frames
from data.loading.loader import DataConfig, build_loader
from data.loading.samples import render_raw
from data.loading.shard_reader import read_shard
from data.shards import INDEX_FORMAT
from data.tasks.pieces import IGNORE_INDEX
from data.text_tokenizer import build_text_tokenizer, extend_tokenizer, load_tokenizer, special_ids

torch.set_num_threads(1)


def _flac(duration_s, freq_hz=220.0):
    t = np.arange(int(duration_s * SAMPLE_RATE)) / SAMPLE_RATE
    buf = io.BytesIO()
    soundfile.write(buf, (0.3 * np.sin(2 * math.pi * freq_hz * t)).astype(np.float32), SAMPLE_RATE, format="FLAC")
    return buf.getvalue()


def _npy(values):
    buf = io.BytesIO()
    np.save(buf, np.array(values, dtype=np.int32))
    return buf.getvalue()


def _json(**meta):
    return json.dumps(meta).encode()


def _write(folder, samples, per_shard=None):
    """Shards of `per_shard` samples (default: one shard) and an index.json counting them."""
    folder.mkdir(parents=True)
    per_shard = per_shard or len(samples)
    shards = []
    for start in range(0, len(samples), per_shard):
        name = f"shard-{start // per_shard:06d}.tar"
        with webdataset.TarWriter(str(folder / name)) as writer:
            for key, members in samples[start:start + per_shard]:
                writer.write({"__key__": key, **members})
        shards.append({"name": name, "num_samples": len(samples[start:start + per_shard])})
    (folder / "index.json").write_text(json.dumps({"format": INDEX_FORMAT, "shards": shards}))


WORDS = ["the cat sat", "on the mat", "a dog ran", "in the park", "yes", "no", "where is it?"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    texts = WORDS + ["You are a helpful assistant.", "Transcribe the speech.", "Read the text aloud.",
                     "system\nhuman\nassistant\n"]
    extend_tokenizer(build_text_tokenizer(texts * 3, vocab_size=300), 8).save_pretrained(path)
    return str(path)


def _text_pair(i):
    """A preference record with text answers."""
    return (f"t{i}", {"json": _json(task="preference", style="calm", messages=[{"role": "human", "text": WORDS[i % 7]}],
                                    chosen={"text": WORDS[(i + 1) % 7]}, rejected={"text": WORDS[(i + 2) % 7]})})


def _audio_pair(i, duration_s):
    """A preference record heard as speech and answered in speech (codes as data.codes writes them)."""
    return (f"a{i}", {"turn0.flac": _flac(duration_s, 200 + 40 * i),
                      "chosen.codes.npy": _npy([i % 8, 3, 5, 7, 1]), "rejected.codes.npy": _npy([2, 4, (i + 3) % 8]),
                      "json": _json(task="preference", speaker=f"spk{i}", text=WORDS[i % 7],
                                    messages=[{"role": "human", "audio": "turn0.flac"}],
                                    chosen={"text": WORDS[i % 7], "codes": "chosen.codes.npy"},
                                    rejected={"text": WORDS[(i + 3) % 7], "codes": "rejected.codes.npy"})})


def _cfg(tok_dir, folder, **kw):
    return DataConfig(**{"shards": [str(folder)], "tokenizer": tok_dir, "batch_size": 2, "num_workers": 0,
                         "shuffle_buffer": 0, **kw})


def _raws(folder):
    return {raw["__key__"]: raw for path in sorted(folder.glob("shard-*.tar")) for raw in read_shard(str(path))}


def test_pairs_batch_has_chosen_rows_then_rejected_rows(tmp_path, tok_dir):
    samples = [_audio_pair(0, 0.3), _audio_pair(1, 0.5),
               ("asr0", {"flac": _flac(0.4), "json": _json(text="the cat sat")}),  # not a pair: skipped
               _text_pair(0), _text_pair(1)]
    _write(tmp_path / "ds", samples)
    raws = _raws(tmp_path / "ds")
    tok = load_tokenizer(tok_dir)
    ids = special_ids(tok)
    loader = build_loader(_cfg(tok_dir, tmp_path / "ds", render="pairs"), rank=0, world_size=1, seed=0)

    for want_keys in (["a0", "a1"], ["t0", "t1"]):
        batch = next(loader)
        assert batch["keys"] == want_keys and batch["num_pairs"] == 2 and batch["num_samples"] == 2
        assert batch["datasets"] == ["default"] * 2 and batch["epochs"] == [0, 0]
        assert batch["meta"] == [{**json.loads(raws[k]["json"]), "key": k} for k in want_keys]
        rows = [render_raw(raws[k], tok, ids, answer=answer) for answer in ("chosen", "rejected") for k in want_keys]
        length = max(len(r["input_ids"]) for r in rows)
        assert batch["input_ids"].shape == (4, length)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            assert batch["input_ids"][i].tolist() == row["input_ids"] + [ids.end_of_text] * (length - n)
            assert batch["labels"][i].tolist() == row["labels"] + [IGNORE_INDEX] * (length - n)
            assert batch["attention_mask"][i].sum() == n
        # Loss falls only on the answers, and chosen and rejected answers differ.
        for i in range(2):
            chosen = [t for t in batch["labels"][i].tolist() if t != IGNORE_INDEX]
            rejected = [t for t in batch["labels"][i + 2].tolist() if t != IGNORE_INDEX]
            assert chosen != rejected and chosen[-1] == rejected[-1] == ids.eot
        assert batch["num_tokens"] == sum(len(r["input_ids"]) for r in rows)
        assert batch["num_loss_tokens"] == sum(sum(t != IGNORE_INDEX for t in r["labels"]) for r in rows)
        if want_keys == ["a0", "a1"]:
            # Mels in row order: a0 and a1 as heard by the chosen rows, then again by the rejected rows.
            frames = [mel_frames(int(0.3 * SAMPLE_RATE)), mel_frames(int(0.5 * SAMPLE_RATE))]
            assert batch["mel_lengths"].tolist() == frames * 2
            wave_a1 = torch.from_numpy(soundfile.read(io.BytesIO(raws["a1"]["turn0.flac"]), dtype="float32")[0])
            for chunk in (1, 3):
                assert torch.equal(batch["mels"][chunk, :, :frames[1]], log_mel(wave_a1))
            assert batch["num_audio_s"] == pytest.approx(2 * 0.8)
            assert (batch["input_ids"] == ids.tts_start).sum(dim=1).tolist() == [1, 1, 1, 1]
        else:
            assert batch["mels"] is None and batch["num_audio_s"] == 0.0
    assert loader.stats()["skipped"] == {"not_a_pair": 1}
    assert loader.stats()["skipped_keys"] == ["shard-000000.tar:asr0 (not_a_pair)"]


def test_prompt_mode_renders_every_task_prompt_with_its_metadata(tmp_path, tok_dir):
    samples = [
        ("asr0", {"flac": _flac(0.4), "json": _json(text="the cat sat", speaker="s1")}),
        ("s2tt0", {"flac": _flac(0.35), "json": _json(task="s2tt", target_language="German")}),  # no answer text
        ("tts0", {"json": _json(task="tts", text="a dog ran")}),   # no codes: its answer is not needed
        # An earlier spoken answer is part of the prompt: without its codes the record cannot be used.
        ("dlg0", {"json": _json(task="dialogue", messages=[
            {"role": "human", "text": "yes"}, {"role": "assistant", "text": "no", "codes": "turn1.codes.npy"},
            {"role": "human", "text": "where is it?"}, {"role": "assistant", "text": "in the park"}])}),
        ("dlg1", {"flac": _flac(0.3), "turn0.flac": _flac(0.3), "json": _json(task="dialogue", style="calm", messages=[
            {"role": "human", "audio": "turn0.flac"}, {"role": "assistant", "text": "on the mat",
                                                       "codes": "turn1.codes.npy"}])}),
        _text_pair(2),
    ]
    _write(tmp_path / "ds", samples)
    raws = _raws(tmp_path / "ds")
    tok = load_tokenizer(tok_dir)
    ids = special_ids(tok)
    loader = build_loader(_cfg(tok_dir, tmp_path / "ds", render="prompt", batch_size=5), 0, 1, seed=0)
    batch = next(loader)
    keys = ["asr0", "s2tt0", "tts0", "dlg1", "t2"]
    assert batch["keys"] == keys and "num_pairs" not in batch
    assert loader.stats()["skipped"] == {"missing_codes": 1}
    assert batch["meta"] == [{**json.loads(raws[k]["json"]), "key": k} for k in keys]
    assert (batch["labels"] == IGNORE_INDEX).all() and batch["num_loss_tokens"] == 0
    for i, key in enumerate(keys):
        want = render_raw(raws[key], tok, ids, with_answer=False)
        n = len(want["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == want["input_ids"]
        assert batch["attention_mask"][i].sum() == n
    # Each prompt ends where generation starts: the answer's header, <tts_start> for a spoken answer.
    ends = [batch["input_ids"][i, int(batch["attention_mask"][i].sum()) - 1].item() for i in range(5)]
    assert ends[0] == ids.audio_end  # ASR's base format: instruction, then the audio
    assert ends[2] == ends[3] == ids.tts_start
    header = tok.encode("assistant\n", add_special_tokens=False)
    for i in (1, 4):  # text answers: the prompt ends with the assistant's header
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, n - len(header) - 1:n].tolist() == [ids.bot] + header
    assert batch["mel_lengths"].tolist() == [mel_frames(int(s * SAMPLE_RATE)) for s in (0.4, 0.35, 0.3)]
    # The same records in full mode: the answers' codes and the translation are missing now.
    full = build_loader(_cfg(tok_dir, tmp_path / "ds", batch_size=1), 0, 1, seed=0)
    assert [next(full)["keys"][0] for _ in range(2)] == ["asr0", "t2"]
    assert full.stats()["skipped"] == {"missing_codes": 3, "missing_field": 1}
    assert "meta" not in next(full)


def _pair_dataset(folder, num_pairs):
    samples = [_audio_pair(i, 0.2 + 0.05 * i) if i % 3 == 0 else _text_pair(i) for i in range(num_pairs)]
    _write(folder, samples, per_shard=3)
    return [key for key, _ in samples]


def test_ranks_share_pairs_disjoint_and_complete(tmp_path, tok_dir):
    keys = _pair_dataset(tmp_path / "ds", 8)
    cfg = _cfg(tok_dir, tmp_path / "ds", render="pairs", shuffle_buffer=4)
    shares = []
    for rank in range(2):
        loader = build_loader(cfg, rank=rank, world_size=2, seed=5)
        batches = [next(loader) for _ in range(2)]  # 4 pairs per rank per epoch
        assert [b["input_ids"].shape[0] for b in batches] == [4, 4]
        shares.append([k for b in batches for k in b["keys"]])
    assert set(shares[0]).isdisjoint(shares[1]) and sorted(shares[0] + shares[1]) == sorted(keys)


def test_pairs_resume_exactly(tmp_path, tok_dir):
    _pair_dataset(tmp_path / "ds", 10)
    cfg = _cfg(tok_dir, tmp_path / "ds", render="pairs", num_workers=2, shuffle_buffer=3)
    k, m = 3, 5  # odd k: the resumed run starts at worker 1; 5 pairs per worker and epoch: batches span epochs
    reference = build_loader(cfg, rank=0, world_size=1, seed=3)
    expected = [next(reference) for _ in range(k + m)]
    first = build_loader(cfg, rank=0, world_size=1, seed=3)
    for i in range(k):
        assert next(first)["keys"] == expected[i]["keys"]
    state = json.loads(json.dumps(first.state_dict()))
    # Each worker's stream position counts pairs: 4 on worker 0 (two batches), 2 on worker 1.
    assert [w["datasets"]["default"]["consumed"] for w in state["workers"]] == [4, 2]
    del first
    resumed = build_loader(cfg, rank=0, world_size=1, seed=3)
    resumed.load_state_dict(state)
    for want in expected[k:]:
        got = next(resumed)
        for name in ("keys", "uids", "meta", "num_pairs", "epochs", "num_tokens", "num_loss_tokens", "num_audio_s"):
            assert got[name] == want[name], name
        for name in ("input_ids", "attention_mask", "labels", "mel_lengths"):
            assert torch.equal(got[name], want[name]), name
        assert (got["mels"] is None) == (want["mels"] is None)
        if want["mels"] is not None:
            assert torch.equal(got["mels"], want["mels"])
    assert {e for b in expected for e in b["epochs"]} == {0, 1}


@pytest.mark.parametrize("overrides,message", [
    ({"render": "all"}, r"data.render='all': expected one of \['full', 'prompt', 'pairs'\]"),
    ({"render": "pairs", "batching": "packed"},
     r"data.render='pairs' needs data.batching='fixed', got data.batching='packed'"),
    ({"render": "prompt", "batching": "tokens"},
     r"data.render='prompt' needs data.batching='fixed', got data.batching='tokens'"),
])
def test_config_errors_name_render_and_batching(tmp_path, tok_dir, overrides, message):
    _write(tmp_path / "ds", [_text_pair(0), _text_pair(1)])
    with pytest.raises(ValueError, match=message):
        build_loader(_cfg(tok_dir, tmp_path / "ds", **overrides), 0, 1, 0)


def test_prompt_only_records_render_a_prompt_and_ask_for_speech_when_told(tok_dir):
    """An RL prompt set has no answers: a dialogue record whose messages end at the human turn renders its
    prompt (with <tts_start> when "speech_answer": true), and is refused for training with an answer."""
    from data.tasks import TASKS
    from data.tasks.base import RenderOptions, Sample
    from data.tasks.pieces import TemplateError

    tok = load_tokenizer(str(tok_dir))
    ids = special_ids(tok)
    meta = {"messages": [{"role": "human", "text": "say the cat sat slowly"}], "style": "slow"}
    spoken = TASKS["dialogue"].render(Sample("k", {**meta, "speech_answer": True}), tok, ids,
                                      RenderOptions(with_answer=False))
    text = TASKS["dialogue"].render(Sample("k", meta), tok, ids, RenderOptions(with_answer=False))
    assert tok.decode(spoken.input_ids).endswith("say the cat sat slowly<|EOT|><|BOT|>assistant\n<tts_start>")
    assert spoken.input_ids[:-1] == text.input_ids and spoken.input_ids[-1] == ids.tts_start
    assert set(spoken.labels) == {IGNORE_INDEX}
    with pytest.raises(TemplateError, match="no assistant turn after the last human turn"):
        TASKS["dialogue"].render(Sample("k", meta), tok, ids, RenderOptions(with_answer=True))
