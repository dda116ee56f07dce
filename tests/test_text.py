"""The frozen text encoder: loads offline, token-level states, lengths, truncation, stand-ins."""

import json
import socket

import pytest
import torch

from ldm.text import MAX_TOKENS, TextEncoder, default_encoder_path, pad_context


@pytest.fixture(scope="module")
def encoder():
    def refuse(*args, **kwargs):
        raise OSError("network access during text-encoder loading")

    with pytest.MonkeyPatch.context() as mp:  # any attempt to reach a hub fails loudly
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield TextEncoder()


def test_default_encoder_loads_offline_and_matches_transformers(encoder):
    from transformers import AutoModel, AutoTokenizer

    assert encoder.width == 384
    prompts = ["a small red circle in the top left on a blue background", "a square", ""]
    context, lengths = encoder.encode(prompts)
    tok = AutoTokenizer.from_pretrained(default_encoder_path(), local_files_only=True)
    ref_model = AutoModel.from_pretrained(default_encoder_path(), local_files_only=True).eval()
    batch = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = ref_model(**batch).last_hidden_state
    assert context.shape == (3, batch["input_ids"].shape[1], 384)
    assert lengths.tolist() == batch["attention_mask"].sum(1).tolist()
    assert lengths[2] == 2  # the empty prompt keeps its [CLS] and [SEP] tokens
    torch.testing.assert_close(context, ref)


def test_valid_tokens_do_not_depend_on_batch_padding(encoder):
    alone, n = encoder.encode(["a green triangle"])
    batched, lengths = encoder.encode(["a green triangle", "a large yellow diamond in the bottom right corner"])
    assert lengths[0] == n[0] < lengths[1]
    torch.testing.assert_close(batched[0, : n[0]], alone[0, : n[0]], atol=1e-5, rtol=1e-5)


def test_long_prompts_are_truncated_with_a_warning(encoder):
    with pytest.warns(UserWarning, match=f"exceed {MAX_TOKENS} tokens"):
        context, lengths = encoder.encode(["red " * 120, "blue"])
    assert context.shape[1] == MAX_TOKENS and lengths.tolist()[0] == MAX_TOKENS


def test_a_local_clip_text_model_stands_in(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), pad_token="<|endoftext|>")
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=MAX_TOKENS, pad_token_id=1,
                            bos_token_id=0, eos_token_id=1)
    CLIPTextModel(config).save_pretrained(tmp_path / "sd" / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "sd" / "tokenizer")  # diffusers layout: tokenizer beside the encoder

    enc = TextEncoder(tmp_path / "sd" / "text_encoder", pad_to_max=True, mask_padding=False)
    context, lengths = enc.encode(["a red circle", ""])
    assert enc.width == 32 and context.shape == (2, MAX_TOKENS, 32)
    assert lengths.tolist() == [MAX_TOKENS, MAX_TOKENS]


def test_bad_folder_and_bad_prompts(tmp_path, encoder):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        TextEncoder(tmp_path)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        encoder.encode([])


def test_pad_context():
    a, b = torch.randn(3, 4), torch.randn(5, 4)
    out = pad_context([a, b], 6)
    assert out.shape == (2, 6, 4)
    assert torch.equal(out[0, :3], a) and torch.equal(out[1, :5], b)
    assert out[0, 3:].abs().sum() == 0
