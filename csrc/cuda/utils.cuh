// Small device helpers shared by the kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

// Throws (torch turns it into a Python RuntimeError) instead of killing the process.
#define ANCHOR_CUDA_CHECK(expr)                                                            \
  do {                                                                                     \
    cudaError_t err_ = (expr);                                                             \
    if (err_ != cudaSuccess) {                                                             \
      throw std::runtime_error(std::string("anchor_ext CUDA error: ") +                    \
                               cudaGetErrorString(err_) + " at " + __FILE__ + ":" +       \
                               std::to_string(__LINE__));                                  \
    }                                                                                      \
  } while (0)

namespace anchor::cuda {

// 16-byte global -> shared async copy; src_bytes = 0 fills the 16 bytes with zeros
// (used for rows past the sequence end and empty key slots).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  const uint32_t smem_addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

template <typename T>
struct NumericTraits;
template <>
struct NumericTraits<__nv_bfloat16> {
  __device__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct NumericTraits<__half> {
  __device__ static float to_float(__half x) { return __half2float(x); }
  __device__ static __half from_float(float x) { return __float2half_rn(x); }
};

}  // namespace anchor::cuda
