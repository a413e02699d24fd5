// CPU path of the three stages (see stages_cpu.h). Each task owns one
// (batch, q head, query block) or (batch, q head, group) and works on fp32
// copies of small tiles: the query block and a chunk of at most kKeyChunk
// gathered keys. Small matrix products go through at::mm (BLAS).
#include "stages_cpu.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <limits>
#include <vector>

namespace anchor::cpu {
namespace {

constexpr int64_t kKeyChunk = 512;      // keys per score tile in stages 1 and 3
constexpr int64_t kIdentifyChunk = 4096;  // keys per tile in stage 2 (only `step` query rows)

struct Task {
  int64_t batch, head, unit;  // unit: query block (stages 1, 3) or group (stage 2)
};

Task split_task(int64_t task, int64_t heads, int64_t units) {
  return {task / (heads * units), (task / units) % heads, task % units};
}

int64_t kv_head_of(int64_t q_head, int64_t q_heads, int64_t kv_heads) {
  return q_head / (q_heads / kv_heads);
}

// Sorted key positions that query rows [r0, r1) of `group` attend to: the sink,
// the group's selected middle keys (from `selection_words`, may be null) and the
// local keys up to r1 - 1. Causality inside the list is the caller's mask.
std::vector<int64_t> block_keys(int64_t r0, int64_t r1, int64_t group, const Geometry& geo,
                                const uint32_t* selection_words) {
  std::vector<int64_t> keys;
  const int64_t sink_hi = std::min<int64_t>(geo.sink_end(), r1);
  const int64_t local_lo = geo.local_start(group);
  if (local_lo <= sink_hi) {  // sink and local ranges touch: one range, no middle region
    keys.reserve(r1);
    for (int64_t j = 0; j < r1; ++j) keys.push_back(j);
    return keys;
  }
  keys.reserve(sink_hi + (r1 - local_lo));
  for (int64_t j = 0; j < sink_hi; ++j) keys.push_back(j);
  if (selection_words != nullptr) {
    const int64_t m0 = geo.sink_end(), m1 = geo.middle_end(group);
    for (int64_t w = m0 / 32; w * 32 < m1; ++w) {
      uint32_t bits = selection_words[w];
      while (bits != 0) {
        const int64_t j = w * 32 + __builtin_ctz(bits);
        bits &= bits - 1;
        if (j >= m0 && j < m1) keys.push_back(j);
      }
    }
  }
  for (int64_t j = local_lo; j < r1; ++j) keys.push_back(j);
  return keys;
}

// fp32 scores of `q_block` (rows r0.., R x D) against keys[c0, c1) of `k_head`,
// scaled, with -inf where a key lies after the row (causal).
at::Tensor score_tile(const at::Tensor& q_block, const at::Tensor& k_head,
                      const at::Tensor& key_index, int64_t r0, float scale,
                      at::Tensor* k_tile_out = nullptr) {
  at::Tensor k_tile = k_head.index_select(0, key_index).to(at::kFloat);
  at::Tensor scores = at::mm(q_block, k_tile.t()).mul_(scale);
  const int64_t last_key = key_index[-1].item<int64_t>();
  if (last_key > r0) {  // only tiles reaching the diagonal need the causal mask
    const at::Tensor rows = at::arange(r0, r0 + q_block.size(0), key_index.options());
    scores.masked_fill_(key_index.unsqueeze(0) > rows.unsqueeze(1),
                        -std::numeric_limits<float>::infinity());
  }
  if (k_tile_out != nullptr) *k_tile_out = std::move(k_tile);
  return scores;
}

}  // namespace

at::Tensor anchor(const at::Tensor& q, const at::Tensor& k, const Geometry& geo) {
  const int64_t batch = q.size(0), q_heads = q.size(1), n = q.size(2), kv_heads = k.size(1);
  const int64_t q_blocks = geo.num_q_blocks(n);
  at::Tensor result = at::empty({batch, q_heads, n}, q.options().dtype(at::kFloat));
  at::parallel_for(0, batch * q_heads * q_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Task task = split_task(t, q_heads, q_blocks);
      const int64_t r0 = task.unit * geo.block_size, r1 = std::min(n, r0 + geo.block_size);
      const at::Tensor q_block = q[task.batch][task.head].slice(0, r0, r1).to(at::kFloat);
      const at::Tensor k_head = k[task.batch][kv_head_of(task.head, q_heads, kv_heads)];
      const std::vector<int64_t> keys = block_keys(r0, r1, r0 / geo.group_rows(), geo, nullptr);
      const at::Tensor key_index = at::tensor(keys, at::kLong);
      at::Tensor row_max = at::full({r1 - r0}, -std::numeric_limits<float>::infinity(), at::kFloat);
      for (int64_t c0 = 0; c0 < int64_t(keys.size()); c0 += kKeyChunk) {
        const at::Tensor chunk = key_index.slice(0, c0, std::min<int64_t>(keys.size(), c0 + kKeyChunk));
        row_max = at::maximum(row_max, std::get<0>(score_tile(q_block, k_head, chunk, r0, geo.sm_scale).max(1)));
      }
      result[task.batch][task.head].slice(0, r0, r1).copy_(row_max);
    }
  });
  return result;
}

