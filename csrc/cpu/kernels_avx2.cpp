// The CPU kernels (kernels.inc) compiled for avx2; log_prob_cpu.cpp picks it at run time
// when the processor has it.  x86-64 only.
#if defined(__x86_64__)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "problem.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2")
#define FGD_NS avx2
#define FGD_VBYTES 32
#include "kernels.inc"
#undef FGD_NS
#undef FGD_VBYTES
#pragma GCC pop_options
#endif
