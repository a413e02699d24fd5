// The gather-attention kernel: one CTA per (query block, q head, batch),
// warp-specialised (FlashAttention-3's layout of roles, with cp.async row
// gathers instead of TMA, since the keys are not contiguous):
//
//   tile scheduler : CausalTileScheduler (longest key lists first)
//   producer       : warpgroup 0. Warp 0 builds each tile's key list
//                    (KeyListProducer); all 4 warps gather the K/V rows of the
//                    tile with cp.async into a kStages-deep ring of swizzled
//                    smem stages, signalled through mbarriers (full/empty).
//   mainloop       : warpgroups 1 and 2, 64 query rows each: S = Q K^T and
//                    O += P V on wgmma, online softmax in registers.
//   epilogue       : O / rowsum -> out (input dtype), lse; or the row max (stage 1)
//
// AttentionPass (params.h) picks the walk: kAnchor is stage 1 (always-computed
// keys, row maxima only, no V); kAll is stage 3. prefill runs kAlwaysPartial
// (always-computed keys with the full softmax, writing the anchors on the way)
// and, after identification, kStripesMerge, which starts from that partial
// softmax state (the partial output counts as one key of score partial_lse and
// value O_partial) and adds the stripes: the always-computed region, the larger
// part of the work at moderate N, is then walked once instead of twice.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "../params.h"
#include "../utils.cuh"
#include "key_list.cuh"
#include "kernel_traits.h"
#include "mainloop.cuh"
#include "softmax.cuh"
#include "tile_scheduler.h"

namespace anchor::cuda::attention {

using Barrier = cutlass::arch::ClusterBarrier;

__device__ __forceinline__ void producer_barrier_sync(int threads) {
  asm volatile("bar.sync 1, %0;\n" ::"r"(threads));  // id 1: the producer warpgroup only
}

template <class Traits, AttentionPass kPass>
__global__ void __launch_bounds__(Traits::kThreads, 1) gather_attention_kernel(const AttentionParams p) {
  constexpr bool kAnchorOnly = kPass == AttentionPass::kAnchor;  // row maxima, no V
  constexpr KeyListMode kKeys = kPass == AttentionPass::kAll            ? KeyListMode::kAll
                                : kPass == AttentionPass::kStripesMerge ? KeyListMode::kStripesOnly
                                                                        : KeyListMode::kAlwaysComputed;
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages;
  constexpr int kProducerThreads = Traits::kProducerThreads;
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ __align__(1024) char smem_raw[];
  auto& storage = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);
  auto* full = reinterpret_cast<Barrier*>(storage.full_barrier);
  auto* empty = reinterpret_cast<Barrier*>(storage.empty_barrier);

  const auto tile = CausalTileScheduler::get_tile();
  const Geometry& geo = p.geo;
  const int64_t r0 = int64_t(tile.q_block) * kBlockM;
  const int64_t r1 = min(int64_t(p.seqlen), r0 + kBlockM);

