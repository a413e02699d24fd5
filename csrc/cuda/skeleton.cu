// SparseSkeleton on the GPU (SPEC §3; the reference is anchor_ext/skeleton.py):
// the O(N d) row statistics of Algorithm 1 and the selection built from the
// fitted components. The small pieces in between (the sampled ridge regression,
// RoPE features, prefix sums of N-vectors) stay in PyTorch.
//
// Row statistics (skeleton_stats_kernel). For row i the interior is the keys
// S <= j <= i - T. Its moments are the causal moments minus the Λ-shape's:
//   sum_{j<=i} x_ij   = q_i . K_c        + sum_{c*C <= j <= i} x_ij
//   sum_{j<=i} x_ij^2 = q_i^T G_c q_i    + sum_{c*C <= j <= i} x_ij^2
// with c = i / C the row's chunk of C = kSkeletonChunkRows keys, and K_c, G_c the
// sums of k_j and k_j k_j^T over the keys before the chunk (taken by the host with
// cuBLAS). The Λ scores (sink keys j < S, band keys i - T < j <= i) are computed
// exactly: their sum and sum of squares are subtracted and their log-sum-exp is
// kept for eq. (10). With S, T <= 64 a 64-row tile needs three 64-key tiles (the
// sink tile 0, the tile before it and its own) plus D/64 tiles of G_c, all fp32
// CUDA-core GEMMs on smem.
//
// Selection (skeleton_select_kernel). One CTA per (group, head); each warp scores
// 32 keys at a time and writes one bitmask word with a ballot (or counts pairs for
// the budget search).
#include <algorithm>
#include <cmath>

#include "params.h"
#include "utils.cuh"

