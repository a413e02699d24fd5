"""Recall-targeted identification: a per-head threshold chosen from an exact probe.

A fixed ``theta`` (natural-log units) buys a different recall on every head and input,
so a user cannot choose it. Here the user names the recall instead:

1. **Vote units.** Identification compares, for every middle-region key ``j`` of a group,
   ``abar_u - sm_scale * qbar_u . k_j < theta_h`` for each *vote unit* ``u`` of the group
   (``vote_rows`` consecutive query rows: their mean query ``qbar_u`` and mean anchor
   ``abar_u``); the group keeps the union of its units' votes. ``vote_rows = block_size``
   is the paper's block mean, smaller units see keys that only some rows need, 1 is an
   exact per-row compare. The smallest gap ``min_u (abar_u - score_uj)`` decides key
   ``j``: it is selected exactly when its gap is below ``theta_h``.
2. **Probe.** For a few groups spread over the sequence (``probe_groups``), a few rows of
   each (``probe_rows``, the group's first row among them: its local window is the
   shortest) get their exact dense softmax over all earlier keys, and their group's gaps
   are computed. A key adds its probability to a probe row's recall once ``theta_h``
   exceeds its gap, so a histogram of probability over gap bins gives the rows' mean
   recall as a function of ``theta_h`` at once (no sort).
3. **Threshold.** ``theta_h`` is the smallest grid value at which the probe rows' *mean*
   recall reaches the target; a head that cannot reach it below :data:`THETA_GRID`'s top
   gets ``+inf``: every middle key, i.e. dense (a head whose block means miss its rows'
   keys gets more keys, or goes dense on its own).

Everything is tensor code on the inputs' device with fixed shapes: no host
synchronisation, CUDA-graph capturable. The gaps are those of
:func:`anchor_ext.reference.unit_gaps`, which defines ``identify`` with ``vote_rows`` and
per-head thresholds.
"""

from __future__ import annotations

import functools
import math

import torch

from .reference import (SparseConfig, check_vote_rows, middle_mask, middle_range, num_groups,
                        unit_means)

__all__ = ["THETA_GRID", "check_recall", "probe_plan", "calibrate_theta"]

# Candidate thresholds (natural-log units). Gaps below the first edge are kept at any
# threshold; a head needing keys whose gap is above the last edge goes dense (+inf).
THETA_GRID = torch.arange(-8.0, 40.0 + 1e-6, 0.25)


def check_recall(recall) -> float:
    """``recall`` as a float in (0, 1], or ``ValueError``."""
    if isinstance(recall, bool) or not isinstance(recall, (int, float)) or not 0.0 < recall <= 1.0:
        raise ValueError(f"recall: expected a number in (0, 1], got {recall!r}")
    return float(recall)


@functools.lru_cache(maxsize=8)
def _grid_on(device) -> torch.Tensor:
    return THETA_GRID.to(device)


@functools.lru_cache(maxsize=64)
def _probe_groups(n: int, cfg: SparseConfig, probe_groups: int) -> tuple[int, ...]:
    """The probe's groups (see :func:`probe_plan`) as Python ints."""
    candidates = [g for g in range(num_groups(n, cfg)) if middle_range(g, cfg)[1] > middle_range(g, cfg)[0]]
    if not candidates:
        return ()
    count = min(probe_groups, len(candidates))
    if count == 1:
        return (candidates[-1],)
    return tuple(sorted({candidates[round(i * (len(candidates) - 1) / (count - 1))] for i in range(count)}))


@functools.lru_cache(maxsize=64)
def probe_plan(n: int, cfg: SparseConfig, probe_groups: int, probe_rows: int, device):
    """The probe's groups and rows: ``(groups (P,), rows (P, R))`` long tensors on ``device``.
    Cached, so a CUDA graph capture after a warm-up call copies nothing to the device.

    Groups: ``probe_groups`` of those with a middle region, evenly spaced, the last one
    included. Rows: ``probe_rows`` per group, the group's first row then evenly spaced
    over the group's rows (clipped to ``n``). Empty tensors when no group has a middle
    region.
    """
    picked = _probe_groups(n, cfg, probe_groups)
    if not picked:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.view(0, probe_rows)
    rows = []
    for g in picked:
        start = cfg.group_start(g)
        size = min(n, start + cfg.group_rows) - start
        offsets = [0] + [round((r + 0.5) * size / max(1, probe_rows - 1)) for r in range(probe_rows - 1)]
        rows.append([start + min(size - 1, o) for o in offsets])
    return (torch.tensor(picked, dtype=torch.long, device=device),
            torch.tensor(rows, dtype=torch.long, device=device))


