// The key list of one query block, produced tile by tile by one warp.
//
// Rows [r0, r1) of group g attend to, in increasing key order:
//   1. the sink keys        [0, min(sink_end, r1))
//   2. the selected stripes  bits of the group's bitmask inside [sink_end, middle_end(g))
//   3. the local keys        [local_start(g), r1)
// When the sink and local ranges touch there is no middle region and the list is
// simply [0, r1). KeyListMode picks the parts: all three (stage 3), the
// always-computed parts 1 and 3 (stage 1, prefill's first pass), or the stripes
// alone (prefill's second pass).
//
// Each call of next_tile() fills kSlots key positions (ascending; -1 marks an
// empty slot). Stripes are compacted straight from the bitmask: each lane takes
// one 32-bit word, a warp prefix sum of the popcounts gives every lane its
// output offset, and words are taken while they fit in the tile (a word that
// does not fit closes the tile early, so no word is ever split). The next 32
// words are loaded before next_tile() returns, so their latency overlaps the
// gathers of the tile just produced instead of delaying the next key list.
#pragma once

#include <cstdint>

#include "../../geometry.h"

namespace anchor::cuda::attention {

enum class KeyListMode : int { kAll, kAlwaysComputed, kStripesOnly };

template <int kSlots>
struct KeyListProducer {
  enum Segment : int { kSink = 0, kStripes = 1, kLocal = 2, kDone = 3 };

  int segment;
  int64_t next;              // next key (sink, local) or next bitmask word (stripes)
  int64_t sink_end, stripe_word_end, local_start, rows_end;
  const uint32_t* words;     // the group's bitmask, or null for stage 1
  uint32_t window = 0;       // lane l holds word next + l while segment == kStripes

  // group_words: the group's bitmask (ignored for kAlwaysComputed).
  __device__ KeyListProducer(const Geometry& geo, int64_t r0, int64_t r1, const uint32_t* group_words,
                             KeyListMode mode) {
    const int64_t group = r0 / geo.group_rows();
    rows_end = r1;
    local_start = geo.local_start(group);
    sink_end = geo.sink_end() < r1 ? geo.sink_end() : r1;
    words = mode == KeyListMode::kAlwaysComputed ? nullptr : group_words;
    const int64_t middle_end = geo.middle_end(group);
    if (local_start <= sink_end) {  // no middle region: one dense range [0, r1)
      sink_end = r1;
      local_start = r1;
      stripe_word_end = 0;
    } else {
      stripe_word_end = (words != nullptr && middle_end > geo.sink_end()) ? middle_end / 32 : 0;
    }
    segment = kSink;
    next = 0;
    if (mode == KeyListMode::kStripesOnly) {
      // Skip the sink (advance() starts the stripes at the real sink_end) and leave
      // an empty local range, so the walk stops after the stripes.
      local_start = rows_end;
      advance();
    }
  }

  // Fills `slots` (kSlots entries). Returns the number of keys placed; all lanes
  // of the calling warp must call it and get the same result.
  __device__ int next_tile(int* slots) {
    const int lane = threadIdx.x % 32;
    int filled = 0;
    while (filled < kSlots && segment != kDone) {
      if (segment == kSink || segment == kLocal) {
        const int64_t end = segment == kSink ? sink_end : rows_end;
        const int64_t left = end - next;
        const int take = left < kSlots - filled ? int(left) : kSlots - filled;
        for (int i = lane; i < take; i += 32) slots[filled + i] = int(next + i);
        filled += take;
        next += take;
        if (next >= end) advance();
      } else {  // kStripes: compact the set bits of the next words
        const int64_t word = next + lane;
        uint32_t bits = window;
        const int count = __popc(bits);
        int inclusive = count;
#pragma unroll
        for (int offset = 1; offset < 32; offset *= 2) {
          const int other = __shfl_up_sync(~0u, inclusive, offset);
          if (lane >= offset) inclusive += other;
        }
        const bool fits = inclusive <= kSlots - filled;  // prefix sums grow, so fitting lanes form a prefix
        const int lanes_taken = __popc(__ballot_sync(~0u, fits));
        if (fits) {
          int out = filled + inclusive - count;
          while (bits != 0u) {
            slots[out++] = int(word * 32 + __ffs(bits) - 1);
            bits &= bits - 1;
          }
        }
        filled += lanes_taken > 0 ? __shfl_sync(~0u, inclusive, lanes_taken - 1) : 0;
        next += lanes_taken;
        // Slide the window: keep the words not taken, load the ones after them.
        const uint32_t kept = __shfl_down_sync(~0u, window, lanes_taken & 31);
        window = (lanes_taken < 32 && lane + lanes_taken < 32) ? kept : load_word(next + lane);
        if (next >= stripe_word_end) {
          advance();
        } else if (lanes_taken < 32) {
          break;  // the next word does not fit: close this tile
        }
      }
    }
    for (int i = filled + lane; i < kSlots; i += 32) slots[i] = -1;
    __syncwarp();
    return filled;
  }

 private:
  __device__ uint32_t load_word(int64_t w) const { return w < stripe_word_end ? words[w] : 0u; }

  __device__ void advance() {
    if (segment == kSink) {
      segment = kStripes;
      next = sink_end / 32;  // the middle region starts at sink_end (a multiple of 128)
      window = load_word(next + threadIdx.x % 32);
      if (next >= stripe_word_end) advance();
    } else if (segment == kStripes) {
      segment = local_start < rows_end ? kLocal : kDone;
      next = local_start;
    } else {
      segment = kDone;
    }
  }
};

}  // namespace anchor::cuda::attention
