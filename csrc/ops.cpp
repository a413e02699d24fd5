// Op schema, argument checks and dispatch (the FlashAttention flash_api.cpp role).
//
// Every public op validates its arguments here, once, with messages that name
// the argument and give the expected and the actual value; the backends
// (csrc/cpu/, csrc/cuda/) receive validated tensors and a plain Geometry.
#include "ops.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <sstream>
#include <string>

#include "cpu/stages_cpu.h"
#include "geometry.h"
#ifdef ANCHOR_WITH_CUDA
#include "cuda/api.h"
#endif

namespace anchor {
namespace {

std::atomic<bool> g_check_finite{true};

std::string shape_of(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

bool is_cuda(const at::Tensor& t) { return t.device().is_cuda(); }

// q (B, Hq, N, D), k and v (B, Hkv, N, D): ranks, matching sizes, GQA ratio,
// dtype, device, unit stride on D, supported head dim.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor* v) {
  TORCH_CHECK_VALUE(q.dim() == 4, "q: expected a 4-D tensor (B, Hq, N, D), got shape ",
                    shape_of(q));
  TORCH_CHECK_VALUE(k.dim() == 4, "k: expected a 4-D tensor (B, Hkv, N, D), got shape ",
                    shape_of(k));
  TORCH_CHECK_VALUE(k.device() == q.device(), "k: expected device ", q.device(),
                    " (the device of q), got ", k.device());
  TORCH_CHECK_VALUE(k.scalar_type() == q.scalar_type(), "k: expected dtype ", q.scalar_type(),
                    " (the dtype of q), got ", k.scalar_type());
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3),
                    "k: expected shape (B, Hkv, N, D) with B, N, D of q ", shape_of(q),
                    ", got ", shape_of(k));
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
                    "k: the number of kv heads must divide the number of q heads (GQA), got "
                    "Hq=", q.size(1), " and Hkv=", k.size(1));
  if (v != nullptr) {
    TORCH_CHECK_VALUE(v->device() == q.device(), "v: expected device ", q.device(),
                      " (the device of q), got ", v->device());
    TORCH_CHECK_VALUE(v->scalar_type() == q.scalar_type(), "v: expected dtype ",
                      q.scalar_type(), " (the dtype of q), got ", v->scalar_type());
    TORCH_CHECK_VALUE(v->sizes() == k.sizes(), "v: expected the shape of k ", shape_of(k),
                      ", got ", shape_of(*v));
  }
  const auto dtype = q.scalar_type();
  const int64_t head_dim = q.size(3);
  if (is_cuda(q)) {
    TORCH_CHECK_VALUE(dtype == at::kHalf || dtype == at::kBFloat16,
                      "q: expected dtype float16 or bfloat16 on CUDA, got ", dtype);
    TORCH_CHECK_VALUE(head_dim == 64 || head_dim == 128,
                      "q: expected head dim D in {64, 128} on CUDA, got D=", head_dim);
  } else {
    TORCH_CHECK_VALUE(q.device().is_cpu(), "q: expected a CPU or CUDA tensor, got device ",
                      q.device());
    TORCH_CHECK_VALUE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
                      "q: expected dtype float32, float16 or bfloat16, got ", dtype);
    TORCH_CHECK_VALUE(head_dim >= 1 && head_dim <= 256,
                      "q: expected head dim D in [1, 256] on CPU, got D=", head_dim);
  }
  const at::Tensor* named[] = {&q, &k, v};
  const char* names[] = {"q", "k", "v"};
  for (int i = 0; i < 3; ++i) {
    if (named[i] == nullptr || named[i]->numel() == 0) continue;
    TORCH_CHECK_VALUE(named[i]->stride(3) == 1, names[i],
                      ": expected unit stride on the last (head) dimension, got strides ",
                      named[i]->strides());
  }
}

bool stream_is_capturing(const at::Tensor& t) {
#ifdef ANCHOR_WITH_CUDA
  return is_cuda(t) && cuda::stream_is_capturing(t);
#else
  (void)t;
  return false;
#endif
}

// NaN/Inf in q or k would make every comparison false and silently drop keys.
// Checked through the min and max only (NaN propagates through both): two
// reductions, no temporary the size of the input, one host read.
void check_finite(const at::Tensor& t, const char* name) {
  if (!g_check_finite.load(std::memory_order_relaxed) || t.numel() == 0) return;
  if (stream_is_capturing(t)) return;  // a host read is illegal during graph capture
  const auto [lowest, highest] = at::aminmax(t);
  const at::Tensor ends = at::stack({lowest, highest}).to(at::kFloat).cpu();
  const float* end = ends.data_ptr<float>();
  TORCH_CHECK_VALUE(std::isfinite(end[0]) && std::isfinite(end[1]), name,
                    ": expected finite values, found NaN or Inf");
}

