// Op schema, argument checks and dispatch (the FlashAttention flash_api.cpp role).
//
// Every public op validates its arguments here, once, with messages that name
// the argument and give the expected and the actual value (built by check.h,
// never through std::ostream); the backends
// (csrc/cpu/, csrc/cuda/) receive validated tensors and a plain Geometry.
#include "ops.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "check.h"
#include "cpu/stages_cpu.h"
#include "geometry.h"
#ifdef ANCHOR_WITH_CUDA
#include "cuda/api.h"
#endif

namespace anchor {
namespace {

std::atomic<bool> g_check_finite{true};

std::string shape_of(const at::Tensor& t) { return detail::message(t.sizes()); }

bool is_cuda(const at::Tensor& t) { return t.device().is_cuda(); }

// q (B, Hq, N, D), k and v (B, Hkv, N, D): ranks, matching sizes, GQA ratio,
// dtype, device, unit stride on D, supported head dim.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor* v) {
  ANCHOR_CHECK_VALUE(q.dim() == 4, "q: expected a 4-D tensor (B, Hq, N, D), got shape ",
                     shape_of(q));
  ANCHOR_CHECK_VALUE(k.dim() == 4, "k: expected a 4-D tensor (B, Hkv, N, D), got shape ",
                     shape_of(k));
  ANCHOR_CHECK_VALUE(k.device() == q.device(), "k: expected device ", q.device(),
                     " (the device of q), got ", k.device());
  ANCHOR_CHECK_VALUE(k.scalar_type() == q.scalar_type(), "k: expected dtype ", q.scalar_type(),
                     " (the dtype of q), got ", k.scalar_type());
  ANCHOR_CHECK_VALUE(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3),
                     "k: expected shape (B, Hkv, N, D) with B, N, D of q ", shape_of(q),
                     ", got ", shape_of(k));
  ANCHOR_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
                     "k: the number of kv heads must divide the number of q heads (GQA), got "
                     "Hq=", q.size(1), " and Hkv=", k.size(1));
  if (v != nullptr) {
    ANCHOR_CHECK_VALUE(v->device() == q.device(), "v: expected device ", q.device(),
                       " (the device of q), got ", v->device());
    ANCHOR_CHECK_VALUE(v->scalar_type() == q.scalar_type(), "v: expected dtype ",
                       q.scalar_type(), " (the dtype of q), got ", v->scalar_type());
    ANCHOR_CHECK_VALUE(v->sizes() == k.sizes(), "v: expected the shape of k ", shape_of(k),
                       ", got ", shape_of(*v));
  }
  const auto dtype = q.scalar_type();
  const int64_t head_dim = q.size(3);
  if (is_cuda(q)) {
    ANCHOR_CHECK_VALUE(dtype == at::kHalf || dtype == at::kBFloat16,
                       "q: expected dtype float16 or bfloat16 on CUDA, got ", dtype);
    ANCHOR_CHECK_VALUE(head_dim == 64 || head_dim == 128,
                       "q: expected head dim D in {64, 128} on CUDA, got D=", head_dim);
  } else {
    ANCHOR_CHECK_VALUE(q.device().is_cpu(), "q: expected a CPU or CUDA tensor, got device ",
                       q.device());
    ANCHOR_CHECK_VALUE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
                       "q: expected dtype float32, float16 or bfloat16, got ", dtype);
    ANCHOR_CHECK_VALUE(head_dim >= 1 && head_dim <= 256,
                       "q: expected head dim D in [1, 256] on CPU, got D=", head_dim);
  }
  const at::Tensor* named[] = {&q, &k, v};
  const char* names[] = {"q", "k", "v"};
  for (int i = 0; i < 3; ++i) {
    if (named[i] == nullptr || named[i]->numel() == 0) continue;
    ANCHOR_CHECK_VALUE(named[i]->stride(3) == 1, names[i],
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

// NaN/Inf in q or k would make every comparison false and silently drop keys; in v
// it would spread through every query block that reads the key. So the inputs are
// checked, through their min and max only (NaN propagates through both): two
// reductions per tensor, no temporary the size of an input, one host read for all.
// `thresholds` (identify's head_theta, may be undefined) may hold +-inf but not NaN.
void check_finite(std::initializer_list<std::pair<const at::Tensor*, const char*>> inputs,
                  const at::Tensor& thresholds = at::Tensor()) {
  if (!g_check_finite.load(std::memory_order_relaxed)) return;
  std::vector<at::Tensor> ends;
  std::vector<const char*> names;
  const bool scan_thresholds = thresholds.defined() && thresholds.numel() > 0;
  if (scan_thresholds) {
    if (stream_is_capturing(thresholds)) return;
    const auto [lowest, highest] = at::aminmax(thresholds);
    ends.push_back(lowest.to(at::kFloat).reshape({1}));
    ends.push_back(highest.to(at::kFloat).reshape({1}));
  }
  for (const auto& [t, name] : inputs) {
    if (t->numel() == 0) continue;
    if (stream_is_capturing(*t)) return;  // a host read is illegal during graph capture
    const auto [lowest, highest] = at::aminmax(*t);
    ends.push_back(lowest.to(at::kFloat).reshape({1}));
    ends.push_back(highest.to(at::kFloat).reshape({1}));
    names.push_back(name);
  }
  if (ends.empty()) return;
  const at::Tensor host = at::cat(ends).cpu();
  const float* end = host.data_ptr<float>();
  if (scan_thresholds) {
    ANCHOR_CHECK_VALUE(!std::isnan(end[0]) && !std::isnan(end[1]),
                       "head_theta: expected numbers (inf keeps every key), found NaN");
    end += 2;
  }
  for (size_t i = 0; i < names.size(); ++i) {
    ANCHOR_CHECK_VALUE(std::isfinite(end[2 * i]) && std::isfinite(end[2 * i + 1]), names[i],
                       ": expected finite values, found NaN or Inf (anchor_ext.set_check_finite"
                       "(False) skips this scan)");
  }
}

Geometry make_geometry(const at::Tensor& q, int64_t block_size, int64_t step,
                       int64_t init_blocks, int64_t local_blocks, std::optional<double> sm_scale) {
  ANCHOR_CHECK_VALUE(block_size > 0 && block_size <= (1 << 20),
                     "block_size: expected a positive integer, got ", block_size);
  ANCHOR_CHECK_VALUE(step > 0 && step <= (1 << 20), "step: expected a positive integer, got ",
                     step);
  ANCHOR_CHECK_VALUE(init_blocks >= 0 && init_blocks <= (1 << 20),
                     "init_blocks: expected a non-negative integer, got ", init_blocks);
  ANCHOR_CHECK_VALUE(local_blocks >= 0 && local_blocks <= (1 << 20),
                     "local_blocks: expected a non-negative integer, got ", local_blocks);
  if (is_cuda(q)) {
    ANCHOR_CHECK_VALUE(block_size == 128, "block_size: the CUDA kernels support 128, got ",
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
  ANCHOR_CHECK_VALUE(std::isfinite(scale) && std::isfinite(geo.sm_scale) && geo.sm_scale > 0,
                     "sm_scale: expected a finite positive number representable as float32, got ",
                     scale);
  return geo;
}

// The CUDA kernels' grid and index limits (csrc/ops.cpp checks them for every q-based op,
// so path="auto" rejects what the sparse kernels would, even where it runs dense).
void check_cuda_launch_limits(const at::Tensor& q, const Geometry& geo) {
  if (!is_cuda(q)) return;
  const int64_t n = q.size(2);
  ANCHOR_CHECK_VALUE(n < std::numeric_limits<int32_t>::max() / 2,
                     "q: the CUDA kernels support N < 2^30 tokens, got N=", n);
  ANCHOR_CHECK_VALUE(q.size(0) <= 65535 && q.size(1) <= 65535,
                     "q: the CUDA kernels support B <= 65535 and Hq <= 65535, got B=", q.size(0),
                     ", Hq=", q.size(1));
  ANCHOR_CHECK_VALUE(geo.step <= 256, "step: the CUDA identify kernel supports step <= 256, got ",
                     geo.step);
  ANCHOR_CHECK_VALUE(geo.num_groups(n) <= 65535, "step: at most 65535 groups on CUDA, got ",
                     geo.num_groups(n), " (N=", n, ", step=", geo.step, ")");
}

// make_geometry plus the CUDA limits: the geometry of an op on q (B, Hq, N, D).
Geometry geometry_of_q(const at::Tensor& q, int64_t block_size, int64_t step, int64_t init_blocks,
                       int64_t local_blocks, std::optional<double> sm_scale) {
  const Geometry geo = make_geometry(q, block_size, step, init_blocks, local_blocks, sm_scale);
  check_cuda_launch_limits(q, geo);
  return geo;
}

void check_theta(double theta) {
  ANCHOR_CHECK_VALUE(!std::isnan(theta), "theta: expected a number (inf keeps every key), got NaN");
}

// vote_rows 0 means block_size (the paper's block means).
int resolve_vote_rows(const at::Tensor& q, int64_t vote_rows, const Geometry& geo) {
  if (vote_rows == 0) return geo.block_size;
  ANCHOR_CHECK_VALUE(vote_rows > 0 && geo.block_size % vote_rows == 0,
                     "vote_rows: expected a positive divisor of block_size=", geo.block_size,
                     " (or 0 for block_size), got ", vote_rows);
  if (is_cuda(q)) {
    const int64_t units = geo.group_rows() / vote_rows;
    ANCHOR_CHECK_VALUE(units <= 256,
                       "vote_rows: the CUDA identify kernel supports step * block_size / vote_rows "
                       "<= 256 vote units per group, got ", units, " (step=", geo.step,
                       ", vote_rows=", vote_rows, ")");
  }
  return static_cast<int>(vote_rows);
}

void check_head_theta(const at::Tensor& q, const std::optional<at::Tensor>& head_theta) {
  if (!head_theta.has_value()) return;
  const at::Tensor& t = *head_theta;
  ANCHOR_CHECK_VALUE(t.device() == q.device(), "head_theta: expected device ", q.device(),
                     " (the device of q), got ", t.device());
  ANCHOR_CHECK_VALUE(t.scalar_type() == at::kFloat, "head_theta: expected dtype float32, got ",
                     t.scalar_type());
  ANCHOR_CHECK_VALUE(t.dim() == 2 && t.size(0) == q.size(0) && t.size(1) == q.size(1),
                     "head_theta: expected shape (B, Hq) = [", q.size(0), ", ", q.size(1),
                     "], got ", shape_of(t));
}

void check_anchor_scores(const at::Tensor& q, const at::Tensor& anchor_scores) {
  ANCHOR_CHECK_VALUE(anchor_scores.device() == q.device(), "anchor: expected device ", q.device(),
                     " (the device of q), got ", anchor_scores.device());
  ANCHOR_CHECK_VALUE(anchor_scores.scalar_type() == at::kFloat,
                     "anchor: expected dtype float32, got ", anchor_scores.scalar_type());
  ANCHOR_CHECK_VALUE(anchor_scores.dim() == 3 && anchor_scores.size(0) == q.size(0) &&
                        anchor_scores.size(1) == q.size(1) && anchor_scores.size(2) == q.size(2),
                     "anchor: expected shape (B, Hq, N) = [", q.size(0), ", ", q.size(1), ", ",
                     q.size(2), "], got ", shape_of(anchor_scores));
}

void check_selection(const at::Tensor& q, const at::Tensor& selection, const Geometry& geo) {
  const int64_t n = q.size(2);
  const int64_t groups = geo.num_groups(n), words = selection_words(n);
  ANCHOR_CHECK_VALUE(selection.device() == q.device(), "selection: expected device ", q.device(),
                     " (the device of q), got ", selection.device());
  ANCHOR_CHECK_VALUE(selection.scalar_type() == at::kInt, "selection: expected dtype int32, got ",
                     selection.scalar_type());
  ANCHOR_CHECK_VALUE(selection.dim() == 4 && selection.size(0) == q.size(0) &&
                        selection.size(1) == q.size(1) && selection.size(2) == groups &&
                        selection.size(3) == words,
                     "selection: expected shape (B, Hq, num_groups, ceil(N/32)) = [", q.size(0),
                     ", ", q.size(1), ", ", groups, ", ", words, "], got ", shape_of(selection));
}

[[noreturn]] void no_cuda_kernels(const char* op) {
  ANCHOR_CHECK_NOT_IMPLEMENTED(false, "anchor::", op,
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
  const Geometry geo = geometry_of_q(q, block_size, step, init_blocks, local_blocks, sm_scale);
  check_finite({{&q, "q"}, {&k, "k"}});
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
                       const std::optional<at::Tensor>& head_theta, double theta,
                       int64_t block_size, int64_t step, int64_t init_blocks,
                       int64_t local_blocks, std::optional<double> sm_scale, int64_t vote_rows) {
  check_qkv(q, k, nullptr);
  check_theta(theta);
  const Geometry geo = geometry_of_q(q, block_size, step, init_blocks, local_blocks, sm_scale);
  const int unit_rows = resolve_vote_rows(q, vote_rows, geo);
  check_anchor_scores(q, anchor_scores);
  check_head_theta(q, head_theta);
  const at::Tensor thresholds = head_theta.value_or(at::Tensor());
  check_finite({{&q, "q"}, {&k, "k"}}, thresholds);
  if (is_cuda(q)) {
#ifdef ANCHOR_WITH_CUDA
    return cuda::identify(q, k, anchor_scores, theta, thresholds, unit_rows, geo);
#else
    no_cuda_kernels("identify");
#endif
  }
  return cpu::identify(q, k, anchor_scores, theta, thresholds, unit_rows, geo);
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_op(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& selection,
    int64_t block_size, int64_t step, int64_t init_blocks, int64_t local_blocks,
    std::optional<double> sm_scale) {
  check_qkv(q, k, &v);
  const Geometry geo = geometry_of_q(q, block_size, step, init_blocks, local_blocks, sm_scale);
  check_selection(q, selection, geo);
  check_finite({{&q, "q"}, {&k, "k"}, {&v, "v"}});
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
  geometry_of_q(q, block_size, step, init_blocks, local_blocks, sm_scale);
  if (!scan_finite) return;
  check_finite({{&q, "q"}, {&k, "k"}, {&v, "v"}});
}

at::Tensor prefill_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double theta,
                      int64_t block_size, int64_t step, int64_t init_blocks, int64_t local_blocks,
                      std::optional<double> sm_scale) {
  check_prefill_args(q, k, v, theta, block_size, step, init_blocks, local_blocks, sm_scale,
                     /*scan_finite=*/true);
  const Geometry geo = geometry_of_q(q, block_size, step, init_blocks, local_blocks, sm_scale);
  if (is_cuda(q)) {
#ifdef ANCHOR_WITH_CUDA
    return cuda::prefill(q, k, v, theta, geo);
#else
    no_cuda_kernels("prefill");
#endif
  }
  const at::Tensor anchor_scores = cpu::anchor(q, k, geo);
  const at::Tensor selection = cpu::identify(q, k, anchor_scores, theta, at::Tensor(), geo.block_size, geo);
  return std::get<0>(cpu::sparse_attention(q, k, v, selection, geo));
}

// ---- SparseSkeleton (CUDA only: on CPU, anchor_ext.skeleton is the PyTorch path) ----

std::tuple<at::Tensor, at::Tensor, at::Tensor> skeleton_row_stats_op(
    const at::Tensor& q, const at::Tensor& k, int64_t sink_tokens, int64_t local_tokens,
    std::optional<double> sm_scale) {
  check_qkv(q, k, nullptr);
  ANCHOR_CHECK_VALUE(sink_tokens >= 1 && sink_tokens <= 64,
                     "sink_tokens: the CUDA row statistics support 1 <= S <= 64, got ", sink_tokens);
  ANCHOR_CHECK_VALUE(local_tokens >= 1 && local_tokens <= 64,
                     "local_tokens: the CUDA row statistics support 1 <= T <= 64, got ",
                     local_tokens);
  // Only sm_scale is used; block_size 128 passes the CUDA geometry check.
  const Geometry geo = make_geometry(q, 128, 1, 1, 1, sm_scale);
  check_finite({{&q, "q"}, {&k, "k"}});
  ANCHOR_CHECK_NOT_IMPLEMENTED(is_cuda(q), "anchor::skeleton_row_stats: CUDA tensors only (got ",
                               q.device(), "); on CPU anchor_ext.skeleton computes the "
                               "statistics in PyTorch");
#ifdef ANCHOR_WITH_CUDA
  return cuda::skeleton_row_stats(q, k, sink_tokens, local_tokens, geo);
#else
  no_cuda_kernels("skeleton_row_stats");
#endif
}

at::Tensor skeleton_select_op(const at::Tensor& vertical, const at::Tensor& slash,
                              const at::Tensor& horizontal, const at::Tensor& tau, int64_t seqlen,
                              int64_t mask_block, bool count_pairs, int64_t block_size,
                              int64_t step, int64_t init_blocks, int64_t local_blocks) {
  ANCHOR_CHECK_VALUE(vertical.dim() == 2, "vertical: expected a 2-D tensor (heads, length), got shape ",
                     shape_of(vertical));
  ANCHOR_CHECK_VALUE(seqlen >= 0 && seqlen < (int64_t(1) << 30),
                     "seqlen: expected 0 <= N < 2^30, got ", seqlen);
  const Geometry geo = make_geometry(vertical, block_size, step, init_blocks, local_blocks, 1.0);
  const int64_t heads = vertical.size(0), groups = geo.num_groups(seqlen);
  ANCHOR_CHECK_VALUE(mask_block >= 0, "mask_block: expected >= 0 (0 selects per key), got ",
                     mask_block);
  int64_t length = seqlen, horizontal_length = groups;
  if (mask_block > 0) {
    ANCHOR_CHECK_VALUE(block_size % mask_block == 0,
                       "mask_block: expected a divisor of block_size=", block_size,
                       " (a mask block must not straddle the middle region's ends), got ",
                       mask_block);
    length = horizontal_length = (seqlen + mask_block - 1) / mask_block;
  }
  const std::pair<const at::Tensor*, const char*> components[] = {
      {&vertical, "vertical"}, {&slash, "slash"}, {&horizontal, "horizontal"}, {&tau, "tau"}};
  for (const auto& [t, name] : components) {
    ANCHOR_CHECK_VALUE(t->device() == vertical.device(), name, ": expected device ",
                       vertical.device(), " (the device of vertical), got ", t->device());
    ANCHOR_CHECK_VALUE(t->scalar_type() == at::kFloat, name, ": expected dtype float32, got ",
                       t->scalar_type());
  }
  const auto expect_shape = [&](const at::Tensor& t, const char* name, int64_t len) {
    ANCHOR_CHECK_VALUE(t.dim() == 2 && t.size(0) == heads && t.size(1) == len, name,
                       ": expected shape [", heads, ", ", len, "], got ", shape_of(t));
  };
  expect_shape(vertical, "vertical", length);
  expect_shape(slash, "slash", length);
  expect_shape(horizontal, "horizontal", horizontal_length);
  ANCHOR_CHECK_VALUE(tau.dim() == 1 && tau.size(0) == heads, "tau: expected shape [", heads,
                     "], got ", shape_of(tau));
  ANCHOR_CHECK_VALUE(heads <= 65535, "vertical: the CUDA kernel supports at most 65535 heads, got ",
                     heads);
  ANCHOR_CHECK_NOT_IMPLEMENTED(is_cuda(vertical), "anchor::skeleton_select: CUDA tensors only "
                               "(got ", vertical.device(), "); on CPU anchor_ext.skeleton.select "
                               "builds the selection in PyTorch");
#ifdef ANCHOR_WITH_CUDA
  return cuda::skeleton_select(vertical, slash, horizontal, tau, seqlen, mask_block, count_pairs,
                               geo);
#else
  no_cuda_kernels("skeleton_select");
#endif
}

}  // namespace anchor

TORCH_LIBRARY(anchor, m) {
  m.def(
      "anchor(Tensor q, Tensor k, *, int block_size=128, int step=16, int init_blocks=1, "
      "int local_blocks=1, float? sm_scale=None) -> Tensor");
  m.def(
      "identify(Tensor q, Tensor k, Tensor anchor, Tensor? head_theta=None, *, float theta=12.0, "
      "int block_size=128, int step=16, int init_blocks=1, int local_blocks=1, "
      "float? sm_scale=None, int vote_rows=0) -> Tensor");
  m.def(
      "sparse_attention(Tensor q, Tensor k, Tensor v, Tensor selection, *, int block_size=128, "
      "int step=16, int init_blocks=1, int local_blocks=1, float? sm_scale=None) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "prefill(Tensor q, Tensor k, Tensor v, *, float theta=12.0, int block_size=128, "
      "int step=16, int init_blocks=1, int local_blocks=1, float? sm_scale=None) -> Tensor");
  m.def(
      "skeleton_row_stats(Tensor q, Tensor k, *, int sink_tokens=64, int local_tokens=64, "
      "float? sm_scale=None) -> (Tensor mu, Tensor var, Tensor lambda_lse)");
  m.def(
      "skeleton_select(Tensor vertical, Tensor slash, Tensor horizontal, Tensor tau, *, "
      "int seqlen, int mask_block=0, bool count_pairs=False, int block_size=128, int step=1, "
      "int init_blocks=1, int local_blocks=1) -> Tensor");
}

// One implementation per op serves both backends: it validates, then branches on
// the device. Registering it for CPU and CUDA keeps the checks in one place.
#define ANCHOR_REGISTER_BACKEND(KEY)                               \
  TORCH_LIBRARY_IMPL(anchor, KEY, m) {                             \
    m.impl("anchor", &anchor::anchor_op);                          \
    m.impl("identify", &anchor::identify_op);                      \
    m.impl("sparse_attention", &anchor::sparse_attention_op);      \
    m.impl("prefill", &anchor::prefill_op);                        \
    m.impl("skeleton_row_stats", &anchor::skeleton_row_stats_op);  \
    m.impl("skeleton_select", &anchor::skeleton_select_op);        \
  }

ANCHOR_REGISTER_BACKEND(CPU)
ANCHOR_REGISTER_BACKEND(CUDA)
