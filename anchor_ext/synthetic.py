"""Seeded, realistic long-context Q/K/V for attention-prefill experiments.

Plain ``randn`` attention is nearly uniform, so every sparse method looks equally
good (or bad) on it. :func:`make_qkv` instead builds queries and keys from a few
named components, each modelled on what is seen in real long-context LLMs
(LLaMA-3.1, Qwen2.5), and then applies RoPE to both, exactly as a model does:

* **RoPE** (rotate-half convention, ``ROPE_BASE = 500000`` as in LLaMA-3.1). All
  components are built in pre-RoPE space; position enters only through RoPE.
  "Semantic" components (sink, heavy hitters, topics) live in the slowest RoPE
  pairs (period >> sequence length), so they act at any distance; the locality
  component lives in the faster pairs, so it decays with distance.
* **Locality**: one positional vector ``c`` per kv head, shared by q and k. Its
  RoPE dot product is ``sum_f |c_f|^2 cos((i-j) theta_f)``, a kernel that peaks
  at ``i == j`` and decays over ``ell`` tokens (``LOCAL_SCALE_RANGE``), with the
  small quasi-random "slash" ripples that real maps show too.
* **Attention sink**: key 0 (and weakly keys 1..3, ``SINK_KEY_WEIGHTS``) carries a
  large loading on a direction every query of the head shares, so it takes a
  large share of the mass (tens of percent) and usually holds the row max.
  Its value vector is shrunk (``SINK_VALUE_SCALE``): real sinks are near no-ops.
* **Heavy hitters** ("stripes"): about one key in ``HEAVY_HITTER_EVERY`` (a shared
  pool of "important tokens", each kv head using part of it) gets a loading on
  a second shared direction, with per-key strength; every query of the head
  reads it with a per-head strength and per-row jitter. These key columns sit in
  the middle of the sequence, so a sparse method has to find them.
* **Topics**: the sequence is cut into segments (``SEGMENT_LEN_RANGE``) with a
  topic out of ``NUM_TOPICS``; keys and queries carry their segment's topic
  vector, so queries lean towards earlier segments of the same (or a related,
  i.e. correlated) topic. Values carry a topic component as well.
* **Per-head variation**: every q head draws its own sink / locality / stripe /
  topic strengths (sharp and more diffuse heads); q heads of one kv group share
  the keys but have their own queries (GQA).
* **Noise**: i.i.d. normal noise on every entry of q and k (the "content" that is
  not modelled), giving about one natural-log unit of per-pair logit noise.

Profiles: ``"realistic"`` (default; concentrated heads as above) and
``"diffuse"`` (weak sink/locality/stripes: a head needs a large share of its keys
for 95% of the mass, for testing the dense-fallback regime). Three more profiles
add head types whose mass is not on a few key columns (``HEAD_TYPES``):
``"slash"`` (every head), ``"staircase"`` (every head) and ``"mixed"`` (q head
``h``: ``h % 4 == 1`` slash, ``h % 4 == 2`` staircase, the others realistic).

* **Slash heads** (mass on diagonals ``i - j = o_k``): every key gets a flat
  positional component over the RoPE pairs with ``theta_f >= SLASH_MIN_FREQ``, in
  phase with its locality vector ``c`` (``c_key``); a slash query's fast part is
  ``zq_f = W_f / conj(c_key_f)`` with ``W_f = a g_f sum_k w_k e^{-i o_k theta_f}``, so
  its RoPE score is ``a sum_k w_k sum_f g_f cos((i-j-o_k) theta_f)``: 2-3 lines at
  offsets drawn in ``SLASH_OFFSET_RANGE`` (256-4096), peak logit ``SLASH_GAP`` below
  the sink, about 4 tokens wide, with the RoPE ripples of such a sum (std ~0.15 of
  the peak) as fainter slashes. Their heavy hitters and locality are lowered.
* **Staircase heads** (mass on the row's own document): every topic segment is a
  document with a random unit vector in the medium RoPE pairs (``DOC_FREQ_MAX``,
  slow over a segment); keys carry their document's vector, staircase queries their
  own, worth ``STAIRCASE_LOGIT`` (9-11); their locality and heavy hitters are small.
* Realistic heads of these profiles read ``c_key`` with ``W_f = a |c_f|^2`` (the
  flat part compensated), so they keep the realistic locality kernel.

The extra components come from a second generator (``seed + EXTRA_SEED``): the base
draws, and "realistic" / "diffuse" themselves, are unchanged.

Magnitudes are bounded (|q|, |k| entries stay well below 100; typical entries
are O(1), the largest ones on the sink key about 10-20), so fp16/bf16 are finite.

Measured statistics (CPU, torch 2.14.1, bf16 inputs, fp32 scores)
-----------------------------------------------------------------
``q, k, v = make_qkv(n, q_heads=8, kv_heads=2, head_dim=128, seed=0)`` then
``concentration_stats(q, k)`` (512 rows spread over the sequence); rerun with
``python -m anchor_ext.synthetic --n 16384`` (and ``--profile diffuse``):

=========  ==========================  ==========================  =========
profile    keys for 95% mass, median   rows whose argmax is in     sink mass
n          over heads (mean; range)    sink block or local region
=========  ==========================  ==========================  =========
real. 4k   1.15% (1.45%; 0.85-2.09%)   98.2%                       45%
real. 16k  0.64% (0.86%; 0.52-1.29%)   91.9% (per head 78-99%)     26%
diffuse 4k 68.9% (69.6%)               86.0%                       12%
diff. 16k  69.0% (68.8%)               62.6%                       4%
=========  ==========================  ==========================  =========

AnchorAttention on ``make_qkv(8192, q_heads=4, kv_heads=1, seed=0)`` with
``reference.anchor`` / ``reference.identify`` (theta=12, block_size=128, step=16),
mass recall over 256 sampled rows (dense fp32 softmax mass on always-computed keys
plus the group's selected stripes):

* realistic: recall mean 0.9996 (1st percentile 0.9975); the groups select on
  average 8.4% of their middle region (max 31.8%). With the stripes dropped
  (always-computed keys only) recall falls to 0.910 over all rows and 0.880
  (1st percentile 0.37) over rows that have a middle region (i >= 2048): the
  stripes carry about 12% of those rows' mass, so identification matters.
* diffuse: theta=12 selects 100% of the middle region (recall 1.0); always-only
  recall is 0.33 on rows with a middle region.

New profiles, same call and statistics (the ``python -m anchor_ext.synthetic``
table above, ``--profile``):

=============  ==========================  ==========================  =========
profile, n     keys for 95% mass, median   rows whose argmax is in     sink mass
               over heads (mean)           sink block or local region
=============  ==========================  ==========================  =========
mixed 4k       1.00% (2.38%)               95.4%                       42%
mixed 16k      0.86% (1.44%)               84.9%                       21%
slash 4k       0.86% (1.00%)               91.3%                       36%
slash 16k      0.48% (0.73%)               81.7%                       29%
staircase 4k   4.67% (5.26%)               93.1%                       52%
staircase 16k  3.19% (3.27%)               93.4%                       29%
=============  ==========================  ==========================  =========

On ``make_qkv(8192, q_heads=4, kv_heads=1, seed=0, profile=...)``, rows >= 4096: the
four slash heads put 24%, 72%, 27% and 100% of the mass at offsets >= 300 (the lines
and their neighbours; the strongest single offset holds 8%, 12%, 1.3% and 61%), the
staircase heads 93-98% on the row's own document, about 60% beyond the last 128 keys.
Sparsity / mass recall (every 4th query block) of the stage-3 selections, anchor
``reference.identify`` theta=12 vs ``skeleton.select``:

=========  ===============  ===============  ======================================
profile    anchor step 16   anchor step 1    skeleton step 1 (key granularity) at
                                             anchor step 1's sparsity
=========  ===============  ===============  ======================================
realistic  0.645 / 0.9995   0.914 / 0.9994   0.914 / 0.9993
slash      0.663 / 0.810    0.909 / 0.566    0.909 / 0.701
staircase  0.544 / 0.9999   0.814 / 0.998    0.814 / 0.810
mixed      0.627 / 0.979    0.887 / 0.934    0.887 / 0.903
=========  ===============  ===============  ======================================

(anchor's mean query of a 128-row block averages the fast RoPE pairs that carry
the slash lines away; skeleton's slash/vertical/horizontal model cannot express a
per-document block.)

Generation time on this 2-core CPU: ``make_qkv(32768)`` (32 q heads, 8 kv heads,
D=128, bf16) takes about 2.5 s.

Everything is drawn from a CPU ``torch.Generator`` seeded with ``seed``, so the
same call gives the same tensors on every device (up to the rounding of the
device's fp32 arithmetic before the final cast). Generation is O(n * D) time and
memory per head; heads are produced one at a time.
"""

