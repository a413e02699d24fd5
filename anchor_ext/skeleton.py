"""SparseSkeleton (SPEC §3): sparse-prefill identification by online decomposition.

A pure-PyTorch implementation of ``papers/sparseskeleton.txt`` ("the paper"), a second
way to produce the stage-3 selection besides AnchorAttention. Every function is
device-agnostic and vectorised over rows and keys (Python loops run over heads, and
over bounded chunks of groups when the selection is packed), so the same code runs
on CUDA tensors.

The idea (paper §3). With ``x_ij = sm_scale * q_i . k_j`` the log-attention of a
causal pair is ``log A_ij = x_ij - lse_i``. It is approximated by three vectors of
length N, ``log A_ij ~ s_{i-j} + v_j + h_i``:

* slash ``s_o`` (per offset ``o = i - j``): a linear model on the RoPE features
  ``r_o = (cos(o theta_f), sin(o theta_f))``, the positional part of the scores;
* vertical ``v_j`` (per key): a linear model on the unRoPEd key ``k~_j``;
* horizontal ``h_i`` (per row): minus the row's log-sum-exp, estimated from row
  statistics (mean ``mu_i``, variance ``sigma_i^2``) under a log-normal model, with
  the Λ-shape (sink keys and the diagonal band) computed exactly.

The Λ-shape (``sink_tokens`` S first keys and the ``local_tokens`` T keys ``(i-T, i]``)
is computed exactly; the "interior" of row ``i`` is the keys ``S <= j <= i - T``
(``c_i = i - T - S + 1`` of them). Algorithm 1 (:func:`decompose`):

1. sample ``samples`` (default ``80 * head_dim``) interior pairs uniformly (line 1);
2. unRoPE the keys (line 2);
3. row statistics ``mu_i``, ``sigma_i^2`` of the interior scores for all rows from
   prefix sums: ``O(N d)`` for ``mu``, ``O(N d^2)`` time / ``O(N d)`` memory for
   ``sigma^2`` (prefix sums of ``k_j^T k_j`` per chunk of rows; lines 3-4);
4. Λ-shape and calibration rows exactly (lines 5-8);
5. ridge regression (normal equations) of ``x_ij - mu_i`` on the row-centred RoPE
   features and unRoPEd keys, eq. (3) (lines 9-13) -> ``alpha``, ``kappa``;
6. ``s``, ``v`` by eqs. (4), (6); ``h = -delta - eps - nu`` by eqs. (5), (8)-(11)
   (lines 14-19).

Masks (:func:`skeleton_block_mask`, paper §3.3 / §4) are on 64-token blocks: block
``(I, J)`` is kept when ``s^B_{I-J} + v^B_J + h^B_I >= tau_B`` with
``tau_B = log(eps * B / N)`` (threshold mode, default ``eps = 0.8``) or ``tau_B`` set
from a target sparsity (budget mode, eq. (14): ``p_B = Phi((tau_B - mu)/sigma)^B``,
or the exact block-score quantile). The sink block column and the diagonal are always
kept. :func:`select` turns the block mask into the anchor_ext selection bitmask
(``granularity="block"``, the paper), or scores every (group, key) stripe directly
(``granularity="key"``: stage 3 computes stripes, so a key need not bring its whole
64-key block along).

Measured (CPU, ``synthetic.make_qkv(8192, q_heads=4, kv_heads=1, seed=0)``, selection
with block_size 128, step 1; sparsity as ``metrics.sparsity``, mass recall of every
4th query block; anchor = ``reference.identify``, theta 12):

=========  =====================  =====================  ======================
profile    skeleton block, eps .8  skeleton key, eps .8  anchor step 1 / step 16
=========  =====================  =====================  ======================
realistic  0.714 / 0.9978          0.919 / 0.9993        0.914 / 0.9994, 0.645 / 0.9995
slash      0.719 / 0.981           0.700 / 0.994         0.909 / 0.566,  0.663 / 0.810
staircase  0.903 / 0.611           0.884 / 0.705         0.814 / 0.998,  0.544 / 0.9999
mixed      0.730 / 0.897           0.827 / 0.926         0.887 / 0.934,  0.627 / 0.979
=========  =====================  =====================  ======================

At equal sparsity (``granularity="key", sparsity=`` anchor's), skeleton ties anchor
on realistic heads (0.9993 vs 0.9994), wins on slash heads (0.701 vs 0.566 at 0.909;
0.977 vs 0.736 at 0.861 with anchor theta 14) and loses on staircase heads (0.810 vs
0.998): a per-document block is neither a diagonal, a column nor a row. Budget mode
hits its target to < 0.001 (quantile); eq. (14) (``budget="normal"``) gave 0.69 for a
0.9 target on realistic heads and 0.50 on slash heads. Known components (q, k built so
that ``x = S_{i-j} + V_j + H_i``, N 2048, D 64, rotary_dim 32) are recovered to
0.013 (s, max), 0.016 (v, max), 0.056 / 0.30 (h, mean / max), 0.047 (log A on the
interior, mean abs).

On CUDA (:func:`cuda_path_supported`: 16-bit inputs, D 64 / 128, the default Λ-shape)
:func:`select` runs :func:`fused_components` and two kernels of ``csrc/cuda/skeleton.cu``:
``anchor::skeleton_row_stats`` (the O(N d) row statistics: exact Λ scores and in-chunk
keys on fp32 tiles, the keys before a row's 128-key chunk through a float64 Gram prefix)
and ``anchor::skeleton_select`` (the bitmask from ``s``, ``v``, ``h``, or the pair counts
of the budget bisection). With the Λ-shape inside the always-computed region no Λ element
can fall into a stripe or block the selection decides, so the kernels need no Λ block
scores. Measured on an H100 (``bench/results/skeleton_h100.json``, 32 q / 8 kv heads,
D 128, bf16, per key, eps 0.8, step 1): the row statistics take 3.3 / 6.2 / 12.0 / 25.4 ms
at 16k / 32k / 64k / 128k, the whole selection 26-63 ms (the PyTorch glue is host-bound
below 64k), against 0.8 + 0.2 ms (16k) to 5.8 + 3.8 ms (128k) for AnchorAttention's two
stages; the tests hold the selection to the PyTorch path's within 0.2% of its bits.

Departures from the paper (each also noted where it happens):

* ``mu_i``, ``sigma_i`` are taken over the interior keys (the paper's lines 3-4 use
  all ``j <= i``): the regression centres ``r`` and ``k~`` over the interior (lines
  9-10), so ``mu`` must use the same range, and eq. (10) adds the Λ-shape exactly,
  which an all-keys variance would count twice.
* eq. (9): ``zeta`` uses the log of the *mean* of ``exp(lastrow)`` over the interior
  (the paper writes the log of the sum); only with the mean does eq. (10) reproduce
  the calibration row exactly. ``calib_rows`` (default 1 = the paper's last row)
  averages ``zeta`` over the last rows.
* eq. (11): ``h_i`` also subtracts ``eps_i = (mean_interior(k~)_i - mean(k~)_N) kappa``,
  the vertical counterpart of ``delta_i``, so ``s + v + h`` is exact under the model.
* eq. (12)-(13) moments (budget mode) are over interior pairs, in O(N) with prefix
  sums (no convolution needed).
* block slash ``s^B_D`` is the max of ``s`` over the offsets block pairs at distance D
  contain, ``[DB - B + 1, DB + B - 1]`` (``slash_pool="max"``, default): a slash line
  crosses two block diagonals and must show in both; the paper's average of two
  neighbouring maxima (``slash_pool="mean"``) halves a sharp line's log-score and
  drops it. The model is only used for interior elements; Λ elements of a block use
  their exact scores.
* budget mode defaults to ``budget="quantile"`` (the exact block-score quantile that
  keeps ``1 - sparsity`` of the causal pairs): eq. (14) (``budget="normal"``) is the
  paper's statistical shortcut, measured to miss the target by 20-40 points on the
  synthetic inputs (block maxima are far from the normal tail it assumes; the paper
  also calibrates it on reference rows).
* ``granularity="key"`` in :func:`select` is ours (the paper's kernel is block
  sparse); it uses the element threshold ``log(eps / N)``.
* the ridge parameter is ``lambda = ridge * ||A||_F`` with ``ridge = 1e-3`` (the
  paper's ``eps ||A||_F / 2`` leaves eps open; with 1e-2 the recovered slash of the
  test construction was off by up to 0.12, with 1e-3 by 0.015).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from .reference import SparseConfig, num_groups, pack_bits

__all__ = ["Skeleton", "check_rope_args", "rope_frequencies", "apply_rope", "unrope",
           "decompose", "skeleton_block_mask", "block_mask_sparsity", "select",
           "cuda_path_supported", "fused_components", "SkeletonPathWarning"]

#: Size of the mask blocks (paper §4: the block-sparse kernel of MInference uses 64).
MASK_BLOCK = 64


# --------------------------------------------------------------------------- RoPE

def check_rope_args(rope_base, rotary_dim, head_dim: int) -> int:
    """Validate the RoPE arguments; return the effective ``rotary_dim``.

    Raises ``ValueError`` naming the argument, the expected and the actual value:
    without the RoPE base the method cannot undo RoPE on the keys (SPEC §3).
    """
    if rope_base is None:
        raise ValueError("rope_base is required by SparseSkeleton (it unRoPEs the keys): "
                         "expected a finite float > 0 (e.g. 500000.0 for LLaMA-3.1), got None")
    if isinstance(rope_base, bool) or not isinstance(rope_base, (int, float)):
        raise ValueError(f"rope_base must be a finite float > 0, got {rope_base!r} "
                         f"({type(rope_base).__name__})")
    if not math.isfinite(rope_base) or rope_base <= 0:
        raise ValueError(f"rope_base must be a finite float > 0, got {rope_base!r}")
    if rotary_dim is None:
        return int(head_dim)
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int):
        raise ValueError(f"rotary_dim must be an even int in [2, head_dim={head_dim}], "
                         f"got {rotary_dim!r} ({type(rotary_dim).__name__})")
    if rotary_dim < 2 or rotary_dim > head_dim or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be an even int in [2, head_dim={head_dim}], "
                         f"got {rotary_dim}")
    return rotary_dim


def rope_frequencies(rope_base: float, rotary_dim: int, device=None) -> torch.Tensor:
    """Inverse frequencies ``theta_f = base^(-2f / rotary_dim)``, float64 ``(rotary_dim/2,)``."""
    f = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=device)
    return rope_base ** (-f / rotary_dim)


def _rotate(x, positions, rope_base, rotary_dim, sign):
    d = x.shape[-1]
    rotary_dim = check_rope_args(rope_base, rotary_dim, d)
    if positions is None:
        positions = torch.arange(x.shape[-2], device=x.device)
    angles = positions.to(device=x.device, dtype=torch.float64)[:, None] * \
        rope_frequencies(rope_base, rotary_dim, x.device)[None, :]
    cos, sin = angles.cos(), sign * angles.sin()
    half = rotary_dim // 2
    xf = x.to(torch.float64) if x.dtype == torch.float64 else x.float()
    cos, sin = cos.to(xf.dtype), sin.to(xf.dtype)
    a, b, rest = xf[..., :half], xf[..., half:rotary_dim], xf[..., rotary_dim:]
    # Rotate-half: pair f is dims (f, f + rotary_dim/2), z_f = a_f + i b_f -> z_f e^{i p theta_f}.
    return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], dim=-1)


def apply_rope(x, positions=None, *, rope_base, rotary_dim=None):
    """Rotate-half RoPE (HF LLaMA convention) on the first ``rotary_dim`` dims of ``x (..., N, D)``.

    ``positions``: ``(N,)`` (default ``arange(N)``). Returns fp32 (fp64 for fp64 input).
    """
    return _rotate(x, positions, rope_base, rotary_dim, 1.0)


def unrope(x, positions=None, rope_base=None, rotary_dim=None):
    """Undo :func:`apply_rope`: rotate pair ``f`` of position ``p`` back by ``-p theta_f``."""
    return _rotate(x, positions, rope_base, rotary_dim, -1.0)


# --------------------------------------------------------------------------- the result

@dataclass
class Skeleton:
    """Decomposition ``log A_ij ~ s_{i-j} + v_j + h_i`` (leading dims ``(B, Hq)``, or none
    for one head).

    * ``s (.., N)``: slash per offset ``o = i - j`` (eq. 4); ``s[o]`` for ``o < T`` is the
      model's extrapolation (those pairs are in the exact band);
    * ``v (.., N)``: vertical per key (eq. 6); ``h (.., N)``: horizontal per row (eq. 11),
      ``-inf`` for rows without interior keys (``i < S + T``);
    * ``mu``, ``sigma``: mean / std of the row's interior scores ``x_ij``;
    * ``lse``: estimated log-sum-exp of the row, ``mu_i + nu_i`` (exact for rows
      without interior);
    * ``sink (.., N, S)``: exact ``x_ij`` for ``j < S`` (``-inf`` where ``j > i``);
    * ``band (.., N, T)``: exact ``x_{i, i-t}`` (``-inf`` where ``i - t < 0``);
    * ``alpha (.., rotary_dim)``, ``kappa (.., D)``: fitted coefficients; ``zeta``:
      eq. (9) correction; ``fit_r2``: share of the sampled ``x - mu`` variance explained.
    """

    s: torch.Tensor
    v: torch.Tensor
    h: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    lse: torch.Tensor
    sink: torch.Tensor
    band: torch.Tensor
    alpha: torch.Tensor
    kappa: torch.Tensor
    zeta: torch.Tensor
    fit_r2: torch.Tensor

    @property
    def n(self) -> int:
        return self.s.shape[-1]

    @property
    def sink_tokens(self) -> int:
        return self.sink.shape[-1]

    @property
    def local_tokens(self) -> int:
        return self.band.shape[-1]

    def log_attention(self, rows: torch.Tensor) -> torch.Tensor:
        """Model ``s_{i-j} + v_j + h_i`` for ``rows (R,)`` and all keys: ``(.., R, N)``,
        ``-inf`` for ``j > i``. O(R N) memory (for tests and plots)."""
        keys = torch.arange(self.n, device=self.s.device)
        offset = rows[:, None].to(self.s.device) - keys[None, :]
        est = (self.s[..., offset.clamp_min(0)] + self.v[..., None, :]
               + self.h[..., rows, None])
        return est.masked_fill(offset < 0, -math.inf)


def _stack(parts: list[Skeleton], shape) -> Skeleton:
    return Skeleton(**{f.name: torch.stack([getattr(p, f.name) for p in parts]).reshape(
        *shape, *getattr(parts[0], f.name).shape) for f in fields(Skeleton)})


# --------------------------------------------------------------------------- exact pieces

def _band_scores(q, k, width, scale):
    """Exact ``x_{i, i-t}`` for ``t < width``: ``(N, width)``, ``-inf`` where ``i - t < 0``.

    Rows are cut into chunks of ``width``; chunk ``c`` needs keys ``[c W - W, c W + W)``,
    so memory is ``O(N width)``.
    """
    n, d = q.shape
    w = width
    chunks = -(-n // w)
    pad = chunks * w - n
    qp = torch.nn.functional.pad(q, (0, 0, 0, pad))
    kp = torch.nn.functional.pad(k, (0, 0, w, pad))                   # key m sits at m + w
    windows = kp.unfold(0, 2 * w, w)[:chunks]                        # (chunks, d, 2w)
    scores = torch.bmm(qp.view(chunks, w, d), windows) * scale       # (chunks, w, 2w)
    # Row p of chunk c is i = c w + p; key c w - w + m has offset t = w + p - m.
    p = torch.arange(w, device=q.device)
    t = torch.arange(width, device=q.device)
    index = (w + p[:, None] - t[None, :]).expand(chunks, w, width)
    band = scores.gather(2, index).reshape(chunks * w, width)[:n]
    rows = torch.arange(n, device=q.device)
    return band.masked_fill(rows[:, None] - t[None, :] < 0, -math.inf)


def _causal_moments(q, k, scale, chunk):
    """``sum_{j<=i} x_ij`` and ``sum_{j<=i} x_ij^2`` for every row, float64 ``(N,)`` each.

    Lines 3-4 of Algorithm 1: the first from prefix sums of ``k`` (O(N d)); the second
    as ``q_i (sum_{j<=i} k_j^T k_j) q_i^T`` with the prefix Gram matrix taken per chunk
    of ``chunk`` rows (exclusive prefix over chunks + the exact causal part inside the
    chunk): O(N d^2) time, O(N d^2 / chunk + N chunk) memory.
    """
    n, d = q.shape
    q64, k64 = q.double(), k.double()
    first = scale * (q64 * k64.cumsum(0)).sum(-1)
    chunks = -(-n // chunk)
    pad = chunks * chunk - n
    qc = torch.nn.functional.pad(q64, (0, 0, 0, pad)).view(chunks, chunk, d)
    kc = torch.nn.functional.pad(k64, (0, 0, 0, pad)).view(chunks, chunk, d)
    gram = torch.einsum("cjd,cje->cde", kc, kc)                        # per-chunk sum k^T k
    before = gram.cumsum(0) - gram                                     # keys of earlier chunks
    second = torch.einsum("cid,cde,cie->ci", qc, before, qc)
    inside = torch.bmm(qc, kc.transpose(1, 2)).tril() ** 2             # causal, same chunk
    second = (second + inside.sum(-1)).reshape(-1)[:n] * scale ** 2
    return first, second


# --------------------------------------------------------------------------- Algorithm 1

def _decompose_head(q, k, k_unroped, *, theta, scale, samples, ridge, gen, sink_tokens,
                    local_tokens, calib_rows) -> Skeleton:
    """Algorithm 1 for one head. ``q``, ``k`` RoPEd ``(N, D)`` fp32, ``k_unroped`` ``(N, D)``."""
    n, d = q.shape
    dev = q.device
    S, T = min(sink_tokens, n), local_tokens
    rows = torch.arange(n, device=dev)
    count = (rows - T - S + 1).clamp_min(0)            # c_i: interior keys S <= j <= i - T
    has_interior = count > 0
    cnt = count.clamp_min(1).double()

    # ---- Λ-shape exactly (lines 5, 7): sink keys j < S, band keys j = i - t, t < T.
    sink = (q @ k[:S].T) * scale                                       # (N, S)
    sink = sink.masked_fill(torch.arange(S, device=dev)[None, :] > rows[:, None], -math.inf)
    band = _band_scores(q, k, T, scale)                                # (N, T)
    band_in_sink = (rows[:, None] - torch.arange(T, device=dev)[None, :]) < S
    band_only = band.masked_fill(band_in_sink, -math.inf)              # count each key once

    # ---- row statistics over the interior (lines 3-4; see the module docstring).
    m1, m2 = _causal_moments(q, k, scale, chunk=max(64, d))
    sink0 = sink.double().masked_fill(~torch.isfinite(sink), 0.0)
    band0 = band_only.double().masked_fill(~torch.isfinite(band_only), 0.0)
    m1 = m1 - sink0.sum(-1) - band0.sum(-1)
    m2 = m2 - (sink0 ** 2).sum(-1) - (band0 ** 2).sum(-1)
    mu = torch.where(has_interior, m1 / cnt, 0.0)
    var = torch.where(has_interior, (m2 / cnt - mu ** 2).clamp_min(0.0), 0.0)

    # ---- row-centred regressors (lines 9-10) from prefix sums.
    # RoPE features of offset o = i - j: r_o = (cos(o theta), sin(o theta)), eq. (3).
    offsets = torch.arange(n, device=dev, dtype=torch.float64)
    ang = offsets[:, None] * theta[None, :]
    r = torch.cat([ang.cos(), ang.sin()], dim=-1)                      # (N, rotary_dim)
    r_pre = torch.nn.functional.pad(r.cumsum(0), (0, 0, 1, 0))         # sum_{o < m} r_o
    kt = k_unroped.double()
    k_pre = torch.nn.functional.pad(kt.cumsum(0), (0, 0, 1, 0))        # sum_{j < m} k~_j
    lo_o = min(T, n)                                                    # offsets [T, i - S]
    hi_o = (rows - S + 1).clamp(min=lo_o, max=n)
    r_bar = (r_pre[hi_o] - r_pre[lo_o]) / cnt[:, None]                 # line 9
    hi_j = (rows - T + 1).clamp(min=S, max=n)                           # keys [S, i - T]
    k_bar = (k_pre[hi_j] - k_pre[S]) / cnt[:, None]                    # line 10

    # ---- sample the interior uniformly (line 1) and fit eq. (3) (lines 11-13).
    m = n - S - T                                                       # interior rows/cols
    rd = r.shape[1]
    if m >= 2 and samples > 0:
        xs = torch.randint(0, m, (2, samples), generator=gen).to(dev)
        si = xs.max(0).values + S + T                                   # I = S + T + max(X, Y)
        sj = xs.min(0).values + S                                       # J = S + min(X, Y)
        b = (q[si] * k[sj]).sum(-1).double() * scale - mu[si]           # line 12
        a = torch.cat([r[si - sj] - r_bar[si], kt[sj] - k_bar[si]], dim=1)   # line 11
        lam2 = (ridge * a.norm()) ** 2                                  # lambda = ridge ||A||_F
        gram = a.T @ a + lam2 * torch.eye(a.shape[1], dtype=a.dtype, device=dev)
        coef = torch.linalg.solve(gram, a.T @ b)                        # normal equations
        resid = b - a @ coef
        fit_r2 = 1.0 - resid.var() / b.var().clamp_min(1e-30)
    else:                                                               # too short to fit
        coef = torch.zeros(rd + d, dtype=torch.float64, device=dev)
        fit_r2 = torch.zeros((), dtype=torch.float64, device=dev)
    alpha, kappa = coef[:rd], coef[rd:]

    # ---- slash and vertical (lines 14-15): eqs. (4) and (6), centred at the last row.
    s = (r - r_bar[-1]) @ alpha
    v = (kt - k_bar[-1]) @ kappa
    # delta_i = (r_bar_i - r_bar_N) alpha, eq. (5) / line 18; eps_i, its vertical twin.
    delta = (r_bar - r_bar[-1]) @ alpha
    eps = (k_bar - k_bar[-1]) @ kappa

    # ---- horizontal (lines 16-19). zeta, eq. (9), on the last `calib_rows` rows
    # (mean, not sum, of exp over the interior: see the module docstring).
    calib = rows[has_interior][-calib_rows:]
    if calib.numel():
        x = (q[calib] @ k.T) * scale                                    # (R, N) exact rows
        keys = torch.arange(n, device=dev)
        inside = (keys[None, :] >= S) & (keys[None, :] <= calib[:, None] - T)
        lse_int = torch.logsumexp(x.double().masked_fill(~inside, -math.inf), dim=-1)
        log_mean = lse_int - torch.log(cnt[calib]) - mu[calib]
        zeta = (var[calib] / 2 - log_mean).mean()
    else:
        zeta = torch.zeros((), dtype=torch.float64, device=dev)
    # nu_i = log(Λ_i + c_i exp(sigma_i^2 / 2 - zeta)), eq. (10), in log space.
    lam_terms = torch.cat([sink.double(), band_only.double()], dim=1) - mu[:, None]
    interior_term = torch.where(has_interior, torch.log(cnt) + var / 2 - zeta, -math.inf)
    nu = torch.logsumexp(torch.cat([lam_terms, interior_term[:, None]], dim=1), dim=-1)
    delta = torch.where(has_interior, delta, 0.0)
    eps = torch.where(has_interior, eps, 0.0)
    h = torch.where(has_interior, -delta - eps - nu, -math.inf)         # eq. (11)

    return Skeleton(s=s.float(), v=v.float(), h=h.float(), mu=mu.float(),
                    sigma=var.sqrt().float(), lse=(mu + nu).float(), sink=sink.float(),
                    band=band.float(), alpha=alpha.float(), kappa=kappa.float(),
                    zeta=zeta.float(), fit_r2=fit_r2.float())


def _check_qk(q, k):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-d (B, H, N, D), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:] or q.shape[1] % k.shape[1]:
        raise ValueError(f"k must be (B, Hkv, N, D) with Hq % Hkv == 0 for q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")


def _check_tokens(sink_tokens, local_tokens, calib_rows):
    for name, value in (("sink_tokens", sink_tokens), ("local_tokens", local_tokens),
                        ("calib_rows", calib_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _heads(q, k, rope_base, rotary_dim):
    """Yield ``(b, h, q_head fp32, k_head fp32, unRoPEd k_head)``; keys are unRoPEd once
    per kv head (GQA: q head ``h`` reads kv head ``h // (Hq / Hkv)``)."""
    bsz, hq = q.shape[:2]
    group = hq // k.shape[1]
    for b in range(bsz):
        for g in range(k.shape[1]):
            kh = k[b, g].float()
            kt = unrope(kh, None, rope_base, rotary_dim)
            for h in range(g * group, (g + 1) * group):
                yield b, h, q[b, h].float(), kh, kt


# --------------------------------------------------------------------------- masks (§3.3, §4)

def _block_max(x, block):
    """Max over consecutive blocks of ``block`` entries along the last dim (tail padded -inf)."""
    nb = -(-x.shape[-1] // block)
    return torch.nn.functional.pad(x, (0, nb * block - x.shape[-1]), value=-math.inf) \
        .view(*x.shape[:-1], nb, block).amax(-1)


def _block_pairs(n, block, device):
    """Causal element count of every block pair ``(I, J)``: float64 ``(nb, nb)``."""
    nb = -(-n // block)
    size = (torch.clamp(n - torch.arange(nb, device=device) * block, max=block)).double()
    pairs = (size[:, None] * size[None, :]).tril(-1)
    return pairs + torch.diag(size * (size + 1) / 2)


def _interior_moments(skel: Skeleton):
    """Mean and std of ``s_{i-j} + v_j + h_i`` over the interior pairs, eqs. (12)-(13),
    in O(N) with prefix sums (float64)."""
    n, S, T = skel.n, skel.sink_tokens, skel.local_tokens
    s, v, h = skel.s.double(), skel.v.double(), skel.h.double()
    dev = s.device
    idx = torch.arange(n, device=dev)
    c = (idx - T - S + 1).clamp_min(0).double()                       # interior keys of row i
    h = torch.where(c > 0, h, 0.0)
    ws = torch.where(idx >= T, (n - S - idx).clamp_min(0).double(), 0.0)   # rows with offset o
    wv = torch.where(idx >= S, (n - T - idx).clamp_min(0).double(), 0.0)   # rows seeing key j
    total = c.sum()
    if total == 0:
        return 0.0, 1.0
    s_pre = torch.nn.functional.pad((s * (idx >= T)).cumsum(0), (1, 0))   # sum of s_o, o < m
    v_pre = torch.nn.functional.pad((v * (idx >= S)).cumsum(0), (1, 0))
    first = (ws * s).sum() + (wv * v).sum() + (c * h).sum()
    # Cross sums: sum_pairs s v = sum_j v_j sum_{o=T}^{N-1-j} s_o, and so on.
    hi_o_for_j = (n - idx).clamp(min=T)
    sv = (torch.where(wv > 0, v, 0.0) * (s_pre[hi_o_for_j] - s_pre[T])).sum()
    sh = (h * (s_pre[(idx - S + 1).clamp(min=T)] - s_pre[T])).sum()
    vh = (h * (v_pre[(idx - T + 1).clamp(min=S)] - v_pre[S])).sum()
    second = ((ws * s * s).sum() + (wv * v * v).sum() + (c * h * h).sum()
              + 2 * (sv + sh + vh))
    mean = first / total
    var = (second / total - mean ** 2).clamp_min(1e-12)
    return float(mean), float(var.sqrt())


def _block_components(s, v, h, *, sink_tokens, local_tokens, block, slash_pool):
    """Block maxima of the components (paper §3.3) along the last dim: ``(sb, vb, hb)``,
    each ``(..., nb)``. ``sb[D]`` pools the model slash over the offsets of block pairs at
    distance ``D``; only interior offsets (``>= T``) and keys (``>= S``) count."""
    n = s.shape[-1]
    nb = -(-n // block)
    idx = torch.arange(n, device=s.device)
    s = s.masked_fill(idx < local_tokens, -math.inf)                   # model: interior offsets
    v = v.masked_fill(idx < sink_tokens, -math.inf)
    vb, hb = _block_max(v, block), _block_max(h, block)
    if slash_pool == "max":
        # Offsets in block pairs at distance D: [DB - B + 1, DB + B - 1]. Window max of
        # width 2B - 1 centred on DB (computed with a sliding window, O(N B)).
        padded = torch.nn.functional.pad(s, (block - 1, nb * block - n + block), value=-math.inf)
        sb = padded.unfold(-1, 2 * block - 1, block)[..., :nb, :].amax(-1)  # starts at DB - B + 1
    else:  # "mean": the paper's (m_{D-1} + m_D) / 2, m_D alone where m_{D-1} is -inf
        m = _block_max(s, block)                                       # m_D: offsets [DB, DB+B)
        prev = torch.nn.functional.pad(m[..., :-1], (1, 0), value=-math.inf)
        sb = torch.where(torch.isfinite(prev), (prev + m) / 2, m)
    return sb, vb, hb


def _block_scores(skel: Skeleton, block: int, slash_pool: str) -> torch.Tensor:
    """Block scores ``s^B_{I-J} + v^B_J + h^B_I`` (model, interior pairs) maxed with the
    exact Λ-element estimates ``x_ij - lse_i`` in the block: fp32 ``(nb, nb)``, ``-inf``
    above the diagonal."""
    n, S, T = skel.n, skel.sink_tokens, skel.local_tokens
    dev = skel.s.device
    nb = -(-n // block)
    idx = torch.arange(n, device=dev)
    sb, vb, hb = _block_components(skel.s, skel.v, skel.h, sink_tokens=S, local_tokens=T,
                                   block=block, slash_pool=slash_pool)
    d_idx = (torch.arange(nb, device=dev)[:, None] - torch.arange(nb, device=dev)[None, :])
    scores = sb[d_idx.clamp_min(0)] + vb[None, :] + hb[:, None]
    # Λ elements exactly: x_ij - lse_i, scattered (amax) into their blocks.
    lse = skel.lse[:, None]
    exact = torch.full((nb * nb,), -math.inf, device=dev)
    t = torch.arange(T, device=dev)
    band_key = idx[:, None] - t[None, :]
    band_val = (skel.band - lse).masked_fill(band_key < 0, -math.inf)
    band_flat = (idx[:, None] // block) * nb + band_key.clamp_min(0) // block
    sink_key = torch.arange(S, device=dev)
    sink_flat = (idx[:, None] // block) * nb + (sink_key[None, :] // block)
    exact.scatter_reduce_(0, band_flat.flatten(), band_val.flatten(), "amax")
    exact.scatter_reduce_(0, sink_flat.expand(n, S).flatten(), (skel.sink - lse).flatten(), "amax")
    scores = torch.maximum(scores, exact.view(nb, nb))
    return scores.masked_fill(d_idx < 0, -math.inf)


def _mask_from_scores(scores, skel: Skeleton, *, block, eps, sparsity, budget):
    n = skel.n
    nb = scores.shape[0]
    dev = scores.device
    ar = torch.arange(nb, device=dev)
    causal = ar[None, :] <= ar[:, None]
    forced = causal & ((ar[None, :] == 0) | (ar[None, :] == ar[:, None]))
    if sparsity is None:
        tau = math.log(eps * block / n)                                # tau_B = log(eps B / N)
        return forced | (causal & (scores >= tau))
    weights = _block_pairs(n, block, dev)
    if budget == "normal":
        # Eq. (14): p = Phi((tau_B - mu) / sigma)^B with mu, sigma of eqs. (12)-(13).
        mean, std = _interior_moments(skel)
        z = torch.special.ndtri(torch.tensor(sparsity, dtype=torch.float64) ** (1.0 / block))
        tau = mean + std * float(z)
        return forced | (causal & (scores >= tau))
    # "quantile": keep the highest-scoring blocks until (1 - sparsity) of the causal pairs.
    need = (1.0 - sparsity) * weights.sum() - weights[forced].sum()
    cand = causal & ~forced
    order = torch.argsort(scores[cand], descending=True)
    kept_weight = weights[cand][order].cumsum(0)
    take = int((kept_weight <= need + 0.5 * weights[cand][order]).sum()) if need > 0 else 0
    flat = torch.zeros(int(cand.sum()), dtype=torch.bool, device=dev)
    flat[order[:take]] = True
    mask = forced.clone()
    mask[cand] = flat
    return mask


def _sliding_max(x, width):
    """``out[..., o] = max(x[..., o : o + width])`` along the last dim (``-inf`` past the
    end), by doubling: O(len log(width)) time, O(len) memory."""
    n = x.shape[-1]
    y = torch.nn.functional.pad(x, (0, width), value=-math.inf)
    span = 1
    while 2 * span <= width:
        y = torch.maximum(y, torch.nn.functional.pad(y[..., span:], (0, span), value=-math.inf))
        span *= 2
    shifted = torch.nn.functional.pad(y[..., width - span:], (0, width - span), value=-math.inf)
    return torch.maximum(y, shifted)[..., :n]


def _group_max(h, cfg: SparseConfig) -> torch.Tensor:
    """The largest ``h`` of each group's rows, along the last dim: ``(..., num_groups)``."""
    n = h.shape[-1]
    rows = cfg.group_rows
    padded = torch.nn.functional.pad(h, (0, num_groups(n, cfg) * rows - n), value=-math.inf)
    return padded.view(*h.shape[:-1], -1, rows).amax(-1)


def _key_scores(skel: Skeleton, cfg: SparseConfig, g0: int, g1: int) -> torch.Tensor:
    """Stripe scores of groups ``[g0, g1)``: fp32 ``(g1 - g0, N)``, ``-inf`` outside the
    group's middle region.

    Key ``j`` of group ``g`` (rows ``[G0, G1)``) scores the largest element estimate of
    its stripe, ``max_i (s_{i-j} + v_j + h_i) <= v_j + max_{G0<=i<G1} s_{i-j} + max_i h_i``
    (the slash max is a sliding window over offsets); sink keys ``j < S`` use their exact
    ``max_i (x_ij - lse_i)``.
    """
    n = skel.n
    dev = skel.s.device
    rows_per_group = cfg.group_rows
    groups = torch.arange(g0, g1, device=dev)
    start = groups * rows_per_group
    keys = torch.arange(n, device=dev)
    window = _sliding_max(skel.s, rows_per_group)                   # max s[o : o + rows]
    h_group = _group_max(skel.h, cfg)[g0:g1]
    offset = (start[:, None] - keys[None, :]).clamp(0, n - 1)
    scores = skel.v[None, :] + window[offset] + h_group[:, None]
    S = skel.sink_tokens
    sink_exact = torch.nn.functional.pad(skel.sink - skel.lse[:, None],
                                         (0, 0, 0, num_groups(n, cfg) * rows_per_group - n),
                                         value=-math.inf)
    sink_exact = sink_exact.view(-1, rows_per_group, S)[g0:g1].amax(1)  # (groups, S)
    scores[:, :S] = sink_exact[:, :min(S, n)]
    m1 = torch.clamp(start - cfg.local_blocks * cfg.block_size, min=cfg.sink_end)
    middle = (keys[None, :] >= cfg.sink_end) & (keys[None, :] < m1[:, None])
    return scores.masked_fill(~middle, -math.inf)


# Budget mode's bisection on the stripe-score threshold: the interval and the width it stops at.
_TAU_BOUND, _TAU_WIDTH = 1e3, 1e-4


def _always_pairs(n: int, cfg: SparseConfig) -> float:
    """Causal pairs stage 3 always computes (sink + local, counted once), per head."""
    rows = torch.arange(n, dtype=torch.float64)
    group_start = torch.div(rows, cfg.group_rows, rounding_mode="floor") * cfg.group_rows
    local_start = (group_start - cfg.local_blocks * cfg.block_size).clamp_min(0)
    sink = torch.clamp(rows + 1, max=cfg.sink_end)
    return float((sink + rows + 1 - local_start - (sink - local_start).clamp_min(0)).sum())


def _key_threshold(skel, cfg, *, eps, sparsity, budget, chunk):
    """Threshold of the stripe scores.

    * threshold mode: ``log(eps / N)``, the paper's element threshold (a stripe holds one
      element of each of its rows);
    * ``budget="normal"``: eq. (14) with the stripe's ``group_rows`` elements as the block;
    * ``budget="quantile"``: the level at which the selection computes ``1 - sparsity`` of
      the causal pairs (always-computed ones included), by bisection on the pair count.
    """
    n = skel.n
    if sparsity is None:
        return math.log(eps / n)
    if budget == "normal":
        mean, std = _interior_moments(skel)
        p_elem = torch.tensor(float(sparsity), dtype=torch.float64) ** (1.0 / cfg.group_rows)
        return mean + std * float(torch.special.ndtri(p_elem))
    need = (1.0 - sparsity) * n * (n + 1) / 2 - _always_pairs(n, cfg)   # pairs left to spend
    if need <= 0:
        return math.inf                                # the always-computed keys use it all
    groups = num_groups(n, cfg)
    rows = torch.clamp(n - torch.arange(groups, device=skel.s.device) * cfg.group_rows,
                       max=cfg.group_rows).double()
    chunks = [(c0, min(groups, c0 + chunk)) for c0 in range(0, groups, chunk)]
    # Cache the scores when they are small (64 MiB on CPU, 1 GiB on an accelerator).
    cache_limit = 1 << 24 if skel.s.device.type == "cpu" else 1 << 28
    cached = [_key_scores(skel, cfg, c0, c1) for c0, c1 in chunks] \
        if groups * n <= cache_limit else None

    def pairs_at(tau):
        total = 0.0
        for i, (c0, c1) in enumerate(chunks):
            scores = cached[i] if cached is not None else _key_scores(skel, cfg, c0, c1)
            total += float(((scores >= tau).sum(-1).double() * rows[c0:c1]).sum())
        return total

    lo, hi = -_TAU_BOUND, _TAU_BOUND                   # log-attention estimates lie inside
    while hi - lo > _TAU_WIDTH:                        # pairs_at(tau) falls as tau grows
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if pairs_at(mid) > need else (lo, mid)
    return hi


def _check_mask_args(eps, sparsity, block, slash_pool, budget):
    if sparsity is None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (
                math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite float > 0, got {eps!r}")
    elif isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (
            0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity must be a float in [0, 1) or None, got {sparsity!r}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    if slash_pool not in ("max", "mean"):
        raise ValueError(f"slash_pool must be 'max' or 'mean', got {slash_pool!r}")
    if budget not in ("quantile", "normal"):
        raise ValueError(f"budget must be 'quantile' or 'normal', got {budget!r}")


def _decompose_args(q, k, *, rope_base, rotary_dim, sm_scale, samples, ridge, sink_tokens,
                    local_tokens, calib_rows):
    """Validate the decomposition arguments; return ``(rotary_dim, scale, samples)``."""
    _check_qk(q, k)
    d = q.shape[-1]
    rotary_dim = check_rope_args(rope_base, rotary_dim, d)
    _check_tokens(sink_tokens, local_tokens, calib_rows)
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not (
            math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a finite float >= 0, got {ridge!r}")
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    samples = 80 * d if samples is None else int(samples)
    return rotary_dim, scale, samples


def _head_skeletons(q, k, *, rope_base, rotary_dim, sm_scale, samples, ridge, seed, sink_tokens,
                    local_tokens, calib_rows):
    """Validate, then yield ``(b, h, Skeleton of one head)`` one head at a time."""
    rotary_dim, scale, samples = _decompose_args(
        q, k, rope_base=rope_base, rotary_dim=rotary_dim, sm_scale=sm_scale, samples=samples,
        ridge=ridge, sink_tokens=sink_tokens, local_tokens=local_tokens, calib_rows=calib_rows)
    theta = rope_frequencies(float(rope_base), rotary_dim, q.device)
    for b, h, qh, kh, kt in _heads(q, k, rope_base, rotary_dim):
        gen = torch.Generator().manual_seed(int(seed))
        yield b, h, _decompose_head(qh, kh, kt, theta=theta, scale=scale, samples=samples,
                                    ridge=ridge, gen=gen, sink_tokens=sink_tokens,
                                    local_tokens=local_tokens, calib_rows=calib_rows)


# --------------------------------------------------------------------------- CUDA path

def cuda_path_supported(q, k=None, *, granularity="block", sparsity=None, budget="quantile",
                        block_size=128, step=1, init_blocks=1, local_blocks=1,
                        mask_block=MASK_BLOCK, sink_tokens=64, local_tokens=64) -> bool:
    """Whether :func:`select` runs on the CUDA kernels (``csrc/cuda/skeleton.cu``).

    They cover non-empty 16-bit inputs (k, when given, of q's dtype) on a Hopper GPU with
    D in {64, 128}, when the exact Λ-shape lies inside the region stage 3 always computes
    (``sink_tokens <= min(64, init_blocks * block_size)``, ``local_tokens <= min(64,
    local_blocks * block_size)``; the defaults): then no Λ element can fall into a stripe
    or block the selection decides (a middle key is more than ``local_blocks *
    block_size`` keys before every row of its group), and the selection needs only ``s``,
    ``v``, ``h``. Per key: threshold and ``budget="quantile"``; per block: threshold mode
    with ``mask_block`` dividing ``block_size``. Anything else runs the PyTorch
    implementation (on CUDA tensors :func:`select` warns that it does).
    """
    from . import _C
    if not (q.is_cuda and _C.built_with_cuda() and q.dtype in (torch.float16, torch.bfloat16)
            and q.dim() == 4 and q.shape[2] > 0 and q.shape[-1] in (64, 128) and block_size == 128
            and (k is None or k.dtype == q.dtype)
            and torch.cuda.get_device_capability(q.device)[0] == 9):
        return False
    local = local_blocks * block_size
    if not (1 <= sink_tokens <= min(64, init_blocks * block_size) and 1 <= local_tokens <= min(64, local)):
        return False
    if granularity == "key":
        return sparsity is None or budget == "quantile"
    return sparsity is None and block_size % mask_block == 0


class SkeletonPathWarning(UserWarning):
    """:func:`select` ran the PyTorch implementation on CUDA tensors (options the CUDA
    kernels do not cover; see :func:`cuda_path_supported`)."""


_WARNED = set()


def _warn_pytorch_path(options: dict) -> None:
    key = tuple(sorted(options.items()))
    if key in _WARNED:
        return
    _WARNED.add(key)
    import warnings

    warnings.warn(f"anchor_ext.skeleton.select runs the PyTorch implementation on CUDA for "
                  f"{options} (much slower than the CUDA kernels, which cover fp16/bf16 on "
                  f"Hopper, D 64/128, the default Λ-shape, per-key selection or per-block "
                  f"threshold mode; see cuda_path_supported)", SkeletonPathWarning, stacklevel=3)


def _row_prefix(x):
    """``out[m] = sum_{j < m} x[j]`` for ``x (N, C)``: ``(N + 1, C)``. The scan runs along a
    contiguous last dim (on CUDA a scan over dim 0 of a few columns is one thread per
    column, tens of ms at 32k rows)."""
    return torch.nn.functional.pad(x.T.contiguous().cumsum(-1), (1, 0)).T


def fused_components(q, k, *, rope_base=None, rotary_dim=None, sm_scale=None, samples=None,
                     ridge=1e-3, seed=0, sink_tokens=64, local_tokens=64, calib_rows=1) -> dict:
    """Algorithm 1 on CUDA for every head at once: a dict of ``(B, Hq, N)`` tensors ``s``,
    ``v``, ``h``, ``mu``, ``sigma``, ``lse`` (as :class:`Skeleton`'s fields) and ``alpha``,
    ``kappa``, ``zeta``, ``fit_r2``.

    The row statistics (``mu``, ``sigma`` and the Λ-shape's log-sum-exp) come from the
    ``anchor::skeleton_row_stats`` kernel (fp32 tiles; the Gram prefix is summed in float64
    and read in fp32, so a row's variance is within ~1e-6 of its mean squared score over
    its interior count); the rest is
    float64 PyTorch on N-vectors and the ``samples x (rotary_dim + D)`` regression, with the
    same samples as :func:`decompose` (one draw shared by all heads, as there). Equal to
    :func:`decompose` up to fp32 rounding; no Λ-shape tensors (``sink``, ``band``).
    Nothing waits for the GPU but the op's NaN/Inf scan of q and k (off with
    ``anchor_ext.set_check_finite(False)``): the ridge systems of all kv heads are solved in
    one batched ``solve_ex`` (no error check, which would synchronise), the draw is copied
    from pinned memory, and every index known on the host is a Python int.
    """
    rotary_dim, scale, samples = _decompose_args(
        q, k, rope_base=rope_base, rotary_dim=rotary_dim, sm_scale=sm_scale, samples=samples,
        ridge=ridge, sink_tokens=sink_tokens, local_tokens=local_tokens, calib_rows=calib_rows)
    bsz, hq, n, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    dev = q.device
    S, T = min(sink_tokens, n), local_tokens
    m = n - S - T                                                       # interior rows/cols
    fit = m >= 2 and samples > 0
    if fit:  # line 1: the draw of decompose (re-seeded per head there, so equal for all)
        xs = torch.randint(0, m, (2, samples), generator=torch.Generator().manual_seed(int(seed)))
        xs = (xs.pin_memory() if dev.type == "cuda" else xs).to(dev, non_blocking=True)
        si, sj = xs.max(0).values + S + T, xs.min(0).values + S
    mu, var, lambda_lse = torch.ops.anchor.skeleton_row_stats(
        q, k, sink_tokens=S, local_tokens=T, sm_scale=scale)
    mu, var = mu.double(), var.double()                                 # 0 without interior
    rows = torch.arange(n, device=dev)
    count = (rows - T - S + 1).clamp_min(0)
    has_interior = count > 0
    cnt = count.clamp_min(1).double()

    # Row-centred regressors (lines 9-10), shared by every head for r.
    theta = rope_frequencies(float(rope_base), rotary_dim, dev)
    ang = torch.arange(n, device=dev, dtype=torch.float64)[:, None] * theta[None, :]
    r = torch.cat([ang.cos(), ang.sin()], dim=-1)                      # (N, rotary_dim)
    r_pre = _row_prefix(r)
    lo_o = min(T, n)
    r_bar = (r_pre[(rows - S + 1).clamp(min=lo_o, max=n)] - r_pre[lo_o]) / cnt[:, None]
    del r_pre
    hi_j = (rows - T + 1).clamp(min=S, max=n)                           # keys [S, i - T]
    hi_last = min(max(n - T, S), n)                                     # hi_j[-1], on the host
    rd = r.shape[1]

    def unroped(b, g):  # line 2, as decompose; run again in the second loop rather than
        # kept, so only one kv head's float64 keys are alive at a time (1 GiB at 1M tokens, D 128)
        return unrope(k[b, g].float(), None, rope_base, rotary_dim).double()

    # Lines 11-13: one ridge system per kv head (A is shared by its q heads), solved in a batch.
    k_bar_last = torch.empty(bsz, hkv, d, dtype=torch.float64, device=dev)
    coef = torch.zeros(bsz, hkv, rd + d, group, dtype=torch.float64, device=dev)
    fit_r2 = torch.zeros(bsz, hq, dtype=torch.float64, device=dev)
    if fit:
        r_sampled = r[si - sj] - r_bar[si]
        systems, rhs, designs, targets = [], [], [], []
    for b in range(bsz):
        for g in range(hkv):
            kt = unroped(b, g)
            k_pre = _row_prefix(kt)
            k_bar_last[b, g] = (k_pre[hi_last] - k_pre[S]) / cnt[-1]
            if fit:
                k_bar = (k_pre[hi_j[si]] - k_pre[S]) / cnt[si, None]
                a = torch.cat([r_sampled, kt[sj] - k_bar], dim=1)       # (samples, rd + D)
                heads = slice(g * group, (g + 1) * group)
                target = (q[b, heads, si].float() * k[b, g, sj].float()).sum(-1).double() * scale \
                    - mu[b, heads][:, si]                               # (group, samples)
                lam2 = (ridge * a.norm()) ** 2
                systems.append(a.T @ a + lam2 * torch.eye(a.shape[1], dtype=a.dtype, device=dev))
                rhs.append(a.T @ target.T)
                designs.append(a)
                targets.append(target)
    if fit:
        solution = torch.linalg.solve_ex(torch.stack(systems), torch.stack(rhs))[0]
        coef = solution.view(bsz, hkv, rd + d, group)
        targets = torch.stack(targets)                                  # (B Hkv, group, samples)
        resid = targets.transpose(1, 2) - torch.stack(designs) @ solution
        fit_r2 = (1.0 - resid.var(1) / targets.var(2).clamp_min(1e-30)).view(bsz, hq)
        del systems, rhs, designs, targets
    alpha = coef[:, :, :rd].transpose(2, 3).reshape(bsz, hq, rd)
    kappa = coef[:, :, rd:].transpose(2, 3).reshape(bsz, hq, d)

    # v (eq. 6), eps_i = (k_bar_i - k_bar_N) kappa from prefix sums of k~_j kappa, and
    # zeta (eq. 9) on the last calib_rows rows with interior keys (rows >= S + T).
    v = torch.empty(bsz, hq, n, dtype=torch.float64, device=dev)
    eps = torch.empty(bsz, hq, n, dtype=torch.float64, device=dev)
    zeta = torch.zeros(bsz, hq, dtype=torch.float64, device=dev)
    calib = torch.arange(max(n - calib_rows, S + T), max(n, S + T), device=dev)  # empty if n < S + T
    for b in range(bsz):
        for g in range(hkv):
            heads = slice(g * group, (g + 1) * group)
            w = unroped(b, g) @ kappa[b, heads].T                       # (N, group)
            w_pre = _row_prefix(w)
            last = k_bar_last[b, g] @ kappa[b, heads].T
            v[b, heads] = (w - last).T
            eps[b, heads] = ((w_pre[hi_j] - w_pre[S]) / cnt[:, None] - last).T
            if calib.numel():
                x = (q[b, heads][:, calib].float() @ k[b, g].float().T).double() * scale
                inside = (rows[None, :] >= S) & (rows[None, :] <= calib[:, None] - T)  # keys
                lse_int = torch.logsumexp(x.masked_fill(~inside, -math.inf), dim=-1)
                log_mean = lse_int - torch.log(cnt[calib]) - mu[b, heads][:, calib]
                zeta[b, heads] = (var[b, heads][:, calib] / 2 - log_mean).mean(-1)
    # Slash, delta (eqs. 4-5) for every head at once; h (eqs. 10-11).
    s = torch.einsum("nr,bhr->bhn", r - r_bar[-1], alpha)
    delta = torch.einsum("nr,bhr->bhn", r_bar - r_bar[-1], alpha)
    interior_term = torch.where(has_interior, torch.log(cnt) + var / 2 - zeta[..., None], -math.inf)
    nu = torch.logaddexp(lambda_lse.double() - mu, interior_term)
    delta = torch.where(has_interior, delta, 0.0)
    eps = torch.where(has_interior, eps, 0.0)
    h = torch.where(has_interior, -delta - eps - nu, -math.inf)
    return {"s": s.float(), "v": v.float(), "h": h.float(), "mu": mu.float(),
            "sigma": var.sqrt().float(), "lse": (mu + nu).float(), "alpha": alpha.float(),
            "kappa": kappa.float(), "zeta": zeta.float(), "fit_r2": fit_r2.float()}


def _select_cuda(q, k, cfg: SparseConfig, *, eps, sparsity, granularity, mask_block, slash_pool,
                 **decompose_args) -> torch.Tensor:
    """:func:`select` on the CUDA kernels (see :func:`cuda_path_supported`)."""
    comp = fused_components(q, k, **decompose_args)
    bsz, hq, n, _ = q.shape
    heads = bsz * hq
    s, v, h = (comp[name].reshape(heads, n) for name in ("s", "v", "h"))
    geometry = {"block_size": cfg.block_size, "step": cfg.step, "init_blocks": cfg.init_blocks,
                "local_blocks": cfg.local_blocks}
    S, T = min(decompose_args["sink_tokens"], n), decompose_args["local_tokens"]
    if granularity == "block":
        slash, vertical, horizontal = _block_components(s, v, h, sink_tokens=S, local_tokens=T,
                                                        block=mask_block, slash_pool=slash_pool)
        tau = torch.full((heads,), math.log(eps * mask_block / n), device=q.device)
    else:
        mask_block = 0
        vertical = v
        slash = _sliding_max(s, cfg.group_rows)                         # max s[o : o + rows]
        horizontal = _group_max(h, cfg)
        if sparsity is None:
            tau = torch.full((heads,), math.log(eps / n), device=q.device)
        else:
            tau = _key_threshold_cuda(vertical, slash, horizontal, n, cfg, sparsity, geometry)
    selection = torch.ops.anchor.skeleton_select(
        vertical.contiguous(), slash.contiguous(), horizontal.contiguous(), tau.float(),
        seqlen=n, mask_block=mask_block, **geometry)
    return selection.view(bsz, hq, *selection.shape[1:])


def _key_threshold_cuda(vertical, slash, horizontal, n, cfg, sparsity, geometry):
    """Per-head ``budget="quantile"`` threshold of :func:`_key_threshold`: the same
    bisection (the reference's interval and stopping width), each step one
    pair-count launch for all heads and no host synchronisation."""
    heads = vertical.shape[0]
    need = (1.0 - sparsity) * n * (n + 1) / 2 - _always_pairs(n, cfg)
    if need <= 0:
        return torch.full((heads,), math.inf, device=vertical.device)
    lo = torch.full((heads,), -_TAU_BOUND, dtype=torch.float64, device=vertical.device)
    hi = torch.full((heads,), _TAU_BOUND, dtype=torch.float64, device=vertical.device)
    # The reference's loop count: halve 2 * bound until the width is <= _TAU_WIDTH.
    for _ in range(math.ceil(math.log2(2 * _TAU_BOUND / _TAU_WIDTH))):
        mid = 0.5 * (lo + hi)
        pairs = torch.ops.anchor.skeleton_select(vertical, slash, horizontal, mid.float(), seqlen=n,
                                                 count_pairs=True, **geometry)
        above = pairs.double() > need
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return hi


@torch.no_grad()
def decompose(q, k, *, rope_base=None, rotary_dim=None, sm_scale=None, samples=None, ridge=1e-3,
              seed=0, sink_tokens=64, local_tokens=64, calib_rows=1) -> Skeleton:
    """Algorithm 1 of the paper for every (batch, q head): a :class:`Skeleton` ``(B, Hq, ...)``.

    Args:
        q: ``(B, Hq, N, D)``; k: ``(B, Hkv, N, D)``, both with RoPE applied (rotate-half).
        rope_base, rotary_dim: the model's RoPE (rotary_dim defaults to D); required.
        sm_scale: score scale (default ``1/sqrt(D)``).
        samples: sampled interior pairs for the regression (default ``80 * D``).
        ridge: ``lambda = ridge * ||A||_F`` in the normal equations (line 13).
        seed: seed of the CPU generator that draws the samples.
        sink_tokens, local_tokens: S and T of the exact Λ-shape.
        calib_rows: rows (from the end) that calibrate ``zeta``, eq. (9).

    Memory per head is O(N (D + S + T) + samples D); no N x N tensor.
    """
    parts = [skel for _, _, skel in _head_skeletons(
        q, k, rope_base=rope_base, rotary_dim=rotary_dim, sm_scale=sm_scale, samples=samples,
        ridge=ridge, seed=seed, sink_tokens=sink_tokens, local_tokens=local_tokens,
        calib_rows=calib_rows)]
    return _stack(parts, q.shape[:2])


@torch.no_grad()
def skeleton_block_mask(q, k, *, rope_base=None, rotary_dim=None, eps=0.8, sparsity=None,
                        block=MASK_BLOCK, sm_scale=None, samples=None, ridge=1e-3, seed=0,
                        sink_tokens=64, local_tokens=64, calib_rows=1, slash_pool="max",
                        budget="quantile") -> torch.Tensor:
    """Causal block mask of SparseSkeleton: bool ``(B, Hq, nb, nb)``, ``nb = ceil(N / block)``.

    Block ``(I, J)`` (query block I, key block J <= I) is True when it is computed:
    always for the sink column ``J = 0`` and the diagonal ``J = I``; otherwise when its
    block score ``s^B + v^B + h^B`` (maxed with the exact Λ-element scores) reaches

    * threshold mode (``sparsity=None``): ``tau_B = log(eps * block / N)``;
    * budget mode (``sparsity=p``): ``budget="quantile"`` keeps the best blocks until
      ``1 - p`` of the causal pairs are computed (hits ``p`` up to one block, unless the
      forced blocks alone exceed ``1 - p``); ``budget="normal"`` uses the paper's
      eq. (14), ``tau_B = mu + sigma * Phi^-1(p^(1/block))``.

    Decomposition arguments as in :func:`decompose`. O((N/block)^2) memory per head,
    one head at a time.
    """
    _check_mask_args(eps, sparsity, block, slash_pool, budget)
    bsz, hq, n, _ = q.shape
    nb = -(-n // block)
    out = torch.zeros(bsz, hq, nb, nb, dtype=torch.bool, device=q.device)
    for b, h, skel in _head_skeletons(q, k, rope_base=rope_base, rotary_dim=rotary_dim,
                                      sm_scale=sm_scale, samples=samples, ridge=ridge, seed=seed,
                                      sink_tokens=sink_tokens, local_tokens=local_tokens,
                                      calib_rows=calib_rows):
        scores = _block_scores(skel, block, slash_pool)
        out[b, h] = _mask_from_scores(scores, skel, block=block, eps=eps, sparsity=sparsity,
                                      budget=budget)
    return out


def block_mask_sparsity(mask: torch.Tensor, n: int, block: int = MASK_BLOCK) -> torch.Tensor:
    """Skipped share of the causal pairs of a block mask ``(..., nb, nb)``: float64 ``(...)``."""
    weights = _block_pairs(n, block, mask.device)
    return 1.0 - (mask.double() * weights).sum((-1, -2)) / weights.sum()


@torch.no_grad()
def select(q, k, *, rope_base=None, rotary_dim=None, eps=0.8, sparsity=None, block_size=128, step=1,
           init_blocks=1, local_blocks=1, sm_scale=None, samples=None, ridge=1e-3, seed=0,
           granularity="block", mask_block=MASK_BLOCK, sink_tokens=64, local_tokens=64,
           calib_rows=1, slash_pool="max", budget="quantile") -> torch.Tensor:
    """SparseSkeleton selection in the anchor_ext format: int32 ``(B, Hq, groups, ceil(N/32))``.

    Feed it to ``sparse_attention(q, k, v, selection, block_size=..., step=step, ...)``
    with the same geometry. A group is ``step`` query blocks of ``block_size`` rows (see
    :mod:`anchor_ext.reference`); only keys inside the group's middle region are set
    (stage 3 computes the sink and local keys anyway).

    * ``granularity="block"`` (the paper): the union, over the group's query
      ``mask_block``-blocks, of the key blocks :func:`skeleton_block_mask` keeps,
      expanded to keys (threshold ``log(eps * mask_block / N)``; ``sparsity`` is then
      the target of the block mask, not of this selection).
    * ``granularity="key"``: stage 3 computes stripes (one key for all rows of a group),
      so keys are chosen one by one: key ``j`` is selected when its stripe score
      ``v_j + max_{i in group} s_{i-j} + max_{i in group} h_i`` reaches the element
      threshold ``log(eps / N)``; with ``sparsity`` the selection itself (always-computed
      pairs included, as ``metrics.sparsity`` counts) hits the target.

    ``step`` defaults to 1 here (groups of one 128-row block), not 16: a slash line
    moves one key per row, so over a 2048-row group it sweeps 2048 keys and the union
    over the group would turn every slash into a wide band.

    On CUDA inputs that :func:`cuda_path_supported` covers (the defaults with fp16 / bf16
    on Hopper and D 64 or 128) this runs the kernels of ``csrc/cuda/skeleton.cu`` via
    :func:`fused_components`, with no host synchronisation beyond the NaN/Inf scan; other
    arguments run the PyTorch implementation below on any device (with a
    :class:`SkeletonPathWarning` on CUDA tensors).
    """
    if granularity not in ("block", "key"):
        raise ValueError(f"granularity must be 'block' or 'key', got {granularity!r}")
    _check_mask_args(eps, sparsity, mask_block, slash_pool, budget)
    cfg = SparseConfig(block_size, step, init_blocks, local_blocks)
    if cuda_path_supported(q, k, granularity=granularity, sparsity=sparsity, budget=budget,
                           block_size=block_size, step=step, init_blocks=init_blocks,
                           local_blocks=local_blocks, mask_block=mask_block,
                           sink_tokens=sink_tokens, local_tokens=local_tokens):
        return _select_cuda(q, k, cfg, eps=eps, sparsity=sparsity, granularity=granularity,
                            mask_block=mask_block, slash_pool=slash_pool, rope_base=rope_base,
                            rotary_dim=rotary_dim, sm_scale=sm_scale, samples=samples,
                            ridge=ridge, seed=seed, sink_tokens=sink_tokens,
                            local_tokens=local_tokens, calib_rows=calib_rows)
    if q.is_cuda and q.shape[2] > 0:
        _warn_pytorch_path({"dtype": str(q.dtype).replace("torch.", ""), "head_dim": q.shape[-1],
                            "granularity": granularity, "sparsity": sparsity, "budget": budget,
                            "mask_block": mask_block, "sink_tokens": sink_tokens,
                            "local_tokens": local_tokens, "block_size": block_size})
    bsz, hq, n, _ = q.shape
    groups = num_groups(n, cfg)
    out = torch.zeros(bsz, hq, groups, -(-n // 32), dtype=torch.int32, device=q.device)
    dev = q.device
    keys = torch.arange(n, device=dev)
    g0 = torch.arange(groups, device=dev) * cfg.group_rows
    # Middle region of every group (reference.middle_range, vectorised): [sink_end, m1).
    m1 = torch.clamp(g0 - cfg.local_blocks * cfg.block_size, min=cfg.sink_end)
    # Query mask-blocks of every group: [g0 // mb, ceil(g1 / mb)).
    qb_lo = g0 // mask_block
    qb_hi = -(-torch.clamp(g0 + cfg.group_rows, max=n) // mask_block)
    chunk = max(1, (1 << 24) // max(n, 1))                            # bounds the (chunk, N) temps
    for b, h, skel in _head_skeletons(q, k, rope_base=rope_base, rotary_dim=rotary_dim,
                                      sm_scale=sm_scale, samples=samples, ridge=ridge, seed=seed,
                                      sink_tokens=sink_tokens, local_tokens=local_tokens,
                                      calib_rows=calib_rows):
        if granularity == "block":
            mask = _mask_from_scores(_block_scores(skel, mask_block, slash_pool), skel,
                                     block=mask_block, eps=eps, sparsity=sparsity, budget=budget)
            # Union over the group's query blocks with a prefix count over query blocks.
            pre = torch.nn.functional.pad(mask.int().cumsum(0), (0, 0, 1, 0))
            group_blocks = (pre[qb_hi] - pre[qb_lo]) > 0                # (groups, nb)
        else:
            tau = _key_threshold(skel, cfg, eps=eps, sparsity=sparsity, budget=budget,
                                 chunk=chunk)
        for c0 in range(0, groups, chunk):
            c1 = min(groups, c0 + chunk)
            if granularity == "block":
                in_middle = (keys[None, :] >= cfg.sink_end) & (keys[None, :] < m1[c0:c1, None])
                bits = group_blocks[c0:c1][:, keys // mask_block] & in_middle
            else:
                bits = _key_scores(skel, cfg, c0, c1) >= tau
            out[b, h, c0:c1] = pack_bits(bits)
    return out
