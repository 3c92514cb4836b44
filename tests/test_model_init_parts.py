"""Initialisation from parts against transformers' own producers: a tiny Qwen2ForCausalLM folder, a tiny
Qwen2AudioForConditionalGeneration folder, and a Qwen2-layout tokenizer extended at the release's ids."""
from __future__ import annotations

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (PreTrainedTokenizerFast, Qwen2AudioConfig, Qwen2AudioForConditionalGeneration,
                          Qwen2Config, Qwen2ForCausalLM)

from data import vocab
from data.text_tokenizer import extend_qwen2_tokenizer, first_extension_id, special_ids, stop_token_ids
from model.init_parts import init_from_parts, read_safetensors_folder

torch.set_num_threads(1)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                 "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
QWEN_TEXT_TOKENS = 151643  # Qwen2.5: BPE ids 0..151642, then its 22 specials up to 151664


def qwen_layout_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen2.5's id layout: 151643 text ids (bytes + fillers), then its specials."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    table = {c: i for i, c in enumerate(alphabet)}
    table.update({f"filler{i}": i for i in range(len(table), QWEN_TEXT_TOKENS)})
    bpe = Tokenizer(models.BPE(vocab=table, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS], special_tokens=True)
    return tok


@pytest.fixture(scope="module")
def tok():
    return extend_qwen2_tokenizer(qwen_layout_tokenizer())


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    qwen.save_pretrained(str(root / "qwen"))
    audio_cfg = Qwen2AudioConfig(
        audio_config=dict(d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                          num_mel_bins=128, max_source_positions=1500),
        text_config=dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300))
    audio = Qwen2AudioForConditionalGeneration(audio_cfg)
    audio.save_pretrained(str(root / "audio"))
    return {"root": root, "qwen": qwen.eval(), "audio": audio.eval()}


def test_qwen2_tokenizer_extension_puts_tokens_at_the_reference_ids(tok):
    assert len(tok) == 158258
    ids = special_ids(tok)
    assert {name: tok.convert_tokens_to_ids(name) for name in vocab.SPECIAL_TOKENS} == vocab.REFERENCE_IDS
    assert (ids.first_audio_code, ids.num_audio_codes, ids.audio_pad) == (151696, 6561, 158257)
    assert (ids.eot, ids.tts_pad) == (151665, 151695)
    assert tok.convert_ids_to_tokens([151664, 151666, 151685, 151687, 151691, 151692]) == [
        "<|file_sep|>", "<|step_reserved_151666|>", "<|step_reserved_151685|>", "<|step_reserved_151687|>",
        "<|step_reserved_151691|>", "<|step_reserved_151692|>"]
    assert first_extension_id(tok) == 151665
    assert stop_token_ids(tok) == list(vocab.REFERENCE_EOS_IDS) == [151643, 151645, 151665]
    text = "hi <audio_start><audio_patch><audio_end> <|EOT|><audio_6561>"
    encoded = tok.encode(text, add_special_tokens=False)
    assert encoded[:6] == [71, 72, 220, 151688, 151690, 151689] and encoded[-2:] == [151665, 158257]
    assert tok.decode(encoded) == text


def test_qwen2_tokenizer_extension_rejects_a_wrong_layout():
    small = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab={"a": 0}, merges=[])))
    with pytest.raises(ValueError) as err:
        extend_qwen2_tokenizer(small)
    assert str(err.value) == ("not a Qwen2 tokenizer of the expected layout: '<|endoftext|>' has id None, "
                              "expected 151643")


def test_decoder_rows_are_qwens_and_new_rows_follow_their_statistics(tok, parts):
    model = init_from_parts(parts["root"] / "qwen", parts["root"] / "audio", tok).eval()
    assert model.config.vocab_size == 158720 and model.config.audio_patch_token_id == 151690
    qwen_state = parts["qwen"].state_dict()
    ours = model.state_dict()
    for name, tensor in qwen_state.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert ours[name].shape == (158720, 32)
            assert torch.equal(ours[name][:151665], tensor[:151665]), name
            kept, new = tensor[:151665], ours[name][151665:]
            assert new.abs().min() > 0  # drawn, not zeros
            assert torch.allclose(new.mean(0), kept.mean(0), atol=4 * kept.std(0).max().item() / 80)
            assert torch.allclose(new.std(0), kept.std(0), rtol=0.05)
        else:
            assert torch.equal(ours[name], tensor), name
    # Same decoder, same text logits: the new rows only add columns.
    ids = torch.randint(0, 151665, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = parts["qwen"](ids).logits
        mine = model(ids).logits
    assert torch.allclose(mine[..., :151665], theirs[..., :151665], atol=1e-5)


def test_encoder_tensors_map_and_the_output_equals_transformers(tok, parts):
    model = init_from_parts(parts["root"] / "qwen", parts["root"] / "audio", tok).eval()
    tower = parts["audio"].model.audio_tower if hasattr(parts["audio"], "model") else parts["audio"].audio_tower
    stored = read_safetensors_folder(parts["root"] / "audio")
    assert torch.equal(model.encoder.blocks[1].attn.key.weight, stored["audio_tower.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(model.encoder.blocks[0].mlp[2].bias, stored["audio_tower.layers.0.fc2.bias"])
    assert torch.equal(model.encoder.after_norm.weight, stored["audio_tower.layer_norm.weight"])
    assert torch.equal(model.encoder.positional_embedding.weight, stored["audio_tower.embed_positions.weight"])
    assert not model.encoder.positional_embedding.weight.requires_grad
    mel = torch.randn(1, 128, 3000, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, valid = model.encoder(mel, torch.tensor([3000]))
        plain = tower(mel).last_hidden_state
        # StepFun's encoder (ours) lets conv2 frame j attend only while j < ceil((F - 2) / 2): for a full
        # 3000-frame chunk the last of 1500 frames is no key. Given that mask, transformers agrees exactly
        # (both pool then norm).
        mask = torch.zeros(1, 1, 1500, 1500)
        mask[..., 1499] = torch.finfo(torch.float32).min
        masked = tower(mel, attention_mask=mask).last_hidden_state
    assert ours.shape == plain.shape == (1, 750, 16) and valid.tolist() == [749]
    assert torch.allclose(ours, masked, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)


def test_a_preset_that_disagrees_with_the_folders_is_named(tok, parts):
    with pytest.raises(ValueError, match=r"config audio_encoder_config.n_audio_state=32 but the part folders have 16"):
        init_from_parts(parts["root"] / "qwen", parts["root"] / "audio", tok, config="tiny")
