// The CUDA kernels of csrc/cuda/log_prob_cuda.cu compiled as plain C++ against the CPU emulation
// (csrc/cuda/compat.h, emulation.h) and registered as the `fastgmmdiff_emu` ops on the CPU key,
// with the package's schemas: tests/test_cuda_emulation.py builds this file and compares the ops
// with the CPU kernels and the float64 reference.  Also a few probes of the emulation itself
// (launch limits, the shared-memory barrier model, the sticky launch error).
#define FGD_CUDA_EMULATION 1

#include "cuda/log_prob_cuda.cu"  // NOLINT: the kernels and their entry points, emulated

#include <vector>

#include "schemas.h"

namespace {

using fastgmmdiff::emu::stats;

std::vector<int64_t> emu_stats() {
  const auto& s = stats();
  return {s.launches, s.failed_launches, s.blocks, static_cast<int64_t>(s.max_smem)};
}

// cudaGetLastError: the pending launch error (0 none), cleared.
int64_t emu_take_error() { return fastgmmdiff::emu::get_last_error(); }

__global__ void probe_kernel(float* out) {
  FGD_DYNAMIC_SMEM(raw);
  (void)raw;
  if (threadIdx.x == 0 && blockIdx.x == 0) out[0] = 1.0f;
}

// One launch with this configuration (after raising the kernel's dynamic shared memory limit to
// `raise_smem_to` when > 0); returns the error it left (0: it ran), cleared.
int64_t emu_launch_probe(int64_t threads, int64_t grid_x, int64_t grid_y, int64_t smem, int64_t raise_smem_to) {
  at::Tensor out = at::zeros({1});
  fastgmmdiff::emu::smem_limits().erase(reinterpret_cast<const void*>(&probe_kernel));
  if (raise_smem_to > 0 &&
      fastgmmdiff::emu::func_set_max_dynamic_smem(reinterpret_cast<const void*>(&probe_kernel), raise_smem_to) != 0)
    return fastgmmdiff::emu::get_last_error();
  FGD_LAUNCH(dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y)), static_cast<unsigned>(threads),
             static_cast<size_t>(smem), 0, probe_kernel)(out.data_ptr<float>());
  const int64_t e = fastgmmdiff::emu::get_last_error();
  if (e == 0) TORCH_CHECK(out.item<float>() == 1.0f, "the probe kernel did not run");
  return e;
}

__global__ void barrier_probe_kernel(float* out, bool barrier) {
  FGD_DYNAMIC_SMEM(raw);
  float* s = reinterpret_cast<float*>(raw);
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (barrier) __syncthreads();
  if (threadIdx.x == blockDim.x - 1 || threadIdx.x == 0) {  // reads every other thread's value
    float sum = 0;
    for (unsigned i = 0; i < blockDim.x; ++i) sum += s[i];
    out[threadIdx.x == 0 ? 0 : 1] = sum;
  }
}

// Σ of the threads' indices as seen by threads 0 and B−1, with or without the barrier between
// the writes and the reads: without it the emulation must show unwritten (NaN) values.
at::Tensor emu_barrier_probe(int64_t threads, bool barrier) {
  at::Tensor out = at::zeros({2});
  FGD_LAUNCH(1, static_cast<unsigned>(threads), threads * sizeof(float), 0, barrier_probe_kernel)(
      out.data_ptr<float>(), barrier);
  FGD_KERNEL_LAUNCH_CHECK();
  return out;
}

// The grid-size guard of the entry points (an error past 2^31 − 1 blocks).
int64_t emu_grid_blocks(int64_t blocks) { return fastgmmdiff::cuda::grid_blocks(blocks, "probe"); }

}  // namespace

TORCH_LIBRARY(fastgmmdiff_emu, m) {
  fastgmmdiff::define_schemas(m);
  m.def("emu_stats() -> int[]", &emu_stats);
  m.def("emu_take_error() -> int", &emu_take_error);
  m.def("emu_launch_probe(int threads, int grid_x, int grid_y, int smem, int raise_smem_to) -> int",
        &emu_launch_probe);
  m.def("emu_barrier_probe(int threads, bool barrier) -> Tensor", &emu_barrier_probe);
  m.def("emu_grid_blocks(int blocks) -> int", &emu_grid_blocks);
}
