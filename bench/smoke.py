"""Quick CUDA-vs-reference check of each stage, printing errors (first thing to run on a GPU)."""
import torch

import anchor_ext
from anchor_ext import reference as ref
from anchor_ext import synthetic


def check(n, hq, hkv, d, dtype, theta=3.0, **geometry):
    torch.manual_seed(n)
    q, k, v = synthetic.make_qkv(n, q_heads=hq, kv_heads=hkv, head_dim=d, dtype=dtype, device="cuda")
    a = anchor_ext.anchor(q, k, **geometry)
    a_ref = ref.anchor(q, k, **geometry)
    s = anchor_ext.identify(q, k, a, theta=theta, **geometry)
    s_ref, margin = ref.identify(q, k, a, theta=theta, return_margin=True, **geometry)
    diff = ref.unpack_bits(s, n) != ref.unpack_bits(s_ref, n)
    o, lse = anchor_ext.sparse_attention(q, k, v, s, **geometry)
    o_ref, lse_ref = ref.sparse_attention(q, k, v, s, **geometry)
    fused = anchor_ext.prefill(q, k, v, theta=theta, path="sparse", **geometry)
    print(f"n={n} hq={hq} hkv={hkv} d={d} {dtype} {geometry}: anchor err {(a - a_ref).abs().max():.2e} | "
          f"selection diff {int(diff.sum())} (away from ties {int((diff & (margin >= 1e-3)).sum())}, "
          f"selected {int(ref.unpack_bits(s_ref, n).sum())}) | out err {(o.float() - o_ref).abs().max():.2e} "
          f"lse err {(lse - lse_ref).abs().max():.2e} | fused prefill vs stages "
          f"{(fused.float() - o.float()).abs().max():.2e}", flush=True)


def check_skeleton(n, hq, hkv, d, dtype, **options):
    """SparseSkeleton's CUDA path (row-statistics and selection kernels) against the
    PyTorch path on CPU copies: differing selection bits (near-threshold keys may flip)."""
    from anchor_ext import skeleton

    q, k, _ = synthetic.make_qkv(n, q_heads=hq, kv_heads=hkv, head_dim=d, dtype=dtype, device="cuda",
                                 profile="mixed")
    rope = dict(rope_base=synthetic.ROPE_BASE)
    s = skeleton.select(q, k, **rope, **options)
    s_ref = skeleton.select(q.cpu(), k.cpu(), **rope, **options)
    diff = ref.unpack_bits(s.cpu(), n) != ref.unpack_bits(s_ref, n)
    print(f"skeleton n={n} hq={hq} hkv={hkv} d={d} {dtype} {options}: selection diff {int(diff.sum())} "
          f"of {int(ref.unpack_bits(s_ref, n).sum())} selected", flush=True)


if __name__ == "__main__":
    import sys

    if "--quick" in sys.argv:  # small cases, e.g. under compute-sanitizer: tails, GQA 1/2/4/8
        check(700, 2, 1, 128, torch.bfloat16, theta=8.0, step=2)
        check(300, 2, 2, 64, torch.float16, theta=8.0, step=1)
        check(1000, 4, 1, 64, torch.bfloat16, theta=4.0, step=3, init_blocks=2, local_blocks=0)
        check(777, 8, 1, 128, torch.float16, theta=8.0, step=1)
        check_skeleton(700, 2, 1, 128, torch.bfloat16, granularity="key", sparsity=0.5)
        check_skeleton(1000, 2, 2, 64, torch.float16, granularity="block")
        sys.exit(0)
    for args in [(300, 2, 1, 128, torch.bfloat16), (5000, 4, 2, 128, torch.bfloat16),
                 (5000, 4, 1, 64, torch.float16), (4097, 2, 2, 128, torch.float16)]:
        check(*args, theta=8.0)
        check(*args, theta=8.0, step=2)
    check_skeleton(3000, 4, 2, 128, torch.bfloat16, granularity="key")
    check_skeleton(3000, 4, 2, 128, torch.bfloat16, granularity="block")
