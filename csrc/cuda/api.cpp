// Host side of the CUDA backend (see api.h).
#include "api.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>

namespace anchor::cuda {

bool stream_is_capturing(const at::Tensor& t) {
  c10::cuda::CUDAGuard guard(t.device());
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

[[noreturn]] static void not_yet(const char* op) {
  TORCH_CHECK_NOT_IMPLEMENTED(false, "anchor::", op, ": the CUDA kernel is not implemented yet");
}

at::Tensor anchor(const at::Tensor&, const at::Tensor&, const Geometry&) { not_yet("anchor"); }
at::Tensor identify(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, const Geometry&) {
  not_yet("identify");
}
std::tuple<at::Tensor, at::Tensor> sparse_attention(const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, const at::Tensor&,
                                                    const Geometry&) {
  not_yet("sparse_attention");
}
at::Tensor prefill(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, const Geometry&) {
  not_yet("prefill");
}

}  // namespace anchor::cuda