namespace anchor::cuda {
namespace {

// ------------------------------------------------------------------ row statistics

constexpr int kStatsRows = 64;     // rows per CTA
constexpr int kStatsKeys = 64;     // keys per score tile
constexpr int kStatsThreads = 256; // 16 x 16 threads, 4 x 4 scores each
// A row tile visits key tiles 0, t - 1 and t only: that covers its in-chunk keys when a
// chunk is two tiles, and its Λ keys when S, T <= 64 (checked by the op).
static_assert(kSkeletonChunkRows == 2 * kStatsKeys && kStatsRows == kStatsKeys,
              "the key tiles a row tile visits assume 128-key chunks of two 64-key tiles");

// Per-thread partial sums of its four rows, merged across the 16 threads of a row
// group at the end.
struct RowPartials {
  float chunk_sum[4] = {0, 0, 0, 0};     // sum of x over the in-chunk causal keys
  float chunk_sq[4] = {0, 0, 0, 0};      // sum of x^2 over them
  float lambda_sum[4] = {0, 0, 0, 0};    // sum of x over the Λ keys
  float lambda_sq[4] = {0, 0, 0, 0};
  float lambda_max[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
  float lambda_exp[4] = {0, 0, 0, 0};    // sum exp(x - lambda_max)
  float prefix_dot[4] = {0, 0, 0, 0};    // q_i . K_c (raw, unscaled)
  float prefix_quad[4] = {0, 0, 0, 0};   // q_i^T G_c q_i (raw, unscaled)
};

// Loads rows [row0, row0 + 64) of a (rows, D) 16-bit matrix transposed into fp32
// smem dst[D][64] (zeros past `rows`). Thread t copies 16-byte pieces of rows t % 64,
// so consecutive threads store consecutive smem words (no bank conflicts).
template <typename Element, int kHeadDim>
__device__ void load_transposed(float* dst, const Element* src, int64_t row_stride, int row0,
                                int rows) {
  using Num = NumericTraits<Element>;
  constexpr int kPieces = kHeadDim / 8;
  for (int idx = threadIdx.x; idx < 64 * kPieces; idx += kStatsThreads) {
    const int r = idx % 64, piece = idx / 64;
    Element vals[8];
    if (row0 + r < rows) {
      *reinterpret_cast<uint4*>(vals) =
          *reinterpret_cast<const uint4*>(src + int64_t(row0 + r) * row_stride + piece * 8);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) vals[e] = Num::from_float(0.f);
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) dst[(piece * 8 + e) * 64 + r] = Num::to_float(vals[e]);
  }
}

// acc[i][j] = sum_d a[d][4 ty + i] * b[d][4 tx + j] over smem operands stored [D][64].
template <int kHeadDim>
__device__ __forceinline__ void tile_gemm(float (&acc)[4][4], const float* a, const float* b,
                                          int ty, int tx) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
#pragma unroll 8
  for (int d = 0; d < kHeadDim; ++d) {
    const float4 av = *reinterpret_cast<const float4*>(a + d * 64 + 4 * ty);
    const float4 bv = *reinterpret_cast<const float4*>(b + d * 64 + 4 * tx);
    const float ar[4] = {av.x, av.y, av.z, av.w}, br[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(ar[i], br[j], acc[i][j]);
  }
}

// Sum over the 16 threads of a row group (contiguous lanes of one warp).
__device__ __forceinline__ float row_group_sum(float x) {
#pragma unroll
  for (int offset = 8; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(kStatsThreads) skeleton_stats_kernel(const SkeletonStatsParams p) {
  extern __shared__ float smem[];
  float* q_tile = smem;                       // [D][64] fp32, transposed
  float* k_tile = smem + kHeadDim * 64;       // [D][64]: a key tile or 64 columns of G_c
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int row_tile = blockIdx.x, head = blockIdx.y;
  const int row0 = row_tile * kStatsRows, n = p.seqlen;
  const int S = p.sink_tokens, T = p.local_tokens;
  const int chunk = row0 / kSkeletonChunkRows, chunk_start = chunk * kSkeletonChunkRows;
  const Element* q = static_cast<const Element*>(p.q) + head * p.q_head_stride;
  const Element* k = static_cast<const Element*>(p.k);

  load_transposed<Element, kHeadDim>(q_tile, q, p.q_row_stride, row0, n);
  RowPartials part;
  float acc[4][4];

  // Exact scores against the key tiles that hold a Λ key or an in-chunk key of
  // these rows: tile 0 (sink), the previous tile (band) and the own tile.
  for (int key_tile = 0; key_tile <= row_tile; ++key_tile) {
    if (key_tile != 0 && key_tile < row_tile - 1) continue;
    const int key0 = key_tile * kStatsKeys;
    __syncthreads();  // the previous k_tile is consumed
    load_transposed<Element, kHeadDim>(k_tile, k, p.k_row_stride, key0, n);
    __syncthreads();
    tile_gemm<kHeadDim>(acc, q_tile, k_tile, ty, tx);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = row0 + 4 * ty + i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int key = key0 + 4 * tx + j;
        if (key > row || row >= n) continue;
        const float x = acc[i][j] * p.sm_scale;
        if (key >= chunk_start) {
          part.chunk_sum[i] += x;
          part.chunk_sq[i] = fmaf(x, x, part.chunk_sq[i]);
        }
        if (key < S || key > row - T) {  // Λ: sink, or band (counted once)
          part.lambda_sum[i] += x;
          part.lambda_sq[i] = fmaf(x, x, part.lambda_sq[i]);
          if (x > part.lambda_max[i]) {
            part.lambda_exp[i] = part.lambda_exp[i] * __expf(part.lambda_max[i] - x) + 1.f;
            part.lambda_max[i] = x;
          } else {
            part.lambda_exp[i] += __expf(x - part.lambda_max[i]);
          }
        }
      }
    }
  }

  // The keys before the chunk: q_i^T G_c q_i, 64 columns of G_c at a time (G_c is
  // symmetric, so row d of G_c, columns e0..e0+63, is the [D][64] operand).
  const float* gram = p.gram_prefix + int64_t(chunk) * kHeadDim * kHeadDim;
  for (int e0 = 0; e0 < kHeadDim; e0 += 64) {
    __syncthreads();
    for (int idx = tid; idx < kHeadDim * 64; idx += kStatsThreads) {
      const int d = idx / 64, e = idx % 64;
      k_tile[d * 64 + e] = gram[int64_t(d) * kHeadDim + e0 + e];
    }
    __syncthreads();
    tile_gemm<kHeadDim>(acc, q_tile, k_tile, ty, tx);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        part.prefix_quad[i] = fmaf(acc[i][j], q_tile[(e0 + 4 * tx + j) * 64 + 4 * ty + i],
                                   part.prefix_quad[i]);
  }
  // q_i . K_c: thread tx takes dims tx, tx + 16, ...
  const float* key_sum = p.key_prefix + int64_t(chunk) * kHeadDim;
  for (int d = tx; d < kHeadDim; d += 16) {
    const float kd = key_sum[d];
#pragma unroll
    for (int i = 0; i < 4; ++i) part.prefix_dot[i] = fmaf(q_tile[d * 64 + 4 * ty + i], kd, part.prefix_dot[i]);
  }

  // Merge the row group, then one thread per row writes.
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float chunk_sum = row_group_sum(part.chunk_sum[i]);
    const float chunk_sq = row_group_sum(part.chunk_sq[i]);
    const float lambda_sum = row_group_sum(part.lambda_sum[i]);
    const float lambda_sq = row_group_sum(part.lambda_sq[i]);
    const float prefix_dot = row_group_sum(part.prefix_dot[i]);
    const float prefix_quad = row_group_sum(part.prefix_quad[i]);
    float lmax = part.lambda_max[i];
#pragma unroll
    for (int offset = 8; offset > 0; offset /= 2)
      lmax = fmaxf(lmax, __shfl_xor_sync(0xffffffffu, lmax, offset));
    const float lexp = row_group_sum(
        part.lambda_max[i] == -INFINITY ? 0.f : part.lambda_exp[i] * __expf(part.lambda_max[i] - lmax));
    const int row = row0 + 4 * ty + i;
    if (tx != 0 || row >= n) continue;
    const int64_t out = int64_t(head) * p.out_head_stride + row;
    const int interior = row - T - S + 1;  // c_i
    float mu = 0.f, var = 0.f;
    if (interior > 0) {
      // Double for the final differences: sum x^2 / c - mu^2 cancels.
      const double scale = p.sm_scale;
      const double first = scale * prefix_dot + double(chunk_sum) - lambda_sum;
      const double second = scale * scale * prefix_quad + double(chunk_sq) - lambda_sq;
      const double mean = first / interior;
      mu = float(mean);
      var = float(fmax(second / interior - mean * mean, 0.0));
    }
    p.mu[out] = mu;
    p.var[out] = var;
    p.lambda_lse[out] = lmax + logf(lexp);
  }
}

template <typename Element, int kHeadDim>
void launch_stats(const SkeletonStatsParams& p, cudaStream_t stream) {
  constexpr size_t kSmem = 2 * kHeadDim * 64 * sizeof(float);
  auto kernel = skeleton_stats_kernel<Element, kHeadDim>;
  ANCHOR_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSmem)));
  const dim3 grid((p.seqlen + kStatsRows - 1) / kStatsRows, p.heads);
  kernel<<<grid, kStatsThreads, kSmem, stream>>>(p);
  ANCHOR_CUDA_CHECK(cudaGetLastError());
}

