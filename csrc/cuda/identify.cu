// Stage 2, identification: for each (batch, q head, group), the mean queries of
// the group's vote units (vote_rows consecutive rows each: a whole query block
// for the paper's rule, down to single rows) are multiplied with every key of
// the group's middle region on tensor cores (mma.sync m16n8k16, fp32
// accumulate), each score is compared with its unit's mean anchor against the
// head's threshold, and the group's union of votes is written as the selection
// bitmask with warp ballots.
//
// Precision: the unit means are fp32; to keep the scores fp32-accurate on
// 16-bit tensor cores, each mean is split into hi + lo 16-bit parts and both are
// multiplied (hi·k + lo·k), so a vote differs from the fp32 reference only
// within ~1e-5 of theta. Single-row units are exact in 16 bits: no lo part.
//
// Work split: one CTA per (group, batch, up to heads_per_cta q heads sharing one
// kv head), 4 warps; each warp walks 32-key tiles of the middle region
// (double-buffered cp.async into its own smem buffer) and scores every tile
// against the block means of all the CTA's q heads, so K is read once per kv
// head and group. Every bitmask word is written by exactly one warp.
#include <algorithm>

#include "params.h"
#include "utils.cuh"

namespace anchor::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTileKeys = 32;  // one bitmask word per tile
constexpr int kStages = 2;