  Tensor sQ = make_tensor(make_smem_ptr(storage.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(storage.k.data()), typename Traits::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(storage.v.data()), typename Traits::SmemLayoutVt{});

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      full[s].init(kProducerThreads + 1);  // one cp.async arrival per producer thread + the key list
      empty[s].init(Traits::kConsumerThreads);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (threadIdx.x < kProducerThreads) {
    // ================================ producer ================================
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    const int thread = threadIdx.x;
    const int kv_head = tile.head / p.q_heads_per_kv();
    const auto* q = static_cast<const Element*>(p.q) + tile.batch * p.q_batch_stride + tile.head * p.q_head_stride;
    const auto* k = static_cast<const Element*>(p.k) + tile.batch * p.k_batch_stride + kv_head * p.k_head_stride;
    const auto* v = static_cast<const Element*>(p.v) + tile.batch * p.v_batch_stride + kv_head * p.v_head_stride;
    const int64_t group = r0 / geo.group_rows();
    const uint32_t* group_words =
        kKeys == KeyListMode::kAlwaysComputed
            ? nullptr
            : p.selection + ((int64_t(tile.batch) * p.q_heads + tile.head) * p.num_groups + group) * p.num_words;
    KeyListProducer<kBlockN> key_list(geo, r0, r1, group_words, kKeys);

    // Q rows past the sequence end are zero-filled and never stored; Q lands with stage 0.
    gather_rows<kProducerThreads, kBlockM, kHeadDim>(
        thread, q, p.q_row_stride, [&](int slot) { return r0 + slot < r1 ? r0 + slot : int64_t(-1); },
        [&](int slot, int col) { return &sQ(slot, col); });
    for (int t = 0;; ++t) {
      const int stage = t % kStages;
      // Build the key list first (its bitmask loads overlap the wait for a free
      // stage), then publish it into the stage once the consumers released it.
      int count = 0;
      if (thread < 32) count = key_list.next_tile(storage.staged_slots);
      if (t >= kStages) empty[stage].wait(((t / kStages) + 1) & 1);  // consumers freed tile t - kStages
      int* slots = storage.key_slots[stage];
      if (thread < 32) {
        for (int i = thread; i < kBlockN; i += 32) slots[i] = storage.staged_slots[i];
        __syncwarp();
        if (thread == 0) {
          storage.tile_count[stage] = count;
          storage.tile_causal[stage] = count > 0 && slots[count - 1] > r0;  // keys are ascending
        }
      }
      producer_barrier_sync(kProducerThreads);
      const bool valid = storage.tile_count[stage] > 0;
      if (valid) {
        auto row_of = [&](int slot) { return int64_t(slots[slot]); };
        gather_rows<kProducerThreads, kBlockN, kHeadDim>(
            thread, k, p.k_row_stride, row_of, [&](int slot, int col) { return &sK(slot, col, stage); });
        if constexpr (!kAnchorOnly) {
          gather_rows<kProducerThreads, kBlockN, kHeadDim>(
              thread, v, p.v_row_stride, row_of, [&](int slot, int col) { return &sVt(col, slot, stage); });
        }
      }
      cutlass::arch::cpasync_barrier_arrive_noinc(&storage.full_barrier[stage]);  // when this thread's copies land
      if (thread == 0) full[stage].arrive();  // releases the key list written above
      if (!valid) break;
    }
    return;
  }

  // ================================ consumers ================================
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();
  const int thread = threadIdx.x - kProducerThreads;
  typename Traits::TiledMmaQK mma_qk;
  typename Traits::TiledMmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(thread);
  auto thr_pv = mma_pv.get_thread_slice(thread);
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
  // Stage 1 keeps natural-log row maxima; the other passes work in log2 units.
  OnlineSoftmax softmax{kAnchorOnly ? geo.sm_scale : geo.sm_scale * kLog2e};
  const int64_t row_base = (int64_t(tile.batch) * p.q_heads + tile.head) * p.seqlen;
  const bool quad_leader = thread % 4 == 0;
  auto* out = static_cast<Element*>(p.out) + row_base * kHeadDim;
  if constexpr (kPass == AttentionPass::kStripesMerge) {
    // Resume from the always-computed keys' softmax: their normalised output O_p
    // and log-sum-exp L_p act as one key of score L_p and value O_p (weight 2^L_p),
    // so the online updates below merge the stripes in exactly.
    CUTE_UNROLL
    for (int i = 0; i < size(tOrO); ++i) {
      const int64_t row = r0 + get<0>(tOcO(i));
      tOrO(i) = row < r1 ? float(out[row * kHeadDim + get<1>(tOcO(i))]) : 0.f;
    }
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      softmax.row_max[r] = my_row[r] < r1 ? p.partial_lse[row_base + my_row[r]] : 0.f;
      softmax.row_sum[r] = quad_leader ? 1.f : 0.f;  // the quad's partial sums add up to 1
    }
  }

  // Mask empty slots (the tail of a tile closed early) and, on tiles that reach
  // the diagonal, keys after the row. Stripe tiles need no key lookup.
  auto mask = [&](int stage, int count) {
    const bool causal = storage.tile_causal[stage];
    const int* slots = storage.key_slots[stage];
    if (count < kBlockN || causal) {
      CUTE_UNROLL
      for (int i = 0; i < size(tSrS); ++i) {
        const int slot = get<1>(tScS(i));
        if (slot >= count || (causal && slots[slot] > my_row[row_slot(i)])) tSrS(i) = -INFINITY;
      }
    }
  };