// ------------------------------------------------------------------ selection

constexpr int kSelectThreads = 256;

template <bool kPerBlock>
__global__ void __launch_bounds__(kSelectThreads) skeleton_select_kernel(const SkeletonSelectParams p) {
  const int group = blockIdx.x, head = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Geometry& geo = p.geo;
  const int64_t n = p.seqlen;
  const int64_t g0 = geo.group_start(group);
  const int64_t g1 = g0 + geo.group_rows() < n ? g0 + geo.group_rows() : n;
  const int64_t middle_begin = geo.sink_end(), middle_end = geo.middle_end(group);
  const float* vertical = p.vertical + head * p.component_stride;
  const float* slash = p.slash + head * p.component_stride;
  const float* horizontal = p.horizontal + head * p.horizontal_stride;
  const float tau = p.tau[head];
  // Per key: the group's largest h. Per block: the group's query mask-blocks.
  const float h_group = kPerBlock ? 0.f : horizontal[group];
  const int q_block_lo = kPerBlock ? int(g0 / p.mask_block) : 0;
  const int q_block_hi = kPerBlock ? int((g1 + p.mask_block - 1) / p.mask_block) : 0;

  unsigned long long pairs = 0;
  // Counting stops at the middle region's end; writing covers every word (zeros past it).
  const int64_t middle_words = middle_end > 0 ? (middle_end + 31) / 32 : 0;
  const int64_t words = p.selection ? p.num_words : (middle_words < p.num_words ? middle_words : p.num_words);
  uint32_t* out = p.selection ? p.selection + (int64_t(head) * p.num_groups + group) * p.num_words : nullptr;
  for (int64_t w = warp; w < words; w += kSelectThreads / 32) {
    const int64_t key = w * 32 + lane;
    bool keep = false;
    if (key >= middle_begin && key < middle_end) {  // middle keys are < n
      float score;
      if constexpr (kPerBlock) {
        const int key_block = int(key / p.mask_block);
        // Max over the group's query blocks I >= key_block of (s + v) + h, summed in the
        // reference's order so that the scores round alike.
        const float column = vertical[key_block];
        score = -INFINITY;
        for (int qb = q_block_lo; qb < q_block_hi; ++qb)
          score = fmaxf(score, (slash[qb - key_block] + column) + horizontal[qb]);
      } else {
        score = vertical[key] + slash[g0 - key] + h_group;
      }
      keep = score >= tau;
    }
    const uint32_t bits = __ballot_sync(0xffffffffu, keep);
    if (out != nullptr) {
      if (lane == 0) out[w] = bits;
    } else {
      pairs += uint64_t(__popc(bits));
    }
  }
  if (p.pair_count != nullptr && lane == 0 && pairs > 0) {
    atomicAdd(p.pair_count + head, pairs * static_cast<unsigned long long>(g1 - g0));
  }
}

}  // namespace

void run_skeleton_stats(const SkeletonStatsParams& p, cudaStream_t stream) {
  if (p.seqlen == 0 || p.heads == 0) return;
  if (p.is_bf16) {
    p.head_dim == 64 ? launch_stats<__nv_bfloat16, 64>(p, stream)
                     : launch_stats<__nv_bfloat16, 128>(p, stream);
  } else {
    p.head_dim == 64 ? launch_stats<__half, 64>(p, stream) : launch_stats<__half, 128>(p, stream);
  }
}

void run_skeleton_select(const SkeletonSelectParams& p, cudaStream_t stream) {
  if (p.heads == 0 || p.num_groups == 0) return;
  const dim3 grid(unsigned(p.num_groups), unsigned(p.heads));
  if (p.mask_block > 0) {
    skeleton_select_kernel<true><<<grid, kSelectThreads, 0, stream>>>(p);
  } else {
    skeleton_select_kernel<false><<<grid, kSelectThreads, 0, stream>>>(p);
  }
  ANCHOR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace anchor::cuda
