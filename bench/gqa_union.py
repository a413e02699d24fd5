"""GQA selection choice: per-q-head stripes (the default) vs their union over the
q heads that share a kv head (so one K/V gather could serve the whole group).

    python -m bench.gqa_union --sizes 32768,131072 --out bench/results/gqa_union_h100.json

For each N: sparsity, mass recall (sampled blocks) and stage-3 time of both
selections with the current kernel (which still gathers per q head: the union
only adds keys there; its speed benefit needs a kernel that gathers once per kv
group, see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import anchor_ext
from anchor_ext import metrics, synthetic
from anchor_ext.reference import SparseConfig
from bench.prefill import cuda_time_ms, run_header


def union_over_kv_groups(selection: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """OR the bitmasks of the q heads of each kv group, repeated back to every q head."""
    bsz, hq = selection.shape[:2]
    grouped = selection.view(bsz, kv_heads, hq // kv_heads, *selection.shape[2:])
    union = grouped[:, :, 0].clone()
    for i in range(1, hq // kv_heads):
        union |= grouped[:, :, i]
    return union.unsqueeze(2).expand_as(grouped).reshape(selection.shape).contiguous()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="32768,131072")
    parser.add_argument("--theta", type=float, default=12.0)
    parser.add_argument("--commit", default=os.environ.get("ANCHOR_EXT_COMMIT", "unknown"))
    parser.add_argument("--out", default="bench/results/gqa_union.json")
    args = parser.parse_args(argv)
    if not (torch.cuda.is_available() and anchor_ext.built_with_cuda()):
        sys.exit("bench.gqa_union needs a CUDA device and a CUDA build of anchor_ext")
    anchor_ext.set_check_finite(False)
    cfg = SparseConfig()
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        q, k, v = synthetic.make_qkv(n, device="cuda", seed=0)
        selection = anchor_ext.identify(q, k, anchor_ext.anchor(q, k), theta=args.theta)
        for name, sel in (("per_head", selection), ("kv_group_union", union_over_kv_groups(selection, k.shape[1]))):
            out, _ = anchor_ext.sparse_attention(q, k, v, sel)
            quality = metrics.sampled_quality(q, k, v, out, sel, cfg, blocks=16)
            row = {"n": n, "theta": args.theta, "selection": name,
                   "sparsity": metrics.sparsity(sel, n, cfg)["overall"],
                   "recall_mean": quality["recall"]["mean"], "recall_p01": quality["recall"]["p01"],
                   "err_max": quality["error"]["max"],
                   "stage3_ms": cuda_time_ms(lambda: anchor_ext.sparse_attention(q, k, v, sel), repeats=5)}
            rows.append(row)
            print(f"N={n:>7} {name:>15}: sparsity {row['sparsity']:.3f} recall {row['recall_mean']:.4f} "
                  f"(p1 {row['recall_p01']:.3f}) stage3 {row['stage3_ms']:.2f} ms", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    result = {**run_header("bench.gqa_union", argv, args.commit),
              "shape": {"batch": 1, "q_heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"},
              "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