Geometry make_geometry(const at::Tensor& q, int64_t block_size, int64_t step,
                       int64_t init_blocks, int64_t local_blocks, std::optional<double> sm_scale) {
  TORCH_CHECK_VALUE(block_size > 0 && block_size <= (1 << 20),
                    "block_size: expected a positive integer, got ", block_size);
  TORCH_CHECK_VALUE(step > 0 && step <= (1 << 20), "step: expected a positive integer, got ",
                    step);
  TORCH_CHECK_VALUE(init_blocks >= 0 && init_blocks <= (1 << 20),
                    "init_blocks: expected a non-negative integer, got ", init_blocks);
  TORCH_CHECK_VALUE(local_blocks >= 0 && local_blocks <= (1 << 20),
                    "local_blocks: expected a non-negative integer, got ", local_blocks);
  if (is_cuda(q)) {
    TORCH_CHECK_VALUE(block_size == 128, "block_size: the CUDA kernels support 128, got ",
                      block_size);
  }
  Geometry geo;
  geo.block_size = static_cast<int>(block_size);
  geo.step = static_cast<int>(step);
  geo.init_blocks = static_cast<int>(init_blocks);
  geo.local_blocks = static_cast<int>(local_blocks);
  const double scale = sm_scale.has_value() ? *sm_scale : 1.0 / std::sqrt(double(q.size(3)));
  // The kernels use it as a float: check what they will see (1e40 or 1e-50 would not survive).
  geo.sm_scale = static_cast<float>(scale);
  TORCH_CHECK_VALUE(std::isfinite(scale) && std::isfinite(geo.sm_scale) && geo.sm_scale > 0,
                    "sm_scale: expected a finite positive number representable as float32, got ",
                    scale);
  return geo;
}

void check_theta(double theta) {
  TORCH_CHECK_VALUE(!std::isnan(theta), "theta: expected a number (inf keeps every key), got NaN");
}

void check_anchor_scores(const at::Tensor& q, const at::Tensor& anchor_scores) {
  TORCH_CHECK_VALUE(anchor_scores.device() == q.device(), "anchor: expected device ", q.device(),
                    " (the device of q), got ", anchor_scores.device());
  TORCH_CHECK_VALUE(anchor_scores.scalar_type() == at::kFloat,
                    "anchor: expected dtype float32, got ", anchor_scores.scalar_type());
  TORCH_CHECK_VALUE(anchor_scores.dim() == 3 && anchor_scores.size(0) == q.size(0) &&
                        anchor_scores.size(1) == q.size(1) && anchor_scores.size(2) == q.size(2),
                    "anchor: expected shape (B, Hq, N) = [", q.size(0), ", ", q.size(1), ", ",
                    q.size(2), "], got ", shape_of(anchor_scores));
}

void check_selection(const at::Tensor& q, const at::Tensor& selection, const Geometry& geo) {
  const int64_t n = q.size(2);
  const int64_t groups = geo.num_groups(n), words = selection_words(n);
  TORCH_CHECK_VALUE(selection.device() == q.device(), "selection: expected device ", q.device(),
                    " (the device of q), got ", selection.device());
  TORCH_CHECK_VALUE(selection.scalar_type() == at::kInt, "selection: expected dtype int32, got ",
                    selection.scalar_type());
  TORCH_CHECK_VALUE(selection.dim() == 4 && selection.size(0) == q.size(0) &&
                        selection.size(1) == q.size(1) && selection.size(2) == groups &&
                        selection.size(3) == words,
                    "selection: expected shape (B, Hq, num_groups, ceil(N/32)) = [", q.size(0),
                    ", ", q.size(1), ", ", groups, ", ", words, "], got ", shape_of(selection));
}

[[noreturn]] void no_cuda_kernels(const char* op) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "anchor::", op,
                              ": this anchor_ext build has no CUDA kernels (it was built "
                              "without nvcc); reinstall on a machine with the CUDA toolkit");
}

}  // namespace

void set_check_finite(bool enabled) { g_check_finite.store(enabled); }
bool check_finite_enabled() { return g_check_finite.load(); }

bool built_with_cuda() {
#ifdef ANCHOR_WITH_CUDA
  return true;
#else
  return false;
#endif
}

