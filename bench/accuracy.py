"""Selection quality over input families: the frontier against the block oracles (SPEC §5).

    python -m bench.accuracy --device cuda --n 32768,131072 --out bench/results/accuracy_h200.json
    python -m bench.accuracy --device cpu --n 8192 --q-heads 8 --kv-heads 2 \\
        --families realistic,retrieval,real:code --out bench/results/accuracy_cpu_8k.json

For every family of :mod:`anchor_ext.families` and length:

* the per-row, 64-row and 128-row block oracle densities at mean recall 0.90 / 0.95 / 0.99
  (pair-weighted over evenly spaced blocks, like a method's overall density);
* for every setting (the paper's fixed theta at step 16, and recall targets with the
  vote unit and step named in ``SETTINGS``): the kept density (computed causal pairs over
  all causal pairs), mean row recall, p1, the worst of the first 8 rows of the sampled
  groups, the lowest per-head mean, and the share of heads whose mean reaches the target;
* on CUDA, the prefill time against cuDNN's dense SDPA on the same tensors.

Recall is measured on query blocks drawn at random (seeded), not on the rows the
recall probe calibrates on. Writes JSON (device, versions, commit, command) and one
frontier plot per family (density against mean recall beside the oracle curves).
"""

from __future__ import annotations

import argparse
import time

import torch

import anchor_ext
from anchor_ext import families, metrics
from anchor_ext.reference import SparseConfig
from bench.prefill import cuda_time_ms, run_header, write_json

TARGETS = (0.90, 0.95, 0.99)
RECALLS = (*TARGETS, 0.995, 0.999)  # recall targets the settings use
# name -> prefill options (the selection knobs; geometry defaults otherwise).
SETTINGS = {
    **{f"theta={t:g}": {"theta": float(t)} for t in (8, 10, 12, 14, 16)},
    **{f"recall={r:g} step=1 vote=16": {"recall": r, "step": 1, "vote_rows": 16} for r in RECALLS},
    **{f"recall={r:g} step=1 vote=128": {"recall": r, "step": 1, "vote_rows": 128} for r in TARGETS},
    **{f"recall={r:g} step=1 vote={v}": {"recall": r, "step": 1, "vote_rows": v} for r in RECALLS
       for v in (1, 4)},
    **{f"recall={r:g} step=4 vote=16": {"recall": r, "step": 4, "vote_rows": 16} for r in TARGETS},
    **{f"recall={r:g} step=16 vote=128": {"recall": r, "step": 16, "vote_rows": 128} for r in TARGETS},
}


