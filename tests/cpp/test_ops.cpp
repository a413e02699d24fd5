// C++ check of the op library without Python: the ops are reachable both as
// C++ functions (anchor::prefill) and through the dispatcher
// (torch.ops.anchor.prefill), and they agree with dense attention when theta
// keeps every key and with the three stages chained otherwise.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <limits>

#include "ops.h"

namespace {

int failures = 0;

void expect_close(const char* what, const at::Tensor& a, const at::Tensor& b, double tol) {
  const double err = (a.to(at::kFloat) - b.to(at::kFloat)).abs().max().item<double>();
  const bool ok = err <= tol;
  std::printf("%-48s max|diff| = %.3g  %s\n", what, err, ok ? "ok" : "FAILED");
  if (!ok) ++failures;
}

// Dense causal attention with GQA, fp32, in plain ATen.
at::Tensor dense_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const int64_t group = q.size(1) / k.size(1), n = q.size(2);
  const at::Tensor kk = k.to(at::kFloat).repeat_interleave(group, 1);
  const at::Tensor vv = v.to(at::kFloat).repeat_interleave(group, 1);
  at::Tensor s = at::matmul(q.to(at::kFloat), kk.transpose(-1, -2)) / std::sqrt(double(q.size(3)));
  s.masked_fill_(at::ones({n, n}, at::kBool).triu(1), -std::numeric_limits<float>::infinity());
  return at::matmul(at::softmax(s, -1), vv);
}

}  // namespace

int main() {
  at::manual_seed(0);
  const at::Tensor q = at::randn({1, 8, 777, 64}) * 1.5;
  const at::Tensor k = at::randn({1, 2, 777, 64}) * 1.5;
  const at::Tensor v = at::randn({1, 2, 777, 64});
  anchor::Options geometry;
  geometry.block_size = 32;
  geometry.step = 2;

  anchor::Options all_keys = geometry;
  all_keys.theta = std::numeric_limits<double>::infinity();
  expect_close("prefill(theta=inf) == dense attention", anchor::prefill(q, k, v, all_keys),
               dense_attention(q, k, v), 1e-4);

  geometry.theta = 3.0;
  const at::Tensor anchors = anchor::anchor_op(q, k, 32, 2, 1, 1, std::nullopt);
  const at::Tensor selection = anchor::identify_op(q, k, anchors, std::nullopt, 3.0, 32, 2, 1, 1, std::nullopt);
  const auto [out, lse] = anchor::sparse_attention_op(q, k, v, selection, 32, 2, 1, 1, std::nullopt);
  expect_close("prefill == anchor -> identify -> sparse_attention", anchor::prefill(q, k, v, geometry),
               out, 0.0);

  // The same op through the dispatcher, as Python's torch.ops.anchor.prefill sees it.
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("anchor::prefill", "")
                .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                  int64_t, int64_t, int64_t, int64_t, std::optional<double>)>();
  expect_close("dispatcher anchor::prefill == C++ call", op.call(q, k, v, 3.0, 32, 2, 1, 1, std::nullopt),
               out, 0.0);

  std::printf("%d passed, %d failed\n", 3 - failures, failures);
  return failures == 0 ? 0 : 1;
}
