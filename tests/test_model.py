"""The Step-Audio 2 model on tiny sizes: config, encoder lengths and masking, splicing, loss, generation."""
from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import model.lalm as lalm
from data.features import num_audio_tokens
from model.config import StepAudio2Config, preset_config
from model.encoder import sinusoids
from model.generate import greedy_generate
from model.lalm import StepAudio2ForCausalLM

torch.set_num_threads(1)
PATCH = 511  # the tiny preset's <audio_patch>: the last id of its 512-token vocabulary


def tiny_model(seed: int = 0, **kwargs) -> StepAudio2ForCausalLM:
    torch.manual_seed(seed)
    return StepAudio2ForCausalLM(preset_config("tiny"), **kwargs)


def audio_batch(frames, seed: int = 0):
    """Zero-padded random mels for chunks of the given frame counts, and their lengths."""
    gen = torch.Generator().manual_seed(seed)
    mels = torch.zeros(len(frames), 128, max(frames))
    for i, f in enumerate(frames):
        mels[i, :, :f] = torch.randn(128, f, generator=gen)
    return mels, torch.tensor(frames)


def asr_batch(seed: int = 0):
    """Two samples: a text prefix, the audio patches, then labelled text (lengths differ, right padded)."""
    gen = torch.Generator().manual_seed(seed)
    frames = [150, 97]  # 19 and 12 audio tokens
    mels, mel_lengths = audio_batch(frames, seed)
    rows = []
    for f, n_text in zip(frames, (12, 7)):
        prefix = torch.randint(0, 500, (3,), generator=gen)
        text = torch.randint(0, 500, (n_text,), generator=gen)
        rows.append((prefix, torch.full((num_audio_tokens(f),), PATCH), text))
    T = max(sum(len(p) for p in r) for r in rows)
    input_ids = torch.zeros(2, T, dtype=torch.long)
    labels = torch.full((2, T), -100)
    attention_mask = torch.zeros(2, T, dtype=torch.long)
    for i, (prefix, patches, text) in enumerate(rows):
        seq = torch.cat([prefix, patches, text])
        input_ids[i, :len(seq)] = seq
        attention_mask[i, :len(seq)] = 1
        labels[i, len(seq) - len(text):len(seq)] = text
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, mels=mels,
                mel_lengths=mel_lengths)


# ---- config ---------------------------------------------------------------------------------------

def test_config_round_trip_keeps_unknown_keys_and_writes_patch_id_only_when_not_default():
    release = preset_config("mini").to_dict()
    assert "audio_patch_token_id" not in release
    assert release["model_type"] == "step_audio_2" and release["architectures"] == ["StepAudio2ForCausalLM"]
    release["transformers_version"] = "4.49.0"
    release["audio_encoder_config"]["future_key"] = [1, 2]
    release["text_config"]["bos_token_id"] = 151643
    again = StepAudio2Config.from_dict(copy.deepcopy(release)).to_dict()
    assert again == release
    tiny = preset_config("tiny").to_dict()
    assert tiny["audio_patch_token_id"] == PATCH
    assert StepAudio2Config.from_dict(tiny).audio_patch_token_id == PATCH
    assert preset_config("mini").qwen2_config().rope_parameters["rope_theta"] == 1e6


def test_config_errors_name_the_key():
    d = preset_config("tiny").to_dict()
    del d["audio_encoder_config"]["n_audio_head"]
    with pytest.raises(ValueError, match=r"missing required key 'audio_encoder_config.n_audio_head'"):
        StepAudio2Config.from_dict(d)
    d = preset_config("tiny").to_dict()
    del d["text_config"]
    with pytest.raises(ValueError, match=r"missing required key 'text_config'"):
        StepAudio2Config.from_dict(d)
    with pytest.raises(ValueError, match=r"unknown model preset 'huge'; valid presets: \['demo', 'mini', 'tiny'\]"):
        preset_config("huge")
    with pytest.raises(ValueError, match=r"audio_patch_token_id=600 is outside the vocabulary \[0, 512\)"):
        preset_config("tiny", audio_patch_token_id=600)


