"""Which path a CUDA prefill takes: the sparse kernels or dense attention.

Sparse prefill pays for stages 1-2 (anchor + identification) and then runs stage 3
at a lower rate per computed pair than cuDNN's dense kernel. So it only wins when
the selection is sparse enough, and never for short inputs, where the always-computed
region (sink + a group-sized local window) is most of the causal triangle anyway.
``anchor_ext.prefill(..., path="auto")`` (the default) applies this rule on CUDA:

1. **Bound.** With no stripe selected at all, sparse costs (relative to dense)
   ``DENSE_RATE_RATIO * always_fraction + STAGE12_TOKENS / N``. If that bound plus
   the probe's own cost leaves less than ``MIN_PROBE_GAIN`` to win, go dense at once
   (with the default geometry and constants: N below about 15k tokens).
2. **Probe.** Otherwise run stages 1-2 on a prefix only (``N/8`` tokens clamped to
   ``PROBE_TOKENS``; ~0.2% of dense time at 128k) and measure the fraction ``f`` of middle-region keys
   their groups select. Predict the whole input's cost as
   ``DENSE_RATE_RATIO * (always + f * middle) / causal + STAGE12_TOKENS / N``.
3. **Decide.** Sparse when the prediction is below ``SPARSE_IF_BELOW``, else dense.
   Diffuse heads (``f`` near 1) thus cost dense time plus the probe, never the whole
   of stages 1-2.

The probe reads one number back to the host (a synchronisation). While a CUDA graph is
being captured or ``torch.compile`` traces, no number can be read, so step 2 is
skipped and the bound alone decides (sparse when it is below ``NO_PROBE_SPARSE_IF_BELOW``).
``path="sparse"`` or ``path="dense"`` overrides the rule. When the rule picks dense, a
:class:`DensePathWarning` says so (once per process and reason) and ``return_stats``
reports ``path`` and ``reason``. On the CPU the rule is a length alone
(:func:`decide_cpu`, measured by ``bench/cpu_auto.py``): dense below
``CPU_SPARSE_FROM_TOKENS``, sparse from there.

The constants are measured on an H100 at the standard shape (``bench/results/``,
``bench/README.md``): cuDNN computes causal pairs about 2.4x faster than stage 3, and
stages 1-2 cost about as much as dense attention over ``5000 / N`` of the triangle.
Dense runs ``F.scaled_dot_product_attention`` (cuDNN first, then flash, efficient, math).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _C  # noqa: F401  (registers torch.ops.anchor.*, which the probe runs)
from .reference import SparseConfig, middle_range, region_pair_counts

__all__ = ["PathChoice", "DensePathWarning", "decide", "decide_cpu", "choose_path",
           "choose_path_from_fraction", "recall_bound",
           "predicted_cost",
           "dense_prefill", "selected_fraction", "warn_dense_once"]

DENSE_RATE_RATIO = 2.4          # cuDNN pairs/s over stage-3 pairs/s (H100, bf16, D=128)
STAGE12_TOKENS = 5000.0         # stages 1-2 time / dense time, times N
PROBE_TOKENS = (4096, 8192)     # the probe's prefix: N/8 clamped to this range
MIN_PROBE_GAIN = 0.2            # probe only when >= 20% of dense time could be saved
SPARSE_IF_BELOW = 0.9           # predicted sparse/dense cost under which sparse is chosen
NO_PROBE_SPARSE_IF_BELOW = 0.5  # the bound's limit when no probe can run
# The recall mode's stages 1-2 (anchor, probe, identify at step 1 with 16-row units) cost
# about as much as dense attention over 21k-27k / N of the triangle (H200,
# bench/results/accuracy_h200.json stage_ms: 8.5 ms of 13.3 at 32k, 49.5 of 240 at 128k).
RECALL_STAGE12_TOKENS = 25000.0
# CPU: the sparse path beats dense SDPA from about 9k tokens (bench/results/cpu_auto.json:
# dense/sparse time 0.90 at 8k, 1.98 at 16k on realistic inputs, 2 threads).
CPU_SPARSE_FROM_TOKENS = 12288


class PathChoice(dict):
    """``{"path": "sparse" | "dense", "reason": str, "predicted_cost": float | None,
    "probe_fraction": float | None}``: what the rule decided and why."""


def predicted_cost(n: int, cfg: SparseConfig, middle_fraction: float,
                   stage12_tokens: float = STAGE12_TOKENS) -> float:
    """Predicted sparse-prefill time over dense time for ``n`` tokens when a fraction
    ``middle_fraction`` of every group's middle region is selected (H100 model above;
    ``stage12_tokens``: the selection's cost in the module docstring's units)."""
    always, middle = region_pair_counts(n, cfg)
    causal = n * (n + 1) / 2
    density = (always + middle_fraction * middle) / causal
    return DENSE_RATE_RATIO * density + stage12_tokens / n


def probe_tokens(n: int, cfg: SparseConfig) -> int:
    """The probe's prefix length for ``n`` tokens: an eighth, within ``PROBE_TOKENS``, and
    never less than two groups and a block, so that the prefix has a middle region."""
    at_least = 2 * cfg.group_rows + cfg.block_size
    return min(n, max(at_least, PROBE_TOKENS[0], min(PROBE_TOKENS[1], n // 8)))


def probe_cost(n: int, cfg: SparseConfig) -> float:
    """Stages 1-2 on the probe's prefix, relative to dense time over ``n``."""
    return STAGE12_TOKENS * probe_tokens(n, cfg) / n**2


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)
_POPCOUNT_ON = {}  # device -> the table there (a host-to-device copy per call would stall)


