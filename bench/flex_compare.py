"""FlexAttention with our selection vs anchor_ext's stage 3, and dense cuDNN SDPA.

    python -m bench.flex_compare                       # N = 8k, 32k, 128k; KV blocks 128, 64, 32, 16
    python -m bench.flex_compare --quick               # N = 8k only
    python -m bench.flex_compare --sizes 32768 --kv-blocks 128,16 --out bench/results/X.json
    python -m bench.flex_compare --sizes 131072 --append   # add/replace rows of an existing file

For each N, on the standard shape with realistic inputs (``synthetic.make_qkv``):
our selection (``anchor_ext.anchor`` -> ``anchor_ext.identify``, theta 12) is
turned into a ``torch.nn.attention.flex_attention`` ``BlockMask`` that keeps
exactly the same keys:

* the block structure, per (batch, q head, 128-row query tile, KV block): a KV
  block is *kept* when any of its keys is computed for any row of the tile
  (always-computed sink/local region, causal, or a selected stripe of the tile's
  group), and *full* (no mask_mod evaluated) when every key is computed for every
  row; it is built on the GPU from the bitmask with tensor ops (popcounts of the
  bitmask words per KV block, no Python loop over blocks), then
  ``BlockMask.from_kv_blocks``;
* a ``mask_mod`` that reads the bitmask and masks partial tiles to exactly our
  keys, so flex's output equals ``anchor_ext.sparse_attention``'s up to rounding.

KV blocks of 128 keys (the coarsest, flex's default tile) and finer ones (64, 32,
16: flex needs a KV block that is a multiple of its kernel tile BLOCK_N, so for
blocks under 64 keys BLOCK_N is pinned to the block size through
``kernel_options``). Flex computes whole kept tiles, so it computes more (query,
key) pairs than we do; both counts are reported. Times are median CUDA-event
times of ``torch.compile(flex_attention)`` (GQA through ``enable_gqa=True``), of
our ``sparse_attention`` (stage 3 on the same selection) and of the whole sparse
prefill (``torch.ops.anchor.prefill``, stages 1-3), and of
dense causal cuDNN SDPA. Results go to a JSON file (device, versions, commit,
command line, per N: times, pairs, speedups, output differences).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

import anchor_ext
from anchor_ext import metrics, synthetic
from anchor_ext.reference import SparseConfig, middle_range, num_groups, selection_words
from bench.prefill import cuda_time_ms, run_header, sdpa_time_ms

# --------------------------------------------------------------------------- block structure
# Everything here runs on any device (the tests run it on the CPU against a slow loop).


def _popcount(x: torch.Tensor) -> torch.Tensor:
    """Number of set bits of int64 values in [0, 2**32) (SWAR, elementwise)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


def middle_words(n: int, cfg: SparseConfig, device=None) -> torch.Tensor:
    """Bitmask ``(groups, ceil(n/32))`` int64 (values < 2**32) of each group's middle region."""
    groups, words = num_groups(n, cfg), selection_words(n)
    keys = torch.arange(words * 32, device=device)
    bounds = torch.tensor([middle_range(g, cfg) for g in range(groups)], device=device)
    bits = (keys[None, :] >= bounds[:, :1]) & (keys[None, :] < bounds[:, 1:])
    shifts = torch.arange(32, device=device, dtype=torch.int64)
    return (bits.view(groups, words, 32).to(torch.int64) << shifts).sum(-1)