def test_config_is_an_omegaconf_structured_config():
    schema = OmegaConf.structured(StepAudio2Config)
    assert schema.audio_encoder_config.n_audio_state == 1280
    demo = OmegaConf.structured(preset_config("demo"))
    merged = OmegaConf.merge(demo, OmegaConf.from_dotlist(["audio_encoder_config.n_audio_layer=2"]))
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, StepAudio2Config) and obj.audio_encoder_config.n_audio_layer == 2
    assert obj.text_config == preset_config("demo").text_config
    with pytest.raises(Exception, match="n_audio_layrs"):
        OmegaConf.merge(schema, OmegaConf.from_dotlist(["audio_encoder_config.n_audio_layrs=2"]))


# ---- encoder and adapter --------------------------------------------------------------------------

def test_positional_embedding_is_whisper_sinusoids_and_frozen():
    m = tiny_model()
    table = m.encoder.positional_embedding.weight
    assert not table.requires_grad
    assert torch.equal(table, sinusoids(1500, 32))
    assert table[0, :16].abs().max() == 0 and torch.all(table[0, 16:] == 1)


def test_audio_token_counts_match_the_frontend_for_every_frame_count():
    m = tiny_model().eval()
    frames = list(range(20, 400))
    with torch.no_grad():
        feats, lengths = m.encode_audio(*audio_batch(frames))
    assert lengths.tolist() == [num_audio_tokens(f) for f in frames]
    assert feats.shape == (len(frames), 50, 64)  # the 399-frame chunk has 50 tokens


def test_padding_with_a_longer_chunk_does_not_change_a_chunks_features():
    m = tiny_model().eval()
    frames = [37, 38, 39, 40, 41, 42, 100, 101, 102, 103]
    mels, lengths = audio_batch(frames + [257])
    with torch.no_grad():
        batched, n_batched = m.encode_audio(mels, lengths)
        for i, f in enumerate(frames):
            alone, n_alone = m.encode_audio(mels[i:i + 1, :, :f], lengths[i:i + 1])
            n = num_audio_tokens(f)
            assert n_alone.item() == n_batched[i].item() == n
            assert torch.allclose(batched[i, :n], alone[0, :n], atol=1e-5), f


