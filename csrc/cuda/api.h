// Host side of the CUDA backend: takes validated tensors from csrc/ops.cpp,
// allocates outputs, fills the plain params structs of csrc/cuda/params.h and
// launches the kernels on the current stream. No host synchronisation.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "../geometry.h"

namespace anchor::cuda {

at::Tensor anchor(const at::Tensor& q, const at::Tensor& k, const Geometry& geo);
at::Tensor identify(const at::Tensor& q, const at::Tensor& k, const at::Tensor& anchor_scores,
                    double theta, const at::Tensor& head_theta, int vote_rows, const Geometry& geo);
std::tuple<at::Tensor, at::Tensor> sparse_attention(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v,
                                                    const at::Tensor& selection,
                                                    const Geometry& geo);
at::Tensor prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double theta,
                   const Geometry& geo);

// SparseSkeleton (csrc/cuda/skeleton.cu): per-row interior mean / variance and Λ-shape
// log-sum-exp, (B, Hq, N) fp32 each; and the selection (or pair counts) from the
// fitted components (see SkeletonSelectParams).
std::tuple<at::Tensor, at::Tensor, at::Tensor> skeleton_row_stats(const at::Tensor& q,
                                                                  const at::Tensor& k,
                                                                  int64_t sink_tokens,
                                                                  int64_t local_tokens,
                                                                  const Geometry& geo);
at::Tensor skeleton_select(const at::Tensor& vertical, const at::Tensor& slash,
                           const at::Tensor& horizontal, const at::Tensor& tau, int64_t seqlen,
                           int64_t mask_block, bool count_pairs, const Geometry& geo);

// True while the current CUDA stream of t's device is being captured into a graph.
bool stream_is_capturing(const at::Tensor& t);

}  // namespace anchor::cuda
