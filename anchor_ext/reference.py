"""Pure-PyTorch reference implementations: these define what every op computes.

Everything here is written for clarity, not speed, but it is chunked by query
block so that no ``N x N`` tensor is ever built: memory is O(block_size * N)
per (batch, head) at a time, so 32k-token inputs fit on a CPU.

Layout (SPEC §1): ``q`` is ``(B, Hq, N, D)``, ``k``/``v`` are ``(B, Hkv, N, D)``;
q head ``h`` reads kv head ``h // (Hq // Hkv)``. Scores are natural-log units,
``x_ij = sm_scale * q_i . k_j``. All arithmetic is fp32 on upcast inputs.

Regions (SPEC §2), for query row ``i`` in query block ``b = i // block_size``
of group ``g = b // step`` whose first row is ``G0 = g * step * block_size``:

* always computed: sink keys ``[0, init_blocks*block_size)`` and local keys
  ``[G0 - local_blocks*block_size, i]`` (clipped at 0, causal, counted once);
* middle region of the group: ``[init_blocks*block_size, G0 - local_blocks*block_size)``,
  the only keys that can be selected as stripes.

Selection format (the output of ``identify``, the input of ``sparse_attention``):
an int32 tensor ``(B, Hq, num_groups, ceil(N / 32))``; bit ``j % 32`` of word
``j // 32`` (two's complement, bit 31 is the sign bit) says key ``j`` is selected
for every row of the group. Stage 3 reads only the bits inside the group's middle
region; bits elsewhere are ignored, because those keys are either always computed
or causally masked, so every key is computed at most once.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = [
    "SparseConfig",
    "num_groups",
    "selection_words",
    "always_mask",
    "always_pairs_per_group",
    "region_pair_counts",
    "middle_range",
    "pack_bits",
    "unpack_bits",
    "dense_attention",
    "anchor",
    "check_vote_rows",
    "middle_mask",
    "unit_means",
    "unit_gaps",
    "identify",
    "sparse_attention",
    "prefill",
]


@dataclass(frozen=True)
class SparseConfig:
    """Block geometry shared by all stages (SPEC §2 defaults)."""

    block_size: int = 128
    step: int = 16
    init_blocks: int = 1
    local_blocks: int = 1

    @property
    def group_rows(self) -> int:
        return self.step * self.block_size

    def group_of_row(self, row: int) -> int:
        return row // self.group_rows

    def group_start(self, group: int) -> int:
        return group * self.group_rows

    @property
    def sink_end(self) -> int:
        return self.init_blocks * self.block_size

    def local_start(self, group: int) -> int:
        """First local key of ``group`` (may be below the sink end, never below 0)."""
        return max(0, self.group_start(group) - self.local_blocks * self.block_size)


def num_groups(n: int, cfg: SparseConfig) -> int:
    """Number of query groups: ``ceil(ceil(n / block_size) / step)``."""
    num_q_blocks = -(-n // cfg.block_size)
    return -(-num_q_blocks // cfg.step)


def selection_words(n: int) -> int:
    """int32 words per group row of the selection bitmask: ``ceil(n / 32)``."""
    return -(-n // 32)


def middle_range(group: int, cfg: SparseConfig) -> tuple[int, int]:
    """Half-open key range ``[start, end)`` of ``group``'s middle region (may be empty)."""
    start = cfg.sink_end
    end = cfg.group_start(group) - cfg.local_blocks * cfg.block_size
    return start, max(start, end)


def always_pairs_per_group(n: int, cfg: SparseConfig) -> torch.Tensor:
    """Always-computed causal (query, key) pairs of each group, float64 ``(num_groups,)``.

    Row ``i`` of group ``g`` always computes the sink ``[0, min(S, i+1))`` and the local
    keys ``[L_g, i]``, minus their overlap (SPEC §2).
    """
    rows = torch.arange(n, dtype=torch.float64)
    group = torch.div(rows, cfg.group_rows, rounding_mode="floor")
    local_start = (group * cfg.group_rows - cfg.local_blocks * cfg.block_size).clamp_min(0)
    sink = torch.clamp(rows + 1, max=cfg.sink_end)
    overlap = torch.clamp(sink - local_start, min=0)
    always = sink + (rows + 1 - local_start) - overlap
    return torch.zeros(num_groups(n, cfg), dtype=torch.float64).index_add_(0, group.long(), always)


