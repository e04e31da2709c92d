// The CUDA source's view of the machine: real CUDA under nvcc, or the CPU emulation of
// emulation.h when FGD_CUDA_EMULATION is defined (tests/test_cuda_emulation.py compiles
// log_prob_cuda.cu as plain C++ that way, so the kernels run, and are checked, on a machine
// without a GPU).  log_prob_cuda.cu names nothing of either world directly:
//
//   FGD_LAUNCH(grid, block, smem, stream, kernel)(args...)   kernel<<<grid, block, smem, stream>>>(args...)
//   FGD_DYNAMIC_SMEM(name)           the block's dynamic shared memory, 16-byte aligned
//   FGD_KERNEL_LAUNCH_CHECK()        raise the launch's error (C10_CUDA_KERNEL_LAUNCH_CHECK)
//   set_max_dynamic_smem(k, bytes)   cudaFuncSetAttribute(MaxDynamicSharedMemorySize); false (and
//                                    no error left behind) when the device refuses
//   smem_optin(device)               the device's opt-in shared memory per block
//   DeviceGuard, current_stream(), on_device(t)
//   dev_exp, dev_log, dev_isfinite, ldg   device math (accurate exp/log: no fast-math intrinsics)
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

#ifdef FGD_CUDA_EMULATION

#include "emulation.h"

#define FGD_CUDA_OPS_NAMESPACE fastgmmdiff_emu
#define FGD_CUDA_DISPATCH_KEY CPU

namespace fastgmmdiff {
namespace cuda {
using DeviceGuard = emu::DeviceGuard;
using Stream = int;
inline Stream current_stream() { return 0; }
inline bool on_device(const at::Tensor& t) { return t.is_cpu(); }
template <typename K>
inline bool set_max_dynamic_smem(K* kernel, size_t bytes) {
  return emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
}
inline size_t smem_optin(int /*device*/) { return emu::kSmemOptin; }
template <typename T>
inline T dev_exp(T x) { return std::exp(x); }
template <typename T>
inline T dev_log(T x) { return std::log(x); }
template <typename T>
inline bool dev_isfinite(T x) { return std::isfinite(x); }
template <typename T>
inline T ldg(const T* p) { return *p; }
}  // namespace cuda
}  // namespace fastgmmdiff

#define FGD_LAUNCH(grid, block, smem, stream, ...) ::fastgmmdiff::emu::Launch(grid, block, smem, &__VA_ARGS__)
#define FGD_DYNAMIC_SMEM(name) unsigned char* name = ::fastgmmdiff::emu::dynamic_smem()
#define FGD_KERNEL_LAUNCH_CHECK() ::fastgmmdiff::emu::launch_check(__FILE__, __LINE__)

#else  // real CUDA

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#define FGD_CUDA_OPS_NAMESPACE fastgmmdiff
#define FGD_CUDA_DISPATCH_KEY CUDA

namespace fastgmmdiff {
namespace cuda {
using DeviceGuard = c10::cuda::CUDAGuard;
using Stream = cudaStream_t;
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }
inline bool on_device(const at::Tensor& t) { return t.is_cuda(); }
template <typename K>
inline bool set_max_dynamic_smem(K* kernel, size_t bytes) {
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)) ==
      cudaSuccess)
    return true;
  (void)cudaGetLastError();  // consume it: the next, unrelated launch check must not see it
  return false;
}
inline size_t smem_optin(int device) {
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 48 * 1024;  // every CUDA device has at least this much
  }
  return static_cast<size_t>(v);
}
template <typename T>
__device__ __forceinline__ T dev_exp(T x) { return exp(x); }
template <typename T>
__device__ __forceinline__ T dev_log(T x) { return log(x); }
template <typename T>
__device__ __forceinline__ bool dev_isfinite(T x) { return isfinite(x); }
template <typename T>
__device__ __forceinline__ T ldg(const T* p) { return __ldg(p); }
}  // namespace cuda
}  // namespace fastgmmdiff

#define FGD_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define FGD_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define FGD_KERNEL_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

#endif
