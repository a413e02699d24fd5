// The Python extension module anchor_ext._C. Loading it registers the
// torch.ops.anchor.* ops (csrc/ops.cpp); the few functions bound here report
// how the build was made and toggle the input scan.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor <-> torch.Tensor casters

#include "ops.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "anchor_ext compiled ops (registered as torch.ops.anchor.*)";
  m.def("built_with_cuda", &anchor::built_with_cuda,
        "True when this build contains the CUDA kernels.");
  m.def("set_check_finite", &anchor::set_check_finite, pybind11::arg("enabled"),
        "Scan q and k for NaN/Inf before each op (default on; skipped during CUDA graph capture).");
  m.def("check_finite_enabled", &anchor::check_finite_enabled);
  m.def("check_prefill_args", &anchor::check_prefill_args, pybind11::arg("q"), pybind11::arg("k"),
        pybind11::arg("v"), pybind11::arg("theta"), pybind11::arg("block_size"),
        pybind11::arg("step"), pybind11::arg("init_blocks"), pybind11::arg("local_blocks"),
        pybind11::arg("sm_scale"), pybind11::arg("scan_finite") = true,
        "Run prefill's argument checks without computing (raises ValueError on bad input).");
}
