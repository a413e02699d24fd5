"""SparseSkeleton, AnchorAttention and hybrid on the GPU: time per stage, sparsity, recall.

    python -m bench.skeleton_gpu --ns 16384,32768,65536,131072 --out bench/results/skeleton_h100.json

For every N and synthetic profile (standard shape: 32 q heads, 8 kv heads, D 128, bf16):

* anchor (the fused prefill, step 16) at each ``--thetas``: stage 1, 2, 3 and prefill times;
* skeleton, per key (``granularity="key"``) and per 64-block (the paper's), eps 0.8, step 1,
  on the CUDA kernels (csrc/cuda/skeleton.cu): the row-statistics kernel, the whole
  decomposition, the selection (decomposition included), stage 3, and prefill;
* hybrid: skeleton per key (eps 0.8) OR anchor (step 1, ``--hybrid-theta``);
* skeleton per key at the ``--budgets`` sparsity targets (for the recall-vs-sparsity plot).

Recall (mean, 1st percentile) and output error come from ``metrics.sampled_quality`` on
``--quality-blocks`` query blocks per head. cuDNN SDPA on the same tensors is the dense
baseline. JSON (device, versions, commit, command) after each N, and a plot.
"""

from __future__ import annotations

import argparse
import os

import torch

import anchor_ext
from anchor_ext import metrics, skeleton, synthetic
from anchor_ext.reference import SparseConfig
from bench.prefill import cuda_time_ms, run_header, sdpa_time_ms, write_json

ROPE = {"rope_base": synthetic.ROPE_BASE}


def _quality(q, k, v, out, selection, cfg, blocks):
    quality = metrics.sampled_quality(q, k, v, out, selection, cfg, blocks=blocks)
    return {"sparsity": metrics.sparsity(selection, q.shape[2], cfg)["overall"],
            "recall_mean": quality["recall"]["mean"], "recall_p01": quality["recall"]["p01"],
            "err_max": quality["error"]["max"], "err_mean": quality["error"]["mean"]}


def anchor_rows(q, k, v, args):
    rows = []
    cfg = SparseConfig()
    for theta in args.thetas:
        anchors = anchor_ext.anchor(q, k)
        selection = anchor_ext.identify(q, k, anchors, theta=theta)
        out, _ = anchor_ext.sparse_attention(q, k, v, selection)
        ms = {"anchor": cuda_time_ms(lambda: anchor_ext.anchor(q, k), repeats=args.repeats),
              "identify": cuda_time_ms(lambda: anchor_ext.identify(q, k, anchors, theta=theta),
                                       repeats=args.repeats),
              "sparse_attention": cuda_time_ms(lambda: anchor_ext.sparse_attention(q, k, v, selection),
                                               repeats=args.repeats),
              "prefill": cuda_time_ms(lambda: anchor_ext.prefill(q, k, v, theta=theta, path="sparse"),
                                      repeats=args.repeats)}
        rows.append({"method": "anchor", "setting": f"theta={theta:g}, step=16", "ms": ms,
                     **_quality(q, k, v, out, selection, cfg, args.quality_blocks)})
        del anchors, selection, out
    return rows


def skeleton_row(q, k, v, args, *, method, setting, options, timings=True):
    """One skeleton / hybrid configuration (step 1)."""
    cfg = SparseConfig(step=1)
    geometry = {"step": 1}

    def select():
        selection = skeleton.select(q, k, **ROPE, **options, **geometry)
        if method == "hybrid":
            anchors = anchor_ext.anchor(q, k, **geometry)
            selection |= anchor_ext.identify(q, k, anchors, theta=args.hybrid_theta, **geometry)
        return selection

    selection = select()
    out, _ = anchor_ext.sparse_attention(q, k, v, selection, **geometry)
    row = {"method": method, "setting": setting, "options": options,
           **_quality(q, k, v, out, selection, cfg, args.quality_blocks)}
    if timings:
        reps = args.repeats
        ms = {"select": cuda_time_ms(select, warmup=1, repeats=reps),
              "sparse_attention": cuda_time_ms(
                  lambda: anchor_ext.sparse_attention(q, k, v, selection, **geometry), repeats=reps),
              "prefill": cuda_time_ms(lambda: anchor_ext.prefill(
                  q, k, v, method=method, path="sparse", theta=args.hybrid_theta, **ROPE, **options,
                  **geometry), warmup=1, repeats=reps)}
        if method == "skeleton":
            ms["row_stats"] = cuda_time_ms(lambda: torch.ops.anchor.skeleton_row_stats(q, k),
                                           repeats=reps)
            ms["decompose"] = cuda_time_ms(lambda: skeleton.fused_components(q, k, **ROPE),
                                           warmup=1, repeats=reps)
        row["ms"] = ms
    del selection, out
    return row


