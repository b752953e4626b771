// Batched launchers of the Jacobi solvers (jacobi.h), on raw addresses and element strides so
// that callers can hand over any tensor's storage without this library knowing about torch.
#pragma once

#include <cstdint>
#include <string>

namespace prolora {

enum class DType { f32, f64 };

// Address and strides (in elements) of a batch of matrices: element (b, r, c) is at
// ptr + b * sb + r * sr + c * sc.
struct MatArg {
  std::uintptr_t ptr;
  int64_t sb, sr, sc;
};

// Address and strides of a batch of vectors: element (b, i) is at ptr + b * sb + i * si.
struct VecArg {
  std::uintptr_t ptr;
  int64_t sb, si;
};

// A batch of thin SVDs a = u diag(s) v^T: a (batch, m, n), u (batch, m, k), s (batch, k),
// v (batch, n, k), k = min(m, n).
struct SvdBatch {
  MatArg a, u, v;
  VecArg s;
  int64_t batch;
  int m, n;
  int max_sweeps;
  double tol;          // <= 0: the default of jacobi.h
  std::uintptr_t info; // int32 per problem (sweeps used, -1 if not converged), or 0
};

// A batch of symmetric eigendecompositions a = v diag(w) v^T: a, v (batch, n, n), w (batch, n).
struct EighBatch {
  MatArg a, v;
  VecArg w;
  int64_t batch;
  int n;
  int max_sweeps;
  double tol;
  std::uintptr_t info;
};

// CPU: problems spread over `threads` std::threads (<= 0: hardware concurrency).
void svd_jacobi_cpu(const SvdBatch& job, DType dtype, int threads);
void eigh_jacobi_cpu(const EighBatch& job, DType dtype, int threads);

#ifdef PROLORA_WITH_CUDA
// CUDA: one thread block per problem, enqueued on `stream` (a cudaStream_t) of the current
// device; returns without waiting. The working copy of a problem lives in shared memory when
// it fits, else in a global workspace of *_cuda_workspace_elems() elements per problem that
// the caller allocates on the device and passes as `work` (0 when that count is 0).
// Empty when the CUDA runtime sees a device, else why not (an old driver, no device, ...).
std::string cuda_status();
int64_t svd_cuda_workspace_elems(int m, int n, DType dtype);
int64_t eigh_cuda_workspace_elems(int n, DType dtype);
void svd_jacobi_cuda(const SvdBatch& job, DType dtype, std::uintptr_t work, std::uintptr_t stream);
void eigh_jacobi_cuda(const EighBatch& job, DType dtype, std::uintptr_t work,
                      std::uintptr_t stream);
#endif

}  // namespace prolora
