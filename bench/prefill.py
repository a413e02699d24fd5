"""Prefill benchmark: anchor_ext vs dense SDPA on realistic synthetic inputs.

    python -m bench.prefill --sizes 8192,32768,131072 --thetas 12 --out bench/results/prefill.json

For every (N, theta): median CUDA-event time of each stage (anchor, identify,
sparse_attention) and of the whole ``prefill`` op, dense SDPA with the cuDNN and
the flash backends on the same tensors, speedups, sparsity, mass recall (mean and
1st percentile) and output error on sampled query blocks, TFLOP/s on computed
pairs (``4·D·pairs / time``) and peak extra memory of ``prefill``.
Results go to a JSON file with the device, versions, git commit and command line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import anchor_ext
from anchor_ext import metrics, synthetic
from anchor_ext.reference import SparseConfig


def environment(device: str = "cuda") -> dict:
    """Device and versions, recorded in every result file."""
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version()}


def run_header(module: str, argv, commit: str, device: str = "cuda") -> dict:
    """The fields every result file starts with: device and versions, commit, the command
    that made it (``python -m <module> ...``) and the date."""
    args = sys.argv[1:] if argv is None else list(argv)
    return {**environment(device), "commit": commit,
            "command": " ".join([f"python -m {module}"] + args),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def write_json(results: dict, path: str) -> None:
    """Write a result file (its folder created if needed)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def cuda_time_ms(fn, warmup=2, repeats=10):
    """Median time of ``fn`` in ms, CUDA events around each call, after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sdpa_time_ms(q, k, v, backend, repeats):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    try:
        with sdpa_kernel(backend):
            return cuda_time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                       enable_gqa=True),
                                repeats=repeats)
    except RuntimeError as err:  # backend unavailable for this shape/build
        print(f"  SDPA {backend} unavailable: {err}", file=sys.stderr)
        return None


def run_case(n, theta, args, q, k, v, dense_ms):
    cfg = SparseConfig()
    d = q.shape[-1]
    torch.cuda.synchronize()
    anchors = anchor_ext.anchor(q, k)
    selection = anchor_ext.identify(q, k, anchors, theta=theta)
    out, _ = anchor_ext.sparse_attention(q, k, v, selection)
    reps = args.repeats
    t_anchor = cuda_time_ms(lambda: anchor_ext.anchor(q, k), repeats=reps)
    t_identify = cuda_time_ms(lambda: anchor_ext.identify(q, k, anchors, theta=theta), repeats=reps)
    t_attn = cuda_time_ms(lambda: anchor_ext.sparse_attention(q, k, v, selection), repeats=reps)
    t_total = cuda_time_ms(lambda: anchor_ext.prefill(q, k, v, theta=theta, path="sparse"),
                           repeats=reps)
    # path="auto" (the default): probe, then sparse or cuDNN (anchor_ext.dispatch).
    _, auto = anchor_ext.prefill(q, k, v, theta=theta, return_stats=True)
    t_auto = cuda_time_ms(lambda: anchor_ext.prefill(q, k, v, theta=theta), repeats=reps)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    anchor_ext.prefill(q, k, v, theta=theta, path="sparse")
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - base
    pairs = metrics.computed_pairs(selection, n, cfg)
    sparsity = metrics.sparsity(selection, n, cfg)
    quality = metrics.sampled_quality(q, k, v, out, selection, cfg, blocks=args.quality_blocks)
    row = {
        "n": n, "theta": theta,
        "ms": {"anchor": t_anchor, "identify": t_identify, "sparse_attention": t_attn,
               "prefill": t_total, "prefill_auto": t_auto,
               **{f"sdpa_{key}": val for key, val in dense_ms.items()}},
        "auto_path": auto["path"], "auto_predicted_cost": auto.get("predicted_cost"),
        "auto_probe_fraction": auto.get("probe_fraction"),
        "speedup_auto_vs_cudnn": dense_ms["cudnn"] / t_auto if dense_ms.get("cudnn") else None,
        "speedup_vs_cudnn": dense_ms["cudnn"] / t_total if dense_ms.get("cudnn") else None,
        "speedup_vs_flash": dense_ms["flash"] / t_total if dense_ms.get("flash") else None,
        "sparsity": sparsity["overall"],
        "sparsity_per_head_min": float(sparsity["per_head"].min()),
        "recall_mean": quality["recall"]["mean"], "recall_p01": quality["recall"]["p01"],
        "recall_min": quality["recall"]["min"],
        "err_max": quality["error"]["max"], "err_mean": quality["error"]["mean"],
        "computed_pairs": float(pairs.sum()),
        "tflops_stage3": 4 * d * float(pairs.sum()) / (t_attn * 1e-3) / 1e12,
        "peak_extra_mib": peak_extra / 2**20,  # prefill's allocations, out included
        "peak_total_mib": (base + peak_extra) / 2**20,  # inputs, out and scratch
        "output_mib": out.numel() * out.element_size() / 2**20,
    }
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="8192,32768,131072")
    parser.add_argument("--thetas", default="12")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--profile", default="realistic")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quality-blocks", type=int, default=16)
    parser.add_argument("--flash-max-n", type=int, default=131072,
                        help="skip the flash SDPA baseline above this N (it is the slow one)")
    parser.add_argument("--commit", default=os.environ.get("ANCHOR_EXT_COMMIT", "unknown"))
    parser.add_argument("--out", default="bench/results/prefill.json")
    args = parser.parse_args(argv)
    if not (torch.cuda.is_available() and anchor_ext.built_with_cuda()):
        sys.exit("bench.prefill needs a CUDA device and a CUDA build of anchor_ext")
    anchor_ext.set_check_finite(False)  # time the kernels, not the input scan
    results = {
        **run_header("bench.prefill", argv, args.commit),
        "shape": {"batch": 1, "q_heads": args.q_heads, "kv_heads": args.kv_heads,
                  "head_dim": args.head_dim, "dtype": "bfloat16", "profile": args.profile},
        "rows": [],
    }
    thetas = [float(t) for t in args.thetas.split(",")]
    for n in [int(s) for s in args.sizes.split(",")]:
        q, k, v = synthetic.make_qkv(n, q_heads=args.q_heads, kv_heads=args.kv_heads,
                                     head_dim=args.head_dim, device="cuda", seed=0,
                                     profile=args.profile)
        dense_reps = max(3, args.repeats // 2) if n <= 131072 else 1
        dense_ms = {name: sdpa_time_ms(q, k, v, name, dense_reps)
                    for name in ("cudnn", "flash") if name == "cudnn" or n <= args.flash_max_n}
        for theta in thetas:
            row = run_case(n, theta, args, q, k, v, dense_ms)
            results["rows"].append(row)
            ms = row["ms"]
            print(f"N={n:>7} theta={theta:>5}: anchor {ms['anchor']:7.2f} identify {ms['identify']:7.2f} "
                  f"attn {ms['sparse_attention']:7.2f} total {ms['prefill']:7.2f} ms | cudnn "
                  f"{ms['sdpa_cudnn'] or float('nan'):7.2f} ms -> {row['speedup_vs_cudnn'] or 0:5.2f}x | "
                  f"sparsity {row['sparsity']:.3f} recall {row['recall_mean']:.4f} "
                  f"(p1 {row['recall_p01']:.3f}) err {row['err_max']:.3f} | "
                  f"stage3 {row['tflops_stage3']:.0f} TFLOP/s | auto: {row['auto_path']} "
                  f"{ms['prefill_auto']:7.2f} ms | peak extra {row['peak_extra_mib']:.0f} MiB",
                  flush=True)
            # Written after every case, so a run cut short by a time limit keeps what it measured.
            write_json(results, args.out)
        del q, k, v
        torch.cuda.empty_cache()
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
