"""Bad inputs on a device: each must raise an error naming the argument, never crash.

    python -m bench.bad_inputs --device cuda      # a markdown table: case, error, message

Each case runs in a child process of its own, so a crash (the lent GPU image segfaulted
on every check whose message held a number, csrc/check.h) shows as a crash in its row
instead of ending the run. ``tests/test_cuda.py`` checks the same cases in-process.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch

# name -> (q shape, k/v shape, dtype, prefill options, message pattern)
CASES = {
    "Hq=12 with Hkv=5": ((1, 12, 256, 64), (1, 5, 256, 64), "bfloat16", {},
                         r"must divide the number of q heads .* Hq=12 and Hkv=5"),
    "D=96": ((1, 2, 256, 96), (1, 1, 256, 96), "bfloat16", {},
             r"head dim D in \{64, 128\} on CUDA, got D=96"),
    "D=256": ((1, 2, 256, 256), (1, 1, 256, 256), "bfloat16", {},
              r"head dim D in \{64, 128\} on CUDA, got D=256"),
    "fp32 on CUDA": ((1, 2, 256, 64), (1, 1, 256, 64), "float32", {}, r"float16 or bfloat16 on CUDA"),
    "block_size=96": ((1, 2, 256, 64), (1, 1, 256, 64), "bfloat16", {"block_size": 96},
                      r"block_size: the CUDA kernels support 128, got 96"),
    "block_size=0": ((1, 2, 256, 64), (1, 1, 256, 64), "bfloat16", {"block_size": 0},
                     r"block_size: expected a positive integer, got 0"),
    "step=0": ((1, 2, 256, 64), (1, 1, 256, 64), "bfloat16", {"step": 0},
               r"step: expected a positive integer, got 0"),
    "step=1000": ((1, 2, 256, 64), (1, 1, 256, 64), "bfloat16", {"step": 1000},
                  r"step: the CUDA identify kernel supports step <= 256, got 1000"),
    "sm_scale=0": ((1, 2, 256, 64), (1, 1, 256, 64), "bfloat16", {"sm_scale": 0.0},
                   r"sm_scale: expected a finite positive number .* got 0"),
    "q[..., ::2]": ((1, 2, 256, 128), (1, 1, 256, 64), "bfloat16", {"q_every_other": True},
                    r"q: expected unit stride on the last \(head\) dimension, got strides "
                    r"\[65536, 32768, 128, 2\]"),
    "NaN in v": ((1, 2, 256, 64), (1, 1, 256, 64), "bfloat16", {"nan_in": "v"},
                 r"v: expected finite values, found NaN or Inf"),
    "Inf in k": ((1, 2, 256, 64), (1, 1, 256, 64), "bfloat16", {"inf_in": "k"},
                 r"k: expected finite values, found NaN or Inf"),
}


def make_case(name: str, device: str):
    """``(q, k, v, options)`` of case ``name`` on ``device``."""
    q_shape, kv_shape, dtype, options, _ = CASES[name]
    options = dict(options)
    dtype = getattr(torch, dtype)
    q = torch.randn(q_shape, device=device, dtype=dtype)
    k, v = (torch.randn(kv_shape, device=device, dtype=dtype) for _ in range(2))
    if options.pop("q_every_other", False):
        q = q[..., ::2]
    for key, bad in (("nan_in", float("nan")), ("inf_in", float("inf"))):
        which = options.pop(key, None)
        if which is not None:
            {"q": q, "k": k, "v": v}[which][0, 0, 3, 1] = bad
    return q, k, v, options


def run_one(name: str, device: str) -> str:
    import anchor_ext

    q, k, v, options = make_case(name, device)
    try:
        anchor_ext.prefill(q, k, v, path="sparse", **options)
    except Exception as err:  # noqa: BLE001 - the table reports whatever was raised
        return f"{type(err).__name__}: {str(err).splitlines()[0]}"
    return "no error"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda", help="device of the inputs")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args(argv)
    if args.case is not None:
        print(run_one(args.case, args.device))
        return 0
    print("| case | result (each in its own process) |\n|---|---|")
    for name in CASES:
        child = subprocess.run([sys.executable, "-m", "bench.bad_inputs", "--device", args.device,
                                "--case", name], capture_output=True, text=True, timeout=300)
        result = child.stdout.strip() if child.returncode == 0 else \
            f"process ended with exit status {child.returncode}: {child.stderr.strip()[-200:]}"
        print(f"| {name} | {result.replace('|', '/')} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