template <typename Element>
__device__ __forceinline__ void mma_16x8x16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1) {
  if constexpr (std::is_same_v<Element, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Shared memory of one CTA; rows of every tile are padded by 16 bytes so that
// ldmatrix's eight row addresses fall in distinct banks.
template <typename Element, int kHeadDim>
struct IdentifySmem {
  static constexpr int kPitch = kHeadDim + 8;  // elements per smem row
  int rows_per_head;                           // segment rows: 8 units, or units rounded up to 16
  int heads;                                   // q heads per CTA
  // Whole m16 tiles: an odd head count of 8-row segments leaves 8 padding rows.
  __device__ __host__ int mean_rows() const { return (rows_per_head * heads + 15) / 16 * 16; }
  __device__ __host__ size_t mean_bytes() const { return size_t(mean_rows()) * kPitch * sizeof(Element); }
  __device__ __host__ size_t key_tile_bytes() const { return size_t(kTileKeys) * kPitch * sizeof(Element); }
  __device__ __host__ size_t total_bytes() const {
    return 2 * mean_bytes() + mean_rows() * sizeof(float) + kWarps * kStages * key_tile_bytes();
  }
};

// Mean-tile rows of one (head, group): 8 units fill half an m16 tile (two heads share
// a tile, unpadded: the vote union of each half is its own), others round up to 16.
__host__ __device__ inline int segment_rows(int units) { return units == 8 ? 8 : (units + 15) / 16 * 16; }

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(kThreads) identify_kernel(const IdentifyParams p) {
  using Num = NumericTraits<Element>;
  using Smem = IdentifySmem<Element, kHeadDim>;
  constexpr int kPitch = Smem::kPitch;
  const Geometry& geo = p.geo;
  const int q_heads_per_kv = p.q_heads_per_kv();
  const int chunks_per_kv = (q_heads_per_kv + p.heads_per_cta - 1) / p.heads_per_cta;
  const int kv_head = blockIdx.x / chunks_per_kv;
  const int first_head = kv_head * q_heads_per_kv + (blockIdx.x % chunks_per_kv) * p.heads_per_cta;
  const int heads = min(p.heads_per_cta, (kv_head + 1) * q_heads_per_kv - first_head);
  const int group = int(p.num_groups) - 1 - int(blockIdx.y);  // long groups first
  const int batch = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  auto words_of = [&](int h) {
    return p.selection + ((int64_t(batch) * p.q_heads + first_head + h) * p.num_groups + group) * p.num_words;
  };
  const int64_t m0 = geo.sink_end(), m1 = geo.middle_end(group);
  // block_size is 128, so the middle region starts and ends on word boundaries.
  const int64_t w0 = m0 / 32, w1 = m1 > m0 ? m1 / 32 : w0;
  for (int h = 0; h < heads; ++h) {
    uint32_t* words = words_of(h);
    for (int64_t w = threadIdx.x; w < p.num_words; w += kThreads) {
      if (w < w0 || w >= w1) words[w] = 0u;
    }
  }
  if (m1 <= m0) return;

  extern __shared__ __align__(128) char smem_raw[];
  Smem layout{segment_rows(int(geo.group_rows() / p.vote_rows)), heads};
  auto* mean_hi = reinterpret_cast<Element*>(smem_raw);
  auto* mean_lo = reinterpret_cast<Element*>(smem_raw + layout.mean_bytes());
  auto* mean_anchor = reinterpret_cast<float*>(smem_raw + 2 * layout.mean_bytes());
  auto* key_tiles = reinterpret_cast<Element*>(smem_raw + 2 * layout.mean_bytes() +
                                               layout.mean_rows() * sizeof(float));

  // ---- mean queries and anchors of the group's vote units (fp32), split hi + lo ----
  // Row r of the mean tile is vote unit (r % rows_per_head) of head r / rows_per_head.
  const int units_per_group = int(geo.group_rows() / p.vote_rows);
  const int64_t first_row = geo.group_start(group);
  constexpr int kPerLane = kHeadDim / 32;
  for (int r = warp; r < layout.mean_rows(); r += kWarps) {
    const int head = first_head + r / layout.rows_per_head, unit = r % layout.rows_per_head;
    const auto* q = static_cast<const Element*>(p.q) + batch * p.q_batch_stride + head * p.q_head_stride;
    const float* anchor = p.anchor + (int64_t(batch) * p.q_heads + head) * p.seqlen;
    const int64_t row0 = first_row + int64_t(unit) * p.vote_rows;
    float sum[kPerLane] = {};
    float anchor_sum = 0.f;
    int64_t count = 0;
    if (r / layout.rows_per_head < heads && unit < units_per_group && row0 < p.seqlen) {
      const int64_t row1 = min(int64_t(p.seqlen), row0 + p.vote_rows);
      count = row1 - row0;
      for (int64_t row = row0; row < row1; ++row) {
        const Element* src = q + row * p.q_row_stride + lane * kPerLane;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) sum[i] += Num::to_float(src[i]);
      }
      for (int64_t row = row0 + lane; row < row1; row += 32) anchor_sum += anchor[row];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) anchor_sum += __shfl_xor_sync(~0u, anchor_sum, offset);
    }
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const float mean = count > 0 ? sum[i] / float(count) : 0.f;
      const Element hi = Num::from_float(mean);
      mean_hi[r * kPitch + lane * kPerLane + i] = hi;
      mean_lo[r * kPitch + lane * kPerLane + i] = Num::from_float(mean - Num::to_float(hi));
    }
    // Padding rows get +inf: (inf - score < theta) is false, so they never vote.
    if (lane == 0) mean_anchor[r] = count > 0 ? anchor_sum / float(count) : INFINITY;
  }
  __syncthreads();

  // ---- walk the middle region in 32-key tiles, one warp per tile ----
  const auto* k = static_cast<const Element*>(p.k) + batch * p.k_batch_stride + kv_head * p.k_head_stride;
  Element* my_tiles = key_tiles + warp * kStages * kTileKeys * kPitch;
  constexpr int kChunksPerRow = kHeadDim * int(sizeof(Element)) / 16;
  auto load_tile = [&](int64_t tile, int stage) {
    const int64_t key0 = m0 + tile * kTileKeys;
    Element* dst = my_tiles + stage * kTileKeys * kPitch;
#pragma unroll
    for (int i = 0; i < kChunksPerRow; ++i) {
      const int chunk = i * 32 + lane;  // consecutive lanes read consecutive 16 B of a row
      const int row = chunk / kChunksPerRow, col = (chunk % kChunksPerRow) * 8;
      cp_async_16(dst + row * kPitch + col, k + (key0 + row) * p.k_row_stride + col, 16);
    }
  };

  const int64_t num_tiles = (m1 - m0) / kTileKeys;
  const float scale = geo.sm_scale;
  // Block means keep fp32 accuracy (hi + lo); smaller units use their mean rounded to
  // the input dtype, as the reference defines them (half the tensor-core work).
  const bool split = p.vote_rows == geo.block_size;
  auto theta_of = [&](int h) {
    return p.head_theta != nullptr && h < heads ? p.head_theta[int64_t(batch) * p.q_heads + first_head + h]
                                                : p.theta;
  };
  const int g = lane / 4;  // mma row group of this lane
  int stage = 0;
  if (warp < num_tiles) load_tile(warp, 0);
  cp_async_commit();
  for (int64_t tile = warp; tile < num_tiles; tile += kWarps, stage ^= 1) {
    if (tile + kWarps < num_tiles) load_tile(tile + kWarps, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncwarp();
    const Element* keys = my_tiles + stage * kTileKeys * kPitch;

    // B fragments of all 32 keys x kHeadDim, kept in registers for every m-tile.
    uint32_t b_frag[kHeadDim / 16][4][2];
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
#pragma unroll
      for (int pair = 0; pair < 2; ++pair) {
        uint32_t r[4];
        const int key = pair * 16 + (lane % 8) + (lane / 16) * 8;
        ldmatrix_x4(r, keys + key * kPitch + kk * 16 + ((lane / 8) % 2) * 8);
        b_frag[kk][pair * 2][0] = r[0];
        b_frag[kk][pair * 2][1] = r[1];
        b_frag[kk][pair * 2 + 1][0] = r[2];
        b_frag[kk][pair * 2 + 1][1] = r[3];
      }
    }

    // Finish one (head, group) segment: union over the rows held by the 8 lanes sharing
    // t, then one ballot gives the tile's word (lane l reports key l, which lives in
    // lane (l % 8) / 2 at bit (l / 8) * 2 + l % 2).
    auto write_word = [&](uint32_t votes, int h) {
      votes |= __shfl_xor_sync(~0u, votes, 4);
      votes |= __shfl_xor_sync(~0u, votes, 8);
      votes |= __shfl_xor_sync(~0u, votes, 16);
      const uint32_t source = __shfl_sync(~0u, votes, (lane % 8) / 2);
      const uint32_t word = __ballot_sync(~0u, (source >> ((lane / 8) * 2 + (lane & 1))) & 1u);
      if (lane == 0 && h < heads) words_of(h)[w0 + tile] = word;
    };
    const int tiles_per_segment = layout.rows_per_head / 16;  // 0: two segments per m-tile
    uint32_t segment_votes = 0;
    for (int m_tile = 0; m_tile < layout.mean_rows() / 16; ++m_tile) {
      float acc[4][4] = {};
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        uint32_t a_hi[4], a_lo[4];
        const int row = m_tile * 16 + (lane % 16), col = kk * 16 + (lane / 16) * 8;
        ldmatrix_x4(a_hi, mean_hi + row * kPitch + col);
        if (split) ldmatrix_x4(a_lo, mean_lo + row * kPitch + col);
#pragma unroll
        for (int n_tile = 0; n_tile < 4; ++n_tile) {
          mma_16x8x16<Element>(acc[n_tile], a_hi, b_frag[kk][n_tile][0], b_frag[kk][n_tile][1]);
          if (split) mma_16x8x16<Element>(acc[n_tile], a_lo, b_frag[kk][n_tile][0], b_frag[kk][n_tile][1]);
        }
      }
      // This lane's rows: g (top) and g + 8 (bottom) of the m-tile, each with its head's threshold.
      const int top = m_tile * 16 + g, bottom = top + 8;
      const float anchor_top = mean_anchor[top], anchor_bottom = mean_anchor[bottom];
      const float theta_top = theta_of(top / layout.rows_per_head);
      const float theta_bottom = theta_of(bottom / layout.rows_per_head);
      // Vote bits of this lane: bit (n_tile * 2 + e) <-> key n_tile * 8 + 2t + e.
      uint32_t votes_top = 0, votes_bottom = 0;
#pragma unroll
      for (int n_tile = 0; n_tile < 4; ++n_tile) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          votes_top |= uint32_t(anchor_top - scale * acc[n_tile][e] < theta_top) << (n_tile * 2 + e);
          votes_bottom |= uint32_t(anchor_bottom - scale * acc[n_tile][2 + e] < theta_bottom) << (n_tile * 2 + e);
        }
      }
      if (tiles_per_segment == 0) {  // 8-row segments: the m-tile's halves are two heads
        write_word(votes_top, 2 * m_tile);
        write_word(votes_bottom, 2 * m_tile + 1);
      } else {
        segment_votes |= votes_top | votes_bottom;
        if ((m_tile + 1) % tiles_per_segment == 0) {
          write_word(segment_votes, m_tile / tiles_per_segment);
          segment_votes = 0;
        }
      }
    }
    __syncwarp();  // the stage is refilled next iteration
  }
  cp_async_wait<0>();
}

