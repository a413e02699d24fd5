// Host side of the CUDA backend (see api.h): validated tensors in, plain params
// structs filled, kernels launched on the current stream. No host syncs, and
// no allocation beyond each op's outputs (prefill adds the anchor, partial-lse
// and selection buffers: 4·B·Hq·N + 4·B·Hq·N + 4·B·Hq·groups·ceil(N/32) bytes;
// skeleton_row_stats adds the Gram prefix of one kv head at a time, see there).
#include "api.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <limits>

#include "../check.h"
#include "params.h"

namespace anchor::cuda {
namespace {

// The kernels copy rows with 16-byte cp.async: a row start must be 16-byte aligned,
// i.e. the data pointer and every stride but D's a multiple of 8 elements.
bool rows_are_16b_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  }
  return true;
}

// A fresh contiguous copy of an input whose rows are not 16-byte aligned (e.g.
// q[..., 1:65] or a row stride of 65): legal inputs, which the copies could not read
// directly. A clone, not .contiguous(): a tensor whose only non-unit dims are dense
// (e.g. (1, 1, 1, D) at an odd offset) counts as contiguous and would come back as it
// is, misaligned (the GPU fuzz found it: N=1, one kv head, data pointer off by one).
at::Tensor aligned_rows(const at::Tensor& t) {
  return rows_are_16b_aligned(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

// at::empty, with an out-of-memory error that says which buffer of ours did not fit and
// its size (torch's own message follows it).
at::Tensor allocate(const char* what, at::IntArrayRef sizes, const at::TensorOptions& options) {
  try {
    return at::empty(sizes, options);
  } catch (const c10::OutOfMemoryError& error) {
    int64_t bytes = int64_t(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
    for (const int64_t size : sizes) bytes *= size;
    throw c10::OutOfMemoryError(
        {__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
        detail::message("anchor_ext: out of GPU memory allocating ", what, " of shape ", sizes,
                        " (", detail::Fixed{double(bytes) / double(1 << 30)}, " GiB): ",
                        error.what_without_backtrace()));
  }
}

void check_device(const at::Tensor& q) {
  const auto* props = at::cuda::getDeviceProperties(q.device().index());
  ANCHOR_CHECK_VALUE(props->major == 9, "q: the anchor_ext CUDA kernels are built for Hopper (sm_90a), got ",
                     props->name, " (sm_", props->major, props->minor, ")");
}

QKVParams make_qkv_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor* v,
                          const Geometry& geo) {
  check_device(q);
  QKVParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  if (v != nullptr) {
    p.v = v->data_ptr();
    p.v_batch_stride = v->stride(0), p.v_head_stride = v->stride(1), p.v_row_stride = v->stride(2);
  }
  p.batch = int(q.size(0)), p.q_heads = int(q.size(1)), p.kv_heads = int(k.size(1));
  p.seqlen = int(q.size(2)), p.head_dim = int(q.size(3));
  p.is_bf16 = q.scalar_type() == at::kBFloat16;
  p.geo = geo;
  return p;
}

void run_attention(const AttentionParams& p, cudaStream_t stream) {
  if (p.is_bf16) {
    p.head_dim == 64 ? run_attention_<true, 64>(p, stream) : run_attention_<true, 128>(p, stream);
  } else {
    p.head_dim == 64 ? run_attention_<false, 64>(p, stream) : run_attention_<false, 128>(p, stream);
  }
}

// Exclusive prefix sum over dim 0 of a (rows, cols) float64 tensor, as contiguous fp32.
// The scan runs along a contiguous last dim: ATen scans dim 0 with one thread per
// column, sequentially over the rows (milliseconds for a few thousand rows).
at::Tensor exclusive_prefix(const at::Tensor& x) {
  const at::Tensor inclusive = x.t().contiguous().cumsum(1).t();
  return (inclusive - x).to(at::kFloat).contiguous();
}

}  // namespace

bool stream_is_capturing(const at::Tensor& t) {
  c10::cuda::CUDAGuard guard(t.device());
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

at::Tensor anchor(const at::Tensor& q_in, const at::Tensor& k_in, const Geometry& geo) {
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned_rows(q_in), k = aligned_rows(k_in);
  at::Tensor result = allocate("anchor", {q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (result.numel() == 0) return result;
  AttentionParams p;
  static_cast<QKVParams&>(p) = make_qkv_params(q, k, nullptr, geo);
  p.anchor = result.data_ptr<float>();
  p.pass = AttentionPass::kAnchor;
  run_attention(p, at::cuda::getCurrentCUDAStream());
  return result;
}

at::Tensor identify(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& anchor_scores,
                    double theta, const at::Tensor& head_theta, int vote_rows, const Geometry& geo) {
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned_rows(q_in), k = aligned_rows(k_in);
  const int64_t n = q.size(2);
  // Every word is written by the kernel (zeros outside the middle regions).
  at::Tensor selection = allocate("selection", {q.size(0), q.size(1), geo.num_groups(n), selection_words(n)},
                                  q.options().dtype(at::kInt));
  if (selection.numel() == 0) return selection;
  const at::Tensor anchors = anchor_scores.contiguous();
  IdentifyParams p;
  static_cast<QKVParams&>(p) = make_qkv_params(q, k, nullptr, geo);
  p.anchor = anchors.data_ptr<float>();
  p.selection = reinterpret_cast<uint32_t*>(selection.data_ptr<int32_t>());
  p.num_groups = selection.size(2), p.num_words = selection.size(3);
  p.theta = static_cast<float>(theta);
  const at::Tensor thetas = head_theta.defined() ? head_theta.contiguous() : at::Tensor();
  p.head_theta = thetas.defined() ? thetas.data_ptr<float>() : nullptr;
  p.vote_rows = vote_rows;
  run_identify(p, at::cuda::getCurrentCUDAStream());
  return selection;
}

std::tuple<at::Tensor, at::Tensor> sparse_attention(const at::Tensor& q_in, const at::Tensor& k_in,
                                                    const at::Tensor& v_in,
                                                    const at::Tensor& selection,
                                                    const Geometry& geo) {
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned_rows(q_in), k = aligned_rows(k_in), v = aligned_rows(v_in);
  at::Tensor out = allocate("out", q.sizes(), q.options());  // contiguous (B, Hq, N, D)
  at::Tensor lse = allocate("lse", {q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const at::Tensor words = selection.contiguous();
  AttentionParams p;
  static_cast<QKVParams&>(p) = make_qkv_params(q, k, &v, geo);
  p.selection = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  p.num_groups = words.size(2), p.num_words = words.size(3);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  run_attention(p, at::cuda::getCurrentCUDAStream());
  return {out, lse};
}

at::Tensor prefill(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                   double theta, const Geometry& geo) {
  c10::cuda::CUDAGuard guard(q_in.device());
  // Align once here, so the passes do not each copy a misaligned input.
  const at::Tensor q = aligned_rows(q_in), k = aligned_rows(k_in), v = aligned_rows(v_in);
  at::Tensor out = allocate("out", q.sizes(), q.options());  // contiguous (B, Hq, N, D)
  if (out.numel() == 0) return out;
  const auto row_options = q.options().dtype(at::kFloat);
  at::Tensor anchors = allocate("anchors", {q.size(0), q.size(1), q.size(2)}, row_options);
  at::Tensor partial_lse = allocate("partial_lse", {q.size(0), q.size(1), q.size(2)}, row_options);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // Pass 1 (stage 1 fused with stage 3's always-computed part): anchors, plus the
  // softmax over the always-computed keys, kept as out (normalised) and partial_lse.
  AttentionParams p;
  static_cast<QKVParams&>(p) = make_qkv_params(q, k, &v, geo);
  p.pass = AttentionPass::kAlwaysPartial;
  p.out = out.data_ptr();
  p.anchor = anchors.data_ptr<float>();
  p.partial_lse = partial_lse.data_ptr<float>();
  run_attention(p, stream);

  // Stage 2, then pass 2: the selected stripes, merged into out.
  const at::Tensor selection = identify(q, k, anchors, theta, at::Tensor(), geo.block_size, geo);
  p.pass = AttentionPass::kStripesMerge;
  p.selection = reinterpret_cast<const uint32_t*>(selection.data_ptr<int32_t>());
  p.num_groups = selection.size(2), p.num_words = selection.size(3);
  p.anchor = nullptr;
  run_attention(p, stream);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> skeleton_row_stats(const at::Tensor& q_in,
                                                                  const at::Tensor& k_in,
                                                                  int64_t sink_tokens,
                                                                  int64_t local_tokens,
                                                                  const Geometry& geo) {
  c10::cuda::CUDAGuard guard(q_in.device());
  check_device(q_in);
  ANCHOR_CHECK_VALUE(q_in.size(2) < std::numeric_limits<int32_t>::max() / 2,
                     "q: the CUDA kernels support N < 2^30 tokens, got N=", q_in.size(2));
  ANCHOR_CHECK_VALUE(q_in.size(1) <= 65535, "q: the CUDA kernels support Hq <= 65535, got Hq=",
                     q_in.size(1));
  const at::Tensor q = aligned_rows(q_in), k = aligned_rows(k_in);
  const int64_t batch = q.size(0), q_heads = q.size(1), kv_heads = k.size(1);
  const int64_t n = q.size(2), head_dim = q.size(3);
  const auto row_options = q.options().dtype(at::kFloat);
  at::Tensor mu = at::empty({batch, q_heads, n}, row_options);
  at::Tensor var = at::empty({batch, q_heads, n}, row_options);
  at::Tensor lambda_lse = at::empty({batch, q_heads, n}, row_options);
  if (mu.numel() == 0) return {mu, var, lambda_lse};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t chunks = (n + kSkeletonChunkRows - 1) / kSkeletonChunkRows;
  const int64_t group = q_heads / kv_heads;
  // One kv head at a time bounds the scratch: the keys and chunk Grams in float64 and
  // their prefix (chunks * D^2 values; the kernel reads it in fp32), about 0.5 GiB at
  // 128k tokens with D 128, growing linearly with N. Float64 GEMM and prefix sums: the
  // per-row variance is a difference of large sums.
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t g = 0; g < kv_heads; ++g) {
      const at::Tensor keys = at::constant_pad_nd(k[b][g].to(at::kDouble),
                                                  {0, 0, 0, chunks * kSkeletonChunkRows - n})
                                  .view({chunks, kSkeletonChunkRows, head_dim});
      const at::Tensor grams = at::bmm(keys.transpose(1, 2), keys);
      const at::Tensor sums = keys.sum(1);
      const at::Tensor gram_prefix = exclusive_prefix(grams.view({chunks, head_dim * head_dim}));
      const at::Tensor key_prefix = exclusive_prefix(sums);
      SkeletonStatsParams p;
      p.q = q[b][g * group].data_ptr();
      p.k = k[b][g].data_ptr();
      p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2), p.k_row_stride = k.stride(2);
      p.key_prefix = key_prefix.data_ptr<float>();
      p.gram_prefix = gram_prefix.data_ptr<float>();
      p.mu = mu[b][g * group].data_ptr<float>();
      p.var = var[b][g * group].data_ptr<float>();
      p.lambda_lse = lambda_lse[b][g * group].data_ptr<float>();
      p.out_head_stride = n;
      p.heads = int(group), p.seqlen = int(n), p.head_dim = int(head_dim);
      p.sink_tokens = int(sink_tokens), p.local_tokens = int(local_tokens);
      p.sm_scale = geo.sm_scale;
      p.is_bf16 = q.scalar_type() == at::kBFloat16;
      run_skeleton_stats(p, stream);
    }
  }
  return {mu, var, lambda_lse};
}

at::Tensor skeleton_select(const at::Tensor& vertical_in, const at::Tensor& slash_in,
                           const at::Tensor& horizontal_in, const at::Tensor& tau_in,
                           int64_t seqlen, int64_t mask_block, bool count_pairs,
                           const Geometry& geo) {
  c10::cuda::CUDAGuard guard(vertical_in.device());
  const at::Tensor vertical = vertical_in.contiguous(), slash = slash_in.contiguous();
  const at::Tensor horizontal = horizontal_in.contiguous(), tau = tau_in.contiguous();
  const int64_t heads = vertical.size(0);
  SkeletonSelectParams p;
  p.vertical = vertical.data_ptr<float>();
  p.slash = slash.data_ptr<float>();
  p.horizontal = horizontal.data_ptr<float>();
  p.tau = tau.data_ptr<float>();
  p.num_groups = geo.num_groups(seqlen), p.num_words = selection_words(seqlen);
  p.component_stride = vertical.size(1), p.horizontal_stride = horizontal.size(1);
  p.heads = int(heads), p.seqlen = int(seqlen), p.mask_block = int(mask_block);
  p.geo = geo;
  at::Tensor result;
  if (count_pairs) {
    result = at::zeros({heads}, vertical.options().dtype(at::kLong));
    p.pair_count = reinterpret_cast<unsigned long long*>(result.data_ptr<int64_t>());
  } else {
    result = at::empty({heads, p.num_groups, p.num_words}, vertical.options().dtype(at::kInt));
    p.selection = reinterpret_cast<uint32_t*>(result.data_ptr<int32_t>());
  }
  run_skeleton_select(p, at::cuda::getCurrentCUDAStream());
  return result;
}

}  // namespace anchor::cuda