def stripe_counts(selection: torch.Tensor, n: int, cfg: SparseConfig, kv_block: int) -> torch.Tensor:
    """Selected middle-region keys per (batch, q head, group, KV block): int16 ``(B, Hq, G, nKB)``.

    Only bits inside each group's middle region count (the ones stage 3 reads).
    ``kv_block`` must be a multiple of 32 or divide 32.
    """
    words = (selection.to(torch.int64) & 0xFFFFFFFF) & middle_words(n, cfg, selection.device)
    num_kv = -(-n // kv_block)
    if kv_block % 32 == 0:
        per = kv_block // 32
        words = torch.nn.functional.pad(words, (0, num_kv * per - words.shape[-1]))
        counts = _popcount(words).view(*words.shape[:-1], num_kv, per).sum(-1)
    elif 32 % kv_block == 0:
        parts, low = 32 // kv_block, (1 << kv_block) - 1
        sub = torch.stack([(words >> (p * kv_block)) & low for p in range(parts)], dim=-1)
        counts = _popcount(sub.flatten(-2))[..., :num_kv]
    else:
        raise ValueError(f"kv_block must be a multiple of 32 or divide 32, got {kv_block}")
    return counts.to(torch.int16)


def block_structure(selection: torch.Tensor, n: int, cfg: SparseConfig, q_block: int = 128,
                    kv_block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (query tile, KV block) tiles flex must visit, from the selection bitmask.

    Returns ``(kept, full)``, boolean ``(B, Hq, ceil(n/q_block), ceil(n/kv_block))``:
    ``kept`` when some row of the tile computes some key of the block (stage 3's keys:
    sink and local region, causal, plus the group's selected middle keys), ``full`` when
    every row computes every key (rows and keys past ``n`` not counted). Vectorised: no
    loop over blocks. ``q_block`` must divide the group's ``step * block_size`` rows.
    """
    if cfg.group_rows % q_block:
        raise ValueError(f"q_block must divide step*block_size = {cfg.group_rows}, got {q_block}")
    device = selection.device
    num_q, num_kv = -(-n // q_block), -(-n // kv_block)
    r0 = torch.arange(num_q, device=device) * q_block
    r1 = torch.clamp(r0 + q_block, max=n)
    group = r0 // cfg.group_rows
    local = torch.clamp(group * cfg.group_rows - cfg.local_blocks * cfg.block_size, min=0)
    sink = cfg.sink_end
    k0 = (torch.arange(num_kv, device=device) * kv_block)[None, :]
    k1 = torch.clamp(k0 + kv_block, max=n)
    r0, r1, local = r0[:, None], r1[:, None], local[:, None]
    zero, sink_end, end = (torch.full_like(local, x) for x in (0, sink, n))

    def overlap(lo, hi):  # |[k0, k1) ∩ [lo, hi)|, (nQ, nKV)
        return torch.clamp(torch.minimum(k1, hi) - torch.maximum(k0, lo), min=0)

    # Always-computed keys of a row: sink [0, S) and local [L, row], both causal.
    kept_always = (k0 < torch.clamp(r1, max=sink)) | (torch.maximum(k0, local) < torch.minimum(k1, r1))
    # Keys of the block in [0, S) ∪ [L, n): computed for every row at or after them.
    covered_always = overlap(zero, sink_end) + overlap(local, end) - overlap(local, sink_end)
    causal_full = (k1 - 1) <= r0  # every key precedes the tile's first row
    # Stripes lie in the middle region [S, L) of the group: before the tile, disjoint
    # from the always-computed keys.
    counts = stripe_counts(selection, n, cfg, kv_block).index_select(2, group)  # (B, Hq, nQ, nKV)
    kept = kept_always | (counts > 0)
    full = causal_full & ((covered_always + counts) == (k1 - k0))
    return kept, full


def block_structure_slow(selection, n, cfg: SparseConfig, q_block=128, kv_block=128):
    """:func:`block_structure` by brute force over ``reference.computed_mask`` (tests only)."""
    from anchor_ext.reference import computed_mask

    bsz, hq = selection.shape[:2]
    num_q, num_kv = -(-n // q_block), -(-n // kv_block)
    kept = torch.zeros(bsz, hq, num_q, num_kv, dtype=torch.bool)
    full = torch.zeros_like(kept)
    for b in range(bsz):
        for h in range(hq):
            for qt in range(num_q):
                rows = torch.arange(qt * q_block, min(n, (qt + 1) * q_block))
                mask = computed_mask(rows, n, selection[b, h, int(rows[0]) // cfg.group_rows], cfg)
                for kt in range(num_kv):
                    tile = mask[:, kt * kv_block:(kt + 1) * kv_block]
                    kept[b, h, qt, kt] = bool(tile.any())
                    full[b, h, qt, kt] = bool(tile.all())
    return kept, full


def make_mask_mod(selection: torch.Tensor, n: int, cfg: SparseConfig):
    """flex ``mask_mod``: True exactly for the (row, key) pairs stage 3 computes.

    Reads the bitmask ``selection[b, h, group(row), key // 32]``; indices are clamped so
    padded rows/keys past ``n`` never read out of bounds.
    """
    groups, words = selection.shape[2], selection.shape[3]
    group_rows, sink = cfg.group_rows, cfg.sink_end
    before = cfg.local_blocks * cfg.block_size

    def mask_mod(b, h, q_idx, kv_idx):
        group = torch.clamp(q_idx // group_rows, max=groups - 1)
        middle_end = group * group_rows - before  # local keys start here (clipped at 0)
        word = selection[b, h, group, torch.clamp(kv_idx // 32, max=words - 1)]
        bit = ((word >> (kv_idx % 32)) & 1) != 0
        return (kv_idx <= q_idx) & ((kv_idx < sink) | (kv_idx >= middle_end) | bit)

    return mask_mod


def dense_to_kv_blocks(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``(B, H, nQ, nKV)`` -> ``(num int32 (B, H, nQ), indices int32 (B, H, nQ, nKV))``,
    the kept KV block indices first in increasing order (as ``create_block_mask`` makes them)."""
    num = mask.sum(-1, dtype=torch.int32)
    indices = torch.argsort(mask.to(torch.int8), dim=-1, descending=True, stable=True)
    return num, indices.to(torch.int32)


def build_block_mask(selection: torch.Tensor, n: int, cfg: SparseConfig, q_block: int = 128,
                     kv_block: int = 128):
    """``(BlockMask, kept)`` for flex_attention from our selection (see the module docstring)."""
    from torch.nn.attention.flex_attention import BlockMask

    kept, full = block_structure(selection, n, cfg, q_block, kv_block)
    partial_num, partial_idx = dense_to_kv_blocks(kept & ~full)
    full_num, full_idx = dense_to_kv_blocks(full)
    block_mask = BlockMask.from_kv_blocks(
        kv_num_blocks=partial_num, kv_indices=partial_idx, full_kv_num_blocks=full_num,
        full_kv_indices=full_idx, BLOCK_SIZE=(q_block, kv_block),
        mask_mod=make_mask_mod(selection, n, cfg), seq_lengths=(n, n))
    return block_mask, kept


def tile_pairs(kept: torch.Tensor, n: int, q_block: int, kv_block: int) -> float:
    """(query, key) pairs in the kept tiles (what flex computes), clipped at ``n``."""
    rows = torch.clamp(n - torch.arange(0, n, q_block, device=kept.device), max=q_block)
    keys = torch.clamp(n - torch.arange(0, n, kv_block, device=kept.device), max=kv_block)
    per_tile = kept.sum(dim=(0, 1), dtype=torch.int64).double()  # (nQ, nKV), summed over (b, h)
    return float(rows.double() @ per_tile @ keys.double())


# --------------------------------------------------------------------------- benchmark

def _git_commit() -> str:
    env = os.environ.get("ANCHOR_EXT_COMMIT")
    if env:
        return env
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _raise_compile_limits():
    """Every (N, KV block) case compiles its own flex kernel: keep dynamo from giving up."""
    import torch._dynamo

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))


def run_case(n, args, flex_compiled):
    cfg = SparseConfig()
    reps = args.repeats
    q, k, v = synthetic.make_qkv(n, q_heads=args.q_heads, kv_heads=args.kv_heads,
                                 head_dim=args.head_dim, device="cuda", seed=0)
    d = q.shape[-1]
    anchors = anchor_ext.anchor(q, k)
    selection = anchor_ext.identify(q, k, anchors, theta=args.theta)
    ours, _ = anchor_ext.sparse_attention(q, k, v, selection)
    our_pairs = float(metrics.computed_pairs(selection, n, cfg).sum())
    causal_pairs = q.shape[0] * q.shape[1] * n * (n + 1) / 2
    t_ours = cuda_time_ms(lambda: anchor_ext.sparse_attention(q, k, v, selection), repeats=reps)
    # The op itself: always the sparse path (anchor_ext.prefill may dispatch to dense SDPA).
    t_prefill = cuda_time_ms(lambda: torch.ops.anchor.prefill(q, k, v, theta=args.theta), repeats=reps)
    t_cudnn = sdpa_time_ms(q, k, v, "cudnn", max(3, reps // 2))
    row = {
        "n": n, "theta": args.theta,
        "ms": {"anchor_sparse_attention": t_ours, "anchor_prefill": t_prefill, "sdpa_cudnn": t_cudnn},
        "pairs": {"anchor_computed": our_pairs, "causal": causal_pairs},
        "sparsity": 1 - our_pairs / causal_pairs,
        "tflops_anchor_stage3": 4 * d * our_pairs / (t_ours * 1e-3) / 1e12,
        "tflops_sdpa_cudnn": 4 * d * causal_pairs / (t_cudnn * 1e-3) / 1e12 if t_cudnn else None,
        "speedup_anchor_stage3_vs_cudnn": t_cudnn / t_ours if t_cudnn else None,
        "flex": [],
    }
    print(f"N={n:>7}: anchor stage 3 {t_ours:8.2f} ms, prefill {t_prefill:8.2f} ms, cuDNN "
          f"{t_cudnn or float('nan'):8.2f} ms, sparsity {row['sparsity']:.3f}", flush=True)
    for kv_block in args.kv_blocks:
        entry = {"q_block": 128, "kv_block": kv_block}
        try:
            t_build = cuda_time_ms(lambda: build_block_mask(selection, n, cfg, 128, kv_block),
                                   warmup=1, repeats=3)
            block_mask, kept = build_block_mask(selection, n, cfg, 128, kv_block)
            options = {"BLOCK_N": kv_block} if kv_block < 64 else None
            entry["kernel_options"] = options

            def call():
                return flex_compiled(q, k, v, block_mask=block_mask, enable_gqa=True,
                                     kernel_options=options)

            start = time.time()
            out = call()
            torch.cuda.synchronize()
            entry["first_call_s"] = time.time() - start  # compilation included
            t_flex = cuda_time_ms(call, repeats=reps)
            pairs = tile_pairs(kept, n, 128, kv_block)
            err = metrics.output_error(out, ours)
            entry.update({
                "ms": t_flex, "block_mask_build_ms": t_build,
                "tile_pairs": pairs, "tile_pairs_over_anchor_pairs": pairs / our_pairs,
                "kept_tile_fraction": float(kept.sum()) / kept.numel(),
                "tflops_on_tile_pairs": 4 * d * pairs / (t_flex * 1e-3) / 1e12,
                "tflops_on_anchor_pairs": 4 * d * our_pairs / (t_flex * 1e-3) / 1e12,
                "speedup_vs_cudnn": t_cudnn / t_flex if t_cudnn else None,
                "anchor_stage3_speedup_vs_flex": t_flex / t_ours,
                "err_vs_anchor_max": err["max"], "err_vs_anchor_mean": err["mean"],
                "max_abs_diff_vs_anchor": float((out.float() - ours.float()).abs().max()),
            })
            print(f"  flex KV block {kv_block:>3}: {t_flex:8.2f} ms (mask build {t_build:6.2f} ms, "
                  f"first call {entry['first_call_s']:.0f} s), tile pairs {pairs / our_pairs:5.2f}x "
                  f"ours, {entry['tflops_on_tile_pairs']:.0f} TFLOP/s on tiles; ours is "
                  f"{t_flex / t_ours:5.2f}x faster; rel err vs ours {err['max']:.2e}", flush=True)
            del block_mask, kept, out
        except Exception as exc:  # a KV block flex cannot compile or run here
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
            print(f"  flex KV block {kv_block:>3}: failed: {entry['error']}", file=sys.stderr, flush=True)
        row["flex"].append(entry)
        torch.cuda.empty_cache()
    working = [e for e in row["flex"] if "ms" in e]
    if working:
        coarse = next((e for e in working if e["kv_block"] == 128), None)
        finest = min(working, key=lambda e: e["kv_block"])
        row["flex_kv128_ms"] = coarse["ms"] if coarse else None
        row["flex_finest_kv_block"] = finest["kv_block"]
        row["flex_finest_ms"] = finest["ms"]
        row["flex_best_ms"] = min(e["ms"] for e in working)
        row["anchor_stage3_speedup_vs_best_flex"] = row["flex_best_ms"] / t_ours
    del q, k, v, anchors, selection, ours
    torch.cuda.empty_cache()
    return row


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="8192,32768,131072")
    parser.add_argument("--quick", action="store_true", help="N = 8192 only")
    parser.add_argument("--kv-blocks", default="128,64,32,16",
                        help="flex KV block sizes to try (query tiles are 128 rows)")
    parser.add_argument("--theta", type=float, default=12.0)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--commit", default=None, help="default: $ANCHOR_EXT_COMMIT or git HEAD")
    parser.add_argument("--out", default="bench/results/flex_h100.json")
    parser.add_argument("--append", action="store_true",
                        help="add the rows to an existing --out file (split long runs: one N per call)")
    args = parser.parse_args(argv)
    args.sizes = [8192] if args.quick else [int(s) for s in args.sizes.split(",")]
    args.kv_blocks = [int(s) for s in args.kv_blocks.split(",")]
    for kb in args.kv_blocks:
        if kb < 16 or not (kb % 32 == 0 or 32 % kb == 0):
            parser.error(f"--kv-blocks: each must be 16 or a multiple of 32, got {kb}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not (torch.cuda.is_available() and anchor_ext.built_with_cuda()):
        sys.exit("bench.flex_compare needs a CUDA device and a CUDA build of anchor_ext")
    from torch.nn.attention.flex_attention import flex_attention

    anchor_ext.set_check_finite(False)  # time the kernels, not the input scan
    _raise_compile_limits()
    # One compiled flex_attention; dynamic=False: every (N, KV block) gets its own static kernel.
    flex_compiled = torch.compile(flex_attention, dynamic=False)
    results = {
        **run_header("bench.flex_compare", argv, args.commit or _git_commit()),
        "shape": {"batch": 1, "q_heads": args.q_heads, "kv_heads": args.kv_heads,
                  "head_dim": args.head_dim, "dtype": "bfloat16", "profile": "realistic"},
        "notes": "flex uses our selection: 128-row query tiles, KV blocks kept when any key is "
                 "computed, mask_mod exact inside partial tiles; tile_pairs = pairs in kept tiles "
                 "(what flex computes); anchor_computed = pairs stage 3 computes",
        "rows": [],
    }
    if args.append and os.path.exists(args.out):
        with open(args.out) as f:
            previous = json.load(f)
        results["rows"] = [r for r in previous.get("rows", []) if r["n"] not in args.sizes]
        results["command"] = previous.get("command", "") + " ; " + results["command"]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    for n in args.sizes:
        results["rows"].append(run_case(n, args, flex_compiled))
        results["rows"].sort(key=lambda r: r["n"])
        with open(args.out, "w") as f:  # after every N: a run cut short keeps what it measured
            json.dump(results, f, indent=1)
        print(f"wrote {args.out} (N={n})", flush=True)
    return results


if __name__ == "__main__":
    main()
