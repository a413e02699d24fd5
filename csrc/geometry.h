// Block geometry of AnchorAttention (SPEC §2), shared by the CPU path and the
// CUDA kernels. Torch-free and usable from host and device code.
//
// For query row i in query block b = i / block_size of group g = b / step, whose
// first row is G0 = g * step * block_size:
//   always computed : sink keys [0, sink_end) and local keys [local_start(g), i]
//   middle region   : [sink_end, middle_end(g)), the only stripe candidates.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define ANCHOR_HD __host__ __device__ __forceinline__
#else
#define ANCHOR_HD inline
#endif

namespace anchor {

struct Geometry {
  int block_size = 128;   // rows per query block = keys per key block
  int step = 16;          // query blocks per group (one shared selection)
  int init_blocks = 1;    // sink blocks
  int local_blocks = 1;   // key blocks before the group that are always computed
  float sm_scale = 0.f;   // natural-log score scale (1/sqrt(D) when the caller gave none)

  ANCHOR_HD int64_t group_rows() const { return int64_t(step) * block_size; }
  ANCHOR_HD int64_t sink_end() const { return int64_t(init_blocks) * block_size; }
  ANCHOR_HD int64_t group_start(int64_t group) const { return group * group_rows(); }
  // First local key of `group`; may lie inside the sink, never below 0.
  ANCHOR_HD int64_t local_start(int64_t group) const {
    const int64_t s = group_start(group) - int64_t(local_blocks) * block_size;
    return s > 0 ? s : 0;
  }
  // End of the middle region; the region is empty when this is <= sink_end().
  ANCHOR_HD int64_t middle_end(int64_t group) const {
    return group_start(group) - int64_t(local_blocks) * block_size;
  }
  ANCHOR_HD int64_t num_q_blocks(int64_t n) const { return (n + block_size - 1) / block_size; }
  ANCHOR_HD int64_t num_groups(int64_t n) const { return (num_q_blocks(n) + step - 1) / step; }
};

// int32 words per group in the selection bitmask: bit (j % 32) of word j / 32 is key j.
ANCHOR_HD int64_t selection_words(int64_t n) { return (n + 31) / 32; }

}  // namespace anchor
