"""Randomized differential testing: every kernel against :mod:`anchor_ext.reference`.

Each case draws, from its own seed, a batch, a GQA ratio, a length (1 to 20k tokens,
odd tails), a head dim, a dtype, a memory layout (contiguous, SDPA-layout views,
misaligned rows, offset views), a geometry, a theta from -inf to inf and a selection
source (anchor's identify, SparseSkeleton, or random bitmasks with bits anywhere,
outside the middle regions and in the last word's padding too), then checks:

* ``anchor`` against ``reference.anchor``;
* ``identify`` against ``reference.identify`` (bits may differ only within rounding of
  the threshold);
* ``sparse_attention`` on that selection against ``reference.sparse_attention``
  (``out`` and ``lse``);
* the fused ``prefill`` (``path="sparse"``) against the chained stages.

A failure names its seed: ``python -m bench.fuzz --seed SEED --cases 1`` replays it.
``tests/test_fuzz_cuda.py`` runs a short version in the GPU suite; ``bench/fuzz.py``
the long one.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from . import ops
from . import reference as ref

__all__ = ["FuzzCase", "draw_case", "run_case", "run_cases", "bits_off_threshold", "OUT_TOL"]

THETAS = (-math.inf, -5.0, 0.0, 2.0, 4.0, 8.0, 12.0, 20.0, 1e9, math.inf)
# Tolerance on `out` (stored in the input dtype) against the fp32 reference; the test
# suite's comparisons use the same table.
OUT_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
TIE_MARGIN = 1e-3  # identify's bits may differ where |abar - score - theta| is below this


def bits_off_threshold(actual, expected, margin, n, tol=TIE_MARGIN) -> int:
    """Selection bits that differ where the reference is not within ``tol`` of theta
    (``margin`` from ``reference.identify(..., return_margin=True)``)."""
    differ = ref.unpack_bits(actual, n) != ref.unpack_bits(expected, n)
    return int((differ & (margin.to(differ.device) >= tol)).sum())


@dataclass
class FuzzCase:
    seed: int
    batch: int
    q_heads: int
    kv_heads: int
    n: int
    head_dim: int
    dtype: torch.dtype
    layout: str
    theta: float
    selection_source: str
    geometry: dict = field(default_factory=dict)
    spread: float = 1.5

    def describe(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return (f"seed={self.seed} B={self.batch} Hq={self.q_heads} Hkv={self.kv_heads} N={self.n} "
                f"D={self.head_dim} {dtype} layout={self.layout} theta={self.theta} "
                f"selection={self.selection_source} geometry={self.geometry} spread={self.spread}")


def draw_case(seed: int, *, max_tokens: int = 20000, max_row_heads: int = 65536) -> FuzzCase:
    """The case of ``seed``: 70% of lengths up to 4096, 30% up to ``max_tokens``, each
    log-uniform; ``batch * q_heads * n`` at most ``max_row_heads`` (the reference loops
    over heads and blocks in Python)."""
    rng = random.Random(seed)
    top = 4096 if rng.random() < 0.7 else max_tokens
    n = max(1, int(round(math.exp(rng.uniform(0.0, math.log(top))))))
    if rng.random() < 0.3:
        n = rng.choice([1, 127, 128, 129, 2047, 2048, 2049, 4095, 4097])
    kv_heads = rng.choice([1, 1, 2, 3])
    ratio = rng.choice([1, 2, 4, 8])
    batch = rng.choice([1, 1, 1, 2, 3])
    while batch * kv_heads * ratio * n > max_row_heads and batch * kv_heads * ratio > 1:
        if batch > 1:
            batch -= 1
        elif ratio > 1:
            ratio //= 2
        else:
            kv_heads -= 1
    geometry = {}
    step = rng.choice([None, 1, 2, 3, 5, 16, 16, 64])
    if step is not None:
        geometry["step"] = step
    if rng.random() < 0.4:
        geometry["init_blocks"] = rng.choice([0, 1, 2])
    if rng.random() < 0.4:
        geometry["local_blocks"] = rng.choice([0, 1, 2, 3])
    if rng.random() < 0.3:
        geometry["sm_scale"] = round(rng.uniform(0.03, 0.2), 4)
    return FuzzCase(seed=seed, batch=batch, q_heads=kv_heads * ratio, kv_heads=kv_heads, n=n,
                    head_dim=rng.choice([64, 128]),
                    dtype=rng.choice([torch.float16, torch.bfloat16]),
                    layout=rng.choice(["contiguous", "contiguous", "heads_last", "row_stride_pad",
                                       "offset_by_one", "prefix_view"]),
                    theta=rng.choice(THETAS),
                    selection_source=rng.choice(["identify", "identify", "random", "random",
                                                 "skeleton"]),
                    geometry=geometry, spread=rng.choice([0.3, 1.0, 1.5, 2.5]))


def _relayout(t: torch.Tensor, layout: str, gen: torch.Generator) -> torch.Tensor:
    """The same values in another legal memory layout (unit stride on D)."""
    b, h, n, d = t.shape
    if layout == "contiguous":
        return t.contiguous()
    if layout == "heads_last":  # SDPA's (B, N, H, D) storage seen as (B, H, N, D)
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "row_stride_pad":  # rows d + 1 apart: not 16-byte aligned
        wide = torch.empty(b, h, n, d + 1, dtype=t.dtype, device=t.device)
    elif layout == "offset_by_one":  # data pointer off by one element
        wide = torch.empty(b, h, n, d + 1, dtype=t.dtype, device=t.device)[..., 1:]
    elif layout == "prefix_view":  # the first n rows of a longer sequence
        wide = torch.randn(b, h, n + 37, d, generator=gen).to(t.device, t.dtype)
    else:
        raise ValueError(f"layout: unknown {layout!r}")
    view = wide[:, :, :n, :d]
    view.copy_(t)
    return view


def make_case_inputs(case: FuzzCase, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q, k, v with a sink-like key and a few heavy keys, in the case's layout."""
    gen = torch.Generator().manual_seed(case.seed)
    shape_q = (case.batch, case.q_heads, case.n, case.head_dim)
    shape_kv = (case.batch, case.kv_heads, case.n, case.head_dim)
    q = torch.randn(shape_q, generator=gen) * case.spread + 0.5 * case.spread
    k = torch.randn(shape_kv, generator=gen) * case.spread
    v = torch.randn(shape_kv, generator=gen)
    k[:, :, 0] += 2.0 * case.spread
    heavy = torch.randint(0, case.n, (min(8, case.n),), generator=gen)
    k[:, :, heavy] += case.spread * torch.randn(case.head_dim, generator=gen).abs()
    return tuple(_relayout(t.to(device=device, dtype=case.dtype), case.layout, gen) for t in (q, k, v))


