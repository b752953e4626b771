// Portability layer for the math that the CPU and CUDA launchers share: the host-device
// qualifier, scalar helpers that exist under the same name on both sides, strided matrix
// views and per-type constants.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PROLORA_HD __host__ __device__
#else
#define PROLORA_HD
#endif

// `#pragma omp simd` lets the host compiler vectorize the reductions (it may reassociate those
// sums and nothing else). It needs -fopenmp-simd, which CMake adds with PROLORA_OMP_SIMD; it is
// meaningless in device code.
#if defined(PROLORA_OMP_SIMD) && !defined(__CUDA_ARCH__)
#define PROLORA_HOST_SIMD 1
#else
#define PROLORA_HOST_SIMD 0
#endif

namespace prolora {

// The C math functions exist on the host and (as CUDA builtins) on the device.
PROLORA_HD inline float hd_sqrt(float x) { return sqrtf(x); }
PROLORA_HD inline double hd_sqrt(double x) { return sqrt(x); }
PROLORA_HD inline float hd_abs(float x) { return fabsf(x); }
PROLORA_HD inline double hd_abs(double x) { return fabs(x); }
PROLORA_HD inline float hd_max(float a, float b) { return fmaxf(a, b); }  // ignores a NaN
PROLORA_HD inline double hd_max(double a, double b) { return fmax(a, b); }
PROLORA_HD inline float hd_frexp(float x, int* e) { return frexpf(x, e); }
PROLORA_HD inline double hd_frexp(double x, int* e) { return frexp(x, e); }
PROLORA_HD inline float hd_ldexp(float x, int e) { return ldexpf(x, e); }
PROLORA_HD inline double hd_ldexp(double x, int e) { return ldexp(x, e); }

template <class T>
PROLORA_HD inline bool hd_isnan(T x) {
  return x != x;
}
template <class T>
PROLORA_HD inline bool hd_isfinite(T x) {
  return !hd_isnan(x - x);  // inf - inf and NaN - NaN are NaN
}

template <class T>
struct Limits;
template <>
struct Limits<float> {
  PROLORA_HD static constexpr float eps() { return FLT_EPSILON; }
  PROLORA_HD static constexpr float min_normal() { return FLT_MIN; }
  // sqrt(FLT_MIN) = 2^-63: a vector norm below it has squares in the subnormal range.
  PROLORA_HD static constexpr float tiny_norm() { return 1.0842021724855044e-19f; }
};
template <>
struct Limits<double> {
  PROLORA_HD static constexpr double eps() { return DBL_EPSILON; }
  PROLORA_HD static constexpr double min_normal() { return DBL_MIN; }
  // sqrt(DBL_MIN) = 2^-511
  PROLORA_HD static constexpr double tiny_norm() { return 1.4916681462400413e-154; }
};

// A strided matrix: element (r, c) at ptr[r * rs + c * cs]; strides in elements, any sign or
// zero (a broadcast input), so any torch layout can be passed as is.
template <class T>
struct View {
  T* ptr;
  int64_t rs;
  int64_t cs;
  PROLORA_HD T& operator()(int64_t r, int64_t c) const { return ptr[r * rs + c * cs]; }
  PROLORA_HD View transposed() const { return View{ptr, cs, rs}; }
};

}  // namespace prolora
