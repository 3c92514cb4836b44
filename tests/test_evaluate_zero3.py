"""Evaluation split across ranks and batched gives the metric of one process decoding one sample at a time;
under ZeRO-3 on two gloo ranks (train.engine.inference_model) with unequal shares and answer lengths it
does not hang, leaves the parameters partitioned and the next training step unchanged.

The model is the tiny preset with <|EOT|>'s output row swapped with that of a token it generates: greedy
answers then stop where that token came, at a different step for each prompt (one never stops).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from data.loading.loader import iter_eval_samples
from data.text_tokenizer import load_tokenizer, special_ids
from model.config import preset_config
from model.generate import generate
from model.lalm import StepAudio2ForCausalLM
from tests.conftest import run_cli
from tests.test_evaluate import build_tokenizer, write_shards
from train.evaluate import run_eval

MAX_NEW_TOKENS = 20
# (metric, shard folder, max_samples): 3 prompts for the generated metrics, 6 scored TTS answers.
EVALS = (("wer", "asr", 3), ("bleu", "s2tt", 3), ("code_accuracy", "tts", 6))


def tiny_model(tok, ids) -> StepAudio2ForCausalLM:
    torch.manual_seed(2)  # a seed whose answers to the 3 ASR prompts differ
    return StepAudio2ForCausalLM(preset_config("tiny", vocab_size=len(tok), audio_patch_token_id=ids.audio_patch))


def answers(model, tok, ids, folder: Path) -> list:
    """Greedy token ids after each ASR prompt of `folder`, one prompt at a time."""
    out = []
    for s in iter_eval_samples([str(folder / "*.tar")], tok, ids, ""):
        out += generate(model.eval(), torch.tensor([s["prompt_ids"]]), mels=s["mels"], mel_lengths=s["mel_lengths"],
                        max_new_tokens=MAX_NEW_TOKENS, stop_token_ids=(ids.end_of_text, ids.eot))
    return out


def stopping_model(tok, ids, folder: Path) -> StepAudio2ForCausalLM:
    """The tiny model whose answers to the ASR prompts stop at different steps (see the module doc) and
    whose code accuracy is above 0."""
    model = tiny_model(tok, ids)
    with torch.no_grad():  # louder code rows: some teacher-forced codes come out right (accuracy above 0)
        model.lm_head.weight[ids.first_audio_code:ids.audio_pad] *= 1.5
    free = answers(model, tok, ids, folder)
    assert all(len(row) == MAX_NEW_TOKENS for row in free), free  # untouched, it never stops

    def stop_steps(token):
        return [row.index(token) if token in row else MAX_NEW_TOKENS for row in free]
    token = next(t for row in free for t in row if len(set(stop_steps(t))) == len(free))
    with torch.no_grad():
        head = model.lm_head.weight
        head[[token, ids.eot]] = head[[ids.eot, token]]
    assert [len(row) for row in answers(model, tok, ids, folder)] == stop_steps(token)
    return model


def evaluate(model, tok, ids, root: Path, **kwargs) -> dict:
    return {metric: run_eval(metric, model, tok, ids, [str(root / folder / "*.tar")], "", max_samples,
                             MAX_NEW_TOKENS, **kwargs) for metric, folder, max_samples in EVALS}


def same_results(a: dict, b: dict) -> None:
    """Equal metrics: values, counts and examples exactly; the codes' NLL (a float sum) to rounding."""
    assert a.keys() == b.keys()
    for metric in a:
        nll_a, nll_b = a[metric].get("nll", 0.0), b[metric].get("nll", 0.0)
        assert {**a[metric], "nll": None} == {**b[metric], "nll": None}, metric
        assert nll_a == pytest.approx(nll_b, rel=1e-6), metric


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_zero3")
    write_shards(root / "shards")
    tok = build_tokenizer()
    tok.save_pretrained(str(root / "tokenizer"))
    tok = load_tokenizer(str(root / "tokenizer"))  # what the ranks load
    ids = special_ids(tok)
    model = stopping_model(tok, ids, root / "shards" / "asr")
    torch.save(model.state_dict(), root / "model.pt")
    one_by_one = evaluate(model, tok, ids, root / "shards", batch_size=1)
    return {"root": root, "tok": tok, "ids": ids, "model": model, "one_by_one": one_by_one}