@functools.lru_cache(maxsize=64)
def region_pair_counts(n: int, cfg: SparseConfig) -> tuple[float, float]:
    """``(always, middle)``: per head, the causal pairs always computed and the pairs in
    middle regions (each group's rows times its middle keys), i.e. the least and most a
    selection can add."""
    always = float(always_pairs_per_group(n, cfg).sum())
    middle = 0.0
    for g in range(num_groups(n, cfg)):
        m0, m1 = middle_range(g, cfg)
        rows = min(n, cfg.group_start(g) + cfg.group_rows) - cfg.group_start(g)
        middle += float(rows * (m1 - m0))
    return always, middle


def always_mask(rows: torch.Tensor, n_keys: int, cfg: SparseConfig) -> torch.Tensor:
    """Boolean ``(len(rows), n_keys)``: key ``j`` is always computed for row ``i``.

    True when ``j <= i`` and (``j`` is a sink key or ``j >= local_start(group(i))``).
    """
    keys = torch.arange(n_keys, device=rows.device)
    group = rows // cfg.group_rows
    local_start = (group * cfg.group_rows - cfg.local_blocks * cfg.block_size).clamp_min(0)
    causal = keys[None, :] <= rows[:, None]
    in_region = (keys[None, :] < cfg.sink_end) | (keys[None, :] >= local_start[:, None])
    return causal & in_region


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a boolean ``(..., n)`` tensor into int32 words ``(..., ceil(n/32))``."""
    n = bits.shape[-1]
    words = selection_words(n)
    padded = torch.zeros(*bits.shape[:-1], words * 32, dtype=torch.int64, device=bits.device)
    padded[..., :n] = bits.to(torch.int64)
    weights = torch.bitwise_left_shift(torch.ones(32, dtype=torch.int64, device=bits.device),
                                       torch.arange(32, device=bits.device))
    packed = (padded.view(*bits.shape[:-1], words, 32) * weights).sum(-1)
    # Reinterpret the unsigned 32-bit value as two's-complement int32.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 ``(..., W)`` -> boolean ``(..., n)``."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int64)
    bits = (words.to(torch.int64)[..., None] >> shifts) & 1
    return bits.flatten(-2)[..., :n].bool()


def _scale(sm_scale: float | None, d: int) -> float:
    return 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)


def _kv_head(h: int, hq: int, hkv: int) -> int:
    return h // (hq // hkv)


def _query_blocks(n: int, block_size: int):
    for start in range(0, n, block_size):
        yield start, min(n, start + block_size)


def _masked_attention(q, k, v, keep_mask, *, sm_scale, block_size):
    """Softmax attention of every query block over the keys ``keep_mask`` allows.

    ``keep_mask(b, h, rows, n_keys)`` returns the boolean ``(len(rows), n_keys)`` mask
    of the keys each row attends to (keys at or after ``rows[-1] + 1`` are never
    passed). Returns ``(out fp32, lse fp32 natural log)``.
    """
    bsz, hq, n, d = q.shape
    hkv = k.shape[1]
    scale = _scale(sm_scale, d)
    out = torch.empty(bsz, hq, n, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(bsz, hq, n, dtype=torch.float32, device=q.device)
    for b in range(bsz):
        for h in range(hq):
            kh = k[b, _kv_head(h, hq, hkv)].float()
            vh = v[b, _kv_head(h, hq, hkv)].float()
            for r0, r1 in _query_blocks(n, block_size):
                rows = torch.arange(r0, r1, device=q.device)
                s = (q[b, h, r0:r1].float() @ kh[:r1].T) * scale
                s = s.masked_fill(~keep_mask(b, h, rows, r1), -math.inf)
                lse[b, h, r0:r1] = torch.logsumexp(s, dim=-1)
                out[b, h, r0:r1] = torch.softmax(s, dim=-1) @ vh[:r1]
    return out, lse


def dense_attention(q, k, v, *, sm_scale=None, block_size=128):
    """Causal softmax attention in fp32. Returns ``(out fp32, lse fp32 natural log)``."""
    def causal(b, h, rows, n_keys):
        return torch.arange(n_keys, device=rows.device)[None, :] <= rows[:, None]

    return _masked_attention(q, k, v, causal, sm_scale=sm_scale, block_size=block_size)


def anchor(q, k, *, block_size=128, step=16, init_blocks=1, local_blocks=1, sm_scale=None):
    """Stage 1: ``anchor_i = max_j x_ij`` over row ``i``'s always-computed keys. fp32 ``(B, Hq, N)``."""
    cfg = SparseConfig(block_size, step, init_blocks, local_blocks)
    bsz, hq, n, d = q.shape
    hkv = k.shape[1]
    scale = _scale(sm_scale, d)
    result = torch.empty(bsz, hq, n, dtype=torch.float32, device=q.device)
    for b in range(bsz):
        for h in range(hq):
            kh = k[b, _kv_head(h, hq, hkv)].float()
            for r0, r1 in _query_blocks(n, block_size):
                rows = torch.arange(r0, r1, device=q.device)
                s = (q[b, h, r0:r1].float() @ kh[:r1].T) * scale
                s = s.masked_fill(~always_mask(rows, r1, cfg), -math.inf)
                result[b, h, r0:r1] = s.amax(dim=-1)
    return result


