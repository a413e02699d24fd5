"""Where SparseSkeleton's CUDA path spends its time: torch.profiler over
``skeleton.select`` (per key, eps 0.8, step 1) on the standard shape.

    python -m bench.profile_skeleton --n 32768
"""

from __future__ import annotations

import argparse

import torch

from anchor_ext import skeleton, synthetic


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=32768)
    parser.add_argument("--granularity", default="key")
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args(argv)
    q, k, _ = synthetic.make_qkv(args.n, q_heads=32, kv_heads=8, head_dim=128, device="cuda", seed=0)

    def run():
        return skeleton.select(q, k, rope_base=synthetic.ROPE_BASE, granularity=args.granularity)

    run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
