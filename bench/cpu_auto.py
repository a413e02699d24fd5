"""CPU: dense SDPA against the sparse CPU path by length, the measurement behind the CPU
rule of ``path="auto"`` (``anchor_ext.dispatch.CPU_SPARSE_FROM_TOKENS``).

    python -m bench.cpu_auto --sizes 2048,4096,8192,16384,32768 --out bench/results/cpu_auto.json

Realistic synthetic inputs (8 q heads, 2 kv heads, D=128, fp32), default geometry and
theta, mean wall time of ``--repeats`` calls after a warm-up, at the machine's thread count.
"""

from __future__ import annotations

import argparse
import time

import torch

import anchor_ext
from anchor_ext import synthetic
from bench.prefill import run_header, write_json


def wall_s(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", default="2048,4096,8192,16384,32768", help="comma-separated N")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--out", default="bench/results/cpu_auto.json")
    args = parser.parse_args(argv)
    results = {**run_header("bench.cpu_auto", argv, args.commit, "cpu"),
               "threads": torch.get_num_threads(), "runs": []}
    for n in (int(s) for s in args.sizes.split(",")):
        q, k, v = synthetic.make_qkv(n, q_heads=8, kv_heads=2, head_dim=128, dtype=torch.float32)
        dense = wall_s(lambda: anchor_ext.prefill(q, k, v, path="dense"), args.repeats)
        sparse = wall_s(lambda: anchor_ext.prefill(q, k, v, path="sparse"), args.repeats)
        results["runs"].append({"n": n, "dense_s": dense, "sparse_s": sparse, "dense_over_sparse": dense / sparse})
        print(f"n={n}: dense {dense:.3f} s, sparse {sparse:.3f} s, sparse is {dense / sparse:.2f}x dense", flush=True)
        write_json(results, args.out)


if __name__ == "__main__":
    main()
