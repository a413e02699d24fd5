"""anchor_ext as a Hugging Face ``transformers`` attention backend.

    import anchor_ext.integrations.transformers as anchor_hf
    anchor_hf.register()                                   # registers "anchor"
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="anchor")
    # or, on a loaded model:  model.set_attn_implementation("anchor")

What runs where:

* **Prefill** (as many queries as keys, no cache before them): ``anchor_ext.prefill``
  with the registered options (``method``, ``theta``, ``path``, geometry). GQA is passed
  through: K/V are never repeated.
* **Padding**: the model builds the same 4-D boolean mask as for ``"sdpa"``. A batch
  with padding is run one sequence at a time on its unpadded tokens (left or right
  padding: each row's valid keys must be one contiguous range that causal attention
  covers); rows of padding tokens get zeros, which no valid token reads.
* **Dense, through the model's SDPA path**: decode steps and chunked prefill (fewer
  queries than keys), prompts shorter than one block (``block_size`` tokens), training
  with dropout, sliding windows / softcapping / attention sinks passed by the model, and
  masks that are not causal-plus-padding (packed sequences, windows, holes); the last case
  warns, since it means the sparse path is not used.
"""

from __future__ import annotations

import functools
import warnings

import torch

import anchor_ext

__all__ = ["register", "anchor_attention_forward", "capture", "prefill_calls"]

_OPTION_KEYS = ("method", "theta", "path", "block_size", "step", "init_blocks", "local_blocks",
                # method="skeleton" / "hybrid" (anchor_ext.ops): the model's RoPE and the mask
                "rope_base", "rotary_dim", "eps", "sparsity", "granularity", "samples", "ridge",
                "seed",
                # the recall target (anchor_ext.recall)
                "recall", "vote_rows", "probe_groups", "probe_rows")

# Per registered name: how many attention calls took each route (tests and benchmarks read it).
prefill_calls: dict[str, dict[str, int]] = {}
_captured: list | None = None


def _count(name: str, route: str) -> None:
    counts = prefill_calls.setdefault(name, {})
    counts[route] = counts.get(route, 0) + 1


def _valid_key_ranges(mask: torch.Tensor, q_len: int) -> list[tuple[int, int]] | None:
    """``[(start, end)]`` per batch element when the 4-D boolean mask is exactly causal
    attention over the keys ``[start, end)`` (left or right padding), else ``None`` (then
    dense is used): packed sequences, sliding windows or holes are never sliced.

    The last query row gives the candidate range; the whole mask is then compared with the
    causal-plus-padding mask it implies, a bounded chunk of rows at a time.
    """
    if (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1
            or mask.shape[-1] != q_len or mask.shape[-2] != q_len):
        return None
    keys = torch.arange(q_len, device=mask.device)
    chunk = max(1, (1 << 24) // q_len)
    ranges = []
    for b in range(mask.shape[0]):
        idx = torch.nonzero(mask[b, 0, -1]).flatten()
        start, end = (int(idx[0]), int(idx[-1]) + 1) if idx.numel() else (0, 0)
        if end - start != idx.numel() or (end not in (q_len, start) and start != 0):
            return None  # holes, or padding on both sides
        valid = (keys >= start) & (keys < end)
        for r0 in range(0, q_len, chunk):
            rows = keys[r0:r0 + chunk]
            expected = (keys[None, :] <= rows[:, None]) & valid[None, :]
            if not torch.equal(mask[b, 0, r0:r0 + chunk], expected):
                return None
        ranges.append((start, end))
    return ranges


# Attention features the sparse path does not implement: a call using any runs dense.
_DENSE_ONLY_KWARGS = ("sliding_window", "softcap", "s_aux")


def anchor_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                             scaling=None, is_causal=None, *, _name="anchor", _options=None,
                             **kwargs):
    """The attention function registered with ``transformers.AttentionInterface``.

    ``query`` is ``(B, Hq, Nq, D)``, ``key``/``value`` ``(B, Hkv, Nk, D)``; returns
    ``(attn_output (B, Nq, Hq, D), None)`` like the SDPA backend.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    options = dict(_options or {})
    block_size = options.get("block_size", 128)
    q_len, kv_len = query.shape[2], key.shape[2]
    dense_reason = None
    if q_len != kv_len:
        dense_reason = "decode"  # decode step or chunked prefill over a cache
    elif q_len < block_size:
        dense_reason = "short"
    elif module.training and dropout > 0:
        dense_reason = "dropout"
    elif is_causal is False or not getattr(module, "is_causal", True):
        dense_reason = "not_causal"
    elif any(kwargs.get(name) is not None for name in _DENSE_ONLY_KWARGS):
        dense_reason = "unsupported_feature"
    ranges = None
    if dense_reason is None and attention_mask is not None:
        ranges = _valid_key_ranges(attention_mask, q_len)
        if ranges is None:
            dense_reason = "mask"
            warnings.warn("anchor attention: the attention mask is not causal attention with "
                          "left or right padding (packed sequences, a sliding window, holes); "
                          "this call runs dense SDPA", stacklevel=2)
    if dense_reason is not None:
        _count(_name, dense_reason)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)

    def run(q, k, v):
        if _captured is not None:
            _captured.append((getattr(module, "layer_idx", None), q, k, v, scaling))
        return anchor_ext.prefill(q, k, v, sm_scale=scaling, **options)

    if ranges is None or all(r == (0, q_len) for r in ranges):
        _count(_name, "prefill")
        out = run(query, key, value)
    else:
        _count(_name, "prefill_padded")
        out = torch.zeros_like(query)
        for b, (start, end) in enumerate(ranges):
            if end - start > 0:
                out[b:b + 1, :, start:end] = run(query[b:b + 1, :, start:end],
                                                 key[b:b + 1, :, start:end],
                                                 value[b:b + 1, :, start:end])
    return out.transpose(1, 2).contiguous(), None


def register(name: str = "anchor", **options) -> str:
    """Register ``name`` as a transformers attention implementation running anchor_ext.

    ``options`` go to :func:`anchor_ext.prefill`: ``method``, ``theta``, ``recall`` (with
    ``vote_rows``, ``probe_groups``, ``probe_rows``), ``path``,
    ``block_size``, ``step``, ``init_blocks``, ``local_blocks``, and for ``method="skeleton"``
    / ``"hybrid"`` ``rope_base`` (the model's ``rope_theta``), ``rotary_dim``, ``eps``,
    ``sparsity``, ``granularity``, ``samples``, ``ridge``, ``seed`` (``sm_scale`` comes from
    the model). Register several names for several settings. Returns ``name``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    unknown = set(options) - set(_OPTION_KEYS)
    if unknown:
        raise TypeError(f"register() got unexpected options {sorted(unknown)}; expected a subset "
                        f"of {list(_OPTION_KEYS)}")
    forward = functools.partial(anchor_attention_forward, _name=name, _options=options)
    functools.update_wrapper(forward, anchor_attention_forward)
    AttentionInterface.register(name, forward)
    # The same masks as "sdpa": None for plain causal attention, a 4-D boolean mask otherwise.
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    return name


class capture:
    """Context manager recording ``(layer_idx, q, k, v, scaling)`` of every sparse prefill call.

    For per-layer metrics (``bench/real_model.py``): the tensors are the ones passed
    to ``anchor_ext.prefill``, so recall and sparsity are measured on what ran.
    """

    def __enter__(self):
        global _captured
        _captured = []
        self.calls = _captured
        return self.calls

    def __exit__(self, *exc):
        global _captured
        _captured = None
        return False