at::Tensor identify(const at::Tensor& q, const at::Tensor& k, const at::Tensor& anchor_scores,
                    double theta, const at::Tensor& head_theta, int vote_rows, const Geometry& geo) {
  const int64_t batch = q.size(0), q_heads = q.size(1), n = q.size(2), kv_heads = k.size(1);
  const int64_t groups = geo.num_groups(n), words = selection_words(n);
  const int64_t units_per_group = geo.group_rows() / vote_rows;
  const at::Tensor thetas = head_theta.defined() ? head_theta.contiguous() : at::Tensor();
  const float* theta_of_head = thetas.defined() ? thetas.data_ptr<float>() : nullptr;
  at::Tensor selection = at::zeros({batch, q_heads, groups, words}, q.options().dtype(at::kInt));
  auto* selection_data = reinterpret_cast<uint32_t*>(selection.data_ptr<int32_t>());
  at::parallel_for(0, batch * q_heads * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Task task = split_task(t, q_heads, groups);
      const int64_t m0 = geo.sink_end(), m1 = geo.middle_end(task.unit);
      if (m1 <= m0) continue;  // no middle region: nothing to select
      // Mean queries and anchors of the group's vote units (vote_rows rows each).
      const int64_t first_row = geo.group_start(task.unit);
      const int64_t units = std::min(units_per_group, (n - first_row + vote_rows - 1) / vote_rows);
      at::Tensor q_mean = at::empty({units, q.size(3)}, at::kFloat);
      at::Tensor anchor_mean = at::empty({units, 1}, at::kFloat);
      for (int64_t u = 0; u < units; ++u) {
        const int64_t r0 = first_row + u * vote_rows, r1 = std::min(n, r0 + vote_rows);
        at::Tensor mean = q[task.batch][task.head].slice(0, r0, r1).to(at::kFloat).mean(0);
        // Sub-block units use their mean rounded to the input dtype (the reference's rule).
        if (vote_rows < geo.block_size) mean = mean.to(q.scalar_type()).to(at::kFloat);
        q_mean[u].copy_(mean);
        anchor_mean[u].copy_(anchor_scores[task.batch][task.head].slice(0, r0, r1).mean());
      }
      const double group_theta =
          theta_of_head != nullptr ? double(theta_of_head[task.batch * q_heads + task.head]) : theta;
      const at::Tensor k_head = k[task.batch][kv_head_of(task.head, q_heads, kv_heads)];
      uint32_t* group_words = selection_data + t * words;
      for (int64_t c0 = m0; c0 < m1; c0 += kIdentifyChunk) {
        const int64_t c1 = std::min(m1, c0 + kIdentifyChunk);
        const at::Tensor scores = at::mm(q_mean, k_head.slice(0, c0, c1).to(at::kFloat).t()).mul_(geo.sm_scale);
        // A unit votes for key j when mean anchor - score < theta; the group takes the union.
        const at::Tensor votes = (anchor_mean - scores).lt(group_theta).any(0).contiguous();
        const bool* vote = votes.data_ptr<bool>();
        for (int64_t j = c0; j < c1; ++j) {
          if (vote[j - c0]) group_words[j >> 5] |= 1u << (j & 31);
        }
      }
    }
  });
  return selection;
}

