"""Anchor vs SparseSkeleton vs hybrid: mass recall against sparsity on synthetic heads.

    python -m bench.methods --n 8192 --profiles realistic,slash,staircase,mixed --out bench/results/methods_cpu.json

For each profile: anchor over a theta sweep, skeleton (per-key stripes) over a sparsity
budget sweep and the paper's threshold (eps=0.8), hybrid (skeleton eps=0.8 OR anchor)
over the same theta sweep; all with step 1 (groups of one 128-row block), so the three
methods are compared on the same geometry. Mass recall (mean and 1st percentile) is on
every ``--block-stride``-th query block, sparsity as ``anchor_ext.metrics.sparsity``
counts it. Wall times of the identification on the machine that runs it are recorded
too. JSON (device, versions, commit, command) and a recall-vs-sparsity plot.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from anchor_ext import metrics, reference, skeleton, synthetic
from bench.prefill import run_header, write_json
from anchor_ext.reference import SparseConfig

STEP = 1


def _quality(q, k, selection, cfg, stride):
    recall = metrics.mass_recall(q, k, selection, cfg, block_stride=stride)
    summary = metrics.recall_summary(recall)
    return {"sparsity": metrics.sparsity(selection, q.shape[2], cfg)["overall"],
            "recall_mean": summary["mean"], "recall_p01": summary["p01"]}


def _timed(fn):
    t0 = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, (time.perf_counter() - t0) * 1e3


def run_profile(profile, args, device):
    q, k, _ = synthetic.make_qkv(args.n, q_heads=args.q_heads, kv_heads=args.kv_heads,
                                 head_dim=args.head_dim, dtype=torch.float32, device=device,
                                 seed=0, profile=profile)
    cfg = SparseConfig(step=STEP)
    geometry = dict(step=STEP)
    rope = dict(rope_base=synthetic.ROPE_BASE)
    anchors = reference.anchor(q, k, **geometry)
    rows = []
    skel_eps, t_skel = _timed(lambda: skeleton.select(q, k, granularity="key", **rope, **geometry))
    rows.append({"method": "skeleton", "setting": "eps=0.8", "identify_ms": t_skel,
                 **_quality(q, k, skel_eps, cfg, args.block_stride)})
    for theta in args.thetas:
        sel, t = _timed(lambda: reference.identify(q, k, anchors, theta=theta, **geometry))
        rows.append({"method": "anchor", "setting": f"theta={theta:g}", "identify_ms": t,
                     **_quality(q, k, sel, cfg, args.block_stride)})
        rows.append({"method": "hybrid", "setting": f"eps=0.8, theta={theta:g}",
                     **_quality(q, k, sel | skel_eps, cfg, args.block_stride)})
    for target in args.budgets:
        sel, t = _timed(lambda: skeleton.select(q, k, granularity="key", sparsity=target,
                                                **rope, **geometry))
        rows.append({"method": "skeleton", "setting": f"sparsity={target:g}", "identify_ms": t,
                     **_quality(q, k, sel, cfg, args.block_stride)})
    for row in rows:
        print(f"{profile:>9} {row['method']:>8} {row['setting']:<20} sparsity {row['sparsity']:.3f} "
              f"recall {row['recall_mean']:.4f} (p1 {row['recall_p01']:.3f})", flush=True)
    return {"profile": profile, "rows": rows}


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = results["profiles"]
    fig, axes = plt.subplots(1, len(profiles), figsize=(4.2 * len(profiles), 3.8), squeeze=False)
    for ax, prof in zip(axes[0], profiles):
        for method, style in (("anchor", "o-"), ("skeleton", "s--"), ("hybrid", "^:")):
            pts = sorted((r["sparsity"], r["recall_mean"]) for r in prof["rows"] if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=method, ms=4)
        ax.set_title(prof["profile"], fontsize=10)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("mass recall (mean)")
        ax.legend(fontsize=8)
    fig.suptitle(f"N={results['n']}, {results['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--profiles", default="realistic,slash,staircase,mixed")
    parser.add_argument("--thetas", default="8,10,12,14")
    parser.add_argument("--budgets", default="0.8,0.85,0.9,0.95")
    parser.add_argument("--q-heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-stride", type=int, default=4)
    parser.add_argument("--commit", default=os.environ.get("ANCHOR_EXT_COMMIT", "unknown"))
    parser.add_argument("--out", default="bench/results/methods_cpu.json")
    args = parser.parse_args(argv)
    args.thetas = [float(t) for t in args.thetas.split(",")]
    args.budgets = [float(t) for t in args.budgets.split(",")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {**run_header("bench.methods", argv, args.commit, device),
               "n": args.n, "heads": [args.q_heads, args.kv_heads, args.head_dim], "step": STEP,
               "profiles": []}
    for profile in args.profiles.split(","):
        results["profiles"].append(run_profile(profile, args, device))
        write_json(results, args.out)
    plot(results, os.path.splitext(args.out)[0] + ".png")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
