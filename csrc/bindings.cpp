// Python bindings of prolora._C over raw addresses (tensor.data_ptr()), shapes and element
// strides. Nothing here includes or links libtorch, so one build serves any torch version;
// the Python side (prolora._native) owns the tensors and keeps them alive during each call.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "launch.h"

namespace py = pybind11;
using prolora::DType;
using Strides3 = std::array<int64_t, 3>;
using Strides2 = std::array<int64_t, 2>;

#ifndef PROLORA_VERSION
#define PROLORA_VERSION "unknown"
#endif

namespace {

DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::f32;
  if (name == "float64") return DType::f64;
  throw std::invalid_argument("dtype must be 'float32' or 'float64', got '" + name + "'");
}

prolora::MatArg mat(std::uintptr_t ptr, const Strides3& st) { return {ptr, st[0], st[1], st[2]}; }
prolora::VecArg vec(std::uintptr_t ptr, const Strides2& st) { return {ptr, st[0], st[1]}; }

void check_sizes(int64_t batch, std::initializer_list<int64_t> dims, int max_sweeps) {
  if (batch < 0) throw std::invalid_argument("batch must be >= 0");
  for (int64_t d : dims)
    if (d < 0 || d > INT_MAX / 4) throw std::invalid_argument("matrix size out of range");
  if (max_sweeps < 0) throw std::invalid_argument("max_sweeps must be >= 0");
}

void check_ptrs(std::initializer_list<std::uintptr_t> ptrs) {
  for (auto p : ptrs)
    if (p == 0) throw std::invalid_argument("null data pointer");
}

prolora::SvdBatch svd_job(std::uintptr_t a, const Strides3& as, std::uintptr_t u,
                          const Strides3& us, std::uintptr_t s, const Strides2& ss,
                          std::uintptr_t v, const Strides3& vs, int64_t batch, int m, int n,
                          int max_sweeps, double tol, std::uintptr_t info) {
  check_sizes(batch, {m, n}, max_sweeps);
  if (batch > 0 && m > 0 && n > 0) check_ptrs({a, u, s, v});
  return {mat(a, as), mat(u, us), mat(v, vs), vec(s, ss), batch, m, n, max_sweeps, tol, info};
}

prolora::EighBatch eigh_job(std::uintptr_t a, const Strides3& as, std::uintptr_t w,
                            const Strides2& ws, std::uintptr_t v, const Strides3& vs,
                            int64_t batch, int n, int max_sweeps, double tol, std::uintptr_t info) {
  check_sizes(batch, {n}, max_sweeps);
  if (batch > 0 && n > 0) check_ptrs({a, w, v});
  return {mat(a, as), mat(v, vs), vec(w, ws), batch, n, max_sweeps, tol, info};
}

constexpr const char* kSvdDoc =
    "Thin SVD of a batch of m x n matrices: a = u diag(s) v^T with u (batch, m, k), s (batch, "
    "k) descending, v (batch, n, k), k = min(m, n). Arguments are data addresses and element "
    "strides (batch, row, col); info, if not 0, receives int32 sweeps used per problem (-1: "
    "not converged). tol <= 0 selects the default relative threshold.";
constexpr const char* kEighDoc =
    "Eigendecomposition of a batch of symmetric n x n matrices (lower triangle read): "
    "a = v diag(w) v^T with w (batch, n) descending. Arguments as for the SVD.";

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "prolora native kernels: batched Jacobi SVD and symmetric eigensolver";
  mod.def("version", [] { return std::string(PROLORA_VERSION); });
  mod.def("has_cuda", [] {
#ifdef PROLORA_WITH_CUDA
    return true;
#else
    return false;
#endif
  });

  mod.def(
      "svd_jacobi_cpu",
      [](std::uintptr_t a, Strides3 as, std::uintptr_t u, Strides3 us, std::uintptr_t s,
         Strides2 ss, std::uintptr_t v, Strides3 vs, int64_t batch, int m, int n,
         const std::string& dtype, int threads, int max_sweeps, double tol, std::uintptr_t info) {
        const auto job = svd_job(a, as, u, us, s, ss, v, vs, batch, m, n, max_sweeps, tol, info);
        const DType dt = parse_dtype(dtype);
        py::gil_scoped_release nogil;
        prolora::svd_jacobi_cpu(job, dt, threads);
      },
      kSvdDoc, py::arg("a"), py::arg("a_strides"), py::arg("u"), py::arg("u_strides"),
      py::arg("s"), py::arg("s_strides"), py::arg("v"), py::arg("v_strides"), py::arg("batch"),
      py::arg("m"), py::arg("n"), py::arg("dtype"), py::arg("threads") = 0,
      py::arg("max_sweeps") = 30, py::arg("tol") = 0.0, py::arg("info") = 0);

  mod.def(
      "eigh_jacobi_cpu",
      [](std::uintptr_t a, Strides3 as, std::uintptr_t w, Strides2 ws, std::uintptr_t v,
         Strides3 vs, int64_t batch, int n, const std::string& dtype, int threads,
         int max_sweeps, double tol, std::uintptr_t info) {
        const auto job = eigh_job(a, as, w, ws, v, vs, batch, n, max_sweeps, tol, info);
        const DType dt = parse_dtype(dtype);
        py::gil_scoped_release nogil;
        prolora::eigh_jacobi_cpu(job, dt, threads);
      },
      kEighDoc, py::arg("a"), py::arg("a_strides"), py::arg("w"), py::arg("w_strides"),
      py::arg("v"), py::arg("v_strides"), py::arg("batch"), py::arg("n"), py::arg("dtype"),
      py::arg("threads") = 0, py::arg("max_sweeps") = 30, py::arg("tol") = 0.0,
      py::arg("info") = 0);

