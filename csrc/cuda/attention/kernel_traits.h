// Compile-time shape of the gather-attention kernel (stages 1 and 3): tile
// sizes, the Hopper warpgroup MMAs and the shared-memory layouts they read.
#pragma once

#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

namespace anchor::cuda::attention {

using namespace cute;

template <bool kIsBf16, int kHeadDim_, int kBlockN_ = 128, int kStages_ = 3>
struct KernelTraits {
  using Element = std::conditional_t<kIsBf16, cutlass::bfloat16_t, cutlass::half_t>;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;      // query rows per CTA: one query block
  static constexpr int kBlockN = kBlockN_;  // key slots per gathered tile
  static constexpr int kStages = kStages_;  // K/V tiles in flight between producer and consumers
  // Warp specialisation: warpgroup 0 builds key lists and gathers K/V rows with
  // cp.async; warpgroups 1 and 2 each own 64 query rows and run the MMAs and softmax.
  static constexpr int kWarpGroups = 2;  // consumer warpgroups
  static constexpr int kProducerThreads = 128;
  static constexpr int kConsumerThreads = kWarpGroups * 128;
  static constexpr int kThreads = kProducerThreads + kConsumerThreads;
  // setmaxnreg budgets: 128 * 72 + 256 * 216 <= 65536 registers per SM.
  static constexpr int kProducerRegisters = 72;
  static constexpr int kConsumerRegisters = 216;
  static_assert(kHeadDim == 64 || kHeadDim == 128);

  // S = Q K^T: A = Q (smem, K-major), B = K tile (smem, K-major).
  using AtomLayoutMNK = Layout<Shape<Int<kWarpGroups>, _1, _1>>;
  using TiledMmaQK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockN>, Int<kHeadDim>>>(),
      AtomLayoutMNK{}));
  // O += P V: A = P (registers, reused from the S accumulators), B = V^T (smem,
  // MN-major: V rows are stored as loaded, head dim contiguous).
  using TiledMmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, Int<kBlockN>>,
                           GMMA::Major::K, GMMA::Major::MN>(),
      AtomLayoutMNK{}));

  // 128-byte swizzled layouts: bank-conflict free for 16-byte row writes and for wgmma.
  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutVt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                                              Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{}));

  struct SharedStorage {
    cute::array_aligned<Element, cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<Element, cosize_v<SmemLayoutK>, 1024> k;
    cute::array_aligned<Element, cosize_v<SmemLayoutVt>, 1024> v;
    int key_slots[kStages][kBlockN];  // key position of each slot of a tile; -1 = empty
    int staged_slots[kBlockN];        // the next key list, built while its stage is still in use
    int tile_count[kStages];          // keys in the tile (slots [count, kBlockN) are empty)
    int tile_causal[kStages];         // some key lies past the block's first row
    uint64_t full_barrier[kStages];   // producer -> consumers: the stage's rows have landed
    uint64_t empty_barrier[kStages];  // consumers -> producer: the stage may be refilled
  };
};

}  // namespace anchor::cuda::attention