from __future__ import annotations

import math

import torch

__all__ = ["make_qkv", "concentration_stats", "rope_cos_sin", "apply_rope", "ROPE_BASE"]

# --------------------------------------------------------------------------- constants

#: RoPE base of LLaMA-3.1 (rotate-half convention, inverse frequencies base^(-2f/D)).
ROPE_BASE = 500_000.0
#: RoPE pairs whose frequency is at most this are "slow" (semantic): at 128k tokens
#: they turn by at most ~0.65 rad, so sink/stripe/topic scores barely depend on distance.
SLOW_FREQ_MAX = 5e-6
#: At least this many slow pairs (needed for tiny head dims): sink, stripe, >= 2 topic dims.
MIN_SLOW_PAIRS = 2

#: Std of the i.i.d. noise on every q / k entry. Per-pair logit noise is ~ q_std * k_std.
Q_NOISE_STD = 0.8
K_NOISE_STD = 0.8
#: Noise in the slow (semantic) dims is scaled down by this factor: those dims carry the
#: large sink/stripe loadings, and full noise there would make sink and stripe scores
#: swing by several logits from row to row, letting stripes beat the sink too often.
SLOW_NOISE_SCALE = 0.35

#: Loading of the sink key(s) on the sink direction (key 0, then keys 1, 2, 3).
#: Query loadings are derived from the per-head target logit, so this only sets how the
#: sink score splits between |q| and |k| (large key side, as in real sinks).
SINK_KEY_LOADING = 20.0
SINK_KEY_WEIGHTS = (1.0, 0.55, 0.45, 0.35)
#: Values of the sink keys are scaled down: real attention sinks are near no-ops.
SINK_VALUE_SCALE = 0.25

