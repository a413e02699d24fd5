// One (dtype, head dim) instantiation per file keeps each nvcc job small.
#include "attention/kernel.cuh"

template void anchor::cuda::run_attention_<true, 128>(const AttentionParams&, cudaStream_t);