at::Tensor anchor_op(const at::Tensor& q, const at::Tensor& k, int64_t block_size, int64_t step,
                     int64_t init_blocks, int64_t local_blocks, std::optional<double> sm_scale) {
  check_qkv(q, k, nullptr);
  const Geometry geo = make_geometry(q, block_size, step, init_blocks, local_blocks, sm_scale);
  check_finite(q, "q");
  check_finite(k, "k");
  if (is_cuda(q)) {
#ifdef ANCHOR_WITH_CUDA
    return cuda::anchor(q, k, geo);
#else
    no_cuda_kernels("anchor");
#endif
  }
  return cpu::anchor(q, k, geo);
}

at::Tensor identify_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& anchor_scores,
                       double theta, int64_t block_size, int64_t step, int64_t init_blocks,
                       int64_t local_blocks, std::optional<double> sm_scale) {
  check_qkv(q, k, nullptr);
  check_theta(theta);
  const Geometry geo = make_geometry(q, block_size, step, init_blocks, local_blocks, sm_scale);
  check_anchor_scores(q, anchor_scores);
  check_finite(q, "q");
  check_finite(k, "k");
  if (is_cuda(q)) {
#ifdef ANCHOR_WITH_CUDA
    return cuda::identify(q, k, anchor_scores, theta, geo);
#else
    no_cuda_kernels("identify");
#endif
  }
  return cpu::identify(q, k, anchor_scores, theta, geo);
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_op(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& selection,
    int64_t block_size, int64_t step, int64_t init_blocks, int64_t local_blocks,
    std::optional<double> sm_scale) {
  check_qkv(q, k, &v);
  const Geometry geo = make_geometry(q, block_size, step, init_blocks, local_blocks, sm_scale);
  check_selection(q, selection, geo);
  if (is_cuda(q)) {
#ifdef ANCHOR_WITH_CUDA
    return cuda::sparse_attention(q, k, v, selection, geo);
#else
    no_cuda_kernels("sparse_attention");
#endif
  }
  return cpu::sparse_attention(q, k, v, selection, geo);
}

void check_prefill_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        double theta, int64_t block_size, int64_t step, int64_t init_blocks,
                        int64_t local_blocks, std::optional<double> sm_scale, bool scan_finite) {
  check_qkv(q, k, &v);
  check_theta(theta);
  make_geometry(q, block_size, step, init_blocks, local_blocks, sm_scale);
  if (!scan_finite) return;
  check_finite(q, "q");
  check_finite(k, "k");
}

at::Tensor prefill_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double theta,
                      int64_t block_size, int64_t step, int64_t init_blocks, int64_t local_blocks,
                      std::optional<double> sm_scale) {
  check_prefill_args(q, k, v, theta, block_size, step, init_blocks, local_blocks, sm_scale,
                     /*scan_finite=*/true);
  const Geometry geo = make_geometry(q, block_size, step, init_blocks, local_blocks, sm_scale);
  if (is_cuda(q)) {
#ifdef ANCHOR_WITH_CUDA
    return cuda::prefill(q, k, v, theta, geo);
#else
    no_cuda_kernels("prefill");
#endif
  }
  const at::Tensor anchor_scores = cpu::anchor(q, k, geo);
  const at::Tensor selection = cpu::identify(q, k, anchor_scores, theta, geo);
  return std::get<0>(cpu::sparse_attention(q, k, v, selection, geo));
}

}  // namespace anchor

TORCH_LIBRARY(anchor, m) {
  m.def(
      "anchor(Tensor q, Tensor k, *, int block_size=128, int step=16, int init_blocks=1, "
      "int local_blocks=1, float? sm_scale=None) -> Tensor");
  m.def(
      "identify(Tensor q, Tensor k, Tensor anchor, *, float theta=12.0, int block_size=128, "
      "int step=16, int init_blocks=1, int local_blocks=1, float? sm_scale=None) -> Tensor");
  m.def(
      "sparse_attention(Tensor q, Tensor k, Tensor v, Tensor selection, *, int block_size=128, "
      "int step=16, int init_blocks=1, int local_blocks=1, float? sm_scale=None) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "prefill(Tensor q, Tensor k, Tensor v, *, float theta=12.0, int block_size=128, "
      "int step=16, int init_blocks=1, int local_blocks=1, float? sm_scale=None) -> Tensor");
}

// One implementation per op serves both backends: it validates, then branches on
// the device. Registering it for CPU and CUDA keeps the checks in one place.
#define ANCHOR_REGISTER_BACKEND(KEY)                           \
  TORCH_LIBRARY_IMPL(anchor, KEY, m) {                         \
    m.impl("anchor", &anchor::anchor_op);                      \
    m.impl("identify", &anchor::identify_op);                  \
    m.impl("sparse_attention", &anchor::sparse_attention_op);  \
    m.impl("prefill", &anchor::prefill_op);                    \
  }

ANCHOR_REGISTER_BACKEND(CPU)
ANCHOR_REGISTER_BACKEND(CUDA)
