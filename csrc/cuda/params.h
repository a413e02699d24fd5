// Plain parameter structs of the CUDA kernels (the FlashAttention flash.h role):
// filled by csrc/cuda/api.cpp from validated tensors, read by the kernels. No
// torch types here, so the .cu files compile without torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../geometry.h"

namespace anchor::cuda {

// q (B, Hq, N, D), k and v (B, Hkv, N, D), element strides (unit stride on D).
struct QKVParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_batch_stride = 0, q_head_stride = 0, q_row_stride = 0;
  int64_t k_batch_stride = 0, k_head_stride = 0, k_row_stride = 0;
  int64_t v_batch_stride = 0, v_head_stride = 0, v_row_stride = 0;
  int batch = 0, q_heads = 0, kv_heads = 0, seqlen = 0, head_dim = 0;
  bool is_bf16 = true;  // else fp16
  Geometry geo;

  ANCHOR_HD int q_heads_per_kv() const { return q_heads / kv_heads; }
};

// What one launch of the gather-attention kernel walks and produces. Stages 1
// and 3 share the kernel: each pass walks a query block's key list.
enum class AttentionPass : int {
  kAnchor = 0,         // stage 1 op: always-computed keys, row maxima only (no V)
  kAll = 1,            // stage 3 op: always-computed keys + stripes -> out, lse
  // prefill's fused pair, so the always-computed region is walked once, not twice:
  kAlwaysPartial = 2,  // always-computed keys, full softmax -> anchor, partial out, partial_lse
  kStripesMerge = 3,   // stripes only, starting from the partial state -> out
};

struct AttentionParams : QKVParams {
  AttentionPass pass = AttentionPass::kAll;
  // Selection bitmask (B, Hq, num_groups, num_words), contiguous; read by kAll, kStripesMerge.
  const uint32_t* selection = nullptr;
  int64_t num_groups = 0, num_words = 0;
  // out (B, Hq, N, D) contiguous in the input dtype: written by kAll and kAlwaysPartial
  // (normalised over the always-computed keys), read then rewritten by kStripesMerge.
  void* out = nullptr;
  float* lse = nullptr;          // (B, Hq, N) natural log, optional (kAll only)
  float* anchor = nullptr;       // (B, Hq, N) fp32 natural-log row maxima (kAnchor, kAlwaysPartial)
  float* partial_lse = nullptr;  // (B, Hq, N) log2 units: log-sum-exp of the always-computed keys
};

// Stage 2: per (batch, group, q heads of one kv head), stripe votes written as the bitmask.
// A group's rows are cut into vote units of vote_rows rows; each unit's mean query and
// mean anchor vote (anchor_mean - score < theta), the group keeps the union.
struct IdentifyParams : QKVParams {
  const float* anchor = nullptr;  // (B, Hq, N) contiguous
  uint32_t* selection = nullptr;  // (B, Hq, num_groups, num_words) contiguous; every word written
  int64_t num_groups = 0, num_words = 0;
  float theta = 12.f;
  const float* head_theta = nullptr;  // (B, Hq) contiguous: replaces theta per head when set
  int vote_rows = 128;                // rows per vote unit (divides block_size)
  int heads_per_cta = 1;  // q heads of one kv head handled together (each K tile read once for all)
};

void run_identify(const IdentifyParams& params, cudaStream_t stream);

// ---- SparseSkeleton (SPEC §3, anchor_ext/skeleton.py) ---------------------------

// Keys per chunk of the Gram prefix: the row statistics add a row's in-chunk keys
// exactly and everything before its chunk through sum_j k_j and sum_j k_j k_j^T.
constexpr int kSkeletonChunkRows = 128;

// Row statistics of the q heads of one kv head (one batch entry): for every row i,
// the mean and variance of the interior scores x_ij = sm_scale q_i.k_j,
// S <= j <= i - T, and the log-sum-exp of the exact Λ-shape scores (sink keys
// j < S and band keys i - T < j <= i, each once).
struct SkeletonStatsParams {
  const void* q = nullptr;  // q[b, first q head]: (heads, N, D) with the strides below
  const void* k = nullptr;  // k[b, kv head]: (N, D)
  int64_t q_head_stride = 0, q_row_stride = 0, k_row_stride = 0;
  const float* key_prefix = nullptr;   // (chunks, D): sum of the keys before chunk c
  const float* gram_prefix = nullptr;  // (chunks, D, D): sum of k_j k_j^T before chunk c
  float* mu = nullptr;                 // (heads, N) each, row stride 1, head stride out_head_stride
  float* var = nullptr;
  float* lambda_lse = nullptr;
  int64_t out_head_stride = 0;
  int heads = 0, seqlen = 0, head_dim = 0, sink_tokens = 0, local_tokens = 0;
  float sm_scale = 0.f;
  bool is_bf16 = true;
};

void run_skeleton_stats(const SkeletonStatsParams& params, cudaStream_t stream);

// The selection of SparseSkeleton from its components, for `heads` independent
// heads (flattened batch x q heads). Key j of group g is selected when it lies in
// the group's middle region and its score reaches tau[head]:
//  * per key (mask_block == 0): vertical[j] + slash[G0 - j] + horizontal[g], where
//    slash holds the window maxima max s[o .. o + group_rows) and horizontal the
//    group's largest h;
//  * per block (mask_block > 0): vertical[J] + max_I (slash[I - J] + horizontal[I])
//    over the group's query mask-blocks I, with J = j / mask_block and the block
//    maxima of v, s (pooled by distance) and h.
// With pair_count set, nothing is written: each head's count of selected pairs
// (selected keys times the group's rows) is added to pair_count[head].
struct SkeletonSelectParams {
  const float* vertical = nullptr;    // (heads, N) or (heads, mask blocks)
  const float* slash = nullptr;       // (heads, N) or (heads, mask blocks)
  const float* horizontal = nullptr;  // (heads, groups) or (heads, mask blocks)
  const float* tau = nullptr;         // (heads)
  uint32_t* selection = nullptr;      // (heads, groups, words): every word written
  unsigned long long* pair_count = nullptr;  // (heads)
  int64_t num_groups = 0, num_words = 0, component_stride = 0, horizontal_stride = 0;
  int heads = 0, seqlen = 0, mask_block = 0;
  Geometry geo;
};

void run_skeleton_select(const SkeletonSelectParams& params, cudaStream_t stream);

// Instantiated once per (dtype, head dim) in attention_{bf16,fp16}_hdim{64,128}.cu.
template <bool kIsBf16, int kHeadDim>
void run_attention_(const AttentionParams& params, cudaStream_t stream);

}  // namespace anchor::cuda
