"""Task "text": plain text as a base-format LM sequence (labels on every token, then <|endoftext|>), and a
text-only manifest line going through data.corpus.prepare and the loader with no audio at all."""
import json

import pytest
import webdataset as wds

from data.loading.loader import DataConfig, build_loader
from data.corpus.prepare import prepare_manifest
from data.shards import shard_paths
from data.tasks import TASKS, RenderOptions, Sample
from data.tasks.pieces import TemplateError
from data.text_tokenizer import build_text_tokenizer, extend_tokenizer, load_tokenizer, special_ids

TEXTS = ["the cat sat on the mat", "a dog ran", "Transcribe the speech."]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    extend_tokenizer(build_text_tokenizer(TEXTS * 3, vocab_size=300), 8).save_pretrained(path)
    return str(path)


def _render(tok_dir, meta, **options):
    tok = load_tokenizer(tok_dir)
    return TASKS["text"].render(Sample("k", meta), tok, special_ids(tok), RenderOptions(**options))


def test_text_renders_as_plain_lm_sequence_with_loss_on_every_token(tok_dir):
    tok = load_tokenizer(tok_dir)
    ids = special_ids(tok)
    rendered = _render(tok_dir, {"text": "the cat sat", "task": "text"})
    words = tok.encode("the cat sat", add_special_tokens=False)
    assert tok.decode(words) == "the cat sat" and all(i < ids.end_of_text for i in words)
    assert rendered.input_ids == words + [ids.end_of_text]
    assert rendered.labels == rendered.input_ids  # no -100 anywhere: no prompt, no role tags
    assert rendered.audio == []
    assert TASKS["text"].audio({}) == [] and TASKS["text"].codes({}) == []


@pytest.mark.parametrize("meta, options, reason", [
    ({"text": "the cat"}, {"with_answer": False}, "no_prompt"),
    ({"text": "  "}, {}, "missing_text"),
    ({}, {}, "missing_text"),
    ({"text": "the <audio_patch> cat"}, {}, "bad_text"),
])
def test_text_records_it_cannot_render(tok_dir, meta, options, reason):
    with pytest.raises(TemplateError) as info:
        _render(tok_dir, meta, **options)
    assert info.value.reason == reason


def test_text_only_manifest_prepares_and_loads(tmp_path, tok_dir):
    lines = [{"id": "t0", "task": "text", "text": "the cat sat"},
             {"id": "asr0", "text": "no audio here"},               # audio-less, not task "text": rejected
             {"id": "t1", "task": "text", "text": "a dog ran", "source_corpus": "web"},
             {"id": "tts0", "task": "tts", "text": "a dog ran"}]    # same for any other task
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    index = prepare_manifest(str(tmp_path / "m.jsonl"), str(tmp_path / "ds"), workers=1, progress=False)
    assert index["num_samples"] == 2 and index["total_duration_s"] == 0
    reason = "missing field 'audio' (only a line of task 'text' may have no audio)"
    assert index["rejects"] == [{"line": 2, "audio": None, "reason": reason},
                                {"line": 4, "audio": None, "reason": reason}]
    assert index["counts"]["task"]["text"]["samples"] == 2
    members = {s["__key__"]: sorted(k for k in s if not k.startswith("__"))
               for s in wds.WebDataset(shard_paths(str(tmp_path / "ds")), shardshuffle=False)}
    assert members == {"t0": ["json"], "t1": ["json"]}

    cfg = DataConfig(shards=[str(tmp_path / "ds")], tokenizer=tok_dir, batching="fixed", batch_size=2,
                     num_workers=0, shuffle_buffer=0)
    batch = next(build_loader(cfg, rank=0, world_size=1, seed=0))
    assert batch["keys"] == ["t0", "t1"]
    assert batch["mels"] is None and batch["num_audio_s"] == 0.0
    for row, text in enumerate(["the cat sat", "a dog ran"]):
        expected = _render(tok_dir, {"text": text}).input_ids
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :n].tolist() == expected
        assert batch["labels"][row, :n].tolist() == expected
        assert set(batch["labels"][row, n:].tolist()) <= {-100}
