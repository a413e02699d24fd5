"""Sparse prefill inside a real model: perplexity, per-layer/head quality, generation, speed.

Used by ``bench/real_model.py`` (JSON + plot), ``python -m anchor_ext.demo --model
smollm2`` and ``tests/test_real_model.py``. The model runs through the transformers
backend (:mod:`anchor_ext.integrations.transformers`) with ``path="sparse"``, so the
sparse kernels run at every length (``path="auto"`` would pick dense below ~15k tokens
on a GPU, which measures nothing).
"""

from __future__ import annotations

import statistics
import time

import torch

import anchor_ext
from anchor_ext import metrics
from anchor_ext.integrations import transformers as anchor_hf
from anchor_ext.reference import SparseConfig

from .smollm2 import perplexity

__all__ = ["register_sparse", "quality_by_head", "greedy", "first_divergence", "timed_forward",
           "evaluate"]

_GEOMETRY = ("block_size", "step", "init_blocks", "local_blocks")


def register_sparse(name: str = "anchor_eval", *, only_layers=None, **options) -> str:
    """Register a sparse backend (``path="sparse"``); with ``only_layers`` (a set of layer
    indices) the other layers run dense SDPA, to find which layer changes an output."""
    options = {"path": "sparse", **options}
    if only_layers is None:
        return anchor_hf.register(name, **options)
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    def forward(module, *args, **kwargs):
        if module.layer_idx in only_layers:
            return anchor_hf.anchor_attention_forward(module, *args, _name=name, _options=options,
                                                      **kwargs)
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register(name, forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    return name


@torch.no_grad()
def quality_by_head(calls, options: dict, *, blocks: int = 16) -> list[dict]:
    """Per (layer, q head): sparsity, mass recall (mean, 1st percentile) and output error
    against dense fp32 attention, on ``blocks`` query blocks per head, for the inputs and
    scaling the model gave each sparse prefill (``calls`` from ``anchor_hf.capture``); the
    selection is the one ``anchor_ext.prefill`` makes with ``options`` (any method)."""
    options = {key: value for key, value in options.items() if key != "path"}
    method = options.get("method", "anchor")
    geometry = {k: options[k] for k in _GEOMETRY if k in options}
    # prefill's defaults: step 16 for the paper's fixed theta, 1 for a recall target or skeleton
    geometry.setdefault("step", 16 if method == "anchor" and options.get("recall") is None else 1)
    cfg = SparseConfig(**geometry)
    rows = []
    for layer, q, k, v, scale in calls:
        out, stats = anchor_ext.prefill(q, k, v, sm_scale=scale, path="sparse", return_stats=True,
                                        **options)
        selection = stats["selection"]
        sparsity = metrics.sparsity(selection, q.shape[2], cfg)["per_head"][0]
        group = q.shape[1] // k.shape[1]
        for h in range(q.shape[1]):
            kv = slice(h // group, h // group + 1)
            quality = metrics.sampled_quality(q[:, h:h + 1], k[:, kv], v[:, kv], out[:, h:h + 1],
                                              selection[:, h:h + 1], cfg, sm_scale=scale,
                                              blocks=blocks)
            rows.append({"layer": layer, "head": h, "sparsity": float(sparsity[h]),
                         "recall_mean": quality["recall"]["mean"],
                         "recall_p01": quality["recall"]["p01"],
                         "err_max": quality["error"]["max"], "err_mean": quality["error"]["mean"]})
    return rows


@torch.no_grad()
def greedy(model, impl: str, prompt: torch.Tensor, tokens: int) -> list[int]:
    """Greedy continuation of ``prompt`` (1, n) with attention implementation ``impl``."""
    model.set_attn_implementation(impl)
    device = next(model.parameters()).device
    pad = model.generation_config.pad_token_id
    pad = model.config.eos_token_id if pad is None else pad  # generate() wants one for its mask
    out = model.generate(prompt.to(device), max_new_tokens=tokens, do_sample=False,
                         attention_mask=torch.ones_like(prompt, device=device), pad_token_id=pad)
    return out[0, prompt.shape[1]:].tolist()


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, or ``None`` when one is a prefix of the other."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


@torch.no_grad()
def timed_forward(model, impl: str, ids: torch.Tensor, repeats: int = 3) -> float:
    """Median ms of one prefill forward pass (last position's logits only)."""
    model.set_attn_implementation(impl)
    device = next(model.parameters()).device
    ids = ids.to(device)
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(ids, logits_to_keep=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call warms up
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def evaluate(model, tokenizer, *, n: int, last: int, options: dict, gen_prompt: int | None = None,
             gen_tokens: int = 32, blocks: int = 16, find_layer: bool = True,
             time_repeats: int = 3) -> dict:
    """Dense vs sparse on the first ``n`` tokens of the built-in long text: perplexity of the
    last ``last`` tokens, per-head quality, greedy generation after a ``gen_prompt``-token
    prompt (default ``n - gen_tokens``), prefill time. Returns a JSON-ready dict."""
    from .smollm2 import token_window

    ids = token_window(tokenizer, n)
    name = register_sparse("anchor_eval", **options)
    model.set_attn_implementation("sdpa")
    ppl_dense = perplexity(model, ids, last)
    model.set_attn_implementation(name)
    with anchor_hf.capture() as calls:
        ppl_sparse = perplexity(model, ids, last)
    heads = quality_by_head(calls, options, blocks=blocks)
    del calls

    # Default prompt: the window minus the continuation, so prompt + continuation fit the
    # model's context (8192 for SmolLM2) when the window is that long.
    prompt = ids[:, :gen_prompt or n - gen_tokens]
    dense_tokens = greedy(model, "sdpa", prompt, gen_tokens)
    sparse_tokens = greedy(model, name, prompt, gen_tokens)
    diverge = first_divergence(dense_tokens, sparse_tokens)
    layers_changing = None
    if diverge is not None and find_layer:
        # Which single layer, made sparse alone, already changes that token?
        layers_changing = []
        for layer in range(model.config.num_hidden_layers):
            one = register_sparse("anchor_one_layer", only_layers={layer}, **options)
            if greedy(model, one, prompt, diverge + 1)[diverge] != dense_tokens[diverge]:
                layers_changing.append(layer)

    def summary(key):
        values = [h[key] for h in heads]
        return {"mean": statistics.fmean(values), "min": min(values)}

    result = {
        "n": n, "last": last, "options": options,
        "perplexity": {"dense": ppl_dense, "sparse": ppl_sparse,
                       "ratio": ppl_sparse / ppl_dense},
        "sparsity": summary("sparsity"), "recall_mean": summary("recall_mean"),
        "recall_p01": summary("recall_p01"),
        "err_max": max(h["err_max"] for h in heads),
        "generation": {"prompt_tokens": prompt.shape[1], "tokens": gen_tokens,
                       "dense": dense_tokens, "sparse": sparse_tokens,
                       "first_divergence": diverge, "layers_changing_it": layers_changing,
                       "dense_text": tokenizer.decode(dense_tokens),
                       "sparse_text": tokenizer.decode(sparse_tokens)},
        "heads": heads,
    }
    if time_repeats:
        result["prefill_ms"] = {"dense": timed_forward(model, "sdpa", ids, time_repeats),
                                "sparse": timed_forward(model, name, ids, time_repeats)}
    model.set_attn_implementation("sdpa")
    return result
