// Deterministic work split for the CPU backward passes: a fixed number of chunks (not
// threads), each with its own parameter-gradient buffers summed in chunk order afterwards, so
// results are bit-identical from run to run for a given thread count.  When every chunk can
// own whole mixtures (batched x and G >= chunks), chunks write the outputs in place.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace fastgmmdiff {
namespace cpu {

struct ChunkPlan {
  int64_t chunks = 1;
  bool own_mixtures = false;
  int64_t nbuf = 1;
  int64_t items = 0, G = 1;

  // items: work items; per_g: items per mixture when items are g-major (batched x);
  // buf_bytes: bytes of one set of parameter-gradient buffers.
  // work: total element-operations; a chunk gets at least ~2^18 of them.
  ChunkPlan(int64_t items_, int64_t G_, bool shared, int64_t buf_bytes, int64_t work)
      : items(items_), G(G_) {
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    chunks = std::min<int64_t>(threads, std::max<int64_t>(items, 1));
    chunks = std::min<int64_t>(chunks, std::max<int64_t>(1, work >> 18));
    chunks = std::min<int64_t>(chunks, std::max<int64_t>(1, (int64_t{64} << 20) / std::max<int64_t>(1, buf_bytes)));
    own_mixtures = !shared && G >= chunks;
    nbuf = own_mixtures ? 1 : chunks;
  }
  // Item range and buffer index of chunk c.
  void range(int64_t c, int64_t* b, int64_t* e, int64_t* buf) const {
    if (own_mixtures) {
      const int64_t per_g = items / G;
      *b = (c * G / chunks) * per_g;
      *e = ((c + 1) * G / chunks) * per_g;
      *buf = 0;
    } else {
      *b = c * items / chunks;
      *e = (c + 1) * items / chunks;
      *buf = c;
    }
  }
  template <typename F>
  void run(const F& f) const {
    if (chunks == 1) {
      int64_t b, e, buf;
      range(0, &b, &e, &buf);
      f(b, e, buf);
      return;
    }
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t b, e, buf;
        range(c, &b, &e, &buf);
        f(b, e, buf);
      }
    });
  }
};

// Σ over the leading (chunk) axis, in chunk order.
inline at::Tensor fold_chunks(const at::Tensor& t) {
  if (t.size(0) == 1) return t[0];
  at::Tensor s = t[0].clone();
  for (int64_t c = 1; c < t.size(0); ++c) s.add_(t[c]);
  return s;
}

}  // namespace cpu
}  // namespace fastgmmdiff