def run(n, profile, args):
    q, k, v = synthetic.make_qkv(n, q_heads=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                                 device="cuda", seed=0, profile=profile)
    assert skeleton.cuda_path_supported(q, granularity="key", step=1)
    cudnn = sdpa_time_ms(q, k, v, "cudnn", args.repeats)
    rows = anchor_rows(q, k, v, args)
    rows.append(skeleton_row(q, k, v, args, method="skeleton", setting="key, eps=0.8",
                             options={"granularity": "key"}))
    rows.append(skeleton_row(q, k, v, args, method="skeleton", setting="block, eps=0.8",
                             options={"granularity": "block"}))
    rows.append(skeleton_row(q, k, v, args, method="hybrid",
                             setting=f"key eps=0.8 | anchor theta={args.hybrid_theta:g}, step=1",
                             options={"granularity": "key"}))
    for target in args.budgets:
        rows.append(skeleton_row(q, k, v, args, method="skeleton", setting=f"key, sparsity={target:g}",
                                 options={"granularity": "key", "sparsity": target},
                                 timings=target == args.budgets[0]))
    for row in rows:
        ms = row.get("ms", {})
        total = ms.get("prefill")
        print(f"{n:>7} {profile:>9} {row['method']:>8} {row['setting']:<38} sparsity {row['sparsity']:.3f} "
              f"recall {row['recall_mean']:.4f} (p1 {row['recall_p01']:.3f}) err {row['err_max']:.3f}"
              + (f" | {' '.join(f'{key} {val:.2f}' for key, val in ms.items())}"
                 f" | vs cuDNN {cudnn / total:.2f}x" if total and cudnn else ""), flush=True)
    del q, k, v
    torch.cuda.empty_cache()
    return {"n": n, "profile": profile, "cudnn_ms": cudnn, "rows": rows}


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = results["cases"]
    cols = min(4, len(cases))
    nrows = -(-len(cases) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.6 * nrows), squeeze=False)
    for ax, case in zip(axes.flat, cases):
        for method, style in (("anchor", "o-"), ("skeleton", "s--"), ("hybrid", "^:")):
            pts = sorted((r["sparsity"], r["recall_mean"]) for r in case["rows"]
                         if r["method"] == method and "block" not in r["setting"])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=method, ms=4)
        block = [r for r in case["rows"] if "block" in r["setting"]]
        ax.plot([r["sparsity"] for r in block], [r["recall_mean"] for r in block], "kx",
                label="skeleton (64-blocks)")
        ax.set_title(f"{case['profile']}, N={case['n'] // 1024}k", fontsize=10)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("mass recall (mean)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    fig.suptitle(f"{results['device']}, 32/8 heads, D 128, bf16", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", default="16384,32768,65536,131072")
    parser.add_argument("--profiles", default="realistic,mixed")
    parser.add_argument("--thetas", default="8,12")
    parser.add_argument("--hybrid-theta", type=float, default=12.0)
    parser.add_argument("--budgets", default="0.9,0.95,0.97")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quality-blocks", type=int, default=16)
    parser.add_argument("--commit", default=os.environ.get("ANCHOR_EXT_COMMIT", "unknown"))
    parser.add_argument("--out", default="bench/results/skeleton_h100.json")
    args = parser.parse_args(argv)
    args.thetas = [float(t) for t in args.thetas.split(",")]
    args.budgets = [float(t) for t in args.budgets.split(",")] if args.budgets else []
    anchor_ext.set_check_finite(False)  # time the kernels, not the input scan
    results = {**run_header("bench.skeleton_gpu", argv, args.commit),
               "shape": {"q_heads": 32, "kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"},
               "cases": []}
    for n in (int(x) for x in args.ns.split(",")):
        for profile in args.profiles.split(","):
            results["cases"].append(run(n, profile, args))
            write_json(results, args.out)
    plot(results, os.path.splitext(args.out)[0] + ".png")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
