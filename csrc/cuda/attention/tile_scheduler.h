// Which (query block, q head, batch) a CTA owns. Causal sparse rows are uneven:
// later query blocks have longer key lists, so they are launched first and the
// short ones fill the tail of the grid.
#pragma once

#include <cstdint>

namespace anchor::cuda::attention {

struct CausalTileScheduler {
  struct Tile {
    int q_block, head, batch;
  };

  static dim3 grid(int num_q_blocks, int q_heads, int batch) {
    return dim3(unsigned(num_q_blocks), unsigned(q_heads), unsigned(batch));
  }

  __device__ static Tile get_tile() {
    return {int(gridDim.x) - 1 - int(blockIdx.x), int(blockIdx.y), int(blockIdx.z)};
  }
};

}  // namespace anchor::cuda::attention
