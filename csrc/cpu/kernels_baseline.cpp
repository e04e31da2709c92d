// The CPU kernels (kernels.inc) for the compiler's default target (x86-64: SSE2; other
// architectures: their baseline).  Always built; the fallback when no wider ISA is present.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include "problem.h"

#define FGD_NS baseline
#define FGD_VBYTES 16
#include "kernels.inc"
#undef FGD_NS
#undef FGD_VBYTES