#: About one key in this many is a heavy hitter ("important token" pool shared by the
#: sequence); each kv head keeps each pool token with probability HEAVY_HITTER_KEEP.
HEAVY_HITTER_EVERY = 128
HEAVY_HITTER_KEEP = 0.6
#: Key-side loading of heavy hitters, times a per-key strength in HEAVY_HITTER_SPREAD.
HEAVY_HITTER_LOADING = 16.0
HEAVY_HITTER_SPREAD = (0.8, 1.0)
#: Positional (locality) loading of heavy-hitter and sink keys, relative to other keys:
#: their keys are dominated by their semantic component. This keeps the locality
#: kernel's quasi-random far-field ripples ("slash" lines, ~0.15 of the peak) from
#: lifting a stripe above the sink in many rows.
SEMANTIC_KEY_LOCAL_SCALE = 0.25
#: Relative per-row jitter of a query's heavy-hitter loading.
HEAVY_HITTER_ROW_JITTER = 0.03

#: Norm of the positional (locality) vector c on the key side.
LOCAL_KEY_NORM = 11.0
#: Locality length scale ell (tokens), drawn log-uniformly per kv head.
LOCAL_SCALE_RANGE = (16.0, 128.0)
#: Width (in ln(theta) units) of the band of RoPE frequencies around 1/ell that c uses.
LOCAL_BAND_WIDTH = 1.0

#: Topic segments: lengths uniform in this range, topics drawn from NUM_TOPICS.
NUM_TOPICS = 8
SEGMENT_LEN_RANGE = (256, 2048)
#: Key-side norm of a topic vector.
TOPIC_KEY_NORM = 6.0
#: Share of each value vector that is its segment's topic value (mild correlation).
VALUE_TOPIC_CORR = 0.5

#: Per-q-head target logits (natural-log units, above the noise background) drawn
#: uniformly from these ranges: sink score, locality peak, heavy-hitter score as a gap
#: below the sink score (so the sink, not a stripe, usually holds the row max),
#: same-topic bonus. "realistic": concentrated heads; "diffuse": flat heads.
PROFILES = {
    "realistic": dict(sink=(15.5, 19.0), local_gap=(2.0, 5.0), stripe_gap=(2.0, 5.0),
                      topic=(1.0, 3.0)),
    "diffuse": dict(sink=(1.0, 3.0), local_gap=(-1.0, 1.0), stripe_gap=(0.5, 2.0),
                    topic=(0.0, 1.0)),
}
#: In "realistic", this share of heads is drawn as a weaker, more diffuse head
#: (sink/local/stripe logits lowered by DIFFUSE_HEAD_DROP): real models mix both kinds.
DIFFUSE_HEAD_SHARE = 0.125
DIFFUSE_HEAD_DROP = 5.0

# ---- head types of the "mixed", "slash" and "staircase" profiles (realistic + extras)

