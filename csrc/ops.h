// The op layer: argument checks and dispatch of anchor_ext's ops (SPEC §4).
// Python reaches these through torch.ops.anchor.*; the C++ test/bench
// executable calls them directly.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace anchor {

struct Options {
  double theta = 12.0;
  int64_t block_size = 128;
  int64_t step = 16;
  int64_t init_blocks = 1;
  int64_t local_blocks = 1;
  std::optional<double> sm_scale;  // default 1/sqrt(D)
};

at::Tensor anchor_op(const at::Tensor& q, const at::Tensor& k, int64_t block_size, int64_t step,
                     int64_t init_blocks, int64_t local_blocks, std::optional<double> sm_scale);

// head_theta (fp32 (B, Hq), optional) replaces theta per head; vote_rows 0 = block_size.
at::Tensor identify_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& anchor_scores,
                       const std::optional<at::Tensor>& head_theta, double theta,
                       int64_t block_size, int64_t step, int64_t init_blocks,
                       int64_t local_blocks, std::optional<double> sm_scale, int64_t vote_rows = 0);

std::tuple<at::Tensor, at::Tensor> sparse_attention_op(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& selection,
    int64_t block_size, int64_t step, int64_t init_blocks, int64_t local_blocks,
    std::optional<double> sm_scale);

at::Tensor prefill_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double theta,
                      int64_t block_size, int64_t step, int64_t init_blocks, int64_t local_blocks,
                      std::optional<double> sm_scale);

// SparseSkeleton on CUDA (csrc/cuda/skeleton.cu; anchor_ext/skeleton.py documents the
// method): row statistics of the interior scores, and the selection from the fitted
// components. Both raise NotImplementedError for CPU tensors (the PyTorch path covers
// the CPU).
std::tuple<at::Tensor, at::Tensor, at::Tensor> skeleton_row_stats_op(
    const at::Tensor& q, const at::Tensor& k, int64_t sink_tokens, int64_t local_tokens,
    std::optional<double> sm_scale);
at::Tensor skeleton_select_op(const at::Tensor& vertical, const at::Tensor& slash,
                              const at::Tensor& horizontal, const at::Tensor& tau, int64_t seqlen,
                              int64_t mask_block, bool count_pairs, int64_t block_size,
                              int64_t step, int64_t init_blocks, int64_t local_blocks);

// Every check prefill makes (shapes, dtypes, devices, geometry, theta and, with
// scan_finite, the NaN/Inf scan), without computing: the Python API runs it before
// choosing or taking the dense path, so both paths reject the same inputs with the
// same messages.
void check_prefill_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        double theta, int64_t block_size, int64_t step, int64_t init_blocks,
                        int64_t local_blocks, std::optional<double> sm_scale,
                        bool scan_finite = true);

inline at::Tensor prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const Options& o = {}) {
  return prefill_op(q, k, v, o.theta, o.block_size, o.step, o.init_blocks, o.local_blocks,
                    o.sm_scale);
}

// Whether inputs are scanned for NaN/Inf before running (default on). The scan
// is skipped on a CUDA stream that is being captured into a graph.
void set_check_finite(bool enabled);
bool check_finite_enabled();

// True when this build has the CUDA kernels.
bool built_with_cuda();

}  // namespace anchor
