// Online softmax over the wgmma accumulator fragments, in registers.
//
// A thread of a 64-row warpgroup MMA holds, for each group of 8 columns, 2
// columns of 2 rows (r and r + 8 of its warp's 16 rows); the 4 lanes of a quad
// share those rows. Fragment element i belongs to row slot (i / 2) % 2.
// Scores arrive unscaled; `scale` (sm_scale * log2(e)) is folded into the
// exponent, exp2(s * scale - max), one FFMA and one MUFU op per element.
#pragma once

#include <cute/tensor.hpp>

#include <cmath>

namespace anchor::cuda::attention {

__device__ __forceinline__ int row_slot(int fragment_index) { return (fragment_index / 2) % 2; }

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(~0u, x, 1));
  return fmaxf(x, __shfl_xor_sync(~0u, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(~0u, x, 1);
  return x + __shfl_xor_sync(~0u, x, 2);
}

struct OnlineSoftmax {
  float scale;                                // multiplies raw scores (> 0, so it commutes with max)
  float row_max[2] = {-INFINITY, -INFINITY};  // running max of scaled scores, quad-uniform
  float row_sum[2] = {0.f, 0.f};              // this thread's partial sum; quad-reduced at the end

  // Turns scores into probabilities relative to the new running max and returns,
  // per row slot, the factor that rescales what was accumulated before.
  template <class Fragment>
  __device__ void update(Fragment& scores, float (&rescale)[2]) {
    float tile_max[2] = {-INFINITY, -INFINITY};
    CUTE_UNROLL
    for (int i = 0; i < cute::size(scores); ++i) tile_max[row_slot(i)] = fmaxf(tile_max[row_slot(i)], scores(i));
    float shift[2];
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      const float new_max = fmaxf(row_max[r], quad_max(tile_max[r]) * scale);
      shift[r] = new_max == -INFINITY ? 0.f : new_max;  // a row with no key yet: avoid inf - inf
      rescale[r] = exp2f(row_max[r] - shift[r]);
      row_max[r] = new_max;
      row_sum[r] *= rescale[r];
    }
    CUTE_UNROLL
    for (int i = 0; i < cute::size(scores); ++i) {
      const float p = exp2f(fmaf(scores(i), scale, -shift[row_slot(i)]));
      scores(i) = p;
      row_sum[row_slot(i)] += p;
    }
  }

  // Row max only (stage 1): no probabilities.
  template <class Fragment>
  __device__ void update_max(const Fragment& scores) {
    float tile_max[2] = {-INFINITY, -INFINITY};
    CUTE_UNROLL
    for (int i = 0; i < cute::size(scores); ++i) tile_max[row_slot(i)] = fmaxf(tile_max[row_slot(i)], scores(i));
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) row_max[r] = fmaxf(row_max[r], quad_max(tile_max[r]) * scale);
  }
};

}  // namespace anchor::cuda::attention
