// Launch planning of the CUDA kernels (log_prob_cuda.cu), in plain C++: the block sizes, the
// backward's shared memory and the limits of what the kernels take.  Shared with ops.cpp, which
// tells Python (fastgmmdiff._C.cuda_limits) which problems the "cuda" backend cannot run,
// so that backend="auto" passes them to the next backend.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "../ops.h"

namespace fastgmmdiff {
namespace cuda {

constexpr int kMinBlock = 32, kMaxBlock = 256;
constexpr int64_t kMaxGridX = 2147483647;  // blocks in a 1-D grid
constexpr int64_t kMaxD = 65535;           // D (and D·D for full) index as int64 in the kernels, loops as int

// Threads per block for N points of one mixture: the smallest power of two ≥ N in [32, 256].
inline int block_for(int64_t N) {
  int b = kMinBlock;
  while (b < kMaxBlock && b < N) b *= 2;
  return b;
}

// Dynamic shared memory of the backward block: xs [B][D] and, for full, wy [B][D]; w [B]; the
// tile's Σg [1].
inline size_t backward_smem(int cov, int64_t D, size_t elem, int B) {
  return elem * (static_cast<size_t>(B) * static_cast<size_t>(D) * (cov == kFull ? 2 : 1) + B + 1);
}

struct BackwardPlan {
  int block = 0;     // threads per block (0: no block size fits)
  size_t smem = 0;   // bytes of dynamic shared memory at that size (at kMinBlock when none fits)
};

// The largest block ≤ block_for(N) whose shared memory fits in `smem_limit` bytes.
inline BackwardPlan plan_backward(int64_t N, int cov, int64_t D, size_t elem, size_t smem_limit) {
  for (int b = block_for(N); b >= kMinBlock; b /= 2) {
    const size_t s = backward_smem(cov, D, elem, b);
    if (s <= smem_limit) return {b, s};
  }
  return {0, backward_smem(cov, D, elem, kMinBlock)};
}

// The largest block the backward can use for any N (≤ kMaxBlock; 0 when none fits): with more
// points per mixture than this, blocks share a mixture's gradients through atomics.
inline int max_backward_block(int cov, int64_t D, size_t elem, size_t smem_limit) {
  return plan_backward(kMaxBlock, cov, D, elem, smem_limit).block;
}

inline const char* cov_name(int cov) { return cov == kDiag ? "diag" : cov == kSpherical ? "spherical" : "full"; }

// Why the CUDA kernels cannot take this problem ("" when they can): D past kMaxD, or a backward
// block that needs more shared memory than the device allows even at kMinBlock threads.
inline std::string unsupported_reason(int cov, int64_t D, int64_t K, size_t elem, size_t smem_limit) {
  if (D > kMaxD || K > kMaxGridX)
    return "the CUDA kernels take D <= " + std::to_string(kMaxD) + " and K < 2^31 (got D=" + std::to_string(D) +
           ", K=" + std::to_string(K) + ")";
  const BackwardPlan p = plan_backward(1, cov, D, elem, smem_limit);
  if (p.block == 0)
    return "the CUDA backward needs " + std::to_string(p.smem) + " bytes of shared memory per block for " +
           "covariance_type='" + cov_name(cov) + "', D=" + std::to_string(D) + " in float" +
           std::to_string(8 * elem) + " (" + std::to_string(kMinBlock) + " threads); this GPU allows " +
           std::to_string(smem_limit);
  return "";
}

}  // namespace cuda
}  // namespace fastgmmdiff
