"""SparseSkeleton's CUDA path (csrc/cuda/skeleton.cu + skeleton.fused_components /
_select_cuda) against the PyTorch reference (anchor_ext.skeleton on the same device).

The op-level argument checks run everywhere; the kernel comparisons need a GPU.
"""

import math
import warnings

import pytest
import torch

import anchor_ext
from anchor_ext import metrics, synthetic
from anchor_ext import skeleton as sk
from anchor_ext.reference import SparseConfig, unpack_bits

from conftest import requires_cuda

ROPE = dict(rope_base=synthetic.ROPE_BASE)


# --------------------------------------------------------------------------- argument checks (CPU)

def test_row_stats_op_is_cuda_only_and_checks_tokens():
    q = torch.randn(1, 2, 64, 64, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="CUDA tensors only"):
        torch.ops.anchor.skeleton_row_stats(q, q[:, :1])
    with pytest.raises(ValueError, match="sink_tokens: .* got 65"):
        torch.ops.anchor.skeleton_row_stats(q, q[:, :1], sink_tokens=65)
    with pytest.raises(ValueError, match="local_tokens: .* got 0"):
        torch.ops.anchor.skeleton_row_stats(q, q[:, :1], local_tokens=0)
    with pytest.raises(ValueError, match="k: the number of kv heads must divide"):
        torch.ops.anchor.skeleton_row_stats(q, torch.randn(1, 3, 64, 64, dtype=torch.bfloat16))


def test_select_op_checks_shapes_and_dtypes():
    heads, n = 3, 1000
    groups = -(-n // 128)
    v = torch.zeros(heads, n)
    h = torch.zeros(heads, groups)
    tau = torch.zeros(heads)
    with pytest.raises(NotImplementedError, match="CUDA tensors only"):
        torch.ops.anchor.skeleton_select(v, v, h, tau, seqlen=n)
    with pytest.raises(ValueError, match=r"horizontal: expected shape \[3, 8\], got \[3, 7\]"):
        torch.ops.anchor.skeleton_select(v, v, h[:, :-1], tau, seqlen=n)
    with pytest.raises(ValueError, match="slash: expected dtype float32, got Double"):
        torch.ops.anchor.skeleton_select(v, v.double(), h, tau, seqlen=n)
    with pytest.raises(ValueError, match="mask_block: expected a divisor of block_size=128"):
        torch.ops.anchor.skeleton_select(v, v, h, tau, seqlen=n, mask_block=48)
    with pytest.raises(ValueError, match=r"tau: expected shape \[3\]"):
        torch.ops.anchor.skeleton_select(v, v, h, tau[:2], seqlen=n)


def test_cuda_path_coverage_is_explicit():
    q = torch.zeros(1, 1, 8, 64, dtype=torch.bfloat16)  # CPU: never the CUDA path
    assert not sk.cuda_path_supported(q)
    if not anchor_ext.built_with_cuda() or not torch.cuda.is_available():
        return
    q = q.cuda()
    assert sk.cuda_path_supported(q) and sk.cuda_path_supported(q, granularity="key", sparsity=0.9)
    assert not sk.cuda_path_supported(q, sparsity=0.9)                    # block budget: PyTorch
    assert not sk.cuda_path_supported(q, granularity="key", sparsity=0.9, budget="normal")
    assert not sk.cuda_path_supported(q, sink_tokens=129)                 # Λ outside the sink
    assert not sk.cuda_path_supported(q, local_tokens=100)
    assert not sk.cuda_path_supported(q.float())


# --------------------------------------------------------------------------- kernels vs reference

CASES = [  # (n, q heads, kv heads, head dim, dtype, profile)
    (2048, 4, 2, 64, torch.bfloat16, "mixed"),
    (3000, 4, 1, 128, torch.bfloat16, "realistic"),   # tail: N not a multiple of 64 or 128
    (1100, 2, 2, 128, torch.float16, "slash"),
    (4096, 8, 2, 128, torch.bfloat16, "staircase"),
    (520, 2, 1, 64, torch.float16, "realistic"),      # 5 groups: a short middle region
]


def _inputs(n, hq, hkv, d, dtype, profile, batch=1, sdpa_layout=False):
    q, k, _ = synthetic.make_qkv(n, batch=batch, q_heads=hq, kv_heads=hkv, head_dim=d, dtype=dtype,
                                 device="cuda", seed=1, profile=profile)
    if sdpa_layout:  # (B, N, H, D) storage seen as (B, H, N, D): non-unit head and row strides
        q, k = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k))
    return q, k


