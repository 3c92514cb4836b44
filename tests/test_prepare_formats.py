"""Kaldi, folder and Hugging Face corpora into shards; target audio; per-task counts; resuming a killed run;
JSONL lines that are not UTF-8 or not JSON rejected one by one in every JSONL format."""
import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds

import data.corpus.prepare as prepare_module
from data.audio import decode_audio
from data.corpus.conversations import read_conversations
from data.corpus.formats import read_folder, read_hf, read_hf_pairs, read_kaldi, read_manifest
from data.corpus.preferences import read_preferences
from data.corpus.prepare import PrepareError, prepare, prepare_manifest
from data.shards import read_index, shard_paths

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pcm(seed, num_samples):
    return np.random.default_rng(seed).integers(-20000, 20000, size=num_samples, dtype=np.int16)


def _samples(out_dir):
    """{key: {ext: bytes}} in shard order, read the way the loader reads them."""
    return {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}
            for s in wds.WebDataset(shard_paths(str(out_dir)), shardshuffle=False)}


def _pcm_of(flac):
    wave_T, sample_rate = decode_audio(flac)
    assert sample_rate == 16000
    return np.round(wave_T.numpy() * 32768).astype(np.int16)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "data.corpus.prepare", *args, "--workers", "1", "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_kaldi_folder_refuses_piped_command_and_counts(tmp_path):
    wav_dir = tmp_path / "wavs"
    wav_dir.mkdir()
    pcm = {f"u{i}": _pcm(i, 1600 * (i + 1)) for i in range(3)}
    for utt, samples in pcm.items():
        sf.write(wav_dir / f"{utt}.wav", samples, 16000, subtype="PCM_16")
    marker = tmp_path / "pipe-was-run"
    data_dir = tmp_path / "data" / "train"
    data_dir.mkdir(parents=True)
    (data_dir / "wav.scp").write_text(
        f"u0 {wav_dir / 'u0.wav'}\n"
        "u1 wavs/u1.wav\n"                                  # relative: resolved against --root
        f"u2 {wav_dir / 'u2.wav'}\n"
        f"piped sox x.wav -t wav - | touch {marker} |\n"
        f"untranscribed {wav_dir / 'u0.wav'}\n"
        f"u2 {wav_dir / 'u0.wav'}\n")
    (data_dir / "text").write_text("u0 hello world\nu1 good  morning\nu2 bye\npiped never\nno-audio lost\n")
    (data_dir / "utt2spk").write_text("u0 alice\nu1 bob\nu2 alice\n")
    (data_dir / "utt2lang").write_text("u0 en\nu1 de\nu2 en\n")
    out = tmp_path / "out"

    proc = _cli("kaldi", str(data_dir), str(out), "--root", str(tmp_path), "--shard-size", "2")
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    index = read_index(str(out))
    assert index["input_format"] == "kaldi" and index["num_samples"] == 3
    assert [s["num_samples"] for s in index["shards"]] == [2, 1]
    assert index["rejects"] == [
        {"utt": "piped", "audio": f"sox x.wav -t wav - | touch {marker} |",
         "reason": "piped command in wav.scp is not executed"},
        {"utt": "untranscribed", "audio": str(wav_dir / "u0.wav"), "reason": "no transcript in text"},
        {"utt": "u2", "audio": str(wav_dir / "u0.wav"),
         "reason": "utterance id repeated in wav.scp (line 6, first on line 3)"},
        {"utt": "no-audio", "audio": None, "reason": "no audio in wav.scp"}]
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "4 rejected (1 no audio, 1 no transcript, 1 piped command, 1 repeated utterance)")

    samples = _samples(out)
    assert list(samples) == ["u0", "u1", "u2"]
    for utt in pcm:
        np.testing.assert_array_equal(_pcm_of(samples[utt]["flac"]), pcm[utt])
    meta = json.loads(samples["u1"]["json"])
    assert meta == {"id": "u1", "text": "good  morning", "speaker": "bob", "language": "de",
                    "duration_s": 0.2, "num_samples": 3200, "sample_rate": 16000, "source": "wavs/u1.wav"}
    # u0 0.1 s + u2 0.3 s by alice in English, u1 0.2 s by bob in German; all ASR, no style given.
    assert index["counts"] == {
        "task": {"asr": {"samples": 3, "hours": round(0.6 / 3600, 6)}},
        "language": {"de": {"samples": 1, "hours": round(0.2 / 3600, 6)},
                     "en": {"samples": 2, "hours": round(0.4 / 3600, 6)}},
        "speaker": {"alice": {"samples": 2, "hours": round(0.4 / 3600, 6)},
                    "bob": {"samples": 1, "hours": round(0.2 / 3600, 6)}},
        "style": {"unknown": {"samples": 3, "hours": round(0.6 / 3600, 6)}}}

    (data_dir / "segments").write_text("u0 rec 0 1\n")
    with pytest.raises(PrepareError, match="Kaldi segments are not supported"):
        read_kaldi(str(data_dir))