#ifdef PROLORA_WITH_CUDA
  mod.def("cuda_status", &prolora::cuda_status,
          "Empty when the CUDA runtime linked into this module sees a device, else why not.");
  mod.def(
      "svd_cuda_workspace_elems",
      [](int m, int n, const std::string& dtype) {
        check_sizes(0, {m, n}, 0);
        return prolora::svd_cuda_workspace_elems(m, n, parse_dtype(dtype));
      },
      "Elements of global workspace per problem svd_jacobi_cuda needs on the current device "
      "(0: it works in shared memory).",
      py::arg("m"), py::arg("n"), py::arg("dtype"));
  mod.def(
      "eigh_cuda_workspace_elems",
      [](int n, const std::string& dtype) {
        check_sizes(0, {n}, 0);
        return prolora::eigh_cuda_workspace_elems(n, parse_dtype(dtype));
      },
      "Elements of global workspace per problem eigh_jacobi_cuda needs on the current device "
      "(0: it works in shared memory).",
      py::arg("n"), py::arg("dtype"));
  mod.def(
      "svd_jacobi_cuda",
      [](std::uintptr_t a, Strides3 as, std::uintptr_t u, Strides3 us, std::uintptr_t s,
         Strides2 ss, std::uintptr_t v, Strides3 vs, int64_t batch, int m, int n,
         const std::string& dtype, std::uintptr_t work, std::uintptr_t stream, int max_sweeps,
         double tol, std::uintptr_t info) {
        const auto job = svd_job(a, as, u, us, s, ss, v, vs, batch, m, n, max_sweeps, tol, info);
        const DType dt = parse_dtype(dtype);
        py::gil_scoped_release nogil;
        prolora::svd_jacobi_cuda(job, dt, work, stream);
      },
      "CUDA version of svd_jacobi_cpu on the current device, enqueued on `stream` (a "
      "cudaStream_t as an integer) without waiting. `work`: the global workspace "
      "(svd_cuda_workspace_elems per problem) or 0.",
      py::arg("a"), py::arg("a_strides"), py::arg("u"), py::arg("u_strides"), py::arg("s"),
      py::arg("s_strides"), py::arg("v"), py::arg("v_strides"), py::arg("batch"), py::arg("m"),
      py::arg("n"), py::arg("dtype"), py::arg("work") = 0, py::arg("stream") = 0,
      py::arg("max_sweeps") = 30, py::arg("tol") = 0.0, py::arg("info") = 0);
  mod.def(
      "eigh_jacobi_cuda",
      [](std::uintptr_t a, Strides3 as, std::uintptr_t w, Strides2 ws, std::uintptr_t v,
         Strides3 vs, int64_t batch, int n, const std::string& dtype, std::uintptr_t work,
         std::uintptr_t stream, int max_sweeps, double tol, std::uintptr_t info) {
        const auto job = eigh_job(a, as, w, ws, v, vs, batch, n, max_sweeps, tol, info);
        const DType dt = parse_dtype(dtype);
        py::gil_scoped_release nogil;
        prolora::eigh_jacobi_cuda(job, dt, work, stream);
      },
      "CUDA version of eigh_jacobi_cpu; `work` and `stream` as for svd_jacobi_cuda.",
      py::arg("a"), py::arg("a_strides"), py::arg("w"), py::arg("w_strides"), py::arg("v"),
      py::arg("v_strides"), py::arg("batch"), py::arg("n"), py::arg("dtype"),
      py::arg("work") = 0, py::arg("stream") = 0, py::arg("max_sweeps") = 30,
      py::arg("tol") = 0.0, py::arg("info") = 0);
#endif
}
