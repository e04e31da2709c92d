/* The FMA issue rate of this CPU, for bench/bench_em.py --floor: every thread runs 12
 * independent chains of 4-double (AVX2) fused multiply-adds, registers only.  Prints the
 * lane-FMAs per second of all threads together.
 *
 *   gcc -O2 -mavx2 -mfma -fopenmp bench/fma_peak.c -o /tmp/fma_peak && OMP_NUM_THREADS=2 /tmp/fma_peak
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>

int main(void) {
  const long iters = 100000000;
  double sink = 0;
  const double t0 = omp_get_wtime();
#pragma omp parallel reduction(+ : sink)
  {
    __m256d a[12];
    const __m256d b = _mm256_set1_pd(1.0000001), c = _mm256_set1_pd(1e-9);
    for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_pd(i);
    for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 12
      for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_pd(a[i], b, c);
    }
    double s = 0, t[4];
    for (int i = 0; i < 12; ++i) {
      _mm256_storeu_pd(t, a[i]);
      s += t[0];
    }
    sink += s;
  }
  const double dt = omp_get_wtime() - t0;
  printf("%.6g %d %g\n", omp_get_max_threads() * iters * 12.0 * 4.0 / dt, omp_get_max_threads(), sink);
  return 0;
}