def _reference_encoder(enc, mels_BMT, mel_lengths_B):
    """The released forward, written out: additive -1e10 key bias on conv2 frames (T+1)%2::2 of
    x_len = F - 2, no zeroing anywhere (exact only for an unpadded chunk)."""
    T = mels_BMT.shape[-1]
    x = F.gelu(enc.conv2(F.gelu(enc.conv1(mels_BMT)))).transpose(1, 2)
    x_len = mel_lengths_B - 2
    keep = torch.arange(T)[None, :] < x_len[:, None]
    bias = (1.0 - keep[:, (T + 1) % 2::2].float()) * -1e10
    x = x + enc.positional_embedding.weight[:x.shape[1]]
    for blk in enc.blocks:
        h = blk.attn_ln(x)
        B, L, C = h.shape
        q, k, v = (p(h).view(B, L, blk.attn.n_head, -1).transpose(1, 2)
                   for p in (blk.attn.query, blk.attn.key, blk.attn.value))
        w = torch.softmax(q @ k.transpose(-1, -2) / (C // blk.attn.n_head) ** 0.5 + bias[:, None, None, :], -1)
        x = x + blk.attn.out((w @ v).transpose(1, 2).reshape(B, L, C))
        x = x + blk.mlp(blk.mlp_ln(x))
    x = enc.after_norm(F.avg_pool1d(x.transpose(1, 2), 2, 2).transpose(1, 2))
    return x, (x_len + 1) // 2 // 2


@pytest.mark.parametrize("frames", [37, 38, 39, 40, 203])
def test_encoder_equals_the_reference_forward_for_a_lone_chunk(frames):
    m = tiny_model().eval()
    mels, lengths = audio_batch([frames], seed=frames)
    with torch.no_grad():
        ours, n_ours = m.encoder(mels, lengths)
        ref, n_ref = _reference_encoder(m.encoder, mels, lengths)
    assert n_ours.tolist() == n_ref.tolist()
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-5)


# ---- splicing, loss, training ---------------------------------------------------------------------

def test_splice_count_mismatch_names_both_numbers():
    m = tiny_model()
    batch = asr_batch()
    batch["input_ids"][0, 3] = 7  # one audio patch row fewer than the audio gives
    with pytest.raises(ValueError) as err:
        m(**batch)
    assert str(err.value) == ("audio patch count mismatch: input_ids hold 30 audio patch rows (id 511) "
                              "but the audio gives 31 adapter outputs (per chunk [19, 12])")


def test_spliced_rows_carry_the_adapter_outputs():
    m = tiny_model().eval()
    batch = asr_batch()
    captured = {}
    m.model.register_forward_pre_hook(lambda mod, args, kwargs: captured.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        m(**batch)
        feats, lengths = m.encode_audio(batch["mels"], batch["mel_lengths"])
    embeds = captured["inputs_embeds"]
    rows = embeds[batch["input_ids"] == PATCH]
    assert torch.equal(rows, torch.cat([feats[0, :19], feats[1, :12]]))
    assert torch.equal(embeds[0, 0], m.model.embed_tokens.weight[batch["input_ids"][0, 0]])


def test_forward_backward_reaches_encoder_adapter_and_decoder():
    m = tiny_model()
    m.requires_grad_(True)
    m.encoder.positional_embedding.weight.requires_grad_(False)
    out = m(**asr_batch())
    assert out.logits is None and out.num_label_tokens == 12 + 7
    assert torch.isfinite(out.loss) and 5.0 < out.loss.item() < 8.0  # about ln(512) at init
    out.loss.backward()
    for name in ("encoder.conv1.weight", "encoder.blocks.1.attn.key.weight", "encoder.after_norm.weight",
                 "adapter.conv.weight", "adapter.linear2.weight", "model.embed_tokens.weight",
                 "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        grad = m.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert m.encoder.positional_embedding.weight.grad is None


def test_text_only_training_step_still_touches_every_parameter():
    m = tiny_model()
    batch = asr_batch()
    ids = torch.randint(0, 500, (2, 10))
    loss_train = m(ids, labels=ids).loss
    loss_train.backward()
    assert m.encoder.conv1.weight.grad is not None and m.encoder.conv1.weight.grad.abs().sum() == 0
    assert m.adapter.linear2.weight.grad.abs().sum() == 0
    with torch.no_grad():
        loss_eval = m.eval()(ids, labels=ids).loss
    assert torch.allclose(loss_train, loss_eval, atol=1e-6)
    with pytest.raises(ValueError, match="input_ids hold 31 audio patch rows .* but no mels were given"):
        m(batch["input_ids"])


def test_chunked_loss_equals_full_logits_cross_entropy(monkeypatch):
    monkeypatch.setattr(lalm, "LOSS_CHUNK_ROWS", 5)  # 20 labelled rows -> 4 checkpointed chunks
    m = tiny_model()
    m.requires_grad_(True)
    batch = asr_batch()
    chunked = m(**batch).loss
    grads_chunked = torch.autograd.grad(chunked, list(m.parameters()), allow_unused=True)
    plain = {k: v for k, v in batch.items() if k != "labels"}
    logits = m(**plain).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], 512)
    naive = F.cross_entropy(logits[:, :-1].reshape(-1, 512), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    grads_naive = torch.autograd.grad(naive, list(m.parameters()), allow_unused=True)
    assert abs(chunked.item() - naive.item()) < 1e-5
    for (name, _), g_c, g_n in zip(m.named_parameters(), grads_chunked, grads_naive):
        assert (g_c is None) == (g_n is None), name
        if g_c is not None:
            assert torch.allclose(g_c, g_n, atol=1e-5, rtol=1e-4), name


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    batch = asr_batch()
    results = []
    for flag in (False, True, ["encoder"], ["decoder"]):
        m = tiny_model(seed=3, gradient_checkpointing=flag)
        assert m.encoder.gradient_checkpointing == (flag is True or "encoder" in (flag or []))
        assert m.model.is_activation_checkpointing == (flag is True or "decoder" in (flag or []))
        m.requires_grad_(True)
        loss = m(**batch).loss
        loss.backward()
        results.append((loss.detach(), m.encoder.conv1.weight.grad, m.model.layers[0].mlp.up_proj.weight.grad))
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0])
        assert torch.allclose(results[0][1], other[1], atol=1e-6)
        assert torch.allclose(results[0][2], other[2], atol=1e-6)
    with pytest.raises(ValueError, match="expected encoder and/or decoder"):
        tiny_model(gradient_checkpointing=["adapter"])