def eval_blocks(n: int, block_size: int, count: int, seed: int) -> list[int]:
    """First rows of ``count`` query blocks drawn at random (seeded), the last block included."""
    blocks = -(-n // block_size)
    gen = torch.Generator().manual_seed(seed)
    picked = torch.randperm(blocks, generator=gen)[:count - 1].tolist() + [blocks - 1]
    return sorted({b * block_size for b in picked})


@torch.no_grad()
def quality(q, k, selection, cfg: SparseConfig, sm_scale, starts) -> dict:
    """Row recall on the blocks starting at ``starts`` and on the first 8 rows of their groups."""
    n = q.shape[2]

    def rows_of(first_rows, count):
        return torch.cat([torch.arange(r0, min(n, r0 + count)) for r0 in first_rows]).to(q.device)

    group_starts = sorted({(r0 // cfg.group_rows) * cfg.group_rows for r0 in starts})
    recall = metrics.mass_recall(q, k, selection, cfg, sm_scale=sm_scale, starts=starts)
    rows = recall[:, :, rows_of(starts, cfg.block_size)].flatten(0, 1).double().cpu()  # (B*Hq, rows)
    first = metrics.mass_recall(q, k, selection, cfg, sm_scale=sm_scale, starts=group_starts)
    first_rows = first[:, :, rows_of(group_starts, 8)]
    head_means = rows.mean(1)
    return {"recall_mean": float(rows.mean()), "recall_p01": float(torch.quantile(rows.flatten(), 0.01)),
            "first_rows_min": float(first_rows.min()),
            "head_mean_min": float(head_means.min()), "head_means": head_means.tolist()}


def time_ms(fn, repeats: int = 5) -> float:
    """Median CUDA-event time of ``fn()`` in ms, after one warm-up call."""
    return cuda_time_ms(fn, warmup=1, repeats=repeats)


def recall_stage_ms(q, k, v, options: dict, cfg: SparseConfig, sm_scale, head_theta) -> dict:
    """CUDA time of each part of the recall mode: stage 1, the probe, identify, stage 3."""
    from anchor_ext import recall as recall_mode

    geometry = dict(step=cfg.step, sm_scale=sm_scale)
    vote_rows = options.get("vote_rows", anchor_ext.RECALL_DEFAULTS["vote_rows"])
    anchors = anchor_ext.anchor(q, k, **geometry)
    selection = anchor_ext.identify(q, k, anchors, vote_rows=vote_rows, head_theta=head_theta, **geometry)
    return {
        "anchor": time_ms(lambda: anchor_ext.anchor(q, k, **geometry)),
        "probe": time_ms(lambda: recall_mode.calibrate_theta(
            q, k, anchors, recall=options["recall"], cfg=cfg, vote_rows=vote_rows, sm_scale=sm_scale)),
        "identify": time_ms(lambda: anchor_ext.identify(q, k, anchors, vote_rows=vote_rows,
                                                        head_theta=head_theta, **geometry)),
        "sparse_attention": time_ms(lambda: anchor_ext.sparse_attention(q, k, v, selection, **geometry)),
    }


def run_family(family: str, n: int, args) -> dict:
    q, k, v, sm_scale = families.make(family, n, device=args.device, seed=args.seed,
                                      q_heads=args.q_heads, kv_heads=args.kv_heads)
    oracles = {}
    for rows in (1, 64, 128):
        density = metrics.oracle_density(q, k, block_rows=rows, targets=TARGETS,
                                         blocks=args.oracle_blocks * (4 if rows == 1 else 1),
                                         sm_scale=sm_scale)
        oracles[str(rows)] = {str(t): density["pair_weighted"][t] for t in TARGETS}
    result = {"family": family, "n": n, "shape": list(q.shape), "kv_heads": k.shape[1],
              "oracle": oracles, "settings": {}}
    starts_by_block = {}
    dense_ms = None
    if args.device == "cuda":
        dense_ms = time_ms(lambda: anchor_ext.prefill(q, k, v, path="dense", sm_scale=sm_scale))
        result["dense_ms"] = dense_ms
    for name in args.settings:
        options = dict(SETTINGS[name])
        cfg = SparseConfig(128, options.get("step", 16), 1, 1)
        t0 = time.perf_counter()
        _, stats = anchor_ext.prefill(q, k, v, path="sparse", return_stats=True, sm_scale=sm_scale,
                                      **options)
        elapsed = time.perf_counter() - t0
        starts = starts_by_block.setdefault(cfg.block_size, eval_blocks(
            n, cfg.block_size, args.eval_blocks, args.seed + 1))
        row = {"options": options, "density": 1.0 - stats["sparsity"],
               **quality(q, k, stats["selection"], cfg, sm_scale, starts)}
        if "head_theta" in stats:
            theta = stats["head_theta"].flatten()
            row["dense_heads"] = int((~torch.isfinite(theta)).sum())
            finite = theta[torch.isfinite(theta)]
            row["theta_median"] = float(finite.median()) if finite.numel() else None
        if dense_ms is not None:
            ms = time_ms(lambda: anchor_ext.prefill(q, k, v, path="sparse", sm_scale=sm_scale, **options))
            row.update(ms=ms, speedup=dense_ms / ms)
            if "recall" in options:
                row["stage_ms"] = recall_stage_ms(q, k, v, options, cfg, sm_scale, stats["head_theta"])
        else:
            row["cpu_s"] = elapsed
        if "recall" in options:
            target = options["recall"]
            row["heads_reaching_target"] = sum(m >= target - 1e-3 for m in row["head_means"]) / len(row["head_means"])
        result["settings"][name] = row
        print(f"{family:>16} n={n:>7} {name:>28}: density {row['density']:.3f} recall "
              f"{row['recall_mean']:.3f} p1 {row['recall_p01']:.3f} first {row['first_rows_min']:.3f}"
              + (f" {row['speedup']:.2f}x" if "speedup" in row else ""), flush=True)
    print(f"{family:>16} n={n:>7} oracle 1/64/128 at .95: "
          + " / ".join(f"{oracles[r]['0.95']:.3f}" for r in ("1", "64", "128")), flush=True)
    return result


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.8), squeeze=False)
    for ax, run in zip(axes[0], runs):
        for rows, style in (("1", ":"), ("128", "--")):
            ax.plot([float(t) for t in run["oracle"][rows]], list(run["oracle"][rows].values()),
                    style, color="k", label=f"{rows}-row oracle")
        for kind, marker in (("theta=", "o"), ("step=1 vote=16", "s"), ("step=4", "^"),
                             ("step=1 vote=128", "v"), ("step=16", "x")):
            pts = [(r["recall_mean"], r["density"]) for name, r in run["settings"].items() if kind in name]
            if pts:
                ax.plot(*zip(*sorted(pts)), marker=marker, label=kind.strip("="), ms=4)
        ax.set_title(f"{run['family']} n={run['n']}", fontsize=9)
        ax.set_xlabel("mean recall")
        ax.set_ylabel("kept density")
        ax.set_yscale("log")
        ax.set_xlim(0.8, 1.0)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: dict, settings) -> str:
    """Markdown: per family and length, the 128-row block oracle at 0.95 / 0.99 and, for each
    of ``settings``, density, mean recall, p1 (and the speedup over cuDNN where timed)."""
    head = "| family | N | 128-row oracle .95 / .99 |" + "".join(f" {s} |" for s in settings)
    lines = [head, "|" + "---|" * (3 + len(settings)),
             ]
    for run in results["runs"]:
        oracle = run["oracle"]["128"]
        cells = [run["family"], f"{run['n'] // 1024}k", f"{oracle['0.95']:.3f} / {oracle['0.99']:.3f}"]
        for name in settings:
            row = run["settings"].get(name)
            if row is None:
                cells.append("")
                continue
            speed = f", {row['speedup']:.2f}x" if "speedup" in row else ""
            cells.append(f"{row['density']:.3f} @ {row['recall_mean']:.3f} (p1 {row['recall_p01']:.2f}){speed}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--families", default=",".join(families.FAMILIES),
                        help="comma-separated names from anchor_ext.families.FAMILIES")
    parser.add_argument("--n", default="8192", help="comma-separated lengths (real:* use 8192)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="names from SETTINGS")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-blocks", type=int, default=16, help="query blocks per head for recall")
    parser.add_argument("--oracle-blocks", type=int, default=8, help="blocks per head for the oracles")
    parser.add_argument("--out", default="bench/results/accuracy.json")
    parser.add_argument("--commit", default="unknown", help="commit recorded in the JSON")
    parser.add_argument("--table", metavar="JSON", help="print the markdown table of a result file and exit")
    args = parser.parse_args(argv)
    if args.table:
        import json

        with open(args.table) as f:
            results = json.load(f)
        names = [s for s in args.settings.split(",") if s] if "--settings" in (argv or __import__("sys").argv) \
            else list(results["runs"][0]["settings"])
        print(table(results, names))
        return
    args.settings = [s for s in args.settings.split(",") if s]
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        parser.error(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    results = {**run_header("bench.accuracy", argv, args.commit, args.device), "runs": []}
    for family in args.families.split(","):
        lengths = [8192] if family.startswith("real:") else [int(x) for x in args.n.split(",")]
        for n in lengths:
            results["runs"].append(run_family(family, n, args))
            write_json(results, args.out)
    plot(results, args.out.replace(".json", ".png"))


if __name__ == "__main__":
    main()
