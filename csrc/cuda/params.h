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
struct IdentifyParams : QKVParams {
  const float* anchor = nullptr;  // (B, Hq, N) contiguous
  uint32_t* selection = nullptr;  // (B, Hq, num_groups, num_words) contiguous; every word written
  int64_t num_groups = 0, num_words = 0;
  float theta = 12.f;
  int heads_per_cta = 1;  // q heads of one kv head handled together (each K tile read once for all)
};

void run_identify(const IdentifyParams& params, cudaStream_t stream);

// Instantiated once per (dtype, head dim) in attention_{bf16,fp16}_hdim{64,128}.cu.
template <bool kIsBf16, int kHeadDim>
void run_attention_(const AttentionParams& params, cudaStream_t stream);

}  // namespace anchor::cuda
