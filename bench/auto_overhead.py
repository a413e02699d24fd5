"""Where path="auto"'s time goes on inputs it sends to dense attention.

    python -m bench.auto_overhead --sizes 32768,65536,131072 --out bench/results/auto_overhead.json

Per N, on diffuse inputs at the standard shape: cuDNN SDPA alone, the default
``prefill`` (auto: checks, probe, dense), and its parts timed alone: the NaN/Inf scan,
the probe (stages 1-2 on the prefix plus its one host read) and the decision.
"""

from __future__ import annotations

import argparse

import torch

import anchor_ext
from anchor_ext import dispatch, synthetic
from anchor_ext.reference import SparseConfig

from .prefill import cuda_time_ms, run_header, write_json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", default="32768,65536,131072", help="sequence lengths")
    parser.add_argument("--profile", default="diffuse", help="synthetic profile")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement")
    parser.add_argument("--commit", default="unknown", help="git commit recorded in the JSON")
    parser.add_argument("--out", default="bench/results/auto_overhead.json", help="JSON result file")
    args = parser.parse_args(argv)
    import warnings

    warnings.simplefilter("ignore", dispatch.DensePathWarning)
    results = {**run_header("bench.auto_overhead", argv, args.commit), "profile": args.profile,
               "rows": []}
    cfg = SparseConfig()
    for n in (int(s) for s in args.sizes.split(",")):
        q, k, v = synthetic.make_qkv(n, device="cuda", seed=0, profile=args.profile)
        reps = args.repeats
        _, stats = anchor_ext.prefill(q, k, v, return_stats=True)
        row = {"n": n, "auto_path": stats["path"], "reason": stats["reason"],
               "predicted_cost": stats.get("predicted_cost"),
               "cudnn_ms": cuda_time_ms(lambda: dispatch.dense_prefill(q, k, v, None), repeats=reps),
               "auto_ms": cuda_time_ms(lambda: anchor_ext.prefill(q, k, v), repeats=reps),
               "scan_ms": cuda_time_ms(lambda: anchor_ext._C.check_prefill_args(
                   q, k, v, 12.0, cfg.block_size, cfg.step, cfg.init_blocks, cfg.local_blocks,
                   None, scan_finite=True), repeats=reps),
               "probe_ms": cuda_time_ms(lambda: dispatch.choose_path(q, k, 12.0, cfg, None),
                                        repeats=reps)}
        row["overhead"] = row["auto_ms"] / row["cudnn_ms"] - 1.0
        results["rows"].append(row)
        print(row, flush=True)
        write_json(results, args.out)
        del q, k, v
        torch.cuda.empty_cache()
    return results


if __name__ == "__main__":
    main()
