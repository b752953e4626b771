// CUDA launchers: one thread block per problem, running the shared math of jacobi.h on a
// BlockTeam whose groups are warps (a warp rotates one column pair at a time; the pairs of a
// round are spread over the warps). The working copy lives in dynamic shared memory when it
// fits the device's opt-in limit, else in a caller-provided global workspace.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <stdexcept>
#include <string>

#include "jacobi.h"
#include "launch.h"

namespace prolora {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
constexpr int kMaxWarps = 16;

// A thread block as a team (see team.h); blockDim.x must be a multiple of 32.
struct BlockTeam {
  __device__ int rank() const { return int(threadIdx.x); }
  __device__ int size() const { return int(blockDim.x); }
  __device__ int group() const { return int(threadIdx.x) / kWarp; }
  __device__ int groups() const { return int(blockDim.x) / kWarp; }
  __device__ int lane() const { return int(threadIdx.x) % kWarp; }
  __device__ static constexpr int width() { return kWarp; }

  // Butterfly sum, then lane 0's value to all: the lanes' partial orders round differently,
  // and every lane must take the same decisions.
  template <class T>
  __device__ T group_sum(T x) const {
    for (int off = kWarp / 2; off > 0; off /= 2) x += __shfl_xor_sync(kFullMask, x, off);
    return __shfl_sync(kFullMask, x, 0);
  }
  __device__ void group_sync() const { __syncwarp(); }
  __device__ void sync() const { __syncthreads(); }
  __device__ bool block_any(bool b) const { return __syncthreads_or(b) != 0; }

  template <class T>
  __device__ T block_max(T x) const {
    __shared__ T partial[kMaxWarps];
    for (int off = kWarp / 2; off > 0; off /= 2) x = hd_max(x, __shfl_xor_sync(kFullMask, x, off));
    if (lane() == 0) partial[group()] = x;
    __syncthreads();
    T m = partial[0];
    for (int g = 1; g < groups(); ++g) m = hd_max(m, partial[g]);
    __syncthreads();  // partial may be reused
    return m;
  }
};

// Dynamic shared memory, aligned for double.
extern __shared__ __align__(16) unsigned char g_smem[];

template <class T>
__device__ View<T> view(const MatArg& x, int64_t b) {
  return View<T>{reinterpret_cast<T*>(x.ptr) + b * x.sb, x.sr, x.sc};
}

template <class T>
__device__ T* problem_work(T* global_work, int64_t b, int64_t elems) {
  return global_work ? global_work + b * elems : reinterpret_cast<T*>(g_smem);
}

template <class T>
__global__ void svd_kernel(SvdBatch job, T* global_work, int64_t offset) {
  const int64_t b = offset + blockIdx.x;
  T* work = problem_work(global_work, b, svd_work_elems(job.m, job.n));
  const int sweeps = svd_jacobi(BlockTeam{}, view<const T>(job.a, b), job.m, job.n,
                                view<T>(job.u, b), reinterpret_cast<T*>(job.s.ptr) + b * job.s.sb,
                                job.s.si, view<T>(job.v, b), work, job.max_sweeps, T(job.tol));
  if (job.info && threadIdx.x == 0) reinterpret_cast<int32_t*>(job.info)[b] = sweeps;
}

template <class T>
__global__ void eigh_kernel(EighBatch job, T* global_work, int64_t offset) {
  const int64_t b = offset + blockIdx.x;
  T* work = problem_work(global_work, b, eigh_work_elems(job.n));
  const int sweeps = eigh_jacobi(BlockTeam{}, view<const T>(job.a, b), job.n,
                                 reinterpret_cast<T*>(job.w.ptr) + b * job.w.sb, job.w.si,
                                 view<T>(job.v, b), work, job.max_sweeps, T(job.tol));
  if (job.info && threadIdx.x == 0) reinterpret_cast<int32_t*>(job.info)[b] = sweeps;
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("prolora CUDA: ") + what + ": " + cudaGetErrorString(err));
}

