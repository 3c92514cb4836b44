"""Audio codes: k-means fit and encode, S3 wrapper framing with a stand-in model, data.codes over real
shards (codes equal encode(), resume shard by shard, bad samples dropped and counted, tokenizer.json),
and the loader refusing codes from another tokenizer."""
import hashlib
import io
import json
import math
import os
import tarfile

import numpy as np
import pytest
import torch

from data.audio import decode_audio, encode_flac
from data.codes.tokenizers import (S3_NUM_CODES, KMeansTokenizer, S3Tokenizer, audio_tokenizer_hash, fit_kmeans,
                                   load_audio_tokenizer, pooled_mel_NM)
from data.features import SAMPLE_RATE
from data.loading.loader import DataConfig, build_loader
from data.loading.shard_reader import check_audio_tokenizer
from data.shards import ShardWriter, read_index, write_index
from data.corpus.stats import Counts
from data.codes.encode import fit_tokenizer, main, read_tokenizer_record, tokenize_shards
from data.text_tokenizer import build_text_tokenizer, extend_tokenizer

torch.set_num_threads(1)


def _tone(duration_s, freq_hz=440.0):
    t = torch.arange(int(duration_s * SAMPLE_RATE)) / SAMPLE_RATE
    return 0.4 * torch.sin(2 * math.pi * freq_hz * t)


def _noise(duration_s, seed=0):
    return 0.3 * torch.randn(int(duration_s * SAMPLE_RATE), generator=torch.Generator().manual_seed(seed))


def _wave(i):
    return _tone(0.6 + 0.1 * i, 200.0 + 90 * i) if i % 2 == 0 else _noise(0.5 + 0.1 * i, seed=i)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """3 shards of 2 samples (one with target audio) and one sample with corrupt FLAC, and an index."""
    root = tmp_path_factory.mktemp("ds")
    folder = root / "train"
    counts = Counts()
    bad_meta = {"text": "broken", "speaker": "s9", "duration_s": 0.5}
    with ShardWriter(str(folder), max_samples=2) as writer:
        for i in range(6):
            wave_T = _wave(i)
            meta = {"text": f"utt {i}", "speaker": f"s{i % 2}", "duration_s": len(wave_T) / SAMPLE_RATE}
            members = {"flac": encode_flac(wave_T)}
            if i == 3:
                members["target.flac"] = encode_flac(_tone(0.8, 300.0))
                members["codes.npy"] = b"stale codes of another tokenizer"
            if i == 4:  # replaced by a sample whose audio cannot be decoded
                meta, members = bad_meta, {"flac": b"fLaC not really"}
            members["json"] = json.dumps(meta).encode()
            counts.add(meta, meta["duration_s"])
            writer.write(f"utt{i}", members, meta["duration_s"])
    shards = writer.shards
    write_index(str(folder), {"format": 1, "num_samples": 6, "shards": shards, "rejects": [],
                              "total_duration_s": sum(s["duration_s"] for s in shards), "counts": counts.to_json()})
    return root


@pytest.fixture(scope="module")
def kmeans_file(dataset):
    path = str(dataset / "km.pt")
    fit_tokenizer([str(dataset / "train")], num_codes=8, out=path, seed=3, iterations=10, progress=False)
    return path


def _checksum(tensor):
    return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()


def test_kmeans_fit_is_deterministic_and_codes_are_25hz_in_range(dataset, kmeans_file, tmp_path):
    again = str(tmp_path / "again.pt")
    assert main(["fit", str(dataset / "train"), "--num-codes", "8", "--out", again, "--seed", "3",
                 "--iterations", "10", "--no-progress"]) == 0
    tok_again = KMeansTokenizer.load(again)
    tok = KMeansTokenizer.load(kmeans_file)
    assert _checksum(tok.centroids_KM) == _checksum(tok_again.centroids_KM)
    assert tok.hash() == tok_again.hash() == audio_tokenizer_hash(kmeans_file)
    other = fit_tokenizer([str(dataset / "train")], num_codes=8, out=str(tmp_path / "o.pt"), seed=4,
                          iterations=10, progress=False)
    assert other.hash() != tok.hash()
    assert tok.centroids_KM.shape == (8, 128) and tok.config["seed"] == 3

    # 2.0 s -> 202 mel frames at 100 Hz -> 50 codes at 25 Hz
    codes = tok.encode(_tone(2.0))
    assert codes.shape == (50,) and codes.dtype == np.int16
    assert 0 <= codes.min() and codes.max() < 8
    assert tok.frame_rate_hz == 25.0
    # encode is the nearest centroid of each 4-frame mean
    feats_NM = pooled_mel_NM(_tone(2.0))
    expected = torch.cdist(feats_NM.double(), tok.centroids_KM.double()).argmin(1).numpy()
    np.testing.assert_array_equal(codes, expected)
    # a centroid is a mel frame: decoding gives 100 Hz log-mel of the codes
    mel_MF = tok.decode_features(codes)
    assert mel_MF.shape == (128, 200)
    assert torch.equal(mel_MF[:, 4], tok.centroids_KM[codes[1]])


