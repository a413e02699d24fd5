"""bench/flex_compare.py's BlockMask construction, on the CPU (no flex kernels run).

The vectorised block structure (kept / full tiles from the selection bitmask) is
checked against a brute-force loop over ``reference.computed_mask``; the
``mask_mod`` against the same mask element by element (``create_mask``); and the
``BlockMask`` built by ``BlockMask.from_kv_blocks`` against both.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the bench package

from anchor_ext.reference import SparseConfig, computed_mask, middle_range, num_groups, pack_bits  # noqa: E402
from bench import flex_compare as fc  # noqa: E402

flex = pytest.importorskip("torch.nn.attention.flex_attention")


def random_selection(bsz, hq, n, cfg, density, seed, outside_bits=True):
    """Random bitmask; with ``outside_bits`` also bits outside the middle regions (must be ignored)."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.rand(bsz, hq, num_groups(n, cfg), n, generator=gen) < density
    if not outside_bits:
        keys = torch.arange(n)
        for g in range(num_groups(n, cfg)):
            m0, m1 = middle_range(g, cfg)
            bits[:, :, g] &= (keys >= m0) & (keys < m1)
    if density >= 1.0:  # every middle key of some groups: exercises full stripe tiles
        bits[:, :, ::2] = True
    return pack_bits(bits)


def dense_computed(selection, n, cfg):
    """Boolean (B, Hq, n, n) of the pairs stage 3 computes."""
    bsz, hq = selection.shape[:2]
    out = torch.zeros(bsz, hq, n, n, dtype=torch.bool)
    for b in range(bsz):
        for h in range(hq):
            for r0 in range(0, n, cfg.block_size):
                rows = torch.arange(r0, min(n, r0 + cfg.block_size))
                out[b, h, r0:r0 + len(rows)] = computed_mask(
                    rows, n, selection[b, h, r0 // cfg.group_rows], cfg)
    return out


CASES = [
    # (n, cfg, q_block, density)
    (300, SparseConfig(block_size=16, step=2), 16, 0.3),
    (300, SparseConfig(block_size=16, step=2), 32, 0.05),
    (517, SparseConfig(block_size=32, step=2, init_blocks=2, local_blocks=1), 32, 0.2),
    (517, SparseConfig(block_size=32, step=2, init_blocks=0, local_blocks=2), 64, 0.6),
    (640, SparseConfig(block_size=16, step=4, init_blocks=1, local_blocks=0), 32, 1.0),
]


@pytest.mark.parametrize("kv_block", [16, 32, 64, 128])
@pytest.mark.parametrize("n,cfg,q_block,density", CASES)
def test_block_structure_matches_loop(n, cfg, q_block, density, kv_block):
    selection = random_selection(1, 3, n, cfg, density, seed=n + kv_block)
    kept, full = fc.block_structure(selection, n, cfg, q_block, kv_block)
    kept_ref, full_ref = fc.block_structure_slow(selection, n, cfg, q_block, kv_block)
    assert torch.equal(kept, kept_ref)
    assert torch.equal(full, full_ref)
    assert (kept & ~full).any()
    if kv_block <= q_block:
        assert full.any()


def test_stripe_counts_ignore_bits_outside_middle():
    cfg = SparseConfig(block_size=16, step=2)
    n = 300
    sel = random_selection(2, 2, n, cfg, 0.4, seed=1)
    clean = random_selection(2, 2, n, cfg, 0.4, seed=1, outside_bits=False)
    for kv_block in (16, 32, 64):
        assert torch.equal(fc.stripe_counts(sel, n, cfg, kv_block), fc.stripe_counts(clean, n, cfg, kv_block))
    # Totals agree with a plain count of the middle-region bits.
    from anchor_ext.reference import unpack_bits

    total = 0
    for g in range(num_groups(n, cfg)):
        m0, m1 = middle_range(g, cfg)
        total += int(unpack_bits(sel[:, :, g], n)[..., m0:m1].sum())
    assert int(fc.stripe_counts(sel, n, cfg, 32).sum()) == total


def test_popcount():
    x = torch.tensor([0, 1, 0xFFFFFFFF, 0x80000000, 0x12345678, 0xF0F0F0F0], dtype=torch.int64)
    assert fc._popcount(x).tolist() == [bin(int(v)).count("1") for v in x]


@pytest.mark.parametrize("n,cfg,q_block,density", CASES[:3])
def test_mask_mod_is_exact(n, cfg, q_block, density):
    selection = random_selection(2, 2, n, cfg, density, seed=7)
    mask_mod = fc.make_mask_mod(selection, n, cfg)
    dense = flex.create_mask(mask_mod, 2, 2, n, n, device="cpu")
    assert torch.equal(dense, dense_computed(selection, n, cfg))


@pytest.mark.parametrize("kv_block", [16, 64])
@pytest.mark.parametrize("n,cfg,q_block,density", [CASES[0], CASES[2], CASES[4]])
def test_block_mask_from_kv_blocks(n, cfg, q_block, density, kv_block):
    selection = random_selection(1, 2, n, cfg, density, seed=3)
    block_mask, kept = fc.build_block_mask(selection, n, cfg, q_block, kv_block)
    _, full = fc.block_structure(selection, n, cfg, q_block, kv_block)
    assert block_mask.BLOCK_SIZE == (q_block, kv_block)
    num_q, num_kv = -(-n // q_block), -(-n // kv_block)
    assert torch.equal(block_mask.to_dense()[..., :num_q, :num_kv].bool(), kept)
    # Partial and full blocks as flex reads them (the first kv_num_blocks indices of each row).
    for num, idx, expect in ((block_mask.full_kv_num_blocks, block_mask.full_kv_indices, full),
                             (block_mask.kv_num_blocks, block_mask.kv_indices, kept & ~full)):
        dense = torch.zeros_like(expect)
        for b, h, r in torch.cartesian_prod(*(torch.arange(s) for s in num.shape)).tolist():
            dense[b, h, r, idx[b, h, r, :num[b, h, r]].long()] = True
        assert torch.equal(dense, expect)
        # Increasing order inside each row, as create_block_mask produces.
        assert all(idx[b, h, r, :num[b, h, r]].diff().gt(0).all()
                   for b, h, r in torch.cartesian_prod(*(torch.arange(s) for s in num.shape)).tolist())
    # Every computed pair lies in a kept tile; pairs outside kept tiles are never computed.
    computed = dense_computed(selection, n, cfg)
    tiles = kept.repeat_interleave(q_block, 2).repeat_interleave(kv_block, 3)[..., :n, :n]
    assert not (computed & ~tiles).any()
    assert fc.tile_pairs(kept, n, q_block, kv_block) == float(tiles.sum())
    assert fc.tile_pairs(kept, n, q_block, kv_block) >= float(computed.sum())


def test_cli_parses_on_cpu():
    args = fc.parse_args(["--quick", "--kv-blocks", "128,16"])
    assert args.sizes == [8192] and args.kv_blocks == [128, 16]
    assert fc.parse_args([]).sizes == [8192, 32768, 131072]
    with pytest.raises(SystemExit):
        fc.parse_args(["--kv-blocks", "48"])