#: q head ``h`` has type ``HEAD_TYPES[profile][h % len(...)]`` (GQA groups of 4 get one of each
#: in "mixed"). "realistic" heads are drawn as in the "realistic" profile.
HEAD_TYPES = {
    "mixed": ("realistic", "slash", "staircase", "realistic"),
    "slash": ("slash",),
    "staircase": ("staircase",),
}
#: Slash heads use the RoPE pairs with frequency >= this (about 23 pairs at D=128): their
#: kernel sum_f cos((o - o_k) theta_f) / F is 1 at the line, >= 0.5 within ~4 tokens, and
#: ripples with std ~0.15 (max ~0.5) elsewhere -- a sharp line plus faint RoPE slashes.
SLASH_MIN_FREQ = 0.01
#: Key-side norm of the flat positional component every key gets in these profiles (over
#: the slash pairs), so that a query can place a line at any offset.
SLASH_KEY_NORM = 16.0
#: Lines per slash head, their offsets (log-uniform, tokens) and relative weights.
SLASH_LINES = (2, 3)
SLASH_OFFSET_RANGE = (256.0, 4096.0)
SLASH_LINE_WEIGHT = (0.85, 1.0)
#: Slash peak logit as a gap below the head's sink logit, and how much the slash heads'
#: heavy-hitter and locality logits are lowered (the lines take their place).
SLASH_GAP = (0.0, 2.0)
SLASH_OTHER_DROP = 4.0
#: Staircase ("document") heads: every topic segment is a document with its own random
#: vector in the medium RoPE pairs (SLOW_FREQ_MAX < theta_f <= DOC_FREQ_MAX: they turn by at
#: most ~0.6 rad over a 2048-token segment), on keys with norm DOC_KEY_NORM; a staircase
#: query carries its own document's vector, so a row attends to its document so far.
DOC_FREQ_MAX = 3e-4
DOC_KEY_NORM = 6.0
#: Same-document logit of staircase heads, and their (small) locality peak and
#: heavy-hitter logits: the staircase takes their place.
STAIRCASE_LOGIT = (9.0, 11.0)
STAIRCASE_LOCAL = (0.0, 2.0)
STAIRCASE_STRIPE = (1.0, 3.0)
#: Seed offset of the generator of the extra components (the base draws stay those of
#: "realistic" for the same seed).
EXTRA_SEED = 7919


# --------------------------------------------------------------------------- RoPE

