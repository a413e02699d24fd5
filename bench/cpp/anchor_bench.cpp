// anchor_bench: C++ microbenchmark of the anchor_ext CUDA stages, no Python.
//
//   anchor_bench --n 32768 --theta 12 --repeats 10 [--json out.json]
//
// Times each stage alone on device buffers (anchor, identify, sparse_attention)
// and the whole prefill, plus dense SDPA (cuDNN by default) on the same tensors:
// CUDA events on the current stream around every call, after warm-up, median
// (and min) over the repeats. Standard shape by default (B=1, Hq=32, Hkv=8,
// D=128, bf16). Prints per stage:
//
//   identify GB/s, two byte counts (E = 2 bytes per bf16/fp16 element, G groups,
//   W = ceil(N/32) words, mid(g) = middle-region length of group g):
//     compulsory = B*Hkv*N*D*E (K, once) + B*Hq*N*D*E (Q, once)
//                  + B*Hq*G*W*4 (bitmask written)              -> the DRAM lower bound
//     streamed   = sum_g B*Hkv*mid(g)*D*E (every group streams its middle-region
//                  keys once per kv head) + Q + bitmask         -> mostly L2 hits
//   TFLOP/s on computed pairs: 4*D*pairs/time for sparse_attention and prefill
//     (pairs = always-computed pairs + popcount of selected middle-region bits x
//     rows of the group, anchor_ext/metrics.py computed_pairs), 2*D*always/time
//     for anchor (QK^T only, over the always-computed region), and
//     4*D*B*Hq*N(N+1)/2 / time for dense SDPA.
//   fraction of peak: HBM peak = 2 * memory clock * bus width / 8 from
//     cudaDeviceGetAttribute (fallback 3.35e12 B/s, H100 SXM); dense bf16/fp16
//     tensor peak 989e12 FLOP/s (H100 SXM, a constant). Both can be overridden
//     (--peak-bw TB/s, --peak-tflops).
//
// Inputs are generated on the device with ATen ops (seeded): a simplified
// version of anchor_ext.synthetic.make_qkv (RoPE, an attention sink on key 0..3,
// a locality component, ~0.5% heavy-hitter key columns that every query of a
// head reads; no topics). The selection is non-trivial, but sparsity and the
// times differ from the Python benchmark's: for realistic inputs and for
// recall/error, use `python -m bench.prefill` (bench/README.md).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "ops.h"