// Whether `bytes` of dynamic shared memory fit beside the kernel's static shared memory.
bool fits_shared(const void* kernel, int64_t bytes) {
  int device = 0, optin = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
        "cudaDeviceGetAttribute");
  cudaFuncAttributes attr{};
  check(cudaFuncGetAttributes(&attr, kernel), "cudaFuncGetAttributes");
  return bytes + int64_t(attr.sharedSizeBytes) <= int64_t(optin);
}

// Warps per block: enough to rotate the pairs of a round about two at a time per warp.
int block_threads(int cols) { return kWarp * std::clamp(cols / 4, 1, kMaxWarps); }

// Launches kernel<<<batch, threads, smem, stream>>> in chunks of at most INT_MAX blocks,
// with the problem's working copy in shared memory when work == nullptr.
template <class T, class Job>
void launch(void (*kernel)(Job, T*, int64_t), const Job& job, int64_t batch, int64_t elems,
            int threads, T* work, std::uintptr_t stream) {
  if (batch == 0) return;
  const int64_t smem = work ? 0 : elems * int64_t(sizeof(T));
  if (!work && !fits_shared(reinterpret_cast<const void*>(kernel), smem))
    throw std::invalid_argument("prolora CUDA: a global workspace is required for this size");
  check(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                             cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
        "cudaFuncSetAttribute");
  for (int64_t offset = 0; offset < batch; offset += INT_MAX) {
    const unsigned blocks = unsigned(std::min<int64_t>(batch - offset, INT_MAX));
    kernel<<<blocks, threads, size_t(smem), reinterpret_cast<cudaStream_t>(stream)>>>(job, work,
                                                                                     offset);
    check(cudaGetLastError(), "kernel launch");
  }
}

template <class T>
int64_t svd_global_elems(int m, int n) {
  const int64_t elems = svd_work_elems(m, n);
  return fits_shared(reinterpret_cast<const void*>(svd_kernel<T>), elems * int64_t(sizeof(T)))
             ? 0
             : elems;
}

template <class T>
int64_t eigh_global_elems(int n) {
  const int64_t elems = eigh_work_elems(n);
  return fits_shared(reinterpret_cast<const void*>(eigh_kernel<T>), elems * int64_t(sizeof(T)))
             ? 0
             : elems;
}

template <class T>
void svd_cuda(const SvdBatch& job, std::uintptr_t work, std::uintptr_t stream) {
  if (job.m == 0 || job.n == 0) return;
  launch(svd_kernel<T>, job, job.batch, svd_work_elems(job.m, job.n),
         block_threads(std::min(job.m, job.n)), reinterpret_cast<T*>(work), stream);
}

template <class T>
void eigh_cuda(const EighBatch& job, std::uintptr_t work, std::uintptr_t stream) {
  if (job.n == 0) return;
  launch(eigh_kernel<T>, job, job.batch, eigh_work_elems(job.n), block_threads(job.n),
         reinterpret_cast<T*>(work), stream);
}

}  // namespace

std::string cuda_status() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  return count > 0 ? "" : "no CUDA device";
}

int64_t svd_cuda_workspace_elems(int m, int n, DType dtype) {
  return dtype == DType::f32 ? svd_global_elems<float>(m, n) : svd_global_elems<double>(m, n);
}

int64_t eigh_cuda_workspace_elems(int n, DType dtype) {
  return dtype == DType::f32 ? eigh_global_elems<float>(n) : eigh_global_elems<double>(n);
}

void svd_jacobi_cuda(const SvdBatch& job, DType dtype, std::uintptr_t work, std::uintptr_t stream) {
  if (dtype == DType::f32)
    svd_cuda<float>(job, work, stream);
  else
    svd_cuda<double>(job, work, stream);
}

void eigh_jacobi_cuda(const EighBatch& job, DType dtype, std::uintptr_t work,
                      std::uintptr_t stream) {
  if (dtype == DType::f32)
    eigh_cuda<float>(job, work, stream);
  else
    eigh_cuda<double>(job, work, stream);
}

}  // namespace prolora
