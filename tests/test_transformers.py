"""The Hugging Face transformers backend (anchor_ext.integrations.transformers).

Tiny random Llama models (fast, no files) check the routing: prefill sparse, decode
dense, padding, short prompts, GQA (2 kv heads for 4 q heads, never repeated). The real
SmolLM2-135M checks are in test_real_model.py.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import anchor_ext  # noqa: E402
from anchor_ext.integrations import transformers as anchor_hf  # noqa: E402

# CPU geometry small enough that a few hundred tokens have middle regions (stripes).
SMALL = dict(block_size=32, step=2, path="sparse")  # CPU auto would run these short inputs dense


def tiny_llama(seed=0):
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=2048,
                                      rope_theta=10000.0)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    return model


def logits(model, impl, input_ids, attention_mask=None):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


def test_register_rejects_unknown_options():
    with pytest.raises(TypeError, match=r"unexpected options \['window'\]"):
        anchor_hf.register("anchor_bad", window=3)


def test_keeping_every_key_equals_sdpa_and_sparse_differs():
    """theta=1e9 keeps every middle key: the model's logits equal SDPA's. A small theta
    drops keys (sparse), which must change them: the backend really runs anchor_ext."""
    model = tiny_llama()
    ids = torch.randint(0, 300, (1, 400), generator=torch.Generator().manual_seed(1))
    dense = logits(model, "sdpa", ids)
    name = anchor_hf.register("anchor_all", theta=1e9, **SMALL)
    anchor_hf.prefill_calls.pop(name, None)
    torch.testing.assert_close(logits(model, name, ids), dense, rtol=1e-4, atol=1e-4)
    assert anchor_hf.prefill_calls[name] == {"prefill": 2}  # one sparse prefill per layer
    sparse = logits(model, anchor_hf.register("anchor_drop", theta=-1e9, **SMALL), ids)
    assert (sparse - dense).abs().max() > 1e-3


def test_generate_decodes_dense_after_sparse_prefill():
    model = tiny_llama(seed=2)
    ids = torch.randint(0, 300, (1, 300), generator=torch.Generator().manual_seed(3))
    model.set_attn_implementation("sdpa")
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)
    name = anchor_hf.register("anchor_gen", theta=1e9, **SMALL)
    anchor_hf.prefill_calls.pop(name, None)
    model.set_attn_implementation(name)
    got = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, expected)
    calls = anchor_hf.prefill_calls[name]
    assert calls["prefill"] == 2 and calls["decode"] == 2 * 7  # 2 layers; 7 decode steps


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_runs_each_sequence_on_its_tokens(side):
    """A padded batch gives, on each sequence's tokens, the logits of that sequence alone."""
    model = tiny_llama(seed=4)
    gen = torch.Generator().manual_seed(5)
    lengths = [300, 180]
    width = max(lengths)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    singles = []
    for b, n in enumerate(lengths):
        seq = torch.randint(1, 300, (n,), generator=gen)
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[b, cols], mask[b, cols] = seq, 1
        singles.append((cols, seq))
    name = anchor_hf.register("anchor_pad", theta=4.0, **SMALL)
    anchor_hf.prefill_calls.pop(name, None)
    batched = logits(model, name, ids, mask)
    assert anchor_hf.prefill_calls[name].get("prefill_padded") == 2
    for b, (cols, seq) in enumerate(singles):
        # Left padding shifts the absolute positions; RoPE scores depend only on i - j,
        # so the logits still match up to rounding.
        alone = logits(model, name, seq[None])
        torch.testing.assert_close(batched[b, cols], alone[0], rtol=2e-4, atol=2e-4)


def test_short_prompts_and_non_padding_masks_run_dense():
    model = tiny_llama(seed=6)
    name = anchor_hf.register("anchor_short", **SMALL)
    anchor_hf.prefill_calls.pop(name, None)
    ids = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(logits(model, name, ids), logits(model, "sdpa", ids), rtol=1e-5, atol=1e-5)
    assert anchor_hf.prefill_calls[name] == {"short": 2}
    # A mask with a hole in the middle is not padding: dense, with a warning.
    ids = torch.randint(0, 300, (1, 100), generator=torch.Generator().manual_seed(8))
    mask = torch.ones(1, 100, dtype=torch.long)
    mask[0, 40:45] = 0
    with pytest.warns(UserWarning, match="not causal attention with left or right padding"):
        got = logits(model, name, ids, mask)
    torch.testing.assert_close(got, logits(model, "sdpa", ids, mask), rtol=1e-5, atol=1e-5)


def test_only_exact_causal_padding_masks_are_sliced():
    n = 8
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    left = causal & (torch.arange(n) >= 3)  # 3 padding tokens on the left
    assert anchor_hf._valid_key_ranges(left[None, None], n) == [(3, 8)]
    right = causal & (torch.arange(n) < 5)
    assert anchor_hf._valid_key_ranges(right[None, None], n) == [(0, 5)]
    packed = causal.clone()
    packed[3:, :3] = False  # two packed sequences, 3 + 5 tokens: same last row as `left`
    assert anchor_hf._valid_key_ranges(packed[None, None], n) is None
    window = causal & (torch.arange(n)[:, None] - torch.arange(n)[None, :] < 3)
    assert anchor_hf._valid_key_ranges(window[None, None], n) is None


def test_skeleton_method_through_the_backend():
    model = tiny_llama(seed=9)
    ids = torch.randint(0, 300, (1, 300), generator=torch.Generator().manual_seed(10))
    name = anchor_hf.register("anchor_skel", method="skeleton", rope_base=10000.0,
                              granularity="key", **SMALL)
    anchor_hf.prefill_calls.pop(name, None)
    got = logits(model, name, ids)
    assert anchor_hf.prefill_calls[name] == {"prefill": 2} and torch.isfinite(got).all()
    with anchor_hf.capture() as calls:
        logits(model, name, ids)
    assert len(calls) == 2 and calls[0][4] == model.model.layers[0].self_attn.scaling