  // One tile at a time: S = Q K^T (stage 1 stops at its row max), softmax,
  // O += P V, each GEMM waited for.
  Tensor tOrP = make_tensor_like<Element>(tSrS);
  Tensor tOrP_a = make_tensor(tOrP.data(), accumulator_as_operand_a(tSrS.layout()));
  int tiles = 0;
  for (;; ++tiles) {
    const int t = tiles, stage = t % kStages;
    full[stage].wait((t / kStages) & 1);
    const int count = storage.tile_count[stage];
    if (count == 0) break;
    cutlass::arch::fence_view_async_shared();  // cp.async writes -> wgmma (async proxy) reads
    warpgroup_gemm_issue<true>(mma_qk, tSrQ, tSrK(_, _, _, stage), tSrS);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tSrS);
    mask(stage, count);  // reads the stage's key list: before the stage is released
    if constexpr (kAnchorOnly) {
      empty[stage].arrive();
      softmax.update_max(tSrS);
    } else {
      float rescale[2];
      softmax.update(tSrS, rescale);
      CUTE_UNROLL
      for (int i = 0; i < size(tOrO); ++i) tOrO(i) *= rescale[row_slot(i)];
      CUTE_UNROLL
      for (int i = 0; i < size(tSrS); ++i) tOrP(i) = Element(tSrS(i));
      warpgroup_fence_operand(tOrP_a);
      warpgroup_gemm_issue<false>(mma_pv, tOrP_a, tOrVt(_, _, _, stage), tOrO);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrO);
      empty[stage].arrive();
    }
  }

  // ---- epilogue ----
  // No stripes: out already holds the final rows. (lse is not written on this early exit:
  // prefill passes none to this pass; a caller wanting it must store partial_lse / log2e.)
  if (kPass == AttentionPass::kStripesMerge && tiles == 0) return;
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
      if (!quad_leader || my_row[r] >= r1) continue;
      const float lse_log2 = softmax.row_max[r] + __log2f(sum);
      if constexpr (kPass == AttentionPass::kAlwaysPartial) {
        p.partial_lse[row_base + my_row[r]] = lse_log2;
        p.anchor[row_base + my_row[r]] = softmax.row_max[r] / kLog2e;  // natural-log row max
      } else if (p.lse != nullptr) {
        p.lse[row_base + my_row[r]] = lse_log2 / kLog2e;
      }
    }
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

template <bool kIsBf16, int kHeadDim, AttentionPass kPass>
void launch_gather_attention(const AttentionParams& p, cudaStream_t stream) {
  using Traits = KernelTraits<kIsBf16, kHeadDim>;
  constexpr size_t kSmem = sizeof(typename Traits::SharedStorage);
  auto kernel = gather_attention_kernel<Traits, kPass>;
  ANCHOR_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSmem)));
  const dim3 grid = CausalTileScheduler::grid(int(p.geo.num_q_blocks(p.seqlen)), p.q_heads, p.batch);
  kernel<<<grid, Traits::kThreads, kSmem, stream>>>(p);
  ANCHOR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace anchor::cuda::attention

namespace anchor::cuda {

template <bool kIsBf16, int kHeadDim>
void run_attention_(const AttentionParams& p, cudaStream_t stream) {
  using attention::launch_gather_attention;
  switch (p.pass) {
    case AttentionPass::kAnchor:
      return launch_gather_attention<kIsBf16, kHeadDim, AttentionPass::kAnchor>(p, stream);
    case AttentionPass::kAll:
      return launch_gather_attention<kIsBf16, kHeadDim, AttentionPass::kAll>(p, stream);
    case AttentionPass::kAlwaysPartial:
      return launch_gather_attention<kIsBf16, kHeadDim, AttentionPass::kAlwaysPartial>(p, stream);
    case AttentionPass::kStripesMerge:
      return launch_gather_attention<kIsBf16, kHeadDim, AttentionPass::kStripesMerge>(p, stream);
  }
}

}  // namespace anchor::cuda