def test_overfitting_one_batch_drives_the_loss_down_by_90_percent():
    m = tiny_model(seed=1)
    batch = asr_batch(seed=1)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(60):
        loss = m(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::10]


# ---- size and generation --------------------------------------------------------------------------

def test_mini_parameter_count_on_the_meta_device():
    with torch.device("meta"):
        m = StepAudio2ForCausalLM(preset_config("mini"))
    count = sum(p.numel() for p in m.parameters())
    assert count == 8_315_179_264
    assert 8.2e9 < count < 8.4e9


def test_cached_greedy_generation_equals_an_uncached_argmax_loop():
    m = tiny_model(seed=5).eval()
    mels, lengths = audio_batch([120, 64], seed=5)
    n = sum(num_audio_tokens(f) for f in (120, 64))
    prompt = torch.cat([torch.tensor([5, 6]), torch.full((n,), PATCH), torch.tensor([9])])[None]
    ids, expected = prompt, []
    with torch.no_grad():
        for _ in range(12):
            token = int(m(ids, mels=mels, mel_lengths=lengths).logits[0, -1].argmax())
            expected.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert greedy_generate(m, prompt, mels, lengths, max_new_tokens=12) == expected
    stop = expected[7]
    first_stop = expected.index(stop)
    assert greedy_generate(m, prompt, mels, lengths, max_new_tokens=12, stop_token_ids=[stop]) == \
        expected[:first_stop]


_ZERO_INIT_SCRIPT = textwrap.dedent("""
    import json, torch, torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    import deepspeed
    from model.config import preset_config
    from model.encoder import sinusoids
    from model.lalm import StepAudio2ForCausalLM
    zero3 = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    with deepspeed.zero.Init(config_dict_or_path=zero3):
        m = StepAudio2ForCausalLM(preset_config("tiny"))
    table = m.encoder.positional_embedding.weight
    with deepspeed.zero.GatheredParameters([table]):
        sinusoidal = torch.equal(table, sinusoids(1500, 32))
    print(json.dumps({"shapes": {n: list(p.ds_shape) for n, p in m.named_parameters()},
                      "partitioned": table.numel() == 0, "sinusoidal": sinusoidal}))
""")


def test_the_model_builds_under_deepspeed_zero_init():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", OMP_NUM_THREADS="1", PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", _ZERO_INIT_SCRIPT], env=env, cwd=root, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["partitioned"] and result["sinusoidal"]
    plain = {n: list(p.shape) for n, p in tiny_model().named_parameters()}
    assert result["shapes"] == plain


def _content_share(encoder, mels_NMF):
    """Share of the encoder output's energy that differs between inputs (the rest is position)."""
    with torch.no_grad():
        out_NTC, _ = encoder(mels_NMF, torch.full((mels_NMF.shape[0],), mels_NMF.shape[2]))
    return (out_NTC.std(0).pow(2).mean() / out_NTC.pow(2).mean()).item()