def test_folder_of_audio_with_transcripts(tmp_path):
    root = tmp_path / "voice"
    (root / "spk1").mkdir(parents=True)
    (root / "spk2" / "take 2").mkdir(parents=True)
    a, b, c = _pcm(1, 1600), _pcm(2, 2400), _pcm(3, 800)
    sf.write(root / "spk1" / "a.wav", a, 16000, subtype="PCM_16")
    (root / "spk1" / "a.txt").write_text("first line\nsecond  line\n")
    sf.write(root / "spk1" / "b.flac", b, 16000, subtype="PCM_16")
    (root / "spk1" / "b.lab").write_text("from a lab file")
    sf.write(root / "spk2" / "take 2" / "c.ogg", c.astype(np.float32) / 32768, 16000)
    (root / "spk2" / "take 2" / "c.txt").write_text("ogg vorbis")
    sf.write(root / "spk2" / "d.wav", a, 16000, subtype="PCM_16")            # no transcript
    sf.write(root / "spk2" / "e.wav", a, 16000, subtype="PCM_16")
    (root / "spk2" / "e.txt").write_text("  \n")                              # empty transcript
    (root / "spk2" / "notes.txt").write_text("a transcript without audio is ignored")

    index = prepare(read_folder(str(root)), str(tmp_path / "out"), workers=1, progress=False)
    samples = _samples(tmp_path / "out")
    assert list(samples) == ["spk1_a", "spk1_b", "spk2_take_2_c"]
    metas = {k: json.loads(v["json"]) for k, v in samples.items()}
    assert [(m["text"], m["speaker"], m["source"]) for m in metas.values()] == [
        ("first line second line", "spk1", "spk1/a.wav"), ("from a lab file", "spk1", "spk1/b.flac"),
        ("ogg vorbis", "take 2", "spk2/take 2/c.ogg")]
    np.testing.assert_array_equal(_pcm_of(samples["spk1_a"]["flac"]), a)
    np.testing.assert_array_equal(_pcm_of(samples["spk1_b"]["flac"]), b)
    assert metas["spk2_take_2_c"]["num_samples"] == 800  # lossy, so only the length is exact
    assert index["rejects"] == [
        {"file": "spk2/d.wav", "audio": "spk2/d.wav", "reason": "no transcript: expected d.txt or d.lab beside it"},
        {"file": "spk2/e.wav", "audio": "spk2/e.wav", "reason": f"empty transcript {root / 'spk2' / 'e.txt'}"}]
    assert index["counts"]["speaker"] == {"spk1": {"samples": 2, "hours": round(0.25 / 3600, 6)},
                                          "take 2": {"samples": 1, "hours": round(0.05 / 3600, 6)}}


def _wav_bytes(samples, sample_rate=16000):
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def test_hugging_face_save_to_disk_and_parquet_give_identical_shards(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    pcm = [_pcm(i, 1600 + 400 * i) for i in range(4)]
    rows = {
        "audio": [{"bytes": _wav_bytes(pcm[0]), "path": "r0.wav"},
                  {"bytes": _wav_bytes(pcm[1]), "path": None},
                  {"bytes": b"not audio", "path": "bad.wav"},
                  {"bytes": _wav_bytes(pcm[3]), "path": "r3.wav"},
                  {"bytes": _wav_bytes(pcm[2]), "path": "r4.wav"}],
        "sentence": ["zero", "one", "two", None, "four"],
        "speaker": ["s0", "s1", "s0", "s1", "s1"],
        "task": ["asr", "tts", "asr", "asr", "tts"],
        "emotion": ["happy", None, "sad", "sad", "sad"],
        "score": [0.5, 1.0, 2.0, 3.0, 4.0],
    }
    train = datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio())
    datasets.DatasetDict({"train": train, "test": train.select([4])}).save_to_disk(str(tmp_path / "ds"))
    train.to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))

    index = prepare(read_hf(str(tmp_path / "ds"), text_column="sentence"), str(tmp_path / "out"),
                    shard_size=2, workers=1, progress=False)
    samples = _samples(tmp_path / "out")
    assert list(samples) == ["train-00000000", "train-00000001", "train-00000004"]
    for key, expected in zip(samples, [pcm[0], pcm[1], pcm[2]]):
        np.testing.assert_array_equal(_pcm_of(samples[key]["flac"]), expected)
    meta = json.loads(samples["train-00000001"]["json"])
    assert meta == {"text": "one", "speaker": "s1", "task": "tts", "score": 1.0, "duration_s": 0.125,
                    "num_samples": 2000, "sample_rate": 16000, "source": "row 1"}
    assert [r["row"] for r in index["rejects"]] == [2, 3]
    assert index["rejects"][0]["reason"].startswith("unreadable audio (")
    assert index["rejects"][0]["reason"].endswith(": bad.wav (row 2)")
    assert index["rejects"][1] == {"row": 3, "audio": "r3.wav",
                                   "reason": "column 'sentence' must be a string, got NoneType"}
    assert {k: v["samples"] for k, v in index["counts"]["task"].items()} == {"asr": 1, "tts": 2}
    assert {k: v["samples"] for k, v in index["counts"]["style"].items()} == {"happy": 1, "sad": 1,
                                                                               "unknown": 1}

    # Parquet of the same rows, found in a folder by its split name, gives byte-identical shards.
    parquet = prepare(read_hf(str(tmp_path / "pq"), text_column="sentence"), str(tmp_path / "out_pq"),
                      shard_size=2, workers=2, progress=False)
    assert [s["sha256"] for s in parquet["shards"]] == [s["sha256"] for s in index["shards"]]

    proc = _cli("hf", str(tmp_path / "ds"), str(tmp_path / "out_test"), "--split", "test",
                "--text-column", "sentence")
    assert proc.returncode == 0, proc.stderr
    assert list(_samples(tmp_path / "out_test")) == ["test-00000000"]
    assert prepare_module.main(["hf", str(tmp_path / "ds"), str(tmp_path / "x"), "--split", "dev"]) == 2
    assert (f"error: dataset '{tmp_path / 'ds'}' has no split 'dev'; splits: ['test', 'train']"
            in capsys.readouterr().err)
    with pytest.raises(PrepareError, match=r"has no text column 'text'; columns: \['audio', 'sentence'"):
        read_hf(str(tmp_path / "ds"))


