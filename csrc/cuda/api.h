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
                    double theta, const Geometry& geo);
std::tuple<at::Tensor, at::Tensor> sparse_attention(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v,
                                                    const at::Tensor& selection,
                                                    const Geometry& geo);
at::Tensor prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double theta,
                   const Geometry& geo);

// True while the current CUDA stream of t's device is being captured into a graph.
bool stream_is_capturing(const at::Tensor& t);

}  // namespace anchor::cuda