def test_fresh_encoder_output_carries_the_audio_not_only_its_position():
    # With PyTorch's default conv init the sinusoidal table drowns the audio (<5% of the energy) and a
    # from-scratch model never learns to listen; the frontend init must keep the content audible.
    from model.encoder import AudioEncoder, FrontendConv
    torch.manual_seed(0)
    mels = torch.randn(6, 128, 200) * 0.5 + 0.3  # the log-mel frontend's typical range
    encoder = AudioEncoder(128, 1500, 64, 2, 2)
    assert isinstance(encoder.conv1, FrontendConv) and isinstance(encoder.conv2, FrontendConv)
    assert torch.equal(encoder.conv1.bias, torch.zeros(64))
    assert _content_share(encoder, mels) > 0.3
    for conv in (encoder.conv1, encoder.conv2):
        torch.nn.Conv1d.reset_parameters(conv)
    assert _content_share(encoder, mels) < 0.05


def test_attention_switch_resolves_here_and_kernels_agree():
    from model.lalm import StepAudio2ForCausalLM, resolve_attention
    assert resolve_attention("auto") == "varlen_sdpa"  # no GPU, no flash_attn on this machine
    with pytest.raises(ValueError, match="attention='flash_attention_2' is not usable here: no CUDA device"):
        resolve_attention("flash_attention_2")
    with pytest.raises(ValueError, match=r"attention='flash': expected one of"):
        resolve_attention("flash")
    config = preset_config("tiny")
    torch.manual_seed(0)
    sdpa = StepAudio2ForCausalLM(config, attention="sdpa").eval()
    eager = StepAudio2ForCausalLM(config, attention="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 500, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        a = sdpa(ids, attention_mask=mask).logits
        b = eager(ids, attention_mask=mask).logits
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1, :9], b[1, :9], atol=1e-5)


def _fake_flash(monkeypatch, usable: bool, why: str = "flash_attn 2.8.3"):
    import model.lalm as lalm
    monkeypatch.setattr(lalm, "flash_attention_status", lambda: (usable, why))


def test_auto_attention_picks_flash_only_in_half_precision(monkeypatch, caplog):
    from model.lalm import resolve_attention
    _fake_flash(monkeypatch, True)
    with caplog.at_level("INFO", logger="model.lalm"):
        assert resolve_attention("auto", torch.bfloat16) == "flash_attention_2"
        assert resolve_attention("auto", torch.float16) == "flash_attention_2"
        # fp32, the default precision: flash-attention would reject it at the first forward.
        assert resolve_attention("auto", torch.float32) == "varlen_sdpa"
    assert "decoder attention: flash_attention_2 (flash_attn 2.8.3)" in caplog.text
    assert "decoder attention: varlen_sdpa (flash-attention needs bf16/fp16, the model computes in torch.float32)" \
        in caplog.text
    with pytest.raises(ValueError, match=r"needs bf16 or fp16, the model computes in torch.float32 "
                                         r"\(set engine.precision=bf16"):
        resolve_attention("flash_attention_2", torch.float32)
    assert resolve_attention("flash_attention_2", torch.bfloat16) == "flash_attention_2"


def test_broken_flash_build_is_reported_not_used(monkeypatch, caplog):
    """flash_attn's Python part imports but its compiled kernel does not (a wheel for another torch)."""
    import importlib.machinery
    import sys
    import types

    import model.lalm as lalm
    fake = types.ModuleType("flash_attn")
    fake.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    # Importing the kernel raises like a mismatched build does.
    monkeypatch.setitem(sys.modules, "flash_attn_2_cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    lalm.flash_attention_status.cache_clear()
    try:
        usable, why = lalm.flash_attention_status()
        assert not usable
        assert why.startswith("flash_attn is installed but its kernel does not load (ModuleNotFoundError:")
        with caplog.at_level("INFO", logger="model.lalm"):
            assert lalm.resolve_attention("auto", torch.bfloat16) == "varlen_sdpa"
        assert "decoder attention: varlen_sdpa (flash-attention not used: flash_attn is installed but its kernel" \
            in caplog.text
        with pytest.raises(ValueError, match="is not usable here: flash_attn is installed but its kernel"):
            lalm.resolve_attention("flash_attention_2", torch.bfloat16)
    finally:
        lalm.flash_attention_status.cache_clear()