def test_target_audio_is_a_second_flac_and_a_bad_one_rejects(tmp_path):
    source, target = _pcm(1, 1600), _pcm(2, 4000)
    sf.write(tmp_path / "src.wav", source, 16000, subtype="PCM_16")
    sf.write(tmp_path / "tgt.wav", target, 16000, subtype="PCM_16")
    lines = [{"id": "s2st", "audio": "src.wav", "target_audio": "tgt.wav", "text": "hola", "task": "s2st"},
             {"id": "broken", "audio": "src.wav", "target_audio": "gone.wav", "text": "x", "task": "s2st"},
             {"id": "plain", "audio": "src.wav", "text": "hello"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    index = prepare_manifest(str(tmp_path / "m.jsonl"), str(tmp_path / "out"), workers=1, progress=False)

    samples = _samples(tmp_path / "out")
    assert list(samples) == ["s2st", "plain"]
    assert sorted(samples["s2st"]) == ["flac", "json", "target.flac"] and sorted(samples["plain"]) == ["flac", "json"]
    np.testing.assert_array_equal(_pcm_of(samples["s2st"]["target.flac"]), target)
    np.testing.assert_array_equal(_pcm_of(samples["s2st"]["flac"]), source)
    meta = json.loads(samples["s2st"]["json"])
    assert (meta["target_duration_s"], meta["target_num_samples"], meta["target_source"]) == (0.25, 4000, "tgt.wav")
    assert "target_audio" not in meta
    assert index["rejects"] == [{"line": 2, "audio": "src.wav",
                                 "reason": f"target audio: file not found: {tmp_path / 'gone.wav'}"}]
    assert index["counts"]["task"] == {"asr": {"samples": 1, "hours": round(0.1 / 3600, 6)},
                                       "s2st": {"samples": 1, "hours": round(0.1 / 3600, 6)}}


def test_killed_run_resumes_shard_by_shard_and_rerun_writes_nothing(tmp_path, monkeypatch, capsys):
    lines = []
    for i in range(9):
        sf.write(tmp_path / f"{i}.wav", _pcm(i, 800 + 160 * i), 16000, subtype="PCM_16")
        lines.append({"audio": f"{i}.wav", "text": f"t{i}"})
    lines.insert(4, {"audio": "missing.wav", "text": "gone"})  # line 5: a decode reject inside shard 1
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    reference = prepare_manifest(str(manifest), str(tmp_path / "ref"), shard_size=3, workers=1, progress=False)
    assert [s["num_samples"] for s in reference["shards"]] == [3, 3, 3]

    calls = []
    real_load = prepare_module._load

    def counting_load(job):
        calls.append(os.path.basename(job[0]))
        if len(calls) == kill_at:
            raise KeyboardInterrupt  # stands in for a kill between two samples
        return real_load(job)
    monkeypatch.setattr(prepare_module, "_load", counting_load)

    out = tmp_path / "out"
    kill_at = 8  # shards 0 (lines 1-3) and 1 (lines 4-7, line 5 rejected) are done, shard 2 is not
    with pytest.raises(KeyboardInterrupt):
        prepare_manifest(str(manifest), str(out), shard_size=3, workers=1, progress=False)
    assert sorted(os.listdir(out)) == ["prepare_state.json", "shard-000000.tar", "shard-000001.tar"]
    inodes = {name: os.stat(out / name).st_ino for name in ("shard-000000.tar", "shard-000001.tar")}
    (out / "shard-000005.tar.tmp").write_bytes(b"left by a SIGKILL")

    calls.clear()
    kill_at = None
    index = prepare_manifest(str(manifest), str(out), shard_size=3, workers=1, progress=False)
    assert calls == ["6.wav", "7.wav", "8.wav"]  # only the samples of the missing shard were decoded
    assert index == reference | {"source": str(manifest)}
    assert {name: os.stat(out / name).st_ino for name in inodes} == inodes
    assert sorted(os.listdir(out)) == ["index.json", "prepare_state.json"] + [f"shard-00000{i}.tar" for i in range(3)]
    for shard in reference["shards"]:
        assert (out / shard["name"]).read_bytes() == (tmp_path / "ref" / shard["name"]).read_bytes()
    assert "kept 2 shards of the previous run, wrote 1" in capsys.readouterr().err

    calls.clear()
    index_mtime = os.stat(out / "index.json").st_mtime_ns
    assert prepare_manifest(str(manifest), str(out), shard_size=3, workers=1, progress=False) == index
    assert calls == [] and os.stat(out / "index.json").st_mtime_ns == index_mtime
    assert f"data.corpus.prepare: {out} is up to date (3 shards); nothing written" in capsys.readouterr().err

    # A lost or damaged shard is rewritten alone, from the candidates it held (line 5's reject included).
    (out / "shard-000001.tar").unlink()
    (out / "shard-000002.tar").write_bytes(b"damaged")
    calls.clear()
    assert prepare_manifest(str(manifest), str(out), shard_size=3, workers=1, progress=False) == index
    assert calls == ["3.wav", "missing.wav", "4.wav", "5.wav", "6.wav", "7.wav", "8.wav"]
    assert hashlib.sha256((out / "shard-000002.tar").read_bytes()).hexdigest() == index["shards"][2]["sha256"]

    # Another shard size is another output: everything is written again, nothing stale is left.
    calls.clear()
    index = prepare_manifest(str(manifest), str(out), shard_size=5, workers=1, progress=False)
    assert len(calls) == 10 and [s["num_samples"] for s in index["shards"]] == [5, 4]
    assert sorted(os.listdir(out)) == ["index.json", "prepare_state.json", "shard-000000.tar", "shard-000001.tar"]


def test_parquet_with_plain_bytes_columns_and_a_target_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    source, target = _pcm(5, 1600), _pcm(6, 2400)
    table = pa.table({"id": ["ab-1", "ab-2"], "text": ["hi", "yo"],
                      "audio": [_wav_bytes(source), _wav_bytes(source)],
                      "speech_out": [_wav_bytes(target, 8000), b""]})
    pq.write_table(table, str(tmp_path / "pairs.parquet"))
    index = prepare(read_hf(str(tmp_path / "pairs.parquet"), target_column="speech_out"), str(tmp_path / "out"),
                    workers=1, progress=False)
    samples = _samples(tmp_path / "out")
    assert list(samples) == ["ab-1"]
    meta = json.loads(samples["ab-1"]["json"])
    # The 8 kHz target is resampled to 16 kHz: twice the samples.
    assert (meta["source"], meta["target_source"], meta["target_num_samples"]) == ("row 0", "row 0", 4800)
    np.testing.assert_array_equal(_pcm_of(samples["ab-1"]["flac"]), source)
    assert index["rejects"] == [{"row": 1, "audio": "row 1", "reason": "target audio: no audio (neither bytes "
                                 "nor a path): row 1"}]


def test_manifest_line_of_invalid_utf8_is_rejected_and_the_rest_kept(tmp_path):
    sf.write(tmp_path / "a.wav", _pcm(3, 1600), 16000, subtype="PCM_16")
    good = [json.dumps({"id": f"g{i}", "audio": "a.wav", "text": f"line {i}"}).encode() for i in range(3)]
    bad = b'{"id": "bad", "audio": "a.wav", "text": "caf\xe9 \xff"}'  # Latin-1, not UTF-8: byte 44
    (tmp_path / "m.jsonl").write_bytes(b"\n".join([good[0], good[1], bad, good[2]]) + b"\n")
    index = prepare_manifest(str(tmp_path / "m.jsonl"), str(tmp_path / "out"), workers=1, progress=False)

    samples = _samples(tmp_path / "out")
    assert list(samples) == ["g0", "g1", "g2"]
    assert [json.loads(s["json"])["text"] for s in samples.values()] == ["line 0", "line 1", "line 2"]
    assert index["num_samples"] == 3
    assert index["rejects"] == [{"line": 3, "audio": None, "reason": "not valid UTF-8 at byte 44"}]

    cli_out = tmp_path / "cli"
    result = _cli("manifest", str(tmp_path / "m.jsonl"), str(cli_out))
    assert result.returncode == 0, result.stderr
    assert "3 samples" in result.stderr and "1 rejected (1 invalid UTF-8)" in result.stderr


# Every way one JSONL line can be unusable, as (line bytes, reject reason): each is rejected alone.
BAD_LINES = [
    (b'{"text": "\xc3("}', "not valid UTF-8 at byte 10"),
    (b"{not json", "invalid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    (b'["a list"]', "invalid JSON: expected an object, got list"),
    (b'{"text": "x", "score": NaN}', "invalid JSON: NaN is not JSON (Python's extension; write null or a string)"),
    (b"[" * 100_000 + b"]" * 100_000, "invalid JSON: nested too deeply"),
    (b'{"text": "\\ud800"}', "a string holds the lone surrogate '\\ud800': not encodable as UTF-8"),
]


def _conversation_line(i):
    return {"id": f"c{i}", "messages": [{"role": "user", "text": "hi"}, {"role": "assistant", "text": f"ok {i}"}]}


def _preference_line(i):
    return {"id": f"p{i}", "messages": [{"role": "user", "text": "hi"}], "chosen": {"text": f"yes {i}"},
            "rejected": {"text": "no"}}


@pytest.mark.parametrize("read, good_line", [
    (read_manifest, lambda i: {"id": f"m{i}", "audio": "a.wav", "text": f"t {i}"}),
    (read_conversations, _conversation_line),
    (read_preferences, _preference_line),
], ids=["manifest", "conversations", "preferences"])
def test_every_bad_jsonl_line_is_rejected_alone(tmp_path, read, good_line):
    # A BOM, CRLF endings and a U+2028 inside a string (str.splitlines would cut the line there) are fine.
    first = json.dumps(good_line(0), ensure_ascii=False).replace('"id"', '"note": "a\u2028b", "id"', 1)
    lines = [b"\xef\xbb\xbf" + first.encode()] + [bad for bad, _ in BAD_LINES] + [json.dumps(good_line(1)).encode()]
    (tmp_path / "in.jsonl").write_bytes(b"\r\n".join(lines) + b"\r\n")
    corpus = read(str(tmp_path / "in.jsonl"))
    assert [c.where["line"] for c in corpus.candidates] == [1, len(lines)]
    assert corpus.candidates[0].record["note"] == "a\u2028b"
    assert [(r.where, r.reason) for r in corpus.rejects] == [
        ({"line": line_no}, reason) for line_no, (_, reason) in enumerate(BAD_LINES, start=2)]


def _pairs_parquet(tmp_path):
    """Paired speech as a community S2ST dataset holds it: source audio as bytes, target audio as file paths
    (relative to the parquet file), both texts; rows 1-3 are bad one way each."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    src = [_pcm(10 + i, 1600 + 800 * i) for i in range(5)]
    tgt = [_pcm(20 + i, 2400 + 400 * i) for i in range(5)]
    (tmp_path / "audio").mkdir()
    for i, samples in enumerate(tgt):
        sf.write(tmp_path / "audio" / f"t{i}.wav", samples, 16000, subtype="PCM_16")
    (tmp_path / "audio" / "t2.wav").write_bytes(b"RIFF but not audio")   # undecodable target
    table = pa.table({
        "id": ["p0", "p1", "p2", "p3", "p4"],
        "src": [_wav_bytes(src[0]), None, _wav_bytes(src[2]), _wav_bytes(src[3]), _wav_bytes(src[4])],
        "tgt": [f"audio/t{i}.wav" for i in range(5)],
        "src_text": ["bonjour", "salut", "merci", "oui", "au revoir"],
        "tgt_text": ["hello", "hi", "thanks", None, "goodbye"],
        "speaker": ["a", "b", "a", "b", "a"],
    })
    pq.write_table(table, str(tmp_path / "pairs.parquet"), row_group_size=2)
    return src, tgt


def test_s2st_pairs_from_parquet_keep_good_rows_and_reject_bad_ones_by_row(tmp_path):
    src, tgt = _pairs_parquet(tmp_path)
    proc = _cli("s2st", str(tmp_path / "pairs.parquet"), str(tmp_path / "out"), "--source-audio-column", "src",
                "--target-audio-column", "tgt", "--source-text-column", "src_text", "--target-text-column",
                "tgt_text", "--source-language", "French", "--target-language", "English")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("2 samples, 0.4 s (0.00 h) in 1 shards -> "
                                                          f"{tmp_path / 'out'}; 3 rejected (1 no audio, "
                                                          "1 target unreadable audio, 1 wrong type)")
    index = read_index(str(tmp_path / "out"))
    assert index["input_format"] == "hf_pairs" and index["num_samples"] == 2
    assert index["rejects"][0] == {"row": 1, "audio": "row 1", "reason": "no audio (neither bytes nor a path): row 1"}
    assert index["rejects"][1]["row"] == 2 and index["rejects"][1]["audio"] == "row 2"
    assert index["rejects"][1]["reason"].startswith("target audio: unreadable audio (")
    assert index["rejects"][1]["reason"].endswith(f": {tmp_path / 'audio' / 't2.wav'}")
    assert index["rejects"][2] == {"row": 3, "audio": "row 3",
                                   "reason": "column 'tgt_text' must be a string, got NoneType"}
    assert index["counts"]["task"] == {"s2st": {"samples": 2, "hours": round(0.4 / 3600, 6)}}

    samples = _samples(tmp_path / "out")
    assert list(samples) == ["p0", "p4"]
    for key, i in (("p0", 0), ("p4", 4)):
        assert sorted(samples[key]) == ["flac", "json", "target.flac"]
        np.testing.assert_array_equal(_pcm_of(samples[key]["flac"]), src[i])
        np.testing.assert_array_equal(_pcm_of(samples[key]["target.flac"]), tgt[i])
    assert json.loads(samples["p4"]["json"]) == {
        "text": "au revoir", "translation": "goodbye", "id": "p4", "speaker": "a", "task": "s2st",
        "source_language": "French", "target_language": "English", "duration_s": 0.3, "num_samples": 4800,
        "sample_rate": 16000, "source": "row 4", "target_duration_s": 0.25, "target_num_samples": 4000,
        "target_source": "audio/t4.wav"}


def test_s2st_pairs_texts_are_optional_and_columns_are_checked(tmp_path, capsys):
    _pairs_parquet(tmp_path)
    assert prepare_module.main(["s2st", str(tmp_path / "pairs.parquet"), str(tmp_path / "out"), "--source-audio-column",
                                "src", "--target-audio-column", "tgt", "--workers", "1", "--no-progress"]) == 0
    assert ("warning: no --target-text-column: task 's2st' reads the record's 'translation' and skips records "
            "without one") in capsys.readouterr().err
    corpus = read_hf_pairs(str(tmp_path / "pairs.parquet"), "src", "tgt", task="t2st")
    # Without text columns no row is refused before decoding; the languages are left out when not given.
    assert [c.key for c in corpus.candidates] == ["p0", "p1", "p2", "p3", "p4"] and corpus.rejects == []
    assert corpus.candidates[3].record == {"id": "p3", "src_text": "oui", "speaker": "b", "task": "t2st"}
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"src": [b"x", b"y"], "tgt": [b"x", b"y"], "to": [" ", "fine"]}),
                   str(tmp_path / "b.parquet"))
    blank = read_hf_pairs(str(tmp_path / "b.parquet"), "src", "tgt", target_text_column="to")
    assert [c.key for c in blank.candidates] == ["train-00000001"]
    assert [(r.where, r.reason) for r in blank.rejects] == [({"row": 0}, "column 'to' is ' ': expected non-empty text")]
    with pytest.raises(PrepareError, match=r"has no target audio column 'target_audio'; columns: \['id', 'src'"):
        read_hf_pairs(str(tmp_path / "pairs.parquet"), "src")
    with pytest.raises(PrepareError, match="task 'speech' is not a registered task"):
        read_hf_pairs(str(tmp_path / "pairs.parquet"), "src", "tgt", task="speech")


def test_the_lora_s2st_recipes_data_command_runs_as_written(tmp_path):
    # The command in recipes/lora/s2st.yaml's comments, on a parquet file with the columns it names.
    import shlex

    import pyarrow as pa
    import pyarrow.parquet as pq
    text = open(os.path.join(REPO, "recipes", "lora", "s2st.yaml"), encoding="utf-8").read()
    lines = [line.lstrip("# ").rstrip() for line in text.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("python -m data.corpus.prepare s2st"))
    command = ""
    for line in lines[start:]:
        command += " " + line.rstrip("\\")
        if not line.endswith("\\"):
            break
    argv = shlex.split(command)[3:]
    assert argv[:3] == ["s2st", "/data/pairs/train.parquet", "runs/s2st/shards/train"]
    pq.write_table(pa.table({"source_audio": [_wav_bytes(_pcm(1, 1600))], "target_audio": [_wav_bytes(_pcm(2, 800))],
                             "source_text": ["bonjour"], "target_text": ["hello"]}), str(tmp_path / "t.parquet"))
    argv[1:3] = [str(tmp_path / "t.parquet"), str(tmp_path / "out")]
    assert prepare_module.main(argv + ["--workers", "1", "--no-progress"]) == 0
    meta = json.loads(_samples(tmp_path / "out")["train-00000000"]["json"])
    assert {k: meta[k] for k in ("text", "translation", "task", "source_language", "target_language")} == {
        "text": "bonjour", "translation": "hello", "task": "s2st", "source_language": "French",
        "target_language": "English"}


def _kaldi_dir(tmp_path, num_utts):
    """A Kaldi folder of `num_utts` utterances u0.. with wav.scp, text, utt2spk and utt2lang lines, as bytes."""
    (tmp_path / "wavs").mkdir()
    for i in range(num_utts):
        sf.write(tmp_path / "wavs" / f"u{i}.wav", _pcm(i, 800 + 160 * i), 16000, subtype="PCM_16")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    return data_dir, {
        "wav.scp": [f"u{i} {tmp_path / 'wavs' / f'u{i}.wav'}".encode() for i in range(num_utts)],
        "text": [f"u{i} words of {i}".encode() for i in range(num_utts)],
        "utt2spk": [f"u{i} spk{i % 2}".encode() for i in range(num_utts)],
        "utt2lang": [f"u{i} en".encode() for i in range(num_utts)]}


def _write_kaldi(data_dir, files):
    for name, lines in files.items():
        (data_dir / name).write_bytes(b"\n".join(lines) + b"\n")


# A line of each Kaldi file that is not UTF-8 (b"\xff\xfe" in the middle of the file): it rejects the one
# utterance it is about, the reason naming file and line, or, where its id itself is unreadable, the line alone.
@pytest.mark.parametrize("name, line, where, reason", [
    ("wav.scp", b"u2 /wavs/\xff\xfe.wav", {"utt": "u2"}, "wav.scp line 3: not valid UTF-8 at byte 9"),
    ("text", b"u2 caf\xff\xfe au lait", {"utt": "u2"}, "text line 3: not valid UTF-8 at byte 6"),
    ("utt2spk", b"u2 \xff\xfe", {"utt": "u2"}, "utt2spk line 3: not valid UTF-8 at byte 3"),
    ("utt2lang", b"u2 d\xff\xfe", {"utt": "u2"}, "utt2lang line 3: not valid UTF-8 at byte 4"),
    ("text", b"\xff\xfe2 lost", {"file": "text", "line": 3}, "not valid UTF-8 at byte 0"),
], ids=["wav.scp", "text", "utt2spk", "utt2lang", "text-id"])
def test_kaldi_line_of_invalid_utf8_is_rejected_alone(tmp_path, name, line, where, reason):
    data_dir, files = _kaldi_dir(tmp_path, 5)
    files[name][2] = line
    _write_kaldi(data_dir, files)
    index = prepare(read_kaldi(str(data_dir)), str(tmp_path / "out"), workers=1, progress=False)
    kept = ["u0", "u1", "u3", "u4"]
    audio = None if name == "wav.scp" or "file" in where else str(tmp_path / "wavs" / "u2.wav")
    expected = [{**where, "audio": audio, "reason": reason}]
    if "file" in where:  # nothing says the line was u2's: u2 then has no transcript (wav.scp's order first)
        expected.insert(0, {"utt": "u2", "audio": str(tmp_path / "wavs" / "u2.wav"), "reason": "no transcript in text"})
    assert index["rejects"] == expected
    samples = _samples(tmp_path / "out")
    assert list(samples) == kept
    for utt in kept:
        i = int(utt[1:])
        meta = json.loads(samples[utt]["json"])
        assert (meta["text"], meta["speaker"], meta["language"], meta["num_samples"]) == (
            f"words of {i}", f"spk{i % 2}", "en", 800 + 160 * i)
        np.testing.assert_array_equal(_pcm_of(samples[utt]["flac"]), _pcm(i, 800 + 160 * i))


def test_kaldi_every_other_bad_line_is_rejected_alone_and_named(tmp_path):
    data_dir, files = _kaldi_dir(tmp_path, 8)
    files["wav.scp"][3] = b"\xff\xfe " + files["wav.scp"][3].split(b" ", 1)[1]   # u3's line, id unreadable
    files["text"][1] = b"u1"                                                      # no transcript
    files["text"].insert(5, b"u0 said twice")                                     # repeats line 1
    files["utt2spk"][4] = b"u4  "                                                 # no speaker
    files["utt2spk"].append(b"u9 \xff")                                           # not UTF-8, no such utterance
    files["utt2lang"][5] = b"u5"                                                  # no language
    files["text"].append(b"u8 no audio for me")
    _write_kaldi(data_dir, files)
    corpus = read_kaldi(str(data_dir))
    wav = str(tmp_path / "wavs")
    assert [(r.where, r.audio, r.reason) for r in corpus.rejects] == [
        ({"utt": "u1"}, f"{wav}/u1.wav", "text line 2: no transcript after the utterance id"),
        ({"file": "wav.scp", "line": 4}, None, "not valid UTF-8 at byte 0"),
        ({"utt": "u4"}, f"{wav}/u4.wav", "utt2spk line 5: no speaker after the utterance id"),
        ({"utt": "u5"}, f"{wav}/u5.wav", "utt2lang line 6: no language after the utterance id"),
        ({"utt": "u3"}, None, "no audio in wav.scp"),                # its wav.scp line was unreadable
        ({"file": "text", "line": 6}, None, "utterance 'u0' repeated (first on line 1)"),
        ({"utt": "u8"}, None, "no audio in wav.scp"),
        ({"utt": "u9"}, None, "utt2spk line 9: not valid UTF-8 at byte 3"),
    ]
    assert [c.key for c in corpus.candidates] == ["u0", "u2", "u6", "u7"]
    assert corpus.candidates[0].record == {"id": "u0", "text": "words of 0", "speaker": "spk0", "language": "en"}
    proc = _cli("kaldi", str(data_dir), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "8 rejected (2 invalid UTF-8, 2 no audio, 1 no language, 1 no speaker, 1 no transcript, "
        "1 repeated utterance)")
    assert list(_samples(tmp_path / "out")) == ["u0", "u2", "u6", "u7"]


def test_folder_transcript_of_invalid_utf8_rejects_its_file_alone(tmp_path):
    root = tmp_path / "voice"
    root.mkdir()
    for i in range(3):
        sf.write(root / f"a{i}.wav", _pcm(i, 800), 16000, subtype="PCM_16")
        (root / f"a{i}.txt").write_bytes(b"\xef\xbb\xbfline one\r\nline " + str(i).encode() + b"\r\n")  # BOM, CRLF
    (root / "a1.txt").write_bytes(b"first line\nsecond \xff\xfe line\n")
    index = prepare(read_folder(str(root)), str(tmp_path / "out"), workers=1, progress=False)
    assert index["rejects"] == [{"file": "a1.wav", "audio": "a1.wav",
                                 "reason": f"transcript {root / 'a1.txt'} line 2: not valid UTF-8 at byte 7"}]
    samples = _samples(tmp_path / "out")
    assert {k: json.loads(v["json"])["text"] for k, v in samples.items()} == {"a0": "line one line 0",
                                                                           "a2": "line one line 2"}


def test_librispeech_folder_reads_trans_txt_lines_and_rejects_bad_ones_alone(tmp_path):
    # root/SPEAKER/CHAPTER/SPEAKER-CHAPTER-NNNN.flac with one SPEAKER-CHAPTER.trans.txt per chapter folder.
    root = tmp_path / "LibriSpeech" / "test-clean"
    chapter = root / "1272" / "128104"
    chapter.mkdir(parents=True)
    utts = [f"1272-128104-000{i}" for i in range(6)]
    for i, utt in enumerate(utts):
        sf.write(chapter / f"{utt}.flac", _pcm(i, 800 + 80 * i), 16000, subtype="PCM_16")
    (chapter / "1272-128104.trans.txt").write_bytes(b"\n".join([
        b"1272-128104-0000 MISTER QUILTER IS THE APOSTLE",
        b"1272-128104-0001 NOR IS MISTER QUILTER'S MANNER",
        b"1272-128104-0002 HE HAS GRAVE \xff\xfe DOUBTS",                    # not UTF-8: rejects 0002 alone
        b"\xff\xfe-128104-0003 LOST",                                         # unreadable id: the line alone
        b"1272-128104-0004",                                                  # no text
        b"1272-128104-0001 SAID TWICE",                                       # repeated id
        b"1272-128104-0005 LINNELL'S PICTURES",
        b"1272-128104-0009 A LINE WITHOUT AUDIO IS IGNORED"]) + b"\n")
    proc = _cli("folder", str(root), str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    index = read_index(str(tmp_path / "out"))
    chapter_rel = "1272/128104"
    trans = f"{chapter_rel}/1272-128104.trans.txt"
    assert index["rejects"] == [
        {"file": f"{chapter_rel}/{utts[2]}.flac", "audio": f"{chapter_rel}/{utts[2]}.flac",
         "reason": f"{trans} line 3: not valid UTF-8 at byte 30"},
        {"file": f"{chapter_rel}/{utts[3]}.flac", "audio": f"{chapter_rel}/{utts[3]}.flac",
         "reason": f"no transcript: expected {utts[3]}.txt or {utts[3]}.lab beside it, or a line "
                   f"'{utts[3]} ...' in {trans}"},
        {"file": f"{chapter_rel}/{utts[4]}.flac", "audio": f"{chapter_rel}/{utts[4]}.flac",
         "reason": f"{trans} line 5: no transcript after the utterance id"},
        {"file": trans, "line": 4, "audio": None, "reason": "not valid UTF-8 at byte 0"},
        {"file": trans, "line": 6, "audio": None, "reason": f"utterance '{utts[1]}' repeated (first on line 2)"}]
    samples = _samples(tmp_path / "out")
    assert list(samples) == [f"1272_128104_{u}" for u in (utts[0], utts[1], utts[5])]
    metas = [json.loads(v["json"]) for v in samples.values()]
    assert [(m["text"], m["speaker"], m["num_samples"]) for m in metas] == [
        ("MISTER QUILTER IS THE APOSTLE", "1272", 800), ("NOR IS MISTER QUILTER'S MANNER", "1272", 880),
        ("LINNELL'S PICTURES", "1272", 1200)]


def test_parquet_string_cell_of_invalid_utf8_rejects_its_row_alone(tmp_path):
    # Arrow strings must be UTF-8, but a parquet file written by another tool may hold one that is not;
    # reading the column whole would fail the corpus.
    import pyarrow as pa
    import pyarrow.parquet as pq

    def strings(values):
        return pa.array(values, type=pa.binary()).view(pa.string())
    sf.write(tmp_path / "a.wav", _pcm(1, 800), 16000, subtype="PCM_16")
    pq.write_table(pa.table({
        "audio": strings([b"a.wav", b"a.wav", b"a.wav", b"a\xff\xfe.wav", b"a.wav"]),
        "text": strings([b"zero", b"one", b"t\xff\xfeo", b"three", b"four"]),
        "speaker": strings([b"s", b"\xff\xfe", b"s", b"s", b"s"])}), str(tmp_path / "t.parquet"))
    index = prepare(read_hf(str(tmp_path / "t.parquet")), str(tmp_path / "out"), workers=1, progress=False)
    assert index["rejects"] == [
        {"row": 1, "audio": "row 1", "reason": "column 'speaker': not valid UTF-8 at byte 0"},
        {"row": 2, "audio": "row 2", "reason": "column 'text': not valid UTF-8 at byte 1"},
        {"row": 3, "audio": "row 3", "reason": "column 'audio': not valid UTF-8 at byte 1"}]
    samples = _samples(tmp_path / "out")
    assert {k: json.loads(v["json"])["text"] for k, v in samples.items()} == {"train-00000000": "zero",
                                                                           "train-00000004": "four"}
    # The same in the path of datasets' Audio struct {"bytes", "path"}: that row alone goes.
    audio = pa.StructArray.from_arrays([pa.array([_wav_bytes(_pcm(i, 800)) for i in range(3)]),
                                        strings([b"a.wav", b"\xff\xfe.wav", b"c.wav"])], names=["bytes", "path"])
    pq.write_table(pa.table({"audio": audio, "text": ["zero", "one", "two"]}), str(tmp_path / "s.parquet"))
    index = prepare(read_hf(str(tmp_path / "s.parquet")), str(tmp_path / "out_s"), workers=1, progress=False)
    assert index["rejects"] == [{"row": 1, "audio": "row 1", "reason": "column 'audio': not valid UTF-8 at byte 0"}]
    assert [json.loads(v["json"])["source"] for v in _samples(tmp_path / "out_s").values()] == ["a.wav", "c.wav"]


COMMON_VOICE_HEADER = "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccents\tlocale\tsegment"


def test_common_voice_tsv_keeps_good_lines_and_rejects_each_bad_one_by_line(tmp_path):
    (tmp_path / "clips").mkdir()
    for i in (1, 2, 4, 5):
        sf.write(tmp_path / "clips" / f"cv_{i}.wav", _pcm(i, 1600 * i), 16000, subtype="PCM_16")
    lines = [COMMON_VOICE_HEADER.encode(),
             b"spk1\tcv_1.wav\tHello  there.\t2\t0\ttwenties\tfemale\tUnited States English\ten\t",
             b"\xff\xfe",                                                       # not UTF-8, mid-file
             b"spk2\tcv_2.wav\tonly three fields",
             b"spk3\tcv_3.wav\tThe clip is gone.\t1\t0\t\t\t\ten\t",
             b"spk4\tcv_4.wav\t  \t1\t0\t\t\t\ten\t",
             b'spk5\tcv_5.wav\tShe said "hi" twice.\t3\t1\tforties\tmale\t\ten\tBenchmark']
    tsv = tmp_path / "validated.tsv"
    tsv.write_bytes(b"\r\n".join(lines) + b"\r\n")
    out = tmp_path / "out"
    result = _cli("csv", str(tsv), str(out))
    assert result.returncode == 0, result.stderr

    index = read_index(str(out))
    assert index["input_format"] == "csv" and index["num_samples"] == 2
    assert index["rejects"] == [
        {"line": 3, "audio": None, "reason": "not valid UTF-8 at byte 0"},
        {"line": 4, "audio": None, "reason": "3 fields, the header has 10"},
        {"line": 5, "audio": "cv_3.wav", "reason": f"no audio file 'cv_3.wav' in {tmp_path} or {tmp_path / 'clips'}"},
        {"line": 6, "audio": "cv_4.wav", "reason": "column 'sentence' is empty: expected the transcript"}]
    assert ("2 samples" in result.stderr and "4 rejected (1 empty text, 1 invalid UTF-8, 1 missing audio, "
            "1 wrong number of fields)" in result.stderr), result.stderr
    samples = _samples(out)
    assert list(samples) == ["cv_1-00000002", "cv_5-00000007"]
    metas = [json.loads(s["json"]) for s in samples.values()]
    # The text as "text" (whitespace joined, a TSV's quotes kept as written), client_id as the speaker,
    # locale as the language, every other non-empty column as it is; the audio path as the source.
    assert [{k: v for k, v in m.items() if k not in ("duration_s", "num_samples", "sample_rate")} for m in metas] == [
        {"speaker": "spk1", "up_votes": "2", "down_votes": "0", "age": "twenties", "gender": "female",
         "accents": "United States English", "language": "en", "text": "Hello there.", "source": "cv_1.wav"},
        {"speaker": "spk5", "up_votes": "3", "down_votes": "1", "age": "forties", "gender": "male", "language": "en",
         "segment": "Benchmark", "text": 'She said "hi" twice.', "source": "cv_5.wav"}]
    np.testing.assert_array_equal(_pcm_of(samples["cv_5-00000007"]["flac"]), _pcm(5, 8000))
    assert index["counts"]["speaker"].keys() == {"spk1", "spk5"} and index["counts"]["language"].keys() == {"en"}


def test_csv_with_quotes_an_audio_dir_and_named_columns(tmp_path):
    from data.corpus.formats import read_csv

    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "a.wav", _pcm(1, 1600), 16000, subtype="PCM_16")
    sf.write(audio / "b.wav", _pcm(2, 1600), 16000, subtype="PCM_16")
    path = tmp_path / "meta.csv"
    path.write_text('id,file,transcript,locale,language\n'
                    'x1,a.wav,"Yes, quoted ""words""",de,German\n'
                    'x2,b.wav,"an open quote,de,German\n'
                    'x3,b.wav,plain,de,\n')
    corpus = read_csv(str(path), audio_column="file", text_column="transcript", audio_dir=str(audio))
    # A "language" column of its own wins: locale stays "locale". The id column names the sample.
    assert [(c.key, c.record, c.source, c.audio) for c in corpus.candidates] == [
        ("x1", {"id": "x1", "locale": "de", "language": "German", "text": 'Yes, quoted "words"'}, "a.wav",
         str(audio / "a.wav")),
        ("x3", {"id": "x3", "locale": "de", "text": "plain"}, "b.wav", str(audio / "b.wav"))]
    assert [(r.where, r.reason, r.kind) for r in corpus.rejects] == [
        ({"line": 3}, "malformed line: unexpected end of data", "malformed line")]
    # Whole-file faults: the header lacks the text column; an --audio-dir that does not exist.
    with pytest.raises(PrepareError, match=r"meta.csv:1: no text column 'sentence' in the header; columns: "
                                           r"\['id', 'file', 'transcript', 'locale', 'language'\] \(delimiter ','"):
        read_csv(str(path), audio_column="file")
    with pytest.raises(PrepareError, match="audio folder .*nowhere' does not exist"):
        read_csv(str(path), audio_column="file", text_column="transcript", audio_dir=str(tmp_path / "nowhere"))
    # --delimiter '\t' on this comma file: one column only.
    result = _cli("csv", str(path), str(tmp_path / "out"), "--delimiter", "\\t", "--audio-column", "file")
    assert result.returncode == 2 and "no audio column 'file' in the header" in result.stderr
