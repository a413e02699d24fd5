// CPU implementations of the three stages. Inputs arrive validated by
// csrc/ops.cpp; these functions only compute. fp32 arithmetic throughout,
// parallel over (batch, head, block) tasks with at::parallel_for, and memory
// O(block_size * chunk) per task: never an N x N buffer.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "../geometry.h"

namespace anchor::cpu {

// Stage 1: fp32 (B, Hq, N) row maxima over each row's always-computed keys.
at::Tensor anchor(const at::Tensor& q, const at::Tensor& k, const Geometry& geo);

// Stage 2: int32 (B, Hq, num_groups, ceil(N/32)) selection bitmask. Vote units of
// `vote_rows` rows (a divisor of block_size); `head_theta` (fp32 (B, Hq), contiguous, or
// undefined) replaces `theta` per head.
at::Tensor identify(const at::Tensor& q, const at::Tensor& k, const at::Tensor& anchor_scores,
                    double theta, const at::Tensor& head_theta, int vote_rows, const Geometry& geo);

// Stage 3: (out in q's dtype (B, Hq, N, D), lse fp32 (B, Hq, N)).
std::tuple<at::Tensor, at::Tensor> sparse_attention(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v,
                                                    const at::Tensor& selection,
                                                    const Geometry& geo);

}  // namespace anchor::cpu