def selected_fraction(selection: torch.Tensor, n: int, cfg: SparseConfig) -> torch.Tensor:
    """Selected middle-region keys over all middle-region keys, a 0-d fp32 tensor on the
    selection's device (no host read); NaN when the groups have no middle region. Assumes
    bits only inside middle regions, as ``identify`` writes them."""
    lut = _POPCOUNT_ON.get(selection.device)
    if lut is None:
        lut = _POPCOUNT_ON.setdefault(selection.device, _POPCOUNT.to(selection.device))
    selected = lut[selection.contiguous().view(torch.uint8).long()].sum(dtype=torch.float32)
    middle_keys = sum(max(0, end - start) for start, end in
                      (middle_range(g, cfg) for g in range(selection.shape[2])))
    heads = selection.shape[0] * selection.shape[1]
    return selected / (middle_keys * heads) if middle_keys else selected * float("nan")


def _host_reads_allowed(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def decide(n: int, cfg: SparseConfig, probe_fraction: float | None = None, *,
           can_probe: bool = True, stage12_tokens: float = STAGE12_TOKENS) -> PathChoice:
    """The rule of the module docstring as a pure function of the input length.

    Returns ``path="probe"`` when the probe should run; call again with its
    ``probe_fraction`` for the final answer. ``stage12_tokens``: the selection's cost
    (``RECALL_STAGE12_TOKENS`` for the recall mode).
    """
    bound = predicted_cost(n, cfg, 0.0, stage12_tokens)
    if not can_probe:
        path = "sparse" if bound < NO_PROBE_SPARSE_IF_BELOW else "dense"
        return PathChoice(path=path, reason="no probe (graph capture or compile): bound only",
                          predicted_cost=bound, probe_fraction=None)
    if probe_fraction is None:
        if bound + probe_cost(n, cfg) > 1.0 - MIN_PROBE_GAIN:
            return PathChoice(path="dense", reason="input too short for sparse to win",
                              predicted_cost=bound, probe_fraction=None)
        return PathChoice(path="probe", reason="bound leaves room", predicted_cost=bound,
                          probe_fraction=None)
    cost = predicted_cost(n, cfg, probe_fraction, stage12_tokens)
    return PathChoice(path="sparse" if cost < SPARSE_IF_BELOW else "dense", reason="probe",
                      predicted_cost=cost, probe_fraction=probe_fraction)


def choose_path(q: torch.Tensor, k: torch.Tensor, theta: float, cfg: SparseConfig,
                sm_scale: float | None) -> PathChoice:
    """The ``path="auto"`` rule for CUDA inputs: :func:`decide`, running the probe if asked."""
    n = q.shape[2]
    choice = decide(n, cfg, can_probe=_host_reads_allowed(q))
    if choice["path"] != "probe":
        return choice
    p = probe_tokens(n, cfg)
    geometry = dict(block_size=cfg.block_size, step=cfg.step, init_blocks=cfg.init_blocks,
                    local_blocks=cfg.local_blocks, sm_scale=sm_scale)
    q_probe, k_probe = q[:, :, :p], k[:, :, :p]
    anchors = torch.ops.anchor.anchor(q_probe, k_probe, **geometry)
    selection = torch.ops.anchor.identify(q_probe, k_probe, anchors, theta=theta, **geometry)
    fraction = float(selected_fraction(selection, p, cfg))  # the one host read
    if fraction != fraction:  # NaN: the prefix had no middle region, the bound decides
        return decide(n, cfg, can_probe=False)
    return decide(n, cfg, fraction)


def decide_cpu(n: int) -> PathChoice:
    """``path="auto"`` on the CPU: dense SDPA below ``CPU_SPARSE_FROM_TOKENS`` tokens."""
    if n < CPU_SPARSE_FROM_TOKENS:
        return PathChoice(path="dense", reason="CPU: input too short for sparse to win",
                          predicted_cost=None, probe_fraction=None)
    return PathChoice(path="sparse", reason="CPU: long enough for sparse to win",
                      predicted_cost=None, probe_fraction=None)


def recall_bound(q: torch.Tensor, cfg: SparseConfig) -> PathChoice:
    """``path="auto"`` for the recall mode before any work: on the CPU the length rule, on
    CUDA dense when even an empty selection would not pay for the recall mode's stages
    1-2 (``RECALL_STAGE12_TOKENS``); ``path="probe"`` when the probe should decide."""
    n = q.shape[2]
    if not q.is_cuda:
        return decide_cpu(n)
    return decide(n, cfg, can_probe=_host_reads_allowed(q), stage12_tokens=RECALL_STAGE12_TOKENS)


def choose_path_from_fraction(n: int, fraction: torch.Tensor, cfg: SparseConfig) -> PathChoice:
    """``path="auto"`` for the recall mode after its probe: :func:`decide` with the probe's
    estimate of the selected share of middle-region keys
    (``anchor_ext.recall.calibrate_theta``), read back once, before identify runs."""
    estimate = float(fraction)  # the one host read
    if estimate != estimate:  # no middle region anywhere: the bound decides
        return decide(n, cfg, can_probe=False, stage12_tokens=RECALL_STAGE12_TOKENS)
    return decide(n, cfg, estimate, stage12_tokens=RECALL_STAGE12_TOKENS)


class DensePathWarning(UserWarning):
    """``path="auto"`` ran dense attention instead of the sparse kernels (once per reason)."""


_warned: set[str] = set()


def warn_dense_once(choice: PathChoice) -> None:
    """Say, once per process and reason, that ``path="auto"`` chose dense attention, so the
    choice is never silent; ``path="sparse"`` forces the kernels, and
    ``warnings.simplefilter("ignore", DensePathWarning)`` silences it."""
    reason = choice["reason"]
    if reason in _warned or torch.compiler.is_compiling():
        return
    _warned.add(reason)
    import warnings

    cost = choice.get("predicted_cost")
    predicted = f" (predicted sparse/dense cost {cost:.2f})" if cost is not None else ""
    warnings.warn(f"anchor_ext.prefill(path='auto') runs dense attention (SDPA): {reason}{predicted}; "
                  "pass path='sparse' to force the sparse kernels", DensePathWarning, stacklevel=3)


def dense_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  sm_scale: float | None) -> torch.Tensor:
    """Dense causal attention, GQA without repeating K/V: cuDNN first when available."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
             SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=sm_scale,
                                              enable_gqa=True)