@torch.no_grad()
def calibrate_theta(q, k, anchors, *, recall: float, cfg: SparseConfig, vote_rows: int,
                    probe_groups: int = 8, probe_rows: int = 8, sm_scale=None,
                    return_fraction: bool = False):
    """Per-head thresholds whose probe rows reach mean ``recall``: fp32 ``(B, Hq)`` on
    ``q``'s device, ``+inf`` for heads that need every middle key (see the module
    docstring). ``anchors`` are stage 1's row maxima (natural log).

    With ``return_fraction=True`` also returns the share of the probe groups' middle keys
    that those thresholds select (a 0-d fp32 tensor, NaN without a middle region): the
    selection's density estimated before identify runs, for ``path="auto"``.

    Cost: per kv head, two matrix products in the input dtype (the probe rows and the
    probe groups' vote units against all keys) and a few passes over their scores; the
    histogram is taken per probe group (its rows share the group's gaps, so their
    probabilities are averaged first).
    """
    recall = check_recall(recall)
    bsz, hq, n, d = q.shape
    hkv = k.shape[1]
    per_kv = hq // hkv
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    vote_rows = check_vote_rows(vote_rows, cfg.block_size)
    groups, rows = probe_plan(n, cfg, probe_groups, probe_rows, q.device)
    theta = torch.full((bsz, hq), math.inf, dtype=torch.float32, device=q.device)
    selected = torch.zeros((), dtype=torch.float32, device=q.device)
    if groups.numel() == 0:  # no middle region anywhere: every key is always computed
        return (theta, selected * math.nan) if return_fraction else theta
    num_probe, per_group = rows.shape
    grid = _grid_on(q.device)
    edges = grid.numel()
    causal = torch.arange(n, device=q.device)[None, :] <= rows.flatten()[:, None]  # (P*R, N)
    middle = middle_mask(groups, n, cfg)                                           # (P, N)
    q_mean, a_mean = unit_means(q, anchors, cfg, vote_rows, groups)               # (B, Hq, P, U, D)
    units = q_mean.shape[3]
    for b in range(bsz):
        for kv in range(hkv):
            heads = slice(kv * per_kv, (kv + 1) * per_kv)
            kh = k[b, kv]
            # Exact softmax of the probe rows, averaged over each group's rows.
            scores = (q[b, heads][:, rows.flatten()] @ kh.T).float().mul_(scale)
            probs = torch.softmax(scores.masked_fill_(~causal, -math.inf), dim=-1)
            group_probs = probs.view(per_kv, num_probe, per_group, n).mean(2) * middle
            # The groups' gaps: min over vote units of mean anchor - score.
            unit_scores = (q_mean[b, heads].to(q.dtype).flatten(0, 2) @ kh.T).float()
            gaps = (a_mean[b, heads][..., None] - scale * unit_scores.view(per_kv, num_probe, units, n)).amin(2)
            # Key j counts at grid edge e once gap_j < e: bin = number of edges <= gap.
            index = ((gaps - grid[0]) / (grid[1] - grid[0])).floor_().add_(1).clamp_(0, edges)
            index = index.nan_to_num_(nan=edges).long()
            hist = torch.zeros(per_kv, num_probe, edges + 1, device=q.device)
            hist.scatter_add_(2, index, group_probs)
            # Recall at each edge: everything outside the middle region plus the kept middle mass.
            curve = 1.0 - group_probs.sum(-1, keepdim=True) + hist.cumsum(2)[..., :edges]
            reached = curve.mean(1) >= recall - 1e-6                                 # (per_kv, E)
            first = torch.argmax(reached.int(), dim=-1)
            theta[b, heads] = torch.where(reached.any(-1), grid[first], math.inf)
            if return_fraction:
                kept = (gaps < theta[b, heads][:, None, None]) & middle
                selected = selected + kept.sum(dtype=torch.float32)
    if not return_fraction:
        return theta
    middle_keys = sum(end - start for start, end in (middle_range(g, cfg) for g in _probe_groups(n, cfg, probe_groups)))
    return theta, selected / (middle_keys * bsz * hq)  # no host read: the count is Python's
