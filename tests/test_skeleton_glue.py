"""SparseSkeleton's CUDA-path glue (skeleton.fused_components, skeleton._select_cuda) on CPU.

The two CUDA ops are replaced by brute-force PyTorch models of their contracts (float64
dense scores; per key / per block scores in the kernel's order), so the glue around them
(the sampled regression, the prefix sums, the block and group maxima, the budget
bisection) is checked against the PyTorch path in CI, without a GPU. The kernels
themselves are checked against the same contracts in test_skeleton_cuda.py.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from anchor_ext import skeleton as sk
from anchor_ext import synthetic
from anchor_ext.reference import SparseConfig, num_groups, pack_bits, unpack_bits

ROPE = dict(rope_base=synthetic.ROPE_BASE)


def row_stats_model(q, k, *, sink_tokens, local_tokens, sm_scale):
    """anchor::skeleton_row_stats: interior mean / variance and the Λ log-sum-exp per row."""
    bsz, hq, n, _ = q.shape
    group = hq // k.shape[1]
    rows = torch.arange(n)
    i, j = rows[:, None], rows[None, :]
    causal = j <= i
    in_lambda = causal & ((j < sink_tokens) | (j > i - local_tokens))
    interior = causal & ~in_lambda
    count = interior.sum(-1).clamp_min(1)
    has = interior.any(-1)
    out = [torch.empty(bsz, hq, n) for _ in range(3)]
    for b in range(bsz):
        for h in range(hq):
            x = (q[b, h].double() @ k[b, h // group].double().T) * sm_scale
            m1 = (x * interior).sum(-1) / count
            m2 = (x * x * interior).sum(-1) / count
            out[0][b, h] = torch.where(has, m1, 0.0)
            out[1][b, h] = torch.where(has, (m2 - m1 ** 2).clamp_min(0), 0.0)
            out[2][b, h] = torch.logsumexp(x.masked_fill(~in_lambda, -math.inf), -1)
    return tuple(out)


def select_model(vertical, slash, horizontal, tau, *, seqlen, mask_block=0, count_pairs=False,
                 block_size=128, step=1, init_blocks=1, local_blocks=1):
    """anchor::skeleton_select: the bitmask (or pair counts) from the components."""
    cfg = SparseConfig(block_size, step, init_blocks, local_blocks)
    n, heads = seqlen, vertical.shape[0]
    keys = torch.arange(n)
    groups = num_groups(n, cfg)
    out = torch.zeros(heads, groups, -(-n // 32), dtype=torch.int32)
    pairs = torch.zeros(heads, dtype=torch.long)
    for g in range(groups):
        g0 = g * cfg.group_rows
        g1 = min(n, g0 + cfg.group_rows)
        middle = (keys >= cfg.sink_end) & (keys < g0 - local_blocks * block_size)
        if mask_block:
            key_block = keys // mask_block
            q_blocks = torch.arange(g0 // mask_block, -(-g1 // mask_block))
            distance = (q_blocks[None, :] - key_block[:, None]).clamp_min(0)
            score = ((slash[:, distance] + vertical[:, key_block][:, :, None])
                     + horizontal[:, q_blocks][:, None, :]).amax(-1)
        else:
            score = vertical + slash[:, (g0 - keys).clamp(0, n - 1)] + horizontal[:, g:g + 1]
        bits = middle & (score >= tau[:, None])
        out[:, g] = pack_bits(bits)
        pairs += bits.sum(-1) * (g1 - g0)
    return pairs if count_pairs else out


@pytest.fixture
def kernel_models(monkeypatch):
    monkeypatch.setattr(torch.ops, "anchor", SimpleNamespace(skeleton_row_stats=row_stats_model,
                                                             skeleton_select=select_model))


@pytest.fixture(scope="module")
def inputs():
    q, k, _ = synthetic.make_qkv(1536, batch=2, q_heads=4, kv_heads=2, head_dim=64, seed=3,
                                 profile="mixed")
    return q, k


def test_fused_components_equal_decompose(kernel_models, inputs):
    q, k = inputs
    fused = sk.fused_components(q, k, **ROPE, calib_rows=3)
    ref = sk.decompose(q, k, **ROPE, calib_rows=3)
    for name in ("mu", "lse", "s", "v", "h", "zeta", "alpha", "kappa", "fit_r2"):
        expected = getattr(ref, name)
        finite = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(fused[name]), finite), name
        torch.testing.assert_close(fused[name][finite], expected[finite], rtol=1e-4, atol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("options", [dict(granularity="key"), dict(granularity="block"),
                                     dict(granularity="key", sparsity=0.6),
                                     dict(granularity="block", slash_pool="mean", eps=0.2),
                                     dict(granularity="key", step=4, eps=2.0)])
def test_cuda_path_selection_equals_pytorch_path(kernel_models, inputs, options):
    q, k = inputs
    geometry = {key: options.pop(key) for key in ("step",) if key in options}
    cfg = SparseConfig(step=geometry.get("step", 1))
    glue = sk._select_cuda(q, k, cfg, eps=options.get("eps", 0.8), sparsity=options.get("sparsity"),
                           granularity=options["granularity"], mask_block=sk.MASK_BLOCK,
                           slash_pool=options.get("slash_pool", "max"), rope_base=ROPE["rope_base"],
                           rotary_dim=None, sm_scale=None, samples=None, ridge=1e-3, seed=0,
                           sink_tokens=64, local_tokens=64, calib_rows=1)
    expected = sk.select(q, k, **ROPE, **options, **geometry)
    n = q.shape[2]
    assert glue.shape == expected.shape
    selected = unpack_bits(expected, n)
    assert selected.any()
    differ = int((unpack_bits(glue, n) != selected).sum())
    assert differ <= 1e-3 * int(selected.sum()), f"{differ} of {int(selected.sum())} bits differ"


@pytest.mark.parametrize("n", [1, 100, 127])
def test_fused_components_shorter_than_the_lambda_shape(kernel_models, n):
    """Fewer rows than S + T (no row has interior keys, so no calibration row): the glue
    gives decompose's components (zeta 0) instead of failing (found by the GPU fuzz)."""
    q, k, _ = synthetic.make_qkv(n, q_heads=2, kv_heads=1, head_dim=64, seed=5)
    fused = sk.fused_components(q, k, **ROPE)
    ref = sk.decompose(q, k, **ROPE)
    for name in ("mu", "lse", "v", "h", "zeta"):
        expected = getattr(ref, name)
        finite = torch.isfinite(expected)
        assert torch.equal(torch.isfinite(fused[name]), finite), name
        torch.testing.assert_close(fused[name][finite], expected[finite], rtol=1e-4, atol=1e-4)