def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float = ROPE_BASE):
    """cos/sin tables ``(len(positions), head_dim)`` for rotate-half RoPE (fp32)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(positions.device)[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: pair ``f`` is dims ``(f, f + D/2)``, rotated by ``pos * theta_f``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# --------------------------------------------------------------------------- helpers

def _uniform(gen, lo, hi, size=()):
    return lo + (hi - lo) * torch.rand(size, generator=gen, dtype=torch.float64)


def _slow_pairs(head_dim: int) -> int:
    """Number of slow (semantic) RoPE pairs: frequency <= SLOW_FREQ_MAX, clamped."""
    pairs = head_dim // 2
    inv_freq = ROPE_BASE ** (-torch.arange(pairs, dtype=torch.float64) * 2 / head_dim)
    count = int((inv_freq <= SLOW_FREQ_MAX).sum())
    return min(max(count, MIN_SLOW_PAIRS), pairs // 2)


def _pair_dims(pairs: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Dims of RoPE pairs ``pairs`` (rotate-half layout): first halves, then second halves."""
    return torch.cat([pairs, pairs + head_dim // 2])


def _segments(n: int, gen: torch.Generator, with_ids: bool = False):
    """Topic id ``(n,)`` per position: random-length segments with random topics.

    With ``with_ids=True`` also returns the segment index ``(n,)`` of every position.
    """
    lo, hi = SEGMENT_LEN_RANGE
    count = n // lo + 2  # enough segments to cover n even if all are shortest
    lengths = torch.randint(lo, hi + 1, (count,), generator=gen)
    topics = torch.randint(0, NUM_TOPICS, (count,), generator=gen)
    starts = torch.cumsum(lengths, 0) - lengths
    seg = torch.searchsorted(starts, torch.arange(n), right=True) - 1
    return (topics[seg], seg) if with_ids else topics[seg]


def _head_params(profile: str, q_heads: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-q-head target logits (float64 tensors of shape ``(q_heads,)``)."""
    ranges = PROFILES[profile]
    params = {name: _uniform(gen, lo, hi, (q_heads,)) for name, (lo, hi) in ranges.items()}
    params["stripe"] = params["sink"] - params.pop("stripe_gap")
    params["local"] = params["sink"] - params.pop("local_gap")
    weak = torch.rand(q_heads, generator=gen, dtype=torch.float64) < DIFFUSE_HEAD_SHARE
    if profile == "realistic":
        for name in ("sink", "local", "stripe"):
            params[name] = torch.where(weak, params[name] - DIFFUSE_HEAD_DROP, params[name])
    return params


def _extra_head_params(profile: str, q_heads: int, params: dict, extra: torch.Generator):
    """Head types and extra logits of the "mixed" / "slash" / "staircase" profiles.

    Adjusts ``params`` in place (slash heads: lower stripe and locality logits; staircase
    heads: small ones) and returns ``(types, slash_logit, doc_logit)``; draws only from
    ``extra``.
    """
    pattern = HEAD_TYPES[profile]
    types = [pattern[h % len(pattern)] for h in range(q_heads)]
    slash = torch.tensor([t == "slash" for t in types])
    stair = torch.tensor([t == "staircase" for t in types])
    slash_logit = params["sink"] - _uniform(extra, *SLASH_GAP, (q_heads,))
    doc_logit = _uniform(extra, *STAIRCASE_LOGIT, (q_heads,))
    for name in ("stripe", "local"):
        params[name] = torch.where(slash, params[name] - SLASH_OTHER_DROP, params[name])
    # Every own-document key already gets the document logit; locality or heavy hitters on
    # top of it would concentrate the mass on a few keys again, so staircase heads keep
    # little of them.
    for name, (lo, hi) in (("local", STAIRCASE_LOCAL), ("stripe", STAIRCASE_STRIPE)):
        params[name] = torch.where(stair, _uniform(extra, lo, hi, (q_heads,)), params[name])
    return types, slash_logit, doc_logit


def _positional_query(c, c_key, a_local, a_slash, slash_weight, freq, extra):
    """Fast-dim query part ``zq_f = W_f / conj(c_key_f)`` (layout of ``c``), so that the
    RoPE score is ``sum_f Re(W_f e^{i o theta_f})`` at offset ``o = i - j``.

    ``W_f = a_local |c_f|^2`` is the locality kernel of the "realistic" heads (the key's
    band part ``c``; the flat part is compensated) plus, for ``a_slash > 0``,
    ``a_slash g_f sum_k w_k e^{-i o_k theta_f}``: lines of height ``a_slash w_k`` at
    ``o_k`` (drawn here from ``extra``, also when unused, to keep the stream simple).
    """
    half = c.shape[0] // 2
    lines = int(torch.randint(SLASH_LINES[0], SLASH_LINES[1] + 1, (1,), generator=extra))
    log_lo, log_hi = math.log(SLASH_OFFSET_RANGE[0]), math.log(SLASH_OFFSET_RANGE[1])
    offsets = _uniform(extra, log_lo, log_hi, (lines,)).exp().round()
    weights = _uniform(extra, *SLASH_LINE_WEIGHT, (lines,))
    w_re = a_local * (c[:half] ** 2 + c[half:] ** 2)
    w_im = torch.zeros_like(w_re)
    if a_slash:
        angle = offsets[None, :] * freq[:, None]
        w_re = w_re + a_slash * slash_weight * (weights * angle.cos()).sum(1)
        w_im = w_im - a_slash * slash_weight * (weights * angle.sin()).sum(1)
    zq_re, zq_im = _complex_div_conj(w_re, w_im, c_key[:half], c_key[half:])
    return torch.cat([zq_re, zq_im])


def _complex_div_conj(w_re, w_im, c_re, c_im):
    """``w / conj(c)`` for per-pair complex numbers: the query pair that, against key pair
    ``c``, gives the RoPE score weight ``w`` (``zq conj(c) = w``)."""
    norm = (c_re ** 2 + c_im ** 2).clamp_min(1e-12)
    return (w_re * c_re - w_im * c_im) / norm, (w_re * c_im + w_im * c_re) / norm


# --------------------------------------------------------------------------- generator

def make_qkv(n, *, batch=1, q_heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16,
             device="cpu", seed=0, profile="realistic"):
    """Realistic causal-prefill inputs ``(q, k, v)`` in the SDPA layout.

    Returns ``q (batch, q_heads, n, head_dim)`` and ``k, v (batch, kv_heads, n, head_dim)``
    in ``dtype`` on ``device``; q head ``h`` reads kv head ``h // (q_heads // kv_heads)``.
    RoPE (base ``ROPE_BASE``) is already applied to q and k, so the scores
    ``q . k / sqrt(head_dim)`` show an attention sink, locality, heavy-hitter stripes and
    topic clustering (see the module docstring). Deterministic for a given ``seed``
    (CPU generator; each batch element is a different "document").

    ``profile``: ``"realistic"``, ``"diffuse"``, or ``"mixed"`` / ``"slash"`` /
    ``"staircase"`` (realistic heads plus slash heads, mass on a few diagonals, and
    staircase heads, mass on the row's own segment; see ``HEAD_TYPES``).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    for name, value in (("batch", batch), ("q_heads", q_heads), ("kv_heads", kv_heads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if q_heads % kv_heads != 0:
        raise ValueError(f"q_heads must be a multiple of kv_heads, got q_heads={q_heads}, "
                         f"kv_heads={kv_heads}")
    if not isinstance(head_dim, int) or head_dim < 8 or head_dim % 2:
        raise ValueError(f"head_dim must be an even int >= 8, got {head_dim!r}")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")
    if profile not in PROFILES and profile not in HEAD_TYPES:
        raise ValueError(f"profile must be one of {sorted([*PROFILES, *HEAD_TYPES])}, "
                         f"got {profile!r}")
    # Profiles with slash / staircase heads are "realistic" plus extra components drawn
    # from a second generator, so their base draws equal "realistic"'s for the same seed.
    extras = profile in HEAD_TYPES
    base_profile = "realistic" if extras else profile
    extra = torch.Generator(device="cpu").manual_seed(int(seed) + EXTRA_SEED) if extras else None

    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    group = q_heads // kv_heads
    d = head_dim
    scale = 1.0 / math.sqrt(d)  # the default sm_scale: target logits are in these units

    # Fixed geometry: which dims are slow (semantic) and which carry locality.
    pairs = d // 2
    n_slow = _slow_pairs(d)
    slow_dims = _pair_dims(torch.arange(pairs - n_slow, pairs), d)
    fast_pairs = torch.arange(pairs - n_slow)
    fast_dims = _pair_dims(fast_pairs, d)
    fast_freq = ROPE_BASE ** (-fast_pairs.to(torch.float64) * 2 / d)
    cos, sin = rope_cos_sin(torch.arange(n, device=device), d)
    slow_dims, fast_dims = slow_dims.to(device), fast_dims.to(device)
    if extras:
        slash_sel = fast_freq >= SLASH_MIN_FREQ            # pairs (of fast_pairs) of the lines
        slash_weight = slash_sel.double() / slash_sel.sum().clamp_min(1)   # g_f, sums to 1
        doc_dims = _pair_dims(fast_pairs[fast_freq <= DOC_FREQ_MAX], d).to(device)

    def to_dev(x):
        return x.to(device=device, dtype=torch.float32)

    q = torch.empty(batch, q_heads, n, d, dtype=dtype, device=device)
    k = torch.empty(batch, kv_heads, n, d, dtype=dtype, device=device)
    v = torch.empty(batch, kv_heads, n, d, dtype=dtype, device=device)

    for b in range(batch):
        # Sequence-level structure shared by all heads: topics and "important tokens".
        if extras:
            topic_of, seg_of = _segments(n, gen, with_ids=True)
        else:
            topic_of = _segments(n, gen)
        pool = torch.nonzero(torch.rand(n, generator=gen) < 1.0 / HEAVY_HITTER_EVERY).flatten()
        pool = pool[pool >= len(SINK_KEY_WEIGHTS)]  # sink keys are not stripes
        n_sink = min(n, len(SINK_KEY_WEIGHTS))
        params = _head_params(base_profile, q_heads, gen)
        if extras:
            types, slash_logit, doc_logit = _extra_head_params(profile, q_heads, params, extra)
        topic_of_dev = topic_of.to(device)

        for g in range(kv_heads):
            # Orthonormal basis of the slow subspace: sink, stripe, then topic dims.
            basis = torch.linalg.qr(torch.randn(2 * n_slow, 2 * n_slow, generator=gen,
                                                dtype=torch.float64))[0]
            u_sink, u_hit, topic_basis = basis[:, 0], basis[:, 1], basis[:, 2:]
            # Topic vectors (unit norm, random in the topic subspace -> correlated topics).
            topic_vec = torch.randn(NUM_TOPICS, topic_basis.shape[1], generator=gen,
                                    dtype=torch.float64)
            topic_vec = topic_vec / topic_vec.norm(dim=1, keepdim=True)
            topic_vec = topic_vec @ topic_basis.T  # (NUM_TOPICS, 2 * n_slow)

            # Locality vector c: energy in a band of frequencies around 1/ell, random
            # phase per pair; |c_f|^2 sets the weight of cos((i-j) theta_f).
            ell = math.exp(_uniform(gen, math.log(LOCAL_SCALE_RANGE[0]),
                                    math.log(LOCAL_SCALE_RANGE[1])).item())
            band = torch.exp(-0.5 * (torch.log(fast_freq * ell) / LOCAL_BAND_WIDTH) ** 2)
            band = band / band.sum().clamp_min(1e-12)
            phase = _uniform(gen, 0.0, 2 * math.pi, (len(fast_pairs),))
            amp = LOCAL_KEY_NORM * band.sqrt()
            c = torch.cat([amp * phase.cos(), amp * phase.sin()])  # matches fast_dims order
            c_key = c
            if extras:
                # Keys also get a flat positional component over the slash pairs, in phase
                # with c (so |c_key_f| >= flat_amp_f and queries stay small), and every
                # document (segment) a random unit vector in the doc dims.
                flat_amp = SLASH_KEY_NORM * slash_weight.sqrt()
                key_amp = amp + flat_amp
                c_key = torch.cat([key_amp * phase.cos(), key_amp * phase.sin()])
                doc_vec = torch.randn(int(seg_of.max()) + 1, len(doc_dims), generator=extra,
                                      dtype=torch.float64)
                doc_vec = to_dev(doc_vec / doc_vec.norm(dim=1, keepdim=True))[seg_of.to(device)]

            # Heavy hitters of this kv head and their per-key strength.
            keep = torch.rand(len(pool), generator=gen) < HEAVY_HITTER_KEEP
            hit_pos = pool[keep]
            hit_strength = _uniform(gen, *HEAVY_HITTER_SPREAD, (len(hit_pos),))

            # ---- keys
            kh = to_dev(K_NOISE_STD * torch.randn(n, d, generator=gen))
            kh[:, slow_dims] *= SLOW_NOISE_SCALE
            slow = to_dev(TOPIC_KEY_NORM * topic_vec)[topic_of_dev]  # (n, 2 * n_slow)
            slow[hit_pos.to(device)] += to_dev(HEAVY_HITTER_LOADING * hit_strength[:, None]
                                               * u_hit[None, :])
            sink_w = torch.tensor(SINK_KEY_WEIGHTS[:n_sink], dtype=torch.float64)
            slow[:n_sink] += to_dev(SINK_KEY_LOADING * sink_w[:, None] * u_sink[None, :])
            kh[:, slow_dims] += slow
            local_loading = torch.ones(n, 1)
            local_loading[hit_pos] = SEMANTIC_KEY_LOCAL_SCALE
            local_loading[:n_sink] = SEMANTIC_KEY_LOCAL_SCALE
            kh[:, fast_dims] += to_dev(local_loading) * to_dev(c_key)[None, :]
            if extras:
                kh[:, doc_dims] += DOC_KEY_NORM * doc_vec
            k[b, g] = apply_rope(kh, cos, sin).to(dtype)

            # ---- values: noise plus a mild per-topic component; shrunken sink values.
            topic_value = torch.randn(NUM_TOPICS, d, generator=gen)
            vh = (math.sqrt(1 - VALUE_TOPIC_CORR ** 2) * torch.randn(n, d, generator=gen)
                  + VALUE_TOPIC_CORR * topic_value[topic_of])
            vh[:n_sink] *= SINK_VALUE_SCALE
            v[b, g] = vh.to(device=device, dtype=dtype)

            # ---- queries of the kv group: own strengths and noise, shared directions.
            for h in range(g * group, (g + 1) * group):
                a_sink = params["sink"][h] / (scale * SINK_KEY_LOADING)
                a_hit = params["stripe"][h] / (scale * HEAVY_HITTER_LOADING)
                a_local = params["local"][h] / (scale * LOCAL_KEY_NORM ** 2)
                a_topic = params["topic"][h] / (scale * TOPIC_KEY_NORM)
                jitter = 1 + HEAVY_HITTER_ROW_JITTER * torch.randn(n, 1, generator=gen)
                qh = to_dev(Q_NOISE_STD * torch.randn(n, d, generator=gen))
                qh[:, slow_dims] *= SLOW_NOISE_SCALE
                slow = (to_dev(a_sink * u_sink)[None, :]
                        + to_dev(jitter) * to_dev(a_hit * u_hit)[None, :]
                        + to_dev(a_topic * topic_vec)[topic_of_dev])
                qh[:, slow_dims] += slow
                if not extras:
                    qh[:, fast_dims] += to_dev(a_local * c)[None, :]
                else:
                    a_slash = slash_logit[h] / scale if types[h] == "slash" else 0.0
                    qh[:, fast_dims] += to_dev(_positional_query(
                        c, c_key, a_local, a_slash, slash_weight, fast_freq, extra))[None, :]
                    if types[h] == "staircase":
                        a_doc = (doc_logit[h] / (scale * DOC_KEY_NORM)).item()
                        qh[:, doc_dims] += a_doc * doc_vec
                q[b, h] = apply_rope(qh, cos, sin).to(dtype)
    return q, k, v


# --------------------------------------------------------------------------- statistics

@torch.no_grad()
def concentration_stats(q, k, rows=512, mass=0.95, *, block_size=128, step=16,
                        init_blocks=1, local_blocks=1, sm_scale=None, chunk=64):
    """How concentrated causal softmax attention is, from ``rows`` sampled query rows.

    Rows are spread evenly over the sequence (the same rows for every head); their
    dense scores are computed in fp32, ``chunk`` rows at a time (never an N x N tensor).
    Uses batch element 0. Returns a dict:

    * ``keys_frac_per_head``: per q head, mean over rows of (smallest number of keys
      holding ``mass`` of the row's softmax) / (number of causal keys of the row);
    * ``keys_frac_median`` / ``keys_frac_mean``: median / mean of that over heads;
    * ``argmax_in_anchor_region``: share of (head, row) pairs whose largest score is in
      the sink block ``[0, init_blocks*block_size)`` or the row's local region (its own
      group of ``step*block_size`` rows plus ``local_blocks*block_size`` keys before it),
      i.e. where AnchorAttention's anchor equals the true row max; also per head;
    * ``sink_mass``: mean softmax mass on the sink block; ``rows``: the rows used.
    """
    _, hq, n, d = q.shape
    hkv = k.shape[1]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    sample = torch.linspace(0, n - 1, min(rows, n)).round().long().unique().to(q.device)
    sink_end = init_blocks * block_size
    group_rows = step * block_size
    frac = torch.zeros(hq, dtype=torch.float64)
    in_anchor = torch.zeros(hq, dtype=torch.float64)
    sink_mass = torch.zeros(hq, dtype=torch.float64)
    for h in range(hq):
        kh = k[0, h // (hq // hkv)].float()
        for r in torch.split(sample, chunk):
            r1 = int(r[-1]) + 1
            keys = torch.arange(r1, device=q.device)
            s = (q[0, h, r].float() @ kh[:r1].T) * scale
            s = s.masked_fill(keys[None, :] > r[:, None], -math.inf)
            p = torch.softmax(s, dim=-1)
            # Keys needed for `mass`: sort descending, count until the cumsum reaches it.
            cum = p.sort(dim=-1, descending=True).values.cumsum(-1)
            needed = (cum < mass).sum(-1) + 1
            frac[h] += (needed.double() / (r + 1).double()).sum().cpu()
            top = s.argmax(-1)
            local_start = ((r // group_rows) * group_rows - local_blocks * block_size).clamp_min(0)
            ok = (top < sink_end) | (top >= local_start)
            in_anchor[h] += ok.double().sum().cpu()
            sink_mass[h] += p[:, :sink_end].sum(-1).double().sum().cpu()
    count = len(sample)
    frac, in_anchor, sink_mass = frac / count, in_anchor / count, sink_mass / count
    return {
        "keys_frac_per_head": frac.tolist(),
        "keys_frac_median": frac.median().item(),
        "keys_frac_mean": frac.mean().item(),
        "argmax_in_anchor_region": in_anchor.mean().item(),
        "argmax_in_anchor_region_per_head": in_anchor.tolist(),
        "sink_mass": sink_mass.mean().item(),
        "rows": count,
    }


def main(argv=None):
    """Print :func:`concentration_stats` for one generated input (the docstring's table)."""
    import argparse

    parser = argparse.ArgumentParser(description="concentration statistics of make_qkv inputs")
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--q-heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--profile", default="realistic")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    q, k, _ = make_qkv(args.n, q_heads=args.q_heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                       seed=args.seed, profile=args.profile)
    stats = concentration_stats(q, k)
    print(f"n={args.n} profile={args.profile}: keys for 95% mass median {stats['keys_frac_median']:.2%} "
          f"(mean {stats['keys_frac_mean']:.2%}), argmax in sink/local {stats['argmax_in_anchor_region']:.1%}, "
          f"sink mass {stats['sink_mass']:.0%}")


if __name__ == "__main__":
    main()
