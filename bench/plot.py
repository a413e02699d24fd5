"""Plots and a markdown table from a bench.prefill JSON file.

    python -m bench.plot bench/results/prefill_h100.json   # writes prefill_h100.png beside it

Panels: speedup over cuDNN vs N (one line per theta), mass recall vs sparsity
over the theta sweep (one line per N), and the time split by stage at the
default theta. The table (markdown, printed) is what the README shows.
"""

from __future__ import annotations

import json
import os
import sys


def table(results: dict, theta: float | None = None) -> str:
    lines = ["| N | theta | anchor ms | identify ms | sparse attn ms | total ms | cuDNN ms | speedup | "
             "sparsity | recall (mean / p1) | stage-3 TFLOP/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if theta is not None and r["theta"] != theta:
            continue
        ms = r["ms"]
        lines.append(f"| {r['n']} | {r['theta']:g} | {ms['anchor']:.2f} | {ms['identify']:.2f} | "
                     f"{ms['sparse_attention']:.2f} | {ms['prefill']:.2f} | {ms['sdpa_cudnn']:.2f} | "
                     f"{r['speedup_vs_cudnn']:.2f}x | {r['sparsity']:.3f} | "
                     f"{r['recall_mean']:.4f} / {r['recall_p01']:.3f} | {r['tflops_stage3']:.0f} |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    sizes = sorted({r["n"] for r in rows})
    thetas = sorted({r["theta"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for theta in thetas:
        pts = sorted((r["n"], r["speedup_vs_cudnn"]) for r in rows if r["theta"] == theta)
        axes[0].plot(*zip(*pts), marker="o", label=f"theta={theta:g}")
    axes[0].axhline(1.0, color="gray", lw=0.8)
    axes[0].set(xscale="log", xlabel="N (tokens)", ylabel="speedup over cuDNN SDPA",
                title="whole prefill vs dense cuDNN")
    axes[0].legend(fontsize=8)
    for n in sizes:
        pts = sorted((r["sparsity"], r["recall_mean"]) for r in rows if r["n"] == n)
        axes[1].plot(*zip(*pts), marker="o", label=f"N={n}")
    axes[1].set(xlabel="sparsity (skipped causal pairs)", ylabel="mean mass recall",
                title="theta sweep: recall vs sparsity")
    axes[1].legend(fontsize=8)
    default = [r for r in rows if r["theta"] == 12.0] or rows
    labels = [str(r["n"]) for r in default]
    bottom = [0.0] * len(default)
    for stage in ("anchor", "identify", "sparse_attention"):
        heights = [r["ms"][stage] / r["ms"]["sdpa_cudnn"] for r in default]
        axes[2].bar(labels, heights, bottom=bottom, label=stage)
        bottom = [b + h for b, h in zip(bottom, heights)]
    axes[2].axhline(1.0, color="gray", lw=0.8)
    axes[2].set(xlabel="N (tokens)", ylabel="stage time / cuDNN time",
                title=f"time split by stage, theta={default[0]['theta']:g}")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{results['device']}, torch {results['torch']}, commit {results['commit']}: "
                 f"{results['shape']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    src = argv[0] if argv else "bench/results/prefill_h100.json"
    with open(src) as f:
        results = json.load(f)
    out = os.path.splitext(src)[0] + ".png"
    plot(results, out)
    print(table(results))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
