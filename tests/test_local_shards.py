"""Commands that open shards as local files (data.codes, its fit, data.corpus.stats, the speaker-similarity codec
lookup) refuse a URL or pipe: spec at the start, naming it, before any request or other work."""
from __future__ import annotations

import pytest

import data.loading.remote
from data.codes import encode as audio_codes
from data.corpus import stats
from data.shards import local_shard_paths
from train import eval_voice

ADVICE = ("is not a local folder or file; copy the shards to a local folder first (training and evaluation "
          "read shards at URLs through the loader)")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a local-only command made a request")
    monkeypatch.setattr(data.loading.remote, "open_stream", refuse)
    monkeypatch.setattr(data.loading.remote, "read_bytes", refuse)


def test_tokenize_refuses_a_url_before_loading_its_tokenizer(tmp_path, capsys):
    url = "https://example.com/corpus/train"
    # The tokenizer file does not exist either: the shards are named first.
    assert audio_codes.main([url, "--tokenizer", f"kmeans:{tmp_path / 'missing.pt'}", "--no-progress"]) == 2
    assert capsys.readouterr().err == f"error: data.codes writes next to its shards: {url} {ADVICE}\n"


def test_tokenize_fit_refuses_a_bucket_url_among_local_shards(tmp_path, capsys):
    (tmp_path / "shard-000000.tar").write_bytes(b"")
    url = "s3://bucket/corpus/shard-{000000..000003}.tar"
    out = tmp_path / "kmeans.pt"
    assert audio_codes.main(["fit", str(tmp_path / "shard-000000.tar"), url, "--out", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"error: data.codes fit reads its shards as local files: {url} {ADVICE}\n"
    assert not out.exists()


@pytest.mark.parametrize("spec", ["https://example.com/corpus/shard-000000.tar", "pipe:curl -s http://h/s.tar"])
def test_stats_refuses_a_url_or_pipe(spec, capsys):
    assert stats.main([spec, "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: data.corpus.stats reads its shards as local files: {spec} {ADVICE}\n"
    assert captured.out == ""


def test_speaker_similarity_refuses_to_look_for_the_codec_at_a_url():
    with pytest.raises(ValueError) as err:
        eval_voice.vocoder_spec(["gs://bucket/eval"])
    assert str(err.value) == ("speaker_similarity reads its codec from the tokenizer.json beside the shards: "
                              f"gs://bucket/eval {ADVICE}")


def test_local_specs_resolve_as_shard_paths_does(tmp_path):
    for i in range(2):
        (tmp_path / f"shard-{i:06d}.tar").write_bytes(b"")
    assert local_shard_paths(str(tmp_path / "shard-*.tar"), "data.corpus.stats") == [
        str(tmp_path / "shard-000000.tar"), str(tmp_path / "shard-000001.tar")]
