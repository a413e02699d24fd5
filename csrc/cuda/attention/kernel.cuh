// The gather-attention kernel: one CTA per (query block, q head, batch), two
// consumer warpgroups of 64 query rows each.
//
//   tile scheduler : CausalTileScheduler (longest key lists first)
//   key list       : KeyListProducer, run by warp 0 one tile ahead
//   mainloop       : cp.async row gathers of K/V (double buffer), S = Q K^T and
//                    O += P V on wgmma, online softmax in registers
//   epilogue       : O / rowsum -> out (input dtype), lse; or the row max (stage 1)
//
// kAnchorOnly = true is stage 1: the same walk over the always-computed keys
// only, keeping row maxima (no V, no P V).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "../params.h"
#include "../utils.cuh"
#include "key_list.cuh"
#include "kernel_traits.h"
#include "mainloop.cuh"
#include "softmax.cuh"
#include "tile_scheduler.h"

namespace anchor::cuda::attention {

template <class Traits, bool kAnchorOnly>
__global__ void __launch_bounds__(Traits::kThreads, 1) gather_attention_kernel(const AttentionParams p) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kThreads = Traits::kThreads;
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ __align__(1024) char smem_raw[];
  auto& storage = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);

  const auto tile = CausalTileScheduler::get_tile();
  const Geometry& geo = p.geo;
  const int64_t r0 = int64_t(tile.q_block) * kBlockM;
  const int64_t r1 = min(int64_t(p.seqlen), r0 + kBlockM);
  const int64_t group = r0 / geo.group_rows();
  const int kv_head = tile.head / p.q_heads_per_kv();
  const auto* q = static_cast<const Element*>(p.q) + tile.batch * p.q_batch_stride + tile.head * p.q_head_stride;
  const auto* k = static_cast<const Element*>(p.k) + tile.batch * p.k_batch_stride + kv_head * p.k_head_stride;
  const auto* v = static_cast<const Element*>(p.v) + tile.batch * p.v_batch_stride + kv_head * p.v_head_stride;
  const uint32_t* group_words =
      kAnchorOnly ? nullptr
                  : p.selection + ((int64_t(tile.batch) * p.q_heads + tile.head) * p.num_groups + group) * p.num_words;

  Tensor sQ = make_tensor(make_smem_ptr(storage.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(storage.k.data()), typename Traits::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(storage.v.data()), typename Traits::SmemLayoutVt{});

  // ---- key list producer (warp 0) and the gathers of all threads ----
  const int warp = threadIdx.x / 32;
  KeyListProducer<kBlockN> producer(geo, r0, r1, group_words);
  auto produce = [&](int stage) {
    if (warp == 0) {
      int* slots = storage.key_slots[stage];
      const int count = producer.next_tile(slots);
      if (threadIdx.x == 0) {
        storage.tile_valid[stage] = count > 0;
        storage.tile_needs_mask[stage] = count < kBlockN || slots[count - 1] > r0;
      }
    }
  };
  auto gather = [&](int stage) {
    const int* slots = storage.key_slots[stage];
    auto row_of = [&](int slot) { return int64_t(slots[slot]); };
    gather_rows<kThreads, kBlockN, kHeadDim>(k, p.k_row_stride, row_of,
                                             [&](int slot, int col) { return &sK(slot, col, stage); });
    if constexpr (!kAnchorOnly) {
      gather_rows<kThreads, kBlockN, kHeadDim>(v, p.v_row_stride, row_of,
                                               [&](int slot, int col) { return &sVt(col, slot, stage); });
    }
  };

  // Q rows past the sequence end are zero-filled and never stored.
  gather_rows<kThreads, kBlockM, kHeadDim>(
      q, p.q_row_stride, [&](int slot) { return r0 + slot < r1 ? r0 + slot : int64_t(-1); },
      [&](int slot, int col) { return &sQ(slot, col); });
  produce(0);
  __syncthreads();
  gather(0);
  cp_async_commit();

  // ---- MMA partitions ----
  typename Traits::TiledMmaQK mma_qk;
  typename Traits::TiledMmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(threadIdx.x);
  auto thr_pv = mma_pv.get_thread_slice(threadIdx.x);
  Tensor tSrQ = thr_qk.make_fragment_A(thr_qk.partition_A(sQ));  // (MMA, MMA_M, MMA_K)
  Tensor tSrK = thr_qk.make_fragment_B(thr_qk.partition_B(sK));  // (MMA, MMA_N, MMA_K, stage)
  Tensor tOrVt = thr_pv.make_fragment_B(thr_pv.partition_B(sVt));
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  // (row, key slot) and (row, column) of every accumulator element of this thread.
  Tensor tScS = thr_qk.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tOcO = thr_pv.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  clear(tOrO);

  // Rows of this thread's two row slots (softmax.cuh: element i is in slot (i / 2) % 2).
  const int64_t my_row[2] = {r0 + get<0>(tScS(0)), r0 + get<0>(tScS(2))};
  const float scale = kAnchorOnly ? geo.sm_scale : geo.sm_scale * kLog2e;
  OnlineSoftmax softmax;

  for (int stage = 0;; stage ^= 1) {
    // Produce and start gathering the next tile while this one is computed.
    produce(stage ^ 1);
    __syncthreads();
    const bool has_next = storage.tile_valid[stage ^ 1];
    if (has_next) gather(stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    cutlass::arch::fence_view_async_shared();  // cp.async writes -> wgmma (async proxy) reads
    __syncthreads();

    warpgroup_gemm<true>(mma_qk, tSrQ, tSrK(_, _, _, stage), tSrS);

    const bool needs_mask = storage.tile_needs_mask[stage];
    const int* slots = storage.key_slots[stage];
    CUTE_UNROLL
    for (int i = 0; i < size(tSrS); ++i) {
      float s = tSrS(i) * scale;
      if (needs_mask) {
        const int key = slots[get<1>(tScS(i))];
        if (key < 0 || key > my_row[row_slot(i)]) s = -INFINITY;
      }
      tSrS(i) = s;
    }

    if constexpr (kAnchorOnly) {
      softmax.update_max(tSrS);
    } else {
      float rescale[2];
      softmax.update(tSrS, rescale);
      CUTE_UNROLL
      for (int i = 0; i < size(tOrO); ++i) tOrO(i) *= rescale[row_slot(i)];
      // P in the input dtype, in the register layout of the A operand of P V.
      Tensor tOrP = make_tensor_like<Element>(tSrS);
      CUTE_UNROLL
      for (int i = 0; i < size(tSrS); ++i) tOrP(i) = Element(tSrS(i));
      Tensor tOrP_a = make_tensor(tOrP.data(), accumulator_as_operand_a(tSrS.layout()));
      warpgroup_fence_operand(tOrP_a);
      warpgroup_gemm<false>(mma_pv, tOrP_a, tOrVt(_, _, _, stage), tOrO);
    }
    __syncthreads();  // this stage's smem is refilled by the next iteration's gather
    if (!has_next) break;
  }
  cp_async_wait<0>();

  // ---- epilogue ----
  const int64_t row_base = (int64_t(tile.batch) * p.q_heads + tile.head) * p.seqlen;
  const bool quad_leader = threadIdx.x % 4 == 0;
  if constexpr (kAnchorOnly) {
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      if (quad_leader && my_row[r] < r1) p.anchor[row_base + my_row[r]] = softmax.row_max[r];
    }
  } else {
    float inv_sum[2];
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      const float sum = quad_sum(softmax.row_sum[r]);
      inv_sum[r] = 1.f / sum;  // every row sees at least its diagonal key, so sum >= 1
      if (quad_leader && my_row[r] < r1 && p.lse != nullptr) {
        p.lse[row_base + my_row[r]] = (softmax.row_max[r] + __log2f(sum)) / kLog2e;
      }
    }
    auto* out = static_cast<Element*>(p.out) + row_base * kHeadDim;
    // Elements 2j and 2j+1 are neighbouring columns of one row: store them as a pair.
    CUTE_UNROLL
    for (int i = 0; i < size(tOrO); i += 2) {
      const int64_t row = r0 + get<0>(tOcO(i));
      if (row >= r1) continue;
      const int col = get<1>(tOcO(i));
      const float inv = inv_sum[row_slot(i)];
      Element pair[2] = {Element(tOrO(i) * inv), Element(tOrO(i + 1) * inv)};
      *reinterpret_cast<uint32_t*>(out + row * kHeadDim + col) = *reinterpret_cast<uint32_t*>(pair);
    }
  }
}

template <bool kIsBf16, int kHeadDim, bool kAnchorOnly>
void launch_gather_attention(const AttentionParams& p, cudaStream_t stream) {
  using Traits = KernelTraits<kIsBf16, kHeadDim>;
  constexpr size_t kSmem = sizeof(typename Traits::SharedStorage);
  auto kernel = gather_attention_kernel<Traits, kAnchorOnly>;
  ANCHOR_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSmem)));
  const dim3 grid = CausalTileScheduler::grid(int(p.geo.num_q_blocks(p.seqlen)), p.q_heads, p.batch);
  kernel<<<grid, Traits::kThreads, kSmem, stream>>>(p);
  ANCHOR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace anchor::cuda::attention

namespace anchor::cuda {

template <bool kIsBf16, int kHeadDim>
void run_attention_(const AttentionParams& p, cudaStream_t stream) {
  if (p.anchor_only) {
    attention::launch_gather_attention<kIsBf16, kHeadDim, true>(p, stream);
  } else {
    attention::launch_gather_attention<kIsBf16, kHeadDim, false>(p, stream);
  }
}

}  // namespace anchor::cuda
