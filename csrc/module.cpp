// The Python extension module anchor_ext._C. Loading it registers the
// torch.ops.anchor.* ops (csrc/ops.cpp); the few functions bound here report
// how the build was made and toggle the input scan.
#include <pybind11/pybind11.h>

#include "ops.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "anchor_ext compiled ops (registered as torch.ops.anchor.*)";
  m.def("built_with_cuda", &anchor::built_with_cuda,
        "True when this build contains the CUDA kernels.");
  m.def("set_check_finite", &anchor::set_check_finite, pybind11::arg("enabled"),
        "Scan q and k for NaN/Inf before each op (default on; skipped during CUDA graph capture).");
  m.def("check_finite_enabled", &anchor::check_finite_enabled);
}