def _random_selection(case: FuzzCase, cfg: ref.SparseConfig, device) -> torch.Tensor:
    """Bits of any density anywhere, also outside the middle regions and in padding bits."""
    gen = torch.Generator().manual_seed(case.seed + 1)
    density = random.Random(case.seed).choice([0.0, 0.01, 0.1, 0.5, 1.0])
    groups = ref.num_groups(case.n, cfg)
    words = ref.selection_words(case.n)
    bits = torch.rand(case.batch, case.q_heads, groups, words * 32, generator=gen) < density
    packed = ref.pack_bits(bits)  # pack_bits of the padded length keeps the padding bits
    return packed.to(device)


def _selection(case, q, k, anchors, cfg, geometry):
    if case.selection_source == "identify":
        return ops.identify(q, k, anchors, theta=case.theta, **geometry)
    if case.selection_source == "skeleton":
        from . import skeleton

        return skeleton.select(q, k, rope_base=10000.0, granularity="key",
                               **{**geometry, "step": cfg.step})
    return _random_selection(case, cfg, q.device)


def _close(name, actual, expected, tol, failures):
    if actual.shape != expected.shape:
        failures.append(f"{name}: shape {list(actual.shape)} != {list(expected.shape)}")
        return
    bad = ~torch.isclose(actual.float(), expected.float(), rtol=tol, atol=tol, equal_nan=True)
    if bad.any():
        diff = (actual.float() - expected.float()).abs().nan_to_num(math.inf)
        failures.append(f"{name}: {int(bad.sum())} of {bad.numel()} elements off by up to "
                        f"{float(diff.max()):.3g} (tol {tol})")


@torch.no_grad()
def run_case(case: FuzzCase, device="cuda") -> list[str]:
    """Runs one case; returns the failures (empty when every op matches the reference)."""
    q, k, v = make_case_inputs(case, device)
    geometry = dict(case.geometry)
    cfg = ref.SparseConfig(128, geometry.get("step", 16), geometry.get("init_blocks", 1),
                           geometry.get("local_blocks", 1))
    failures: list[str] = []
    anchors = ops.anchor(q, k, **geometry)
    _close("anchor", anchors, ref.anchor(q, k, **geometry), 1e-3, failures)

    selection = _selection(case, q, k, anchors, cfg, geometry)
    if case.selection_source == "identify":
        expected, margin = ref.identify(q, k, anchors, theta=case.theta, return_margin=True, **geometry)
        off_threshold = bits_off_threshold(selection, expected, margin, case.n)
        if off_threshold:
            failures.append(f"identify: {off_threshold} bits differ away from theta")

    out, lse = ops.sparse_attention(q, k, v, selection, **geometry)
    out_ref, lse_ref = ref.sparse_attention(q, k, v, selection, **geometry)
    tol = OUT_TOL[case.dtype]
    _close("sparse_attention out", out, out_ref, tol, failures)
    _close("sparse_attention lse", lse, lse_ref, 1e-3, failures)

    if case.selection_source == "identify":
        fused = ops.prefill(q, k, v, theta=case.theta, path="sparse", **geometry)
        _close("prefill (fused) vs the chained stages", fused, out, tol, failures)
    return failures


def run_cases(seeds, device="cuda", *, log=print, **draw) -> dict:
    """Runs the cases of ``seeds``; returns counts and the failing cases' descriptions."""
    counts = {"cases": 0, "failed": 0, "by_source": {}, "by_dtype": {}, "by_layout": {},
              "max_tokens": 0, "failures": []}
    for seed in seeds:
        case = draw_case(seed, **draw)
        try:
            failures = run_case(case, device)
        except Exception as err:  # noqa: BLE001 - an op that raises on a legal input fails
            failures = [f"raised {type(err).__name__}: {str(err).splitlines()[0][:300]}"]
            if "CUDA error" in str(err):  # the context is broken: later cases cannot run
                counts["aborted"] = f"CUDA error at seed {seed}: later cases not run"
        counts["cases"] += 1
        counts["max_tokens"] = max(counts["max_tokens"], case.n)
        for key, value in (("by_source", case.selection_source), ("by_dtype", str(case.dtype)),
                           ("by_layout", case.layout)):
            counts[key][value] = counts[key].get(value, 0) + 1
        if failures:
            counts["failed"] += 1
            counts["failures"].append({"case": case.describe(), "failures": failures})
            log(f"FAIL {case.describe()}: {failures}; replay: python -m bench.fuzz --seed "
                f"{seed} --cases 1")
        if "aborted" in counts:
            break
    return counts