std::tuple<at::Tensor, at::Tensor> sparse_attention(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v,
                                                    const at::Tensor& selection,
                                                    const Geometry& geo) {
  const int64_t batch = q.size(0), q_heads = q.size(1), n = q.size(2), kv_heads = k.size(1);
  const int64_t q_blocks = geo.num_q_blocks(n);
  const at::Tensor selection_c = selection.contiguous();
  const auto* selection_data = reinterpret_cast<const uint32_t*>(selection_c.data_ptr<int32_t>());
  const int64_t groups = selection_c.size(2), words = selection_c.size(3);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({batch, q_heads, n}, q.options().dtype(at::kFloat));
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, batch * q_heads * q_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const Task task = split_task(t, q_heads, q_blocks);
      const int64_t r0 = task.unit * geo.block_size, r1 = std::min(n, r0 + geo.block_size);
      const int64_t group = r0 / geo.group_rows();
      const int64_t kv_head = kv_head_of(task.head, q_heads, kv_heads);
      const uint32_t* group_words = selection_data + ((task.batch * q_heads + task.head) * groups + group) * words;
      const at::Tensor q_block = q[task.batch][task.head].slice(0, r0, r1).to(at::kFloat);
      const at::Tensor k_head = k[task.batch][kv_head], v_head = v[task.batch][kv_head];
      const std::vector<int64_t> keys = block_keys(r0, r1, group, geo, group_words);
      const at::Tensor key_index = at::tensor(keys, at::kLong);

      // Online softmax over key tiles: running max, running sum, fp32 accumulator.
      at::Tensor row_max = at::full({r1 - r0}, kNegInf, at::kFloat);
      at::Tensor row_sum = at::zeros({r1 - r0}, at::kFloat);
      at::Tensor acc = at::zeros({r1 - r0, q.size(3)}, at::kFloat);
      for (int64_t c0 = 0; c0 < int64_t(keys.size()); c0 += kKeyChunk) {
        const at::Tensor chunk = key_index.slice(0, c0, std::min<int64_t>(keys.size(), c0 + kKeyChunk));
        const at::Tensor scores = score_tile(q_block, k_head, chunk, r0, geo.sm_scale);
        const at::Tensor new_max = at::maximum(row_max, std::get<0>(scores.max(1)));
        // Rows with every key masked so far keep max -inf; shift by 0 there to avoid inf - inf.
        const at::Tensor shift = new_max.masked_fill(new_max == kNegInf, 0.f);
        const at::Tensor rescale = at::exp(row_max - shift);
        const at::Tensor probs = at::exp(scores - shift.unsqueeze(1));
        row_sum = row_sum * rescale + probs.sum(1);
        acc = acc * rescale.unsqueeze(1) + at::mm(probs, v_head.index_select(0, chunk).to(at::kFloat));
        row_max = new_max;
      }
      // Every row sees at least its own key (the diagonal is always computed), so row_sum > 0.
      out[task.batch][task.head].slice(0, r0, r1).copy_(acc / row_sum.unsqueeze(1));
      lse[task.batch][task.head].slice(0, r0, r1).copy_(row_max + at::log(row_sum));
    }
  });
  return {out, lse};
}

}  // namespace anchor::cpu
