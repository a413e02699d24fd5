"""The long randomized differential run (anchor_ext.fuzz) on the GPU; counts to JSON.

    python -m bench.fuzz --cases 1000 --seed 0 --out bench/results/fuzz_h200.json
    python -m bench.fuzz --seed 1234 --cases 1      # replay one case

Exit status 1 when any case fails; the JSON lists each failing case and what differed.
"""

from __future__ import annotations

import argparse
import sys
import time

from anchor_ext import fuzz

from .prefill import run_header, write_json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cases", type=int, default=1000, help="number of cases")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first case")
    parser.add_argument("--device", default="cuda", help="device to run the ops on")
    parser.add_argument("--max-tokens", type=int, default=20000, help="longest sequence drawn")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="stop after this many seconds (the counts say how many ran)")
    parser.add_argument("--commit", default="unknown", help="git commit recorded in the JSON")
    parser.add_argument("--out", default=None, help="JSON result file")
    args = parser.parse_args(argv)
    start = time.time()

    def seeds():
        for seed in range(args.seed, args.seed + args.cases):
            if args.time_limit is not None and time.time() - start > args.time_limit:
                return
            yield seed

    counts = fuzz.run_cases(seeds(), args.device, max_tokens=args.max_tokens)
    counts["seconds"] = round(time.time() - start, 1)
    counts["seeds"] = [args.seed, args.seed + counts["cases"] - 1]
    print({key: value for key, value in counts.items() if key != "failures"})
    if args.out:
        write_json({**run_header("bench.fuzz", argv, args.commit, args.device), **counts}, args.out)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