def check_vote_rows(vote_rows, block_size: int) -> int:
    """``vote_rows`` resolved (``0``/``None`` means ``block_size``), or ``ValueError``."""
    if vote_rows in (0, None):
        return block_size
    if not isinstance(vote_rows, int) or vote_rows < 1 or block_size % vote_rows:
        raise ValueError(f"vote_rows: expected a positive divisor of block_size={block_size}, "
                         f"got {vote_rows!r}")
    return vote_rows


def middle_mask(groups: torch.Tensor, n_keys: int, cfg: SparseConfig) -> torch.Tensor:
    """Boolean ``(len(groups), n_keys)``: key ``j`` lies in the group's middle region."""
    keys = torch.arange(n_keys, device=groups.device)
    middle_end = groups * cfg.group_rows - cfg.local_blocks * cfg.block_size
    return (keys[None, :] >= cfg.sink_end) & (keys[None, :] < middle_end[:, None])


def unit_means(q: torch.Tensor, anchors: torch.Tensor, cfg: SparseConfig, vote_rows: int,
               groups: torch.Tensor):
    """Mean query and mean anchor of every vote unit (``vote_rows`` consecutive rows) of
    ``groups`` (a 1-D long tensor).

    Returns ``q_mean`` fp32 ``(B, Hq, G, U, D)`` and ``a_mean`` fp32 ``(B, Hq, G, U)`` with
    ``G = len(groups)`` and ``U = step * block_size / vote_rows``; units past the last row
    get ``a_mean = +inf`` (they never vote), the last unit may be partial (its mean is over
    its rows). Only the rows of ``groups`` are read.
    """
    n = q.shape[2]
    units = cfg.group_rows // vote_rows
    rows = groups[:, None] * cfg.group_rows + torch.arange(cfg.group_rows, device=q.device)
    valid = (rows < n).float()                                                  # (G, rows)
    rows = rows.clamp_max(n - 1)
    q_rows = q[:, :, rows].float() * valid[..., None]                          # (B, Hq, G, rows, D)
    a_rows = anchors[:, :, rows].float() * valid
    count = valid.view(len(groups), units, vote_rows).sum(-1)                  # (G, U)
    shape = (*q.shape[:2], len(groups), units, vote_rows)
    q_mean = q_rows.view(*shape, q.shape[3]).sum(-2) / count.clamp_min(1)[..., None]
    a_mean = a_rows.view(shape).sum(-1) / count.clamp_min(1)
    return q_mean, a_mean.masked_fill(count == 0, math.inf)


def unit_gaps(q, k, anchor_scores, cfg: SparseConfig, *, vote_rows=None, groups=None,
              sm_scale=None):
    """Per (batch, q head, group, key): the smallest ``abar_u - sm_scale * qbar_u . k_j`` over
    the group's vote units ``u``, fp32 ``(B, Hq, len(groups), N)``, ``+inf`` outside the
    group's middle region. Key ``j`` is selected at threshold ``theta`` exactly when its gap
    is below ``theta``. ``groups``: a 1-D index tensor (default: every group). One q head at
    a time: memory ``O(G * U * N)`` per head.
    """
    bsz, hq, n, d = q.shape
    hkv = k.shape[1]
    scale = _scale(sm_scale, d)
    vote_rows = check_vote_rows(vote_rows, cfg.block_size)
    if groups is None:
        groups = torch.arange(num_groups(n, cfg), device=q.device)
    q_mean, a_mean = unit_means(q, anchor_scores, cfg, vote_rows, groups)
    if vote_rows < cfg.block_size:  # sub-block units: the mean rounded to the input dtype
        q_mean = q_mean.to(q.dtype).float()
    in_middle = middle_mask(groups, n, cfg)
    gaps = torch.empty(bsz, hq, len(groups), n, dtype=torch.float32, device=q.device)
    for b in range(bsz):
        for h in range(hq):
            kh = k[b, _kv_head(h, hq, hkv)].float()
            scores = torch.einsum("gud,nd->gun", q_mean[b, h], kh) * scale
            gaps[b, h] = (a_mean[b, h][..., None] - scores).amin(1).masked_fill(~in_middle, math.inf)
    return gaps