def test_kmeans_fit_reads_every_audio_member_of_a_sample(kmeans_file):
    # Sample 3's target.flac (a conversation turn's audio is a member like it) is read too: a codec fitted
    # on the main audio alone never sees the answers' voice and styles. utt4 is undecodable.
    expected = sum(pooled_mel_NM(_wave(i)).shape[0] for i in (0, 1, 2, 3, 5)) + pooled_mel_NM(_tone(0.8, 300.0)).shape[0]
    assert KMeansTokenizer.load(kmeans_file).config["num_frames"] == expected


def test_tone_and_noise_get_different_codes():
    feats = torch.cat([pooled_mel_NM(_tone(2.0)), pooled_mel_NM(_noise(2.0))])
    tok = KMeansTokenizer(fit_kmeans(feats, 4, seed=0))
    tone, noise = tok.encode(_tone(1.0)), tok.encode(_noise(1.0, seed=7))
    assert len(tone) == len(noise) == 25
    assert set(tone.tolist()).isdisjoint(set(noise.tolist()))


def test_kmeans_fit_refuses_too_few_frames():
    with pytest.raises(ValueError, match="k-means with 16 codes needs at least 16 frames, the corpus gave 5"):
        fit_kmeans(torch.zeros(5, 128), 16)


class _StandInS3(torch.nn.Module):
    """Random model with S3 v2's interface: two stride-2 convs (100 Hz -> 25 Hz), FSQ to 3^8 codes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv1d(128, 16, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv1d(16, 8, 3, stride=2, padding=1)
        self.calls = []

    def quantize(self, mel_BMF, mel_len_B):
        self.calls.append((tuple(mel_BMF.shape), mel_len_B.tolist()))
        h = self.conv2(torch.nn.functional.gelu(self.conv1(mel_BMF)))
        levels = torch.round(torch.tanh(4 * h)).long() + 1  # each of 8 dims in {0, 1, 2}
        codes_BN = (levels * (3 ** torch.arange(8))[None, :, None]).sum(1)
        code_len_B = ((mel_len_B + 2 - 3) // 2 + 1 + 2 - 3) // 2 + 1
        return codes_BN, code_len_B


def test_s3_wrapper_frames_batches_and_ranges_with_a_stand_in_model():
    model = _StandInS3()
    tok = S3Tokenizer(model, batch_size=2)
    waves = [_noise(2.0, 1), _tone(1.0), _noise(31.0, 2)]  # the last is cut into 30 s + 1 s
    codes = tok.encode_batch(waves)
    assert [len(c) for c in codes] == [50, 25, 750 + 25]
    assert all(c.dtype == np.int16 and c.min() >= 0 and c.max() <= S3_NUM_CODES - 1 for c in codes)
    assert len(np.unique(codes[0])) >= 5  # a random model still spreads noise over several codes
    # 4 chunks in batches of 2, zero-padded to the longest, with the true lengths
    assert model.calls == [((2, 128, 200), [200, 100]), ((2, 128, 3000), [3000, 100])]
    # batching does not change a waveform's codes
    np.testing.assert_array_equal(tok.encode(waves[1]), codes[1])
    np.testing.assert_array_equal(tok.encode(waves[2]), codes[2])
    assert tok.record()["num_codes"] == 6561 and tok.record()["frame_rate_hz"] == 25
    assert len(tok.hash()) == 64 and tok.hash() == S3Tokenizer(_StandInS3()).hash()


def test_s3_from_onnx_says_how_to_install(tmp_path):
    onnx = tmp_path / "speech_tokenizer_v2.onnx"
    onnx.write_bytes(b"not a model")
    try:
        import s3tokenizer  # noqa: F401
        pytest.skip("s3tokenizer is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="pip install s3tokenizer"):
        load_audio_tokenizer(f"s3:{onnx}")
    # the hash of an ONNX file needs no package: it is the file's sha256
    assert audio_tokenizer_hash(f"s3:{onnx}") == hashlib.sha256(b"not a model").hexdigest()


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_tokenize_resumes_drops_bad_samples_and_records_tokenizer(dataset, kmeans_file, tmp_path):
    src, out = str(dataset / "train"), str(tmp_path / "out")
    tok = KMeansTokenizer.load(kmeans_file)
    # a "killed" run: only the first shard
    first = tokenize_shards([os.path.join(src, "shard-000000.tar")], f"kmeans:{kmeans_file}", out, workers=1,
                            progress=False)
    assert first[0]["tokenized"] == ["shard-000000.tar"] and not first[0]["complete"]
    assert not os.path.exists(os.path.join(out, "index.json"))  # an unfinished copy has no index
    assert read_tokenizer_record(out)["complete"] is False
    stat0 = os.stat(os.path.join(out, "shard-000000.tar"))

    assert main([src, "--tokenizer", f"kmeans:{kmeans_file}", "--out", out, "--workers", "2",
                 "--no-progress"]) == 0
    stat0_after = os.stat(os.path.join(out, "shard-000000.tar"))
    assert (stat0.st_ino, stat0.st_mtime_ns) == (stat0_after.st_ino, stat0_after.st_mtime_ns)
    record = read_tokenizer_record(out)
    assert record == {"name": "kmeans", "hash": tok.hash(), "num_codes": 8, "frame_rate_hz": 25.0,
                      "spec": f"kmeans:{kmeans_file}", "complete": True}

    # every sample's codes equal encode() of its decoded audio; stale codes are replaced
    samples = {}
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):
        samples.update(_members(os.path.join(out, name)))
    keys = sorted({n.split(".")[0] for n in samples})
    assert keys == ["utt0", "utt1", "utt2", "utt3", "utt5"]  # utt4's audio is undecodable
    for key in keys:
        codes = np.load(io.BytesIO(samples[f"{key}.codes.npy"]))
        np.testing.assert_array_equal(codes, tok.encode(decode_audio(samples[f"{key}.flac"])[0]))
    target = np.load(io.BytesIO(samples["utt3.target.codes.npy"]))
    np.testing.assert_array_equal(target, tok.encode(decode_audio(samples["utt3.target.flac"])[0]))
    assert len(target) == 20  # 0.8 s at 25 Hz

    index = read_index(out)
    assert [s["num_samples"] for s in index["shards"]] == [2, 2, 1] and index["num_samples"] == 5
    assert index["rejects"] == [{"shard": "shard-000002.tar", "key": "utt4", "kind": "unreadable audio",
                                 "reason": index["rejects"][0]["reason"]}]
    assert "shard-000002.tar:utt4.flac" in index["rejects"][0]["reason"]
    assert "s9" not in index["counts"]["speaker"]
    assert sum(v["samples"] for v in index["counts"]["speaker"].values()) == 5
    assert index["total_duration_s"] == pytest.approx(sum(len(_wave(i)) for i in (0, 1, 2, 3, 5)) / SAMPLE_RATE)
    with tarfile.open(os.path.join(out, "shard-000001.tar")) as tar:
        assert all(m.mtime == 0 and m.uid == 0 for m in tar)

    # a third run does nothing; the input folder was never touched
    again = tokenize_shards([src], kmeans_file, out, workers=1, progress=False)
    assert again[0]["tokenized"] == [] and again[0]["complete"]
    assert read_tokenizer_record(src) is None


def test_tokenize_in_place_is_deterministic(dataset, kmeans_file, tmp_path):
    import shutil
    work = tmp_path / "inplace"
    shutil.copytree(dataset / "train", work)
    tokenize_shards([str(work / "shard-00000{0..1}.tar")], kmeans_file, None, workers=1, progress=False)
    # half done: the index lists the rewritten shards' new checksums, tokenizer.json says unfinished
    assert read_tokenizer_record(str(work))["complete"] is False
    half = read_index(str(work))
    assert half["shards"][2] == read_index(str(dataset / "train"))["shards"][2]
    assert half["shards"][0]["sha256"] == hashlib.sha256((work / "shard-000000.tar").read_bytes()).hexdigest()
    with pytest.raises(ValueError, match="data.codes with tokenizer [0-9a-f]{64} has not finished"):
        check_audio_tokenizer([str(work / "shard-000000.tar")], kmeans_file)
    stat1 = os.stat(work / "shard-000001.tar")
    done = tokenize_shards([str(work)], kmeans_file, None, workers=1, progress=False)
    assert done[0]["tokenized"] == ["shard-000002.tar"] and done[0]["complete"]
    assert os.stat(work / "shard-000001.tar").st_mtime_ns == stat1.st_mtime_ns
    copy = tmp_path / "copy"
    tokenize_shards([str(dataset / "train")], kmeans_file, str(copy), workers=1, progress=False)
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):
        assert (work / name).read_bytes() == (copy / name).read_bytes()
    assert read_index(str(work))["shards"] == read_index(str(copy))["shards"]
    assert read_tokenizer_record(str(work))["complete"] is True


def test_loader_refuses_codes_of_another_tokenizer(dataset, kmeans_file, tmp_path):
    out = str(tmp_path / "coded")
    tokenize_shards([str(dataset / "train")], kmeans_file, out, workers=1, progress=False)
    shards = [os.path.join(out, f"shard-00000{i}.tar") for i in range(3)]
    good = KMeansTokenizer.load(kmeans_file).hash()
    check_audio_tokenizer(shards, kmeans_file)  # same tokenizer: accepted, by file or by hash prefix
    check_audio_tokenizer(shards, good[:16])
    wrong = "ab" * 32
    expected = (f"dataset folder {out!r} has audio codes from tokenizer {good} (kmeans), but "
                f"data.audio_tokenizer names {wrong}; re-run `python -m data.codes` on it with that tokenizer")
    with pytest.raises(ValueError) as err:
        check_audio_tokenizer(shards, wrong)
    assert str(err.value) == expected
    tok_dir = tmp_path / "tok"
    extend_tokenizer(build_text_tokenizer(["utt one two"] * 3, vocab_size=300), 8).save_pretrained(tok_dir)
    cfg = DataConfig(shards=[out], tokenizer=str(tok_dir), audio_tokenizer=wrong)
    with pytest.raises(ValueError) as err:
        build_loader(cfg, 0, 1, 0)
    assert str(err.value) == expected
    with pytest.raises(ValueError, match="expected a tokenizer hash"):
        check_audio_tokenizer(shards, "no-such-file.pt")


def test_a_new_audio_tokenizer_kind_is_one_register_call(kmeans_file, tmp_path, monkeypatch):
    from data.codes import tokenizers as A

    monkeypatch.setattr(A, "AUDIO_TOKENIZERS", dict(A.AUDIO_TOKENIZERS))
    A.register_audio_tokenizer("mine", A.TokenizerKind(KMeansTokenizer.load, lambda path: "ab" * 32, suffix=".mine"))
    mine = tmp_path / "t.mine"
    mine.write_bytes(open(kmeans_file, "rb").read())
    assert isinstance(load_audio_tokenizer(f"mine:{mine}"), KMeansTokenizer)
    assert audio_tokenizer_hash(str(mine)) == "ab" * 32  # a bare path: its suffix picks the kind
    assert audio_tokenizer_hash(kmeans_file) == KMeansTokenizer.load(kmeans_file).hash()  # no suffix: k-means
    with pytest.raises(ValueError, match=r"no file 'nope.pt' \(expected one of kmeans:FILE, s3:FILE, mine:FILE\)"):
        load_audio_tokenizer("kmeans:nope.pt")
    with pytest.raises(ValueError, match=r"audio tokenizer name 'My-Tok'"):
        A.register_audio_tokenizer("My-Tok", A.TokenizerKind(KMeansTokenizer.load, str))
