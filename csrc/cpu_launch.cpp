// CPU launchers: a batch of independent problems shared out to std::thread workers. Problems
// are taken one at a time from an atomic counter, since their sweep counts differ; each worker
// owns one workspace for all the problems it takes.
#include <algorithm>
#include <atomic>
#include <system_error>
#include <thread>
#include <vector>

#include "jacobi.h"
#include "launch.h"
#include "team.h"

namespace prolora {
namespace {

// Runs fn(workspace, b) for b in [0, batch) on up to `threads` workers.
template <class T, class Fn>
void parallel_batch(int64_t batch, int threads, int64_t work_elems, Fn fn) {
  if (batch <= 0) return;
  if (threads <= 0) threads = int(std::max(1u, std::thread::hardware_concurrency()));
  const int workers = int(std::min<int64_t>(threads, batch));
  // Allocated here, where a bad_alloc can reach the caller, not inside a worker.
  std::vector<T> work(size_t(workers) * size_t(std::max<int64_t>(work_elems, 1)));
  std::atomic<int64_t> next{0};
  auto worker = [&](int i) {
    T* mine = work.data() + size_t(i) * size_t(std::max<int64_t>(work_elems, 1));
    for (int64_t b = next++; b < batch; b = next++) fn(mine, b);
  };
  std::vector<std::thread> pool;
  pool.reserve(size_t(workers - 1));
  for (int i = 1; i < workers; ++i) {
    try {
      pool.emplace_back(worker, i);
    } catch (const std::system_error&) {  // no more threads: the ones running take the rest
      break;
    }
  }
  worker(0);
  for (auto& t : pool) t.join();
}

template <class T>
View<T> view(const MatArg& x, int64_t b) {
  return View<T>{reinterpret_cast<T*>(x.ptr) + b * x.sb, x.sr, x.sc};
}

template <class T>
void svd_batch(const SvdBatch& job, int threads) {
  parallel_batch<T>(job.batch, threads, svd_work_elems(job.m, job.n), [&](T* work, int64_t b) {
    const int sweeps = svd_jacobi(SerialTeam{}, view<const T>(job.a, b), job.m, job.n,
                                  view<T>(job.u, b), reinterpret_cast<T*>(job.s.ptr) + b * job.s.sb,
                                  job.s.si, view<T>(job.v, b), work, job.max_sweeps, T(job.tol));
    if (job.info) reinterpret_cast<int32_t*>(job.info)[b] = sweeps;
  });
}

template <class T>
void eigh_batch(const EighBatch& job, int threads) {
  parallel_batch<T>(job.batch, threads, eigh_work_elems(job.n), [&](T* work, int64_t b) {
    const int sweeps = eigh_jacobi(SerialTeam{}, view<const T>(job.a, b), job.n,
                                   reinterpret_cast<T*>(job.w.ptr) + b * job.w.sb, job.w.si,
                                   view<T>(job.v, b), work, job.max_sweeps, T(job.tol));
    if (job.info) reinterpret_cast<int32_t*>(job.info)[b] = sweeps;
  });
}

}  // namespace

void svd_jacobi_cpu(const SvdBatch& job, DType dtype, int threads) {
  if (dtype == DType::f32)
    svd_batch<float>(job, threads);
  else
    svd_batch<double>(job, threads);
}

void eigh_jacobi_cpu(const EighBatch& job, DType dtype, int threads) {
  if (dtype == DType::f32)
    eigh_batch<float>(job, threads);
  else
    eigh_batch<double>(job, threads);
}

}  // namespace prolora