namespace {

#define BENCH_CUDA_CHECK(expr)                                                          \
  do {                                                                                  \
    const cudaError_t err_ = (expr);                                                    \
    if (err_ != cudaSuccess) {                                                          \
      std::fprintf(stderr, "anchor_bench: %s failed: %s\n", #expr, cudaGetErrorString(err_)); \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

constexpr double kFallbackPeakBytesPerS = 3.35e12;  // H100 SXM5 80GB HBM3
constexpr double kPeakDenseTensorFlops = 989e12;    // H100 SXM5 dense bf16/fp16, no sparsity

// ------------------------------------------------------------------ arguments

struct Args {
  int64_t n = 32768;
  int64_t batch = 1, q_heads = 32, kv_heads = 8, head_dim = 128;
  std::string dtype = "bf16";
  double theta = 12.0;
  int64_t block_size = 128, step = 16, init_blocks = 1, local_blocks = 1;
  int warmup = 3, repeats = 10;
  uint64_t seed = 0;
  std::string sdpa = "cudnn";  // cudnn | flash | default | none
  double peak_bw_tbs = 0, peak_tflops = 0;  // 0: derive / constant
  bool check_finite = false;
  bool cpu = false;  // --cpu: the same run on the CPU ops (a smoke test of this program, small N)
  std::string json;
  std::string save_selection;  // raw int32 (B, Hq, groups, words), to cross-check the counts
};

void usage(const char* prog) {
  std::printf(
      "usage: %s [--n N] [--theta T] [--repeats R] [--warmup W] [--batch B] [--q-heads HQ]\n"
      "          [--kv-heads HKV] [--head-dim D] [--dtype bf16|fp16] [--step S]\n"
      "          [--init-blocks I] [--local-blocks L] [--seed S] [--sdpa cudnn|flash|default|none]\n"
      "          [--peak-bw TB/s] [--peak-tflops TFLOP/s] [--check-finite] [--json PATH] [--cpu]\n"
      "          [--save-selection PATH]\n"
      "N accepts a k suffix (32k = 32768). Defaults: N=32768, theta=12, 10 repeats, 3 warm-up,\n"
      "B=1, Hq=32, Hkv=8, D=128, bf16, block 128, step 16, 1 sink and 1 local block.\n"
      "--cpu runs the same on the CPU ops with wall-clock times (checks this program without\n"
      "a GPU; use a small N, e.g. --cpu --n 4k --repeats 1 --warmup 0).\n",
      prog);
}

int64_t parse_int(const std::string& s, const char* name) {
  char* end = nullptr;
  double value = std::strtod(s.c_str(), &end);
  if (end != nullptr && (*end == 'k' || *end == 'K')) value *= 1024, ++end;
  if (end == s.c_str() || *end != '\0' || value < 0 || value != std::floor(value)) {
    std::fprintf(stderr, "anchor_bench: %s: expected a non-negative integer, got '%s'\n", name,
                 s.c_str());
    std::exit(2);
  }
  return static_cast<int64_t>(value);
}

double parse_double(const std::string& s, const char* name) {
  char* end = nullptr;
  const double value = std::strtod(s.c_str(), &end);
  if (end == s.c_str() || *end != '\0') {
    std::fprintf(stderr, "anchor_bench: %s: expected a number, got '%s'\n", name, s.c_str());
    std::exit(2);
  }
  return value;
}

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string key = argv[i], value;
    if (key == "-h" || key == "--help") usage(argv[0]), std::exit(0);
    if (key == "--check-finite" || key == "--cpu") {
      (key == "--cpu" ? a.cpu : a.check_finite) = true;
      continue;
    }
    const auto eq = key.find('=');
    if (eq != std::string::npos) {
      value = key.substr(eq + 1), key = key.substr(0, eq);
    } else if (i + 1 < argc) {
      value = argv[++i];
    } else {
      std::fprintf(stderr, "anchor_bench: %s needs a value\n", key.c_str());
      std::exit(2);
    }
    const char* k = key.c_str();
    if (key == "--n") a.n = parse_int(value, k);
    else if (key == "--theta") a.theta = parse_double(value, k);
    else if (key == "--repeats") a.repeats = static_cast<int>(parse_int(value, k));
    else if (key == "--warmup") a.warmup = static_cast<int>(parse_int(value, k));
    else if (key == "--batch") a.batch = parse_int(value, k);
    else if (key == "--q-heads") a.q_heads = parse_int(value, k);
    else if (key == "--kv-heads") a.kv_heads = parse_int(value, k);
    else if (key == "--head-dim") a.head_dim = parse_int(value, k);
    else if (key == "--dtype") a.dtype = value;
    else if (key == "--step") a.step = parse_int(value, k);
    else if (key == "--init-blocks") a.init_blocks = parse_int(value, k);
    else if (key == "--local-blocks") a.local_blocks = parse_int(value, k);
    else if (key == "--seed") a.seed = static_cast<uint64_t>(parse_int(value, k));
    else if (key == "--sdpa") a.sdpa = value;
    else if (key == "--peak-bw") a.peak_bw_tbs = parse_double(value, k);
    else if (key == "--peak-tflops") a.peak_tflops = parse_double(value, k);
    else if (key == "--json") a.json = value;
    else if (key == "--save-selection") a.save_selection = value;
    else {
      std::fprintf(stderr, "anchor_bench: unknown argument %s\n", key.c_str());
      usage(argv[0]);
      std::exit(2);
    }
  }
  if (a.n < 1 || a.batch < 1 || a.kv_heads < 1 || a.q_heads % a.kv_heads != 0 ||
      a.repeats < 1 || (a.dtype != "bf16" && a.dtype != "fp16") ||
      (a.sdpa != "cudnn" && a.sdpa != "flash" && a.sdpa != "default" && a.sdpa != "none")) {
    std::fprintf(stderr,
                 "anchor_bench: bad arguments (need N >= 1, Hq %% Hkv == 0, repeats >= 1, "
                 "dtype bf16|fp16, sdpa cudnn|flash|default|none)\n");
    std::exit(2);
  }
  return a;
}

// ------------------------------------------------------------------ inputs

// Rotate-half RoPE, as anchor_ext.synthetic.apply_rope.
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  const at::Tensor rotated = at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

struct Inputs {
  at::Tensor q, k, v;
};

// A simplified synthetic.make_qkv, generated on the device (constants from there):
// noise 0.8 per entry (x0.35 in the slow RoPE pairs), a sink on keys 0..3 and
// heavy-hitter keys in two slow dims (barely rotated by RoPE, so they act at any
// distance), a locality vector in the fast pairs (decays with distance after RoPE),
// per-head target logits sink 15.5-19, local and stripe 2-5 below it, 1 head in 8 weak.
Inputs make_inputs(const Args& a) {
  const int64_t b = a.batch, hq = a.q_heads, hkv = a.kv_heads, n = a.n, d = a.head_dim;
  const int64_t half = d / 2, group = hq / hkv;
  const double scale = 1.0 / std::sqrt(double(d)), rope_base = 500000.0;
  at::manual_seed(a.seed);  // CPU and CUDA default generators
  std::mt19937_64 rng(a.seed);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  const auto f32 = at::TensorOptions().device(a.cpu ? at::kCPU : at::kCUDA).dtype(at::kFloat);
  const auto dtype = a.dtype == "bf16" ? at::kBFloat16 : at::kHalf;

  // Slow (semantic) pairs: frequency <= 5e-6, at least 2, at most half/2.
  std::vector<double> freq(half);
  int64_t n_slow = 0;
  for (int64_t p = 0; p < half; ++p) {
    freq[p] = std::pow(rope_base, -2.0 * double(p) / double(d));
    n_slow += freq[p] <= 5e-6;
  }
  n_slow = std::min<int64_t>(std::max<int64_t>(n_slow, 2), half / 2);
  const int64_t sink_dim = half - 1, hit_dim = half - 2, n_fast = half - n_slow;
  std::vector<float> noise_scale(d, 0.8f);
  for (int64_t p = n_fast; p < half; ++p) noise_scale[p] = noise_scale[p + half] = 0.8f * 0.35f;
  const at::Tensor noise = at::tensor(noise_scale).to(f32.device());

  // Locality vector c per kv head: energy in a band of frequencies around 1/ell.
  std::vector<float> c(hkv * d, 0.f);
  for (int64_t g = 0; g < hkv; ++g) {
    const double ell = std::exp(std::log(16.0) + unif(rng) * (std::log(128.0) - std::log(16.0)));
    std::vector<double> band(n_fast);
    double total = 0;
    for (int64_t p = 0; p < n_fast; ++p) {
      const double x = std::log(freq[p] * ell);
      total += band[p] = std::exp(-0.5 * x * x);
    }
    for (int64_t p = 0; p < n_fast; ++p) {
      const double amp = 11.0 * std::sqrt(band[p] / std::max(total, 1e-12));
      const double phase = 2 * M_PI * unif(rng);
      c[g * d + p] = float(amp * std::cos(phase));
      c[g * d + p + half] = float(amp * std::sin(phase));
    }
  }
  const at::Tensor c_kv = at::tensor(c).to(f32.device()).view({1, hkv, 1, d});

  // Per-q-head logits -> query loadings.
  std::vector<float> a_sink(hq), a_hit(hq), a_local(hq);
  for (int64_t h = 0; h < hq; ++h) {
    double sink = 15.5 + 3.5 * unif(rng);
    double local = sink - (2.0 + 3.0 * unif(rng)), stripe = sink - (2.0 + 3.0 * unif(rng));
    if (unif(rng) < 0.125) sink -= 5, local -= 5, stripe -= 5;
    a_sink[h] = float(sink / (scale * 20.0));
    a_hit[h] = float(stripe / (scale * 16.0));
    a_local[h] = float(local / (scale * 11.0 * 11.0));
  }
  auto per_head = [&](const std::vector<float>& x) {
    return at::tensor(x).to(f32.device()).view({1, hq, 1});
  };

  // RoPE tables (n, d).
  const at::Tensor inv_freq =
      at::pow(rope_base, -at::arange(0, d, 2, f32.dtype(at::kDouble)) / double(d));
  at::Tensor angles = at::arange(n, f32.dtype(at::kDouble)).unsqueeze(1) * inv_freq.unsqueeze(0);
  angles = at::cat({angles, angles}, 1);
  const at::Tensor cos = angles.cos().to(at::kFloat), sin = angles.sin().to(at::kFloat);
  angles.reset();

  // Keys.
  const int64_t n_sink = std::min<int64_t>(n, 4);
  const at::Tensor pos = at::arange(n, f32.dtype(at::kLong));
  const at::Tensor pool = at::rand({b, 1, n}, f32) < (1.0 / 128.0);
  const at::Tensor hit = (pool & (at::rand({b, hkv, n}, f32) < 0.6) & (pos >= n_sink)).to(at::kFloat);
  const at::Tensor strength = 0.8 + 0.2 * at::rand({b, hkv, n}, f32);
  at::Tensor k = at::randn({b, hkv, n, d}, f32) * noise;
  k.select(-1, hit_dim).add_(16.0 * strength * hit);
  const at::Tensor sink_w = at::tensor(std::vector<float>{1.f, .55f, .45f, .35f})
                                .narrow(0, 0, n_sink).to(f32.device());
  k.select(-1, sink_dim).narrow(-1, 0, n_sink).add_(20.0 * sink_w);
  // Sink and heavy-hitter keys carry a quarter of the locality vector.
  const at::Tensor semantic = at::maximum(hit, (pos < n_sink).to(at::kFloat).view({1, 1, n}));
  k.add_((1.0 - 0.75 * semantic).unsqueeze(-1) * c_kv);
  k = apply_rope(k, cos, sin).to(dtype);

  // Values: noise, shrunken sink values.
  at::Tensor v = at::randn({b, hkv, n, d}, f32);
  v.narrow(2, 0, n_sink).mul_(0.25);
  v = v.to(dtype);

  // Queries: sink, heavy-hitter (with 3% row jitter) and locality loadings per head.
  at::Tensor q = at::randn({b, hq, n, d}, f32) * noise;
  q.select(-1, sink_dim).add_(per_head(a_sink));
  q.select(-1, hit_dim).add_(per_head(a_hit) * (1.0 + 0.03 * at::randn({b, hq, n}, f32)));
  const at::Tensor c_q = c_kv.repeat_interleave(group, 1) * per_head(a_local).unsqueeze(-1);
  q.add_(c_q);
  q = apply_rope(q, cos, sin).to(dtype);
  return {q, k, v};
}

// ------------------------------------------------------------------ timing

struct Timing {
  double median_ms = 0, min_ms = 0;
};

Timing median_of(std::vector<double> times);

// Median (and min) CUDA-event time of fn on the current stream, after warm-up;
// with cpu, wall-clock time (the CPU ops are synchronous).
Timing cuda_time(const std::function<void()>& fn, int warmup, int repeats, bool cpu = false) {
  std::vector<double> times;
  if (cpu) {
    for (int i = 0; i < warmup; ++i) fn();
    for (int i = 0; i < repeats; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      fn();
      times.push_back(
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    return median_of(times);
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  for (int i = 0; i < warmup; ++i) fn();
  BENCH_CUDA_CHECK(cudaStreamSynchronize(stream));
  cudaEvent_t start, end;
  BENCH_CUDA_CHECK(cudaEventCreate(&start));
  BENCH_CUDA_CHECK(cudaEventCreate(&end));
  for (int i = 0; i < repeats; ++i) {
    BENCH_CUDA_CHECK(cudaEventRecord(start, stream));
    fn();
    BENCH_CUDA_CHECK(cudaEventRecord(end, stream));
    BENCH_CUDA_CHECK(cudaEventSynchronize(end));
    float ms = 0;
    BENCH_CUDA_CHECK(cudaEventElapsedTime(&ms, start, end));
    times.push_back(ms);
  }
  BENCH_CUDA_CHECK(cudaEventDestroy(start));
  BENCH_CUDA_CHECK(cudaEventDestroy(end));
  return median_of(times);
}

Timing median_of(std::vector<double> times) {
  std::sort(times.begin(), times.end());
  const size_t m = times.size();
  const double median = m % 2 ? times[m / 2] : 0.5 * (times[m / 2 - 1] + times[m / 2]);
  return {median, times.front()};
}

// ------------------------------------------------------------------ work counts

struct Work {
  double always_pairs = 0;    // always-computed (sink + local, causal) pairs, all (b, h)
  double stripe_pairs = 0;    // selected middle-region keys x rows of their group
  double middle_keys = 0;     // sum over groups of the middle-region length (per (b, kv head))
  double selected_keys = 0;   // selected middle-region keys, all (b, h, g)
  double causal_pairs = 0;    // B * Hq * N(N+1)/2
};

// As anchor_ext.metrics.computed_pairs: always-computed pairs in closed form per
// group, stripes as popcount of the bits inside the group's middle region.
Work count_work(const Args& a, const at::Tensor& selection) {
  const int64_t n = a.n, bs = a.block_size, group_rows = a.step * bs, sink_end = a.init_blocks * bs;
  const int64_t groups = selection.size(2), words = selection.size(3);
  const int64_t heads = a.batch * a.q_heads;
  const at::Tensor sel = selection.contiguous().cpu();
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(sel.data_ptr<int32_t>());
  Work w;
  w.causal_pairs = double(heads) * double(n) * double(n + 1) / 2;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t g0 = g * group_rows, g1 = std::min(n, g0 + group_rows), rows = g1 - g0;
    const int64_t local_start = std::max<int64_t>(0, g0 - a.local_blocks * bs);
    double always = 0;
    for (int64_t i = g0; i < g1; ++i) {
      const int64_t sink = std::min(i + 1, sink_end), local = i + 1 - local_start;
      const int64_t overlap = std::max<int64_t>(0, sink - local_start);
      always += double(sink + local - overlap);
    }
    w.always_pairs += always * double(heads);
    const int64_t m0 = sink_end, m1 = std::max(m0, g0 - a.local_blocks * bs);
    if (m1 <= m0) continue;
    w.middle_keys += double(m1 - m0);
    for (int64_t bh = 0; bh < heads; ++bh) {
      const uint32_t* row = bits + (bh * groups + g) * words;
      int64_t count = 0;
      for (int64_t word = m0 / 32; word <= (m1 - 1) / 32; ++word) {
        uint32_t x = row[word];
        const int64_t lo = word * 32, hi = lo + 32;
        if (lo < m0) x &= ~0u << (m0 - lo);
        if (hi > m1) x &= ~0u >> (hi - m1);
        count += __builtin_popcount(x);
      }
      w.selected_keys += double(count);
      w.stripe_pairs += double(count) * double(rows);
    }
  }
  return w;
}

// ------------------------------------------------------------------ device

struct Device {
  std::string name;
  int sms = 0, major = 0, minor = 0;
  double peak_bytes_per_s = 0, peak_flops = 0;
  std::string bw_source, flops_source;
};

Device query_device(const Args& a) {
  if (a.cpu) {
    Device d;
    d.name = "CPU (--cpu smoke run)";
    d.peak_bytes_per_s = a.peak_bw_tbs > 0 ? a.peak_bw_tbs * 1e12 : kFallbackPeakBytesPerS;
    d.peak_flops = a.peak_tflops > 0 ? a.peak_tflops * 1e12 : kPeakDenseTensorFlops;
    d.bw_source = d.flops_source = "H100 constants, meaningless on CPU";
    return d;
  }
  int dev = 0;
  BENCH_CUDA_CHECK(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  BENCH_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  Device d;
  d.name = prop.name, d.sms = prop.multiProcessorCount, d.major = prop.major, d.minor = prop.minor;
  // cudaDeviceProp::memoryClockRate is gone in CUDA 13; the attribute stays.
  int clock_khz = 0, bus_bits = 0;
  if (cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, dev) != cudaSuccess) clock_khz = 0;
  if (cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, dev) != cudaSuccess) bus_bits = 0;
  (void)cudaGetLastError();
  char buf[160];
  if (a.peak_bw_tbs > 0) {
    d.peak_bytes_per_s = a.peak_bw_tbs * 1e12, d.bw_source = "--peak-bw";
  } else if (clock_khz > 0 && bus_bits > 0) {
    d.peak_bytes_per_s = 2.0 * clock_khz * 1e3 * bus_bits / 8.0;
    std::snprintf(buf, sizeof buf, "2 x %d MHz x %d bit / 8", clock_khz / 1000, bus_bits);
    d.bw_source = buf;
  } else {
    d.peak_bytes_per_s = kFallbackPeakBytesPerS, d.bw_source = "constant (H100 SXM)";
  }
  if (a.peak_tflops > 0) {
    d.peak_flops = a.peak_tflops * 1e12, d.flops_source = "--peak-tflops";
  } else {
    d.peak_flops = kPeakDenseTensorFlops, d.flops_source = "constant (H100 SXM dense bf16)";
  }
  return d;
}

bool run_sdpa(const Args& a, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              Timing& t, std::string& error) {
  if (a.sdpa == "none") return false;
  auto& ctx = at::globalContext();
  if (a.sdpa != "default" && !a.cpu) {
    const bool cudnn = a.sdpa == "cudnn";
    ctx.setSDPUseCuDNN(cudnn);
    ctx.setSDPUseFlash(!cudnn);
    ctx.setSDPUseMemEfficient(false);
    ctx.setSDPUseMath(false);
  }
  try {
    t = cuda_time(
        [&] {
          (void)at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, /*is_causal=*/true,
                                                 std::nullopt, /*enable_gqa=*/true);
        },
        a.warmup, std::max(3, a.repeats / 2), a.cpu);
    return true;
  } catch (const std::exception& err) {
    error = err.what();
    error = error.substr(0, error.find('\n'));
    return false;
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  const Args a = parse_args(argc, argv);
  if (!a.cpu && !anchor::built_with_cuda()) {
    std::fprintf(stderr, "anchor_bench: this build has no CUDA kernels (-DANCHOR_WITH_CUDA=ON)\n");
    return 1;
  }
  if (!a.cpu && !at::hasCUDA()) {
    std::fprintf(stderr, "anchor_bench: libtorch sees no CUDA device (or libtorch_cuda is not "
                         "loaded)\n");
    return 1;
  }
  anchor::set_check_finite(a.check_finite);  // the scan costs a host sync per op
  const Device dev = query_device(a);
  std::printf("anchor_bench: %s (%d SMs, sm_%d%d); peak HBM %.2f TB/s [%s]; peak tensor %.0f "
              "TFLOP/s [%s]\n",
              dev.name.c_str(), dev.sms, dev.major, dev.minor, dev.peak_bytes_per_s / 1e12,
              dev.bw_source.c_str(), dev.peak_flops / 1e12, dev.flops_source.c_str());
  std::printf("shape: B=%lld Hq=%lld Hkv=%lld N=%lld D=%lld %s; theta=%g block=%lld step=%lld "
              "sink=%lld local=%lld; synthetic inputs made on the device (seed %llu); %d warm-up, median of %d\n",
              (long long)a.batch, (long long)a.q_heads, (long long)a.kv_heads, (long long)a.n,
              (long long)a.head_dim, a.dtype.c_str(), a.theta, (long long)a.block_size,
              (long long)a.step, (long long)a.init_blocks, (long long)a.local_blocks,
              (unsigned long long)a.seed, a.warmup, a.repeats);

  const Inputs in = make_inputs(a);
  const at::Tensor &q = in.q, &k = in.k, &v = in.v;
  const int64_t bs = a.block_size, st = a.step, ib = a.init_blocks, lb = a.local_blocks;
  const std::optional<double> scale = std::nullopt;  // 1/sqrt(D)

  // One untimed pass: outputs for the later stages, and the selection for the counts.
  const at::Tensor anchors = anchor::anchor_op(q, k, bs, st, ib, lb, scale);
  const at::Tensor selection = anchor::identify_op(q, k, anchors, std::nullopt, a.theta, bs, st, ib, lb, scale);
  (void)anchor::sparse_attention_op(q, k, v, selection, bs, st, ib, lb, scale);
  if (!a.cpu) BENCH_CUDA_CHECK(cudaDeviceSynchronize());
  const Work w = count_work(a, selection);
  if (!a.save_selection.empty()) {
    // Raw little-endian int32, C order (B, Hq, groups, ceil(N/32)): e.g. compare the counts
    // with anchor_ext.metrics.computed_pairs on torch.from_file(PATH, size=..., dtype=torch.int32).
    const at::Tensor sel = selection.contiguous().cpu();
    FILE* f = std::fopen(a.save_selection.c_str(), "wb");
    if (f == nullptr || std::fwrite(sel.data_ptr<int32_t>(), 4, sel.numel(), f) != size_t(sel.numel())) {
      std::fprintf(stderr, "anchor_bench: cannot write %s\n", a.save_selection.c_str());
      return 1;
    }
    std::fclose(f);
    std::printf("selection (%lld, %lld, %lld, %lld) int32 written to %s\n", (long long)sel.size(0),
                (long long)sel.size(1), (long long)sel.size(2), (long long)sel.size(3),
                a.save_selection.c_str());
  }

  const Timing t_anchor = cuda_time([&] { (void)anchor::anchor_op(q, k, bs, st, ib, lb, scale); },
                                    a.warmup, a.repeats, a.cpu);
  const Timing t_identify = cuda_time(
      [&] { (void)anchor::identify_op(q, k, anchors, std::nullopt, a.theta, bs, st, ib, lb, scale); }, a.warmup,
      a.repeats, a.cpu);
  const Timing t_attn = cuda_time(
      [&] { (void)anchor::sparse_attention_op(q, k, v, selection, bs, st, ib, lb, scale); },
      a.warmup, a.repeats, a.cpu);
  const Timing t_prefill = cuda_time(
      [&] { (void)anchor::prefill_op(q, k, v, a.theta, bs, st, ib, lb, scale); }, a.warmup,
      a.repeats, a.cpu);
  // Work and bytes.
  const double d = double(a.head_dim), elem = 2.0;
  const double pairs = w.always_pairs + w.stripe_pairs;
  const double q_bytes = double(a.batch * a.q_heads) * a.n * d * elem;
  const double k_bytes = double(a.batch * a.kv_heads) * a.n * d * elem;
  const double mask_bytes = double(selection.numel()) * 4.0;
  const double id_compulsory = k_bytes + q_bytes + mask_bytes;
  const double id_streamed = double(a.batch * a.kv_heads) * w.middle_keys * d * elem + q_bytes + mask_bytes;
  auto rate = [](double amount, const Timing& t) { return amount / (t.median_ms * 1e-3); };
  const double anchor_flops = rate(2 * d * w.always_pairs, t_anchor);
  const double attn_flops = rate(4 * d * pairs, t_attn);
  const double prefill_flops = rate(4 * d * pairs, t_prefill);
  const double sparsity = 1.0 - pairs / w.causal_pairs;

  std::printf("selection: %.4g computed pairs of %.4g causal (sparsity %.3f); always %.4g, "
              "stripes %.4g; %.3f%% of middle-region keys selected (mean over groups)\n",
              pairs, w.causal_pairs, sparsity, w.always_pairs, w.stripe_pairs,
              w.middle_keys > 0 ? 100.0 * w.selected_keys / (w.middle_keys * a.batch * a.q_heads) : 0.0);
  std::printf("%-18s %10s %10s   %s\n", "stage", "median ms", "min ms", "throughput");
  std::printf("%-18s %10.3f %10.3f   %.1f TFLOP/s QK^T on always-computed pairs (%.1f%% of peak)\n",
              "anchor", t_anchor.median_ms, t_anchor.min_ms, anchor_flops / 1e12,
              100 * anchor_flops / dev.peak_flops);
  std::printf("%-18s %10.3f %10.3f   %.0f GB/s compulsory (%.1f%% of HBM peak), %.0f GB/s "
              "streamed (%.1f%%)\n",
              "identify", t_identify.median_ms, t_identify.min_ms,
              rate(id_compulsory, t_identify) / 1e9,
              100 * rate(id_compulsory, t_identify) / dev.peak_bytes_per_s,
              rate(id_streamed, t_identify) / 1e9,
              100 * rate(id_streamed, t_identify) / dev.peak_bytes_per_s);
  std::printf("%-18s %10.3f %10.3f   %.1f TFLOP/s on computed pairs (%.1f%% of peak)\n",
              "sparse_attention", t_attn.median_ms, t_attn.min_ms, attn_flops / 1e12,
              100 * attn_flops / dev.peak_flops);
  std::printf("%-18s %10.3f %10.3f   %.1f TFLOP/s on computed pairs (%.1f%% of peak)\n", "prefill",
              t_prefill.median_ms, t_prefill.min_ms, prefill_flops / 1e12,
              100 * prefill_flops / dev.peak_flops);
  auto write_json = [&](bool have_sdpa, const Timing& t_sdpa, double sdpa_flops) -> bool {
    if (a.json.empty()) return true;
    FILE* f = std::fopen(a.json.c_str(), "w");
    if (f == nullptr) {
      std::fprintf(stderr, "anchor_bench: cannot write %s\n", a.json.c_str());
      return false;
    }
    auto stage = [&](const char* name, const Timing& t, const char* tail) {
      std::fprintf(f, "  \"%s\": {\"median_ms\": %.6f, \"min_ms\": %.6f%s}", name, t.median_ms,
                   t.min_ms, tail);
    };
    char extra[256];
    std::fprintf(f, "{\n \"device\": \"%s\", \"sms\": %d, \"peak_bytes_per_s\": %.6g, "
                    "\"peak_bytes_source\": \"%s\", \"peak_flops\": %.6g, \"peak_flops_source\": \"%s\",\n",
                 dev.name.c_str(), dev.sms, dev.peak_bytes_per_s, dev.bw_source.c_str(),
                 dev.peak_flops, dev.flops_source.c_str());
    std::fprintf(f, " \"shape\": {\"batch\": %lld, \"q_heads\": %lld, \"kv_heads\": %lld, \"n\": %lld, "
                    "\"head_dim\": %lld, \"dtype\": \"%s\"}, \"theta\": %g, \"step\": %lld, "
                    "\"inputs\": \"anchor_bench synthetic (seed %llu)\", \"repeats\": %d,\n",
                 (long long)a.batch, (long long)a.q_heads, (long long)a.kv_heads, (long long)a.n,
                 (long long)a.head_dim, a.dtype.c_str(), a.theta, (long long)a.step,
                 (unsigned long long)a.seed, a.repeats);
    std::fprintf(f, " \"computed_pairs\": %.15g, \"always_pairs\": %.15g, \"causal_pairs\": %.15g, "
                    "\"sparsity\": %.6f,\n \"stages\": {\n",
                 pairs, w.always_pairs, w.causal_pairs, sparsity);
    std::snprintf(extra, sizeof extra, ", \"tflops_always_qk\": %.3f", anchor_flops / 1e12);
    stage("anchor", t_anchor, extra);
    std::fprintf(f, ",\n");
    std::snprintf(extra, sizeof extra,
                  ", \"bytes_compulsory\": %.6g, \"gbps_compulsory\": %.3f, \"bytes_streamed\": "
                  "%.6g, \"gbps_streamed\": %.3f",
                  id_compulsory, rate(id_compulsory, t_identify) / 1e9, id_streamed,
                  rate(id_streamed, t_identify) / 1e9);
    stage("identify", t_identify, extra);
    std::fprintf(f, ",\n");
    std::snprintf(extra, sizeof extra, ", \"tflops\": %.3f", attn_flops / 1e12);
    stage("sparse_attention", t_attn, extra);
    std::fprintf(f, ",\n");
    std::snprintf(extra, sizeof extra, ", \"tflops\": %.3f", prefill_flops / 1e12);
    stage("prefill", t_prefill, extra);
    if (have_sdpa) {
      std::fprintf(f, ",\n");
      std::snprintf(extra, sizeof extra, ", \"tflops_dense\": %.3f", sdpa_flops / 1e12);
      stage(("sdpa_" + a.sdpa).c_str(), t_sdpa, extra);
    }
    std::fprintf(f, "\n }\n}\n");
    std::fclose(f);
    std::printf("wrote %s\n", a.json.c_str());
    return true;
  };
  // Written before SDPA runs too, so a failure there loses nothing.
  if (!write_json(false, Timing{}, 0)) return 1;
  if (a.sdpa == "none") return 0;

  Timing t_sdpa;
  std::string sdpa_error;
  const bool have_sdpa = run_sdpa(a, q, k, v, t_sdpa, sdpa_error);
  const double sdpa_flops = have_sdpa ? rate(4 * d * w.causal_pairs, t_sdpa) : 0;
  if (have_sdpa) {
    std::printf("%-18s %10.3f %10.3f   %.1f TFLOP/s dense causal (%.1f%% of peak); prefill "
                "speedup %.2fx\n",
                ("sdpa_" + a.sdpa).c_str(), t_sdpa.median_ms, t_sdpa.min_ms, sdpa_flops / 1e12,
                100 * sdpa_flops / dev.peak_flops, t_sdpa.median_ms / t_prefill.median_ms);
  } else if (a.sdpa != "none") {
    std::printf("%-18s unavailable: %s\n", ("sdpa_" + a.sdpa).c_str(), sdpa_error.c_str());
  }

  if (have_sdpa && !write_json(true, t_sdpa, sdpa_flops)) return 1;
  return 0;
}
