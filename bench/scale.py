"""Long and batched prefill on one GPU: time, peak memory and recall at scale.

    python -m bench.scale --configs 1x1048576,4x131072 --theta 10 --out bench/results/scale_h200.json

Per config ``BATCHxN`` at the standard shape (32 q heads, 8 kv heads, D 128, bf16,
realistic synthetic inputs): median CUDA-event time of ``prefill(path="sparse")``, peak
memory beyond the inputs (nothing N x N: out, two fp32 rows per head and the bitmask),
sparsity and sampled recall; cuDNN SDPA's time where ``--dense-max-n`` allows.
"""

from __future__ import annotations

import argparse

import torch

import anchor_ext
from anchor_ext import metrics, synthetic
from anchor_ext.reference import SparseConfig

from .prefill import cuda_time_ms, run_header, sdpa_time_ms, write_json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--configs", default="1x1048576,4x131072", help="BATCHxN, comma-separated")
    parser.add_argument("--theta", type=float, default=10.0, help="identification threshold")
    parser.add_argument("--repeats", type=int, default=2, help="timed prefill calls per config")
    parser.add_argument("--dense-max-n", type=int, default=262144,
                        help="time cuDNN SDPA only up to this N (18 s at 1M)")
    parser.add_argument("--quality-blocks", type=int, default=8, help="sampled query blocks per head")
    parser.add_argument("--commit", default="unknown", help="git commit recorded in the JSON")
    parser.add_argument("--out", default="bench/results/scale.json", help="JSON result file")
    args = parser.parse_args(argv)
    anchor_ext.set_check_finite(False)  # time the kernels, not the input scan
    results = {**run_header("bench.scale", argv, args.commit), "theta": args.theta, "rows": []}
    cfg = SparseConfig()
    for config in args.configs.split(","):
        batch, n = (int(x) for x in config.lower().split("x"))
        q, k, v = synthetic.make_qkv(n, batch=batch, device="cuda", seed=0)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = anchor_ext.prefill(q, k, v, theta=args.theta, path="sparse")
        torch.cuda.synchronize()
        peak_extra = torch.cuda.max_memory_allocated() - base
        ms = cuda_time_ms(lambda: anchor_ext.prefill(q, k, v, theta=args.theta, path="sparse"),
                          warmup=0, repeats=args.repeats)
        dense = sdpa_time_ms(q, k, v, "cudnn", 1) if n <= args.dense_max_n else None
        selection = anchor_ext.identify(q, k, anchor_ext.anchor(q, k), theta=args.theta)
        sparsity = metrics.sparsity(selection, n, cfg)["overall"]
        quality = metrics.sampled_quality(q[:1], k[:1], v[:1], out[:1], selection[:1], cfg,
                                          blocks=args.quality_blocks)
        row = {"batch": batch, "n": n, "ms": ms, "cudnn_ms": dense,
               "speedup_vs_cudnn": dense / ms if dense else None, "sparsity": sparsity,
               "recall_mean": quality["recall"]["mean"], "recall_p01": quality["recall"]["p01"],
               "input_gib": sum(t.numel() * t.element_size() for t in (q, k, v)) / 2**30,
               "peak_extra_gib": peak_extra / 2**30,
               "output_gib": out.numel() * out.element_size() / 2**30}
        results["rows"].append(row)
        print(row, flush=True)
        write_json(results, args.out)
        del q, k, v, out, selection
        torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    main()
