"""Whole-model perplexity with every attention layer sparse, on texts of different kinds.

    python -m bench.perplexity --texts code,prose,structured --out bench/results/perplexity_cpu_8k.json

SmolLM2-135M (offline GGUF, :mod:`anchor_ext.models.smollm2`), the first ``--n`` tokens of
each text of :data:`anchor_ext.families.TEXTS`, perplexity of the last ``--last`` tokens
with dense SDPA and with each setting (``--settings``: names of
``bench.accuracy.SETTINGS``) run by ``anchor_ext.prefill(path="sparse")`` in every layer.
Beside each perplexity: the share of causal pairs skipped and, per (layer, head), the mean
and 1st-percentile row recall on sampled blocks (the worst head of each). Writes JSON
(device, versions, commit, command).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from anchor_ext import families
from bench.accuracy import SETTINGS
from bench.prefill import run_header, write_json

DEFAULT_SETTINGS = ("theta=12,recall=0.95 step=1 vote=16,recall=0.99 step=1 vote=16")


def table(results: dict) -> str:
    """Markdown rows: text, dense perplexity, setting, sparse perplexity, pairs skipped,
    mean recall, and the worst head's mean / 1st-percentile recall."""
    lines = ["| text | dense | setting | sparse | skipped | recall | worst head mean / p1 |",
             "|---|---|---|---|---|---|---|"]
    for text, entry in results["texts"].items():
        for name, s in entry["settings"].items():
            lines.append(f"| {text} | {entry['dense']:.3f} | {name} | {s['perplexity']:.3f} "
                         f"({s['ratio'] - 1:+.1%}) | {s['skipped']:.2f} | {s['recall_mean']:.4f} | "
                         f"{s['worst_head_mean']:.3f} / {s['worst_head_p01']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--texts", default=",".join(families.TEXTS), help="names from families.TEXTS")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS, help="names from bench.accuracy.SETTINGS")
    parser.add_argument("--n", type=int, default=8192, help="window length in tokens")
    parser.add_argument("--last", type=int, default=2048, help="tokens whose perplexity is measured")
    parser.add_argument("--blocks", type=int, default=8, help="query blocks per head for recall")
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--out", default="bench/results/perplexity_cpu_8k.json")
    parser.add_argument("--table", metavar="JSON", help="print the markdown table of a result file and exit")
    args = parser.parse_args(argv)
    if args.table:
        import json

        with open(args.table) as f:
            print(table(json.load(f)))
        return
    settings = [s for s in args.settings.split(",") if s]
    for name in settings:
        if name not in SETTINGS:
            parser.error(f"--settings: unknown {name!r}; choose from {list(SETTINGS)}")

    from anchor_ext.integrations import transformers as anchor_hf
    from anchor_ext.models import evaluate, smollm2

    model, tokenizer = smollm2.load_smollm2()
    results = {**run_header("bench.perplexity", argv, args.commit, "cpu"), "n": args.n,
               "last": args.last, "texts": {}}
    for text in args.texts.split(","):
        ids = smollm2.token_window(tokenizer, args.n, families.TEXTS[text]())
        model.set_attn_implementation("sdpa")
        dense = smollm2.perplexity(model, ids, args.last)
        entry = {"dense": dense, "settings": {}}
        for name in settings:
            options = dict(SETTINGS[name])
            impl = anchor_hf.register("anchor_ppl", path="sparse", **options)
            model.set_attn_implementation(impl)
            with anchor_hf.capture() as calls:
                sparse = smollm2.perplexity(model, ids, args.last)
            heads = evaluate.quality_by_head(calls, options, blocks=args.blocks)
            del calls
            row = {"options": options, "perplexity": sparse, "ratio": sparse / dense,
                   "skipped": statistics.fmean(h["sparsity"] for h in heads),
                   "recall_mean": statistics.fmean(h["recall_mean"] for h in heads),
                   "worst_head_mean": min(h["recall_mean"] for h in heads),
                   "worst_head_p01": min(h["recall_p01"] for h in heads),
                   "heads": heads}
            entry["settings"][name] = row
            print(f"{text:>10} {name:>28}: ppl {dense:.3f} -> {sparse:.3f} ({row['ratio'] - 1:+.2%}), "
                  f"skipped {row['skipped']:.3f}, recall {row['recall_mean']:.4f}, worst head mean "
                  f"{row['worst_head_mean']:.3f} p1 {row['worst_head_p01']:.3f}", flush=True)
            results["texts"][text] = entry
            write_json(results, args.out)
        model.set_attn_implementation("sdpa")
    write_json(results, args.out)


if __name__ == "__main__":
    main()