def test_batched_and_split_evaluation_equals_one_sample_at_a_time(setup, monkeypatch):
    tok, ids, model, shards = setup["tok"], setup["ids"], setup["model"], setup["root"] / "shards"
    one_by_one = setup["one_by_one"]
    wer = one_by_one["wer"]
    assert wer["num_samples"] == 3 and wer["value"] > 0.5  # an untrained model: mostly wrong
    assert (one_by_one["bleu"]["num_samples"], one_by_one["code_accuracy"]["num_samples"]) == (3, 6)
    assert 0.0 < one_by_one["code_accuracy"]["value"] < 0.5
    same_results(evaluate(model, tok, ids, shards, batch_size=2), one_by_one)
    same_results(evaluate(model, tok, ids, shards, batch_size=8), one_by_one)
    # Called as rank 0 of two (the gather replaced by a look at what it would send), a rank decodes only
    # its share: samples 0 and 2.
    shared = []
    monkeypatch.setattr("train.evaluate._check_group", lambda world_size: None)
    monkeypatch.setattr("train.evaluate._gather", lambda records, world_size: shared.extend(records) or records)
    run_eval("wer", model, tok, ids, [str(shards / "asr" / "*.tar")], "", 3, MAX_NEW_TOKENS, rank=0, world_size=2)
    assert [r["index"] for r in shared] == [0, 2]
    assert [r["hyp"] for r in shared] == [wer["examples"][0]["hyp"], wer["examples"][2]["hyp"]]


def test_bad_split_and_batch_arguments_are_rejected(setup):
    tok, ids, model = setup["tok"], setup["ids"], setup["model"]
    folder = [str(setup["root"] / "shards" / "asr" / "*.tar")]
    with pytest.raises(ValueError, match="^eval batch_size must be >= 1, got 0$"):
        run_eval("wer", model, tok, ids, folder, "", 3, 4, batch_size=0)
    with pytest.raises(ValueError, match="^rank 2 is outside world_size 2$"):
        run_eval("wer", model, tok, ids, folder, "", 3, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="^world_size=2 needs an initialised process group of that many ranks$"):
        run_eval("wer", model, tok, ids, folder, "", 3, 4, rank=0, world_size=2)


def test_mels_reach_the_model_in_its_dtype(setup):
    tok, ids = setup["tok"], setup["ids"]
    model = tiny_model(tok, ids).to(torch.bfloat16)
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        {k: (v.device.type, v.dtype) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}), with_kwargs=True)
    run_eval("code_accuracy", model, tok, ids, [str(setup["root"] / "shards" / "tts" / "*.tar")], "", 2, 1)
    run_eval("wer", model, tok, ids, [str(setup["root"] / "shards" / "asr" / "*.tar")], "", 2, 2)
    # The first call of each: the teacher-forced pass (text only) and the prefill with the mels.
    assert seen[0] == {}  # input_ids are positional
    assert seen[1]["mels"] == ("cpu", torch.bfloat16) and seen[1]["mel_lengths"] == ("cpu", torch.long)
    assert all(device == "cpu" for call in seen for device, _ in call.values())


def test_zero3_evaluation_on_two_ranks(setup):
    root = setup["root"]
    out = root / "ranks"
    run_cli(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "tests.test_evaluate_zero3", str(root), str(out), timeout=300)
    ranks = [json.loads((out / f"rank_{r}.json").read_text()) for r in (0, 1)]
    tok, ids, model = setup["tok"], setup["ids"], setup["model"]
    one = run_eval("wer", model, tok, ids, [str(root / "shards" / "asr" / "*.tar")], "", 1, MAX_NEW_TOKENS)
    for rank in ranks:
        # Before any step: the metrics of one process decoding one sample at a time; also with a single
        # sample, which leaves rank 1 nothing to do.
        same_results(rank["start"], setup["one_by_one"])
        same_results({"wer": rank["start_one_sample"]}, {"wer": one})
        # After a step (new weights): split across the ranks = this rank alone, all in one batch.
        same_results({"wer": rank["after_step"]}, {"wer": rank["after_step_alone"]})
        assert rank["after_step"]["examples"] != rank["start"]["wer"]["examples"]  # the step changed answers
        # Inside the context: whole parameters and none of ZeRO-3's hooks (the 2 left are the engine's own
        # forward pre/post hooks); after it: partitioned again, the hooks back.
        assert rank["inside_hooks_off"] == {"whole": True, "hooks": 2}
        # The view shares the gathered storage and carries no DeepSpeed hook at all.
        assert rank["inside"] == {"whole": True, "shared": True, "hooks": 0, "is_engine_module": False}
        assert rank["before"]["hooks"] > 100
        assert rank["after"] == {"partitioned": True, "hooks": rank["before"]["hooks"]}
        # The evaluations change no training step.
        assert rank["losses_with_eval"] == rank["losses_without"]
        assert rank["losses_with_eval"][1] != rank["losses_with_eval"][0]
    assert ranks[0]["losses_with_eval"] != ranks[1]["losses_with_eval"]  # each rank trained on its own sample
    # Rank 0 decoded 2 of the 3 prompts one at a time (2 beats), rank 1 one; code accuracy in batches
    # of 2: 3 and 3 samples, 2 batches each.
    assert [r["beats"] for r in ranks] == [
        {"start_one_sample": 1, "wer": 2, "bleu": 2, "code_accuracy": 2, "after_step": 2},
        {"start_one_sample": 0, "wer": 1, "bleu": 1, "code_accuracy": 2, "after_step": 1}]


