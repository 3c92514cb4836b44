"""Batched, sampled generation on the tiny model with audio prompts, and splitting a TA4 stream."""
from __future__ import annotations

import pytest
import torch

from data.features import num_audio_tokens
from model.config import preset_config
from model.generate import generate, greedy_generate, split_ta4
from model.lalm import StepAudio2ForCausalLM

torch.set_num_threads(1)
PATCH = 511


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(5)
    return StepAudio2ForCausalLM(preset_config("tiny")).eval()


def prompt(frames, text, seed):
    gen = torch.Generator().manual_seed(seed)
    mels = torch.zeros(1, 128, frames)
    mels[0] = torch.randn(128, frames, generator=gen)
    ids = torch.cat([torch.tensor(text[:2]), torch.full((num_audio_tokens(frames),), PATCH), torch.tensor(text[2:])])
    return ids, mels, torch.tensor([frames])


def left_pad(prompts):
    """One left-padded batch (ids, mask, mels, mel_lengths) of (ids, mels, lengths) prompts."""
    T = max(len(p[0]) for p in prompts)
    F = max(p[1].shape[-1] for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    mels = torch.zeros(len(prompts), 128, F)
    for i, (p_ids, p_mels, _) in enumerate(prompts):
        ids[i, T - len(p_ids):] = p_ids
        mask[i, T - len(p_ids):] = 1
        mels[i, :, :p_mels.shape[-1]] = p_mels[0]
    return ids, mask, mels, torch.cat([p[2] for p in prompts])


PROMPTS = [((120, [5, 6, 9]), 1), ((64, [7, 8, 10, 11, 12, 13]), 2), ((203, [3, 4, 1]), 3)]


def test_a_left_padded_batch_generates_what_each_prompt_generates_alone(model):
    prompts = [prompt(f, t, s) for (f, t), s in PROMPTS]
    alone = [greedy_generate(model, p[0][None], p[1], p[2], max_new_tokens=10) for p in prompts]
    ids, mask, mels, lengths = left_pad(prompts)
    assert mask[:, 0].tolist() == [0, 0, 1]  # rows really are padded differently
    assert generate(model, ids, mask, mels, lengths, max_new_tokens=10) == alone
    # A stop token ends only its own row.
    stop = alone[0][4]
    stopped = generate(model, ids, mask, mels, lengths, max_new_tokens=10, stop_token_ids=[stop])
    assert stopped == [row[:row.index(stop)] if stop in row else row for row in alone]


def test_seeded_sampling_repeats_and_narrow_settings_reduce_to_greedy(model):
    p_ids, mels, lengths = prompt(120, [5, 6, 9], 1)
    greedy = generate(model, p_ids[None], mels=mels, mel_lengths=lengths, max_new_tokens=12)

    def sample(seed, **kwargs):
        return generate(model, p_ids[None], mels=mels, mel_lengths=lengths, max_new_tokens=12,
                        generator=torch.Generator().manual_seed(seed), **kwargs)

    assert sample(0, temperature=1.0) == sample(0, temperature=1.0)
    assert sample(0, temperature=1.0) != sample(1, temperature=1.0)
    assert sample(0, temperature=1.0, top_p=1e-6) == greedy  # the nucleus is the top token alone
    assert sample(0, temperature=1e-4) == greedy
    with pytest.raises(ValueError, match=r"top_p must lie in \(0, 1\], got 0.0"):
        sample(0, temperature=1.0, top_p=0.0)


def test_top_p_draws_only_from_the_nucleus():
    from model.generate import _pick
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([_pick(logits, 1.0, 0.7, gen) for _ in range(400)]).flatten()
    assert set(draws.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7; 2 and 3 are outside
    share = (draws == 0).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.08


def test_split_ta4_follows_the_reference_rule():
    # <tts_start> t1 a a a a t2 a a <audio_pad> <audio_pad> <tts_pad> a a a a <tts_end>
    stream = [151693, 1000, 151696, 151697, 158256, 151700, 2000, 151701, 151702, 158257, 158257,
              151695, 151703, 151704, 151705, 151706, 151694]
    text, codes = split_ta4(stream, audio_start_id=151688, first_audio_code_id=151696, num_audio_codes=6561)
    assert text == [1000, 2000]
    assert codes == [0, 1, 6560, 4, 5, 6, 7, 8, 9, 10]


def test_audio_patch_is_never_generated(model):
    # Bias the output layer so <audio_patch> would win every greedy step; generation must pick the runner-up.
    patch = model.config.audio_patch_token_id
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        saved = model.lm_head.weight[patch].clone()
        runner_up = model(ids).logits[0, -1].argmax().item()
        model.lm_head.weight[patch] = 50.0 * model.model.norm(model.model.embed_tokens(ids))[0, -1]
        try:
            assert model(ids).logits[0, -1].argmax().item() == patch
            new = generate(model, ids, max_new_tokens=4)[0]
        finally:
            model.lm_head.weight[patch] = saved
    assert patch not in new and len(new) == 4
    assert new[0] == runner_up


def reference_generate(model, ids, mask, mels, lengths, max_new_tokens, stops):
    """Greedy decoding the straightforward way: one row at a time on the host, every step."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(ids, attention_mask=mask, mels=mels, mel_lengths=lengths, position_ids=positions, use_cache=True)
    next_pos = positions[:, -1:] + 1
    new, done = [[] for _ in range(ids.shape[0])], [False] * ids.shape[0]
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].clone()
        logits[:, PATCH] = float("-inf")
        token = logits.argmax(-1)
        for b in range(ids.shape[0]):
            done[b] = done[b] or int(token[b]) in stops
            if not done[b]:
                new[b].append(int(token[b]))
        if all(done):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(token[:, None], attention_mask=mask, position_ids=next_pos, past_key_values=out.past_key_values,
                    use_cache=True)
        next_pos = next_pos + 1
    return new


class CountingForwards(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.calls = model, model.config, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


def test_rows_that_stop_at_different_steps_match_a_per_token_reference(model):
    ids, mask, mels, lengths = left_pad([prompt(f, t, s) for (f, t), s in PROMPTS])
    free = generate(model, ids, mask, mels, lengths, max_new_tokens=12)
    # Stop tokens taken from the free-running rows (each first occurs there): rows 0 and 1 end at steps 7
    # and 5, row 2 never.
    stops = [free[0][7], free[1][5]]
    expected = reference_generate(model, ids, mask, mels, lengths, 12, stops)
    assert expected == [row[:min([row.index(s) for s in stops if s in row] + [12])] for row in free]
    assert [len(row) for row in expected] == [7, 5, 12], expected
    for every in (1, 3, 8, 64):
        counted = CountingForwards(model)
        assert generate(counted, ids, mask, mels, lengths, max_new_tokens=12, stop_token_ids=stops,
                        stop_check_every=every) == expected
    # Every row stopping early: with a check every step, decoding ends right after the last stop; with a
    # check interval beyond the steps needed, it runs all 12 steps and the extra tokens are dropped.
    early = [free[0][1], free[1][3], free[2][4]]
    expected = reference_generate(model, ids, mask, mels, lengths, 12, early)
    assert [len(row) for row in expected] == [1, 3, 4], expected
    forwards = {}
    for every in (1, 16):
        counted = CountingForwards(model)
        assert generate(counted, ids, mask, mels, lengths, max_new_tokens=12, stop_token_ids=early,
                        stop_check_every=every) == expected
        forwards[every] = counted.calls
    last_stop = max(len(row) for row in expected)  # the step (0-based) at which the last row stopped
    assert forwards == {1: 1 + last_stop, 16: 12}  # the prefill, then one forward per step that continued
    with pytest.raises(ValueError, match="stop_check_every must be >= 1, got 0"):
        generate(model, ids, mask, mels, lengths, stop_check_every=0)
