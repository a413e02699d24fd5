// Mainloop parts of the gather-attention kernel: row gathers of Q/K/V into
// swizzled shared memory with cp.async, and the two warpgroup MMAs
// (S = Q K^T from shared memory; O += P V with P reused from registers).
#pragma once

#include <cute/tensor.hpp>

#include "../utils.cuh"
#include "kernel_traits.h"

namespace anchor::cuda::attention {

// Copies rows of a (rows, kHeadDim) global matrix into a shared tile, 16 bytes
// per cp.async. `row_of(slot)` gives the global row of a tile slot, or -1 for an
// empty slot (zero-filled). `smem_chunk(slot, col)` gives the shared address of
// the 8 elements starting at column `col` of that slot.
//
// Thread t always copies column chunk t % kChunksPerRow of slots
// t / kChunksPerRow + i * kSlotStep. With kSlotStep a multiple of the 8-row
// swizzle period, those chunks sit at a constant stride in the 128-byte
// swizzled layouts, so the swizzled address is computed twice per call instead
// of once per copy (the address math used to cost more than the copies).
template <int kThreads, int kRows, int kHeadDim, class Element, class RowOf, class SmemChunk>
__device__ __forceinline__ void gather_rows(int thread, const Element* base, int64_t row_stride,
                                            RowOf row_of, SmemChunk smem_chunk) {
  constexpr int kChunksPerRow = kHeadDim / 8;
  constexpr int kSlotStep = kThreads / kChunksPerRow;
  static_assert(kThreads % kChunksPerRow == 0 && kRows % kSlotStep == 0);
  static_assert(kSlotStep % 8 == 0, "the smem stride is constant only across whole swizzle periods");
  const int col = (thread % kChunksPerRow) * 8, first_slot = thread / kChunksPerRow;
  Element* smem = smem_chunk(first_slot, col);
  const ptrdiff_t smem_stride = smem_chunk(first_slot + kSlotStep, col) - smem;
  const Element* src_col = base + col;
#pragma unroll 4
  for (int i = 0; i < kRows / kSlotStep; ++i) {
    const int64_t row = row_of(first_slot + i * kSlotStep);
    cp_async_16(smem + i * smem_stride, row >= 0 ? src_col + row * row_stride : base, row >= 0 ? 16 : 0);
  }
}

// The accumulator fragment of a 64xN warpgroup MMA, ((2, 2, N/8), 1, 1), seen as
// the A-operand fragment of a following 64x?xK MMA with K = N:
// ((2, 2, 2), 1, N/16). Element order matches: A's k-block j is made of the
// accumulator's 8-column groups 2j and 2j+1.
template <class AccLayout>
__device__ __forceinline__ constexpr auto accumulator_as_operand_a(AccLayout acc) {
  using namespace cute;
  static_assert(size<1>(AccLayout{}) == 1 && size<2>(AccLayout{}) == 1);
  auto mode0 = get<0>(acc);                      // (2, 2, V) : (d0, d1, d2)
  constexpr int kGroups = size<2>(decltype(mode0){});
  static_assert(kGroups % 2 == 0);
  auto d2 = get<2>(stride(mode0));
  return make_layout(make_layout(make_shape(get<0>(shape(mode0)), get<1>(shape(mode0)), _2{}),
                                 make_stride(get<0>(stride(mode0)), get<1>(stride(mode0)), d2)),
                     get<1>(acc),
                     make_layout(Int<kGroups / 2>{}, d2 * _2{}));
}

// Issues one warpgroup GEMM batch (all k-blocks) and commits it; the caller
// waits with cute::warpgroup_wait<N>() and fences the accumulators after.
template <bool kZeroInit, class TiledMma, class FragA, class FragB, class FragC>
__device__ __forceinline__ void warpgroup_gemm_issue(TiledMma& tiled_mma, FragA const& a, FragB const& b,
                                                     FragC& c) {
  using namespace cute;
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int k_block = 0; k_block < size<2>(a); ++k_block) {
    cute::gemm(tiled_mma, a(_, _, k_block), b(_, _, k_block), c);
    tiled_mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
}

}  // namespace anchor::cuda::attention