def identify(q, k, anchor_scores, *, theta=12.0, block_size=128, step=16, init_blocks=1,
             local_blocks=1, sm_scale=None, vote_rows=None, head_theta=None, return_margin=False):
    """Stage 2: stripe selection as an int32 bitmask ``(B, Hq, num_groups, ceil(N/32))``.

    Each group's rows are cut into vote units of ``vote_rows`` consecutive rows (default
    ``block_size``: the paper's query blocks). For each unit: ``qbar`` = mean of its rows
    (fp32 for whole blocks; for smaller units rounded to the input dtype, which keeps the
    kernels' scores one tensor-core product), ``abar`` = mean of their anchors; middle key ``j`` gets the unit's vote when
    ``abar - scale * qbar . k_j < theta``. A group's selection is the union of its units'
    votes. ``head_theta`` (fp32 ``(B, Hq)``, may hold ``+inf``: every middle key) replaces
    ``theta`` per head.

    With ``return_margin=True`` also returns, per group and key, ``|min gap - theta|``
    (``inf`` outside the middle region): tests use it to forgive ties within rounding of
    the threshold.
    """
    cfg = SparseConfig(block_size, step, init_blocks, local_blocks)
    bsz, hq, n, _ = q.shape
    gaps = unit_gaps(q, k, anchor_scores, cfg, vote_rows=vote_rows, sm_scale=sm_scale)
    if head_theta is None:
        threshold = torch.full((bsz, hq), float(theta), device=q.device)
    else:
        threshold = head_theta.to(device=q.device, dtype=torch.float32)
    threshold = threshold[:, :, None, None]
    in_middle = torch.isfinite(gaps)
    bits = (gaps < threshold) & in_middle
    margin = torch.where(in_middle, (gaps - threshold).abs(), torch.full_like(gaps, math.inf))
    margin = margin.nan_to_num(nan=math.inf, posinf=math.inf)  # inf thresholds leave no ties
    packed = pack_bits(bits)
    return (packed, margin) if return_margin else packed


def computed_mask(rows, n_keys, selection_row, cfg: SparseConfig):
    """Boolean ``(len(rows), n_keys)`` of the keys stage 3 computes for ``rows`` (all in one group).

    ``selection_row`` is the group's bitmask words ``(W,)``; only bits inside the
    group's middle region count.
    """
    group = int(rows[0]) // cfg.group_rows
    m0, m1 = middle_range(group, cfg)
    selected = unpack_bits(selection_row, n_keys)
    keys = torch.arange(n_keys, device=rows.device)
    selected = selected & (keys >= m0) & (keys < m1)
    return always_mask(rows, n_keys, cfg) | selected[None, :]


def sparse_attention(q, k, v, selection, *, block_size=128, step=16, init_blocks=1,
                     local_blocks=1, sm_scale=None):
    """Stage 3: attention over always-computed keys plus selected stripes.

    Returns ``(out fp32 (B, Hq, N, D), lse fp32 (B, Hq, N))``.
    """
    cfg = SparseConfig(block_size, step, init_blocks, local_blocks)

    def computed(b, h, rows, n_keys):
        return computed_mask(rows, n_keys, selection[b, h, int(rows[0]) // cfg.group_rows], cfg)

    return _masked_attention(q, k, v, computed, sm_scale=sm_scale, block_size=block_size)


def prefill(q, k, v, *, theta=12.0, block_size=128, step=16, init_blocks=1, local_blocks=1,
            sm_scale=None):
    """The whole AnchorAttention prefill: stages 1-3. Returns ``out`` fp32."""
    geometry = dict(block_size=block_size, step=step, init_blocks=init_blocks,
                    local_blocks=local_blocks, sm_scale=sm_scale)
    anchors = anchor(q, k, **geometry)
    selection = identify(q, k, anchors, theta=theta, **geometry)
    out, _ = sparse_attention(q, k, v, selection, **geometry)
    return out