@requires_cuda
@pytest.mark.parametrize("n,hq,hkv,d,dtype,profile", CASES)
@pytest.mark.parametrize("sink,local,batch,sdpa_layout", [(64, 32, 1, False), (16, 64, 2, True)])
def test_row_stats_match_brute_force(n, hq, hkv, d, dtype, profile, sink, local, batch, sdpa_layout):
    q, k = _inputs(n, hq, hkv, d, dtype, profile, batch=batch, sdpa_layout=sdpa_layout)
    mu, var, lam = torch.ops.anchor.skeleton_row_stats(q, k, sink_tokens=sink, local_tokens=local)
    rows = torch.arange(n, device="cuda")
    i, j = rows[:, None], rows[None, :]
    causal = j <= i
    in_lambda = causal & ((j < sink) | (j > i - local))
    interior = causal & ~in_lambda
    count = interior.sum(-1)
    b = batch - 1
    for h in range(hq):
        x = (q[b, h].double() @ k[b, h // (hq // hkv)].double().T) / math.sqrt(d)
        m1 = (x * interior).sum(-1) / count.clamp_min(1)
        m2 = (x * x * interior).sum(-1) / count.clamp_min(1)
        exp_mu = torch.where(count > 0, m1, 0.0)
        exp_var = torch.where(count > 0, m2 - m1 ** 2, 0.0)
        exp_lam = torch.logsumexp(x.masked_fill(~in_lambda, -math.inf), -1)
        torch.testing.assert_close(mu[b, h].double(), exp_mu, rtol=1e-4, atol=2e-4)
        # The kernel takes the interior as (causal sums) - (Λ sums) in fp32: a row's variance
        # is off by ~1e-6 of its causal sum of squares over its interior count (visible
        # only on the first interior rows, where that count is 1).
        causal_sq = (x * x * causal).sum(-1)
        bound = 2e-3 + 2e-3 * exp_var.abs() + 4e-6 * causal_sq / count.clamp_min(1)
        assert ((var[b, h].double() - exp_var).abs() <= bound).all(), (var[b, h] - exp_var).abs().max()
        torch.testing.assert_close(lam[b, h].double(), exp_lam, rtol=1e-4, atol=2e-4)


@requires_cuda
@pytest.mark.parametrize("n,hq,hkv,d,dtype,profile", CASES)
def test_fused_components_match_decompose(n, hq, hkv, d, dtype, profile):
    q, k = _inputs(n, hq, hkv, d, dtype, profile, batch=2 if n <= 2048 else 1)
    fused = sk.fused_components(q, k, **ROPE)
    ref = sk.decompose(q, k, **ROPE)
    for name, tol in (("mu", 2e-4), ("lse", 2e-3), ("s", 2e-3), ("v", 2e-3), ("h", 5e-3)):
        expected = getattr(ref, name)
        assert torch.equal(torch.isfinite(fused[name]), torch.isfinite(expected)), name
        finite = torch.isfinite(expected)
        torch.testing.assert_close(fused[name][finite], expected[finite], rtol=tol, atol=tol,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # sigma = sqrt(var): compare the variance (sqrt magnifies rounding where var ~ 0), with
    # the fp32 bound of test_row_stats_match_brute_force (1e-2 / interior count is ~2x the
    # worst case measured on the first interior rows).
    count = (torch.arange(n, device="cuda") - 64 - 64 + 1).clamp_min(1)
    expected_var = ref.sigma.double() ** 2
    err = (fused["sigma"].double() ** 2 - expected_var).abs()
    assert (err <= 2e-3 + 2e-3 * expected_var + 1e-2 / count).all(), err.max()


def _bits_agree(actual, expected, n, tol=2e-3):
    """At most `tol` of the selected bits differ (keys whose score sits within rounding of tau)."""
    a, e = unpack_bits(actual, n), unpack_bits(expected, n)
    differ = int((a != e).sum())
    assert differ <= tol * max(int(e.sum()), 1) + 4, f"{differ} of {int(e.sum())} selected bits differ"


@requires_cuda
@pytest.mark.parametrize("n,hq,hkv,d,dtype,profile", CASES)
@pytest.mark.parametrize("options", [dict(granularity="key"), dict(granularity="block"),
                                     dict(granularity="key", sparsity=0.6),
                                     dict(granularity="block", slash_pool="mean", eps=0.2),
                                     dict(granularity="key", step=4, eps=2.0)])
def test_select_matches_reference(n, hq, hkv, d, dtype, profile, options):
    q, k = _inputs(n, hq, hkv, d, dtype, profile, batch=2 if n <= 2048 else 1, sdpa_layout=n == 3000)
    assert sk.cuda_path_supported(q, **{key: val for key, val in options.items()
                                         if key in ("granularity", "sparsity", "step")})
    with warnings.catch_warnings():
        warnings.simplefilter("error", sk.SkeletonPathWarning)  # the CUDA path, not PyTorch's
        actual = sk.select(q, k, **ROPE, **options)
    # The reference path: the same function on CPU copies.
    expected = sk.select(q.cpu(), k.cpu(), **ROPE, **options).cuda()
    assert actual.shape == expected.shape and actual.dtype == torch.int32
    _bits_agree(actual, expected, n)


@requires_cuda
def test_budget_mode_hits_target_on_cuda():
    n = 8192
    q, k = _inputs(n, 4, 1, 128, torch.bfloat16, "realistic")
    cfg = SparseConfig(step=1)
    for target in (0.8, 0.9):
        selection = sk.select(q, k, **ROPE, granularity="key", sparsity=target)
        got = metrics.sparsity(selection, n, cfg)["per_head"]
        assert (got - target).abs().max() < 0.02, (target, got)


@requires_cuda
def test_budget_below_the_always_computed_pairs_selects_nothing():
    n = 2048  # at step 1 the sink and local blocks alone are over 1% of the causal pairs
    q, k = _inputs(n, 2, 1, 64, torch.bfloat16, "realistic")
    selection = sk.select(q, k, **ROPE, granularity="key", sparsity=0.99)
    assert selection.shape == (1, 2, n // 128, n // 32) and not selection.any()


@requires_cuda
def test_pytorch_path_on_cuda_warns():
    q, k = _inputs(1024, 2, 1, 64, torch.bfloat16, "realistic")
    sk._WARNED.clear()  # once per option set and process
    with pytest.warns(sk.SkeletonPathWarning, match="budget"):
        sk.select(q, k, **ROPE, granularity="block", sparsity=0.5)


@requires_cuda
def test_skeleton_prefill_on_cuda_runs_the_selection_of_select():
    n = 4096
    q, k, v = synthetic.make_qkv(n, q_heads=4, kv_heads=2, head_dim=128, device="cuda", seed=2,
                                 profile="mixed")
    out, stats = anchor_ext.prefill(q, k, v, method="skeleton", path="sparse", return_stats=True,
                                    granularity="key", **ROPE)
    assert torch.equal(stats["selection"], sk.select(q, k, **ROPE, granularity="key", step=1))
    expected, _ = anchor_ext.sparse_attention(q, k, v, stats["selection"], step=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert 0.0 < stats["sparsity"] < 1.0