# ------------------------------------------------------------------------------------ the ranks

def _rank_main(root: Path, out: Path) -> None:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from data.loading.batching import pad_mels
    from data.loading.loader import iter_rendered
    from train.config import EngineConfig, OptimConfig, TrainConfig
    from train.engine import Engine, inference_model, init_distributed, shutdown_distributed

    torch.set_num_threads(1)
    rank, world_size = init_distributed(timeout_s=120)
    tok = load_tokenizer(str(root / "tokenizer"))
    ids = special_ids(tok)
    state = torch.load(root / "model.pt")
    # No persistent parameters: every one must be partitioned again after the evaluation.
    cfg = TrainConfig(run_dir=str(root / "run"), optim=OptimConfig(lr=1e-2, warmup_steps=0), engine=EngineConfig(
        zero_stage=3, deepspeed={"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    train = list(iter_rendered([str(root / "shards" / "asr" / "*.tar")], tok, ids, ""))

    def step(engine, i):
        s = train[(rank + i) % len(train)]
        mels, mel_lengths = pad_mels(s["mels"])
        batch = {"input_ids": torch.tensor([s["input_ids"]]), "labels": torch.tensor([s["labels"]]),
                 "attention_mask": torch.ones(1, len(s["input_ids"]), dtype=torch.long), "mels": mels,
                 "mel_lengths": mel_lengths}
        loss = engine.forward(batch).loss
        engine.backward_and_step(loss)
        return float(loss)

    def hooks(module):
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())

    def engine_from_state():
        model = tiny_model(tok, ids)
        model.load_state_dict(state)
        engine = Engine(model, cfg)
        engine.set_lr_factor(1.0)
        return engine

    report = {"beats": {}}

    def beats(tag):
        report["beats"][tag] = 0

        def beat():
            report["beats"][tag] += 1
        return beat

    engine = engine_from_state()
    report["losses_without"] = [step(engine, 0), step(engine, 1)]
    engine.close()

    asr = [str(root / "shards" / "asr" / "*.tar")]
    split = dict(rank=rank, world_size=world_size, batch_size=1)
    engine = engine_from_state()
    # The hooks-off path (what a peft-wrapped model gets) before any step: DeepSpeed has recorded no trace yet.
    with inference_model(engine, view=False) as model:
        # First one sample: rank 1 runs no forward at all (a rank-0 forward that would compare DeepSpeed's
        # trace across ranks, as its first forward does under the hooks, would wait for rank 1 forever).
        report["start_one_sample"] = run_eval("wer", model, tok, ids, asr, "", 1, MAX_NEW_TOKENS, **split,
                                              beat=beats("start_one_sample"))
        report["start"] = {metric: run_eval(
            metric, model, tok, ids, [str(root / "shards" / folder / "*.tar")], "", max_samples, MAX_NEW_TOKENS,
            **{**split, "batch_size": 2 if metric == "code_accuracy" else 1}, beat=beats(metric))
            for metric, folder, max_samples in EVALS}
    losses = [step(engine, 0)]
    report["before"] = {"hooks": hooks(engine.module)}
    with inference_model(engine, view=False) as model:
        report["inside_hooks_off"] = {"whole": all(p.ds_status == ZeroParamStatus.AVAILABLE and p.shape == p.ds_shape
                                                   for p in model.parameters()), "hooks": hooks(model)}
    with inference_model(engine) as model:  # the plain view of the gathered tensors (the default)
        trained = dict(engine.module.named_parameters())
        report["inside"] = {"whole": all(p.ds_status == ZeroParamStatus.AVAILABLE and p.shape == p.ds_shape
                                         for p in trained.values()),
                            "shared": all(p.data_ptr() == trained[n].data_ptr() and p.shape == trained[n].ds_shape
                                          for n, p in model.named_parameters()) and len(trained) == len(
                                              list(model.parameters())),
                            "hooks": hooks(model), "is_engine_module": model is engine.module}
        report["after_step"] = run_eval("wer", model, tok, ids, asr, "", 3, MAX_NEW_TOKENS, **split,
                                        beat=beats("after_step"))
        report["after_step_alone"] = run_eval("wer", model, tok, ids, asr, "", 3, MAX_NEW_TOKENS)
    report["after"] = {"partitioned": all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE and p.data.numel() == 0
                                          and p.ds_tensor.numel() == p.partition_numel()
                                          for p in engine.module.parameters()), "hooks": hooks(engine.module)}
    losses.append(step(engine, 1))
    report["losses_with_eval"] = losses
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank_{rank}.json").write_text(json.dumps(report))
    shutdown_distributed()


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]), Path(sys.argv[2]))
    from train.engine import exit_process

    exit_process(0)  # a finished rank exits 0 (train.engine.exit_process says why)