template <typename Element, int kHeadDim>
void launch_identify(const IdentifyParams& p, cudaStream_t stream) {
  IdentifyParams params = p;
  const int rows_per_head = segment_rows(int(p.geo.group_rows() / p.vote_rows));
  // Up to 128 mean rows per CTA (q heads of one kv head together: each K tile is
  // read once for all of them), <= ~140 KB of smem; but one head per CTA when
  // packing would leave SMs idle (short sequences, few groups).
  params.heads_per_cta = std::max(1, std::min(p.q_heads_per_kv(), 128 / rows_per_head));
  static const int num_sms = [] {
    int device = 0, count = 0;
    ANCHOR_CUDA_CHECK(cudaGetDevice(&device));
    ANCHOR_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    return count;
  }();
  if (int64_t(p.kv_heads) * p.num_groups * p.batch < 2 * num_sms) params.heads_per_cta = 1;
  IdentifySmem<Element, kHeadDim> layout{rows_per_head, params.heads_per_cta};
  const size_t smem = layout.total_bytes();
  auto kernel = identify_kernel<Element, kHeadDim>;
  ANCHOR_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const int chunks_per_kv = (p.q_heads_per_kv() + params.heads_per_cta - 1) / params.heads_per_cta;
  const dim3 grid(unsigned(p.kv_heads * chunks_per_kv), unsigned(p.num_groups), p.batch);
  kernel<<<grid, kThreads, smem, stream>>>(params);
  ANCHOR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void run_identify(const IdentifyParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.num_groups == 0) return;
  if (p.is_bf16) {
    p.head_dim == 64 ? launch_identify<__nv_bfloat16, 64>(p, stream)
                     : launch_identify<__nv_bfloat16, 128>(p, stream);
  } else {
    p.head_dim == 64 ? launch_identify<__half, 64>(p, stream) : launch_identify<__half, 128>(p, stream);
  }
}

}  // namespace anchor::cuda
