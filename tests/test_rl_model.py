"""What RL asks of the model: chunked token log-probabilities at a temperature, score models (reward model,
critic) from a causal LM export or their own, LoRA with adapters disabled as the reference, and rollouts
that keep their stop token."""
from __future__ import annotations

import torch

import model.lalm as lalm
from model.checkpoint import save_stepfun
from model.config import preset_config
from model.generate import generate
from model.lalm import StepAudio2ForCausalLM
from model.score import StepAudio2ForScore, is_score_folder, last_token_scores, load_score_model, score_config
from train.config import LoraConfig
from train.lora import adapters_disabled, apply_lora


def _model(seed: int = 0) -> StepAudio2ForCausalLM:
    torch.manual_seed(seed)
    return StepAudio2ForCausalLM(preset_config("tiny", vocab_size=320, audio_patch_token_id=300)).eval()


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 290, (3, 10), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2, 8:] = -100  # a shorter answer (padding after it)
    return ids, labels


def test_token_logprobs_equal_log_softmax_of_the_logits_at_the_temperature(monkeypatch):
    model = _model()
    ids, labels = _batch()
    with torch.no_grad():
        logits = model(ids).logits.float()
    for temperature in (1.0, 0.7):
        expected = torch.log_softmax(logits / temperature, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        expected = torch.where(labels[:, 1:] != -100, expected, torch.zeros_like(expected))
        out = model(ids, labels=labels, token_logprobs=True, temperature=temperature)
        assert out.loss is None and out.token_logprobs.shape == ids.shape
        assert out.token_logprobs[:, 0].abs().max() == 0  # nothing predicts the first token
        assert torch.allclose(out.token_logprobs[:, 1:], expected, atol=1e-5)
        probs = torch.softmax(logits / temperature, -1)[:, :-1]
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
        entropy = torch.where(labels[:, 1:] != -100, entropy, torch.zeros_like(entropy))
        assert torch.allclose(out.entropy[:, 1:], entropy, atol=1e-4)
    # In chunks of 4 rows (as ZeRO-3 pads the chunk count: extra empty chunks), the same values and gradients.
    full = model(ids, labels=labels, token_logprobs=True)
    full.token_logprobs.sum().backward()
    grad_full = model.lm_head.weight.grad.clone()
    model.zero_grad()
    monkeypatch.setattr(lalm, "LOSS_CHUNK_ROWS", 4)
    chunked = model(ids, labels=labels, token_logprobs=True, num_loss_chunks=9)
    assert torch.equal(chunked.token_logprobs, full.token_logprobs)
    chunked.token_logprobs.sum().backward()
    assert torch.allclose(model.lm_head.weight.grad, grad_full, atol=1e-6)
    # The mean negative log-probability is the loss.
    loss = model(ids, labels=labels).loss
    assert torch.allclose(-full.token_logprobs.sum() / (labels[:, 1:] != -100).sum(), loss, atol=1e-6)


def test_lora_with_adapters_disabled_gives_the_base_logits_exactly():
    base = _model(1)
    ids, _ = _batch()
    with torch.no_grad():
        base_logits = base(ids).logits
    tuned = _model(1)
    apply_lora(tuned, LoraConfig(enabled=True, r=4, adapter=True), list(range(301, 318)))
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1)  # as if trained
        assert not torch.allclose(tuned(ids).logits, base_logits, atol=1e-3)
        flags = {n: p.requires_grad for n, p in tuned.named_parameters()}
        with adapters_disabled(tuned):
            assert torch.equal(tuned(ids).logits, base_logits)
        assert {n: p.requires_grad for n, p in tuned.named_parameters()} == flags
        assert not torch.allclose(tuned(ids).logits, base_logits, atol=1e-3)


def test_score_model_from_a_causal_lm_export_and_from_its_own_export(tmp_path):
    lm = _model(2)
    config = lm.config
    save_stepfun(lm.state_dict(), config, tmp_path / "lm")
    score = load_score_model(tmp_path / "lm")
    assert isinstance(score, StepAudio2ForScore) and not hasattr(score, "lm_head")
    # The backbone is the LM's, the head fresh (std 1/sqrt(hidden + 1)), zero bias.
    assert torch.equal(score.model.layers[0].mlp.up_proj.weight, lm.model.layers[0].mlp.up_proj.weight)
    assert score.score.bias.item() == 0.0 and 0.0 < score.score.weight.std().item() < 1.0
    ids, labels = _batch()
    with torch.no_grad():
        scores = score(ids, labels=labels).scores
        hidden, _ = lm.decode(ids)
        assert torch.allclose(scores, score.score(hidden).squeeze(-1), atol=1e-6)
    last = torch.tensor([9, 9, 7])
    assert last_token_scores(scores, last).tolist() == [scores[0, 9].item(), scores[1, 9].item(), scores[2, 7].item()]
    save_stepfun(score.state_dict(), score_config(config), tmp_path / "score")
    assert is_score_folder(tmp_path / "score") and not is_score_folder(tmp_path / "lm")
    again = load_score_model(tmp_path / "score")
    with torch.no_grad():
        assert torch.allclose(again(ids).scores, scores, atol=1e-6)


def test_generate_keeps_the_stop_token_when_asked():
    model = _model(3)
    prompt = torch.randint(0, 290, (2, 5), generator=torch.Generator().manual_seed(0))
    free = generate(model, prompt, max_new_tokens=6)
    stop = free[0][2]
    without = generate(model, prompt, max_new_tokens=6, stop_token_ids=[stop])
    kept = generate(model, prompt, max_new_tokens=6, stop_token_ids=[stop], include_stop=True)
    first = free[0].index(stop)
    assert without[0] == free[0][:first] and kept[0] == free[0][: first + 1]
    for w, k in zip(without, kept):
        assert k[: len(w)] == w and len(k) - len(w) in (0, 1)
