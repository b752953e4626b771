// Can this CUDA toolchain build the shared math for the selected architectures and link a
// program against the CUDA runtime? (see CMakeLists.txt beside this file)
#include <cuda_runtime.h>

#include "jacobi.h"
#include "team.h"

__global__ void probe(const float* a, float* u, float* s, float* v, float* work) {
  using prolora::View;
  prolora::svd_jacobi(prolora::SerialTeam{}, View<const float>{a, 2, 1}, 2, 2, View<float>{u, 2, 1},
                      s, 1, View<float>{v, 2, 1}, work, 4, 0.0f);
}

// Built, never run: the launch makes the program reference the kernel and the runtime.
int main() {
  probe<<<1, 1>>>(nullptr, nullptr, nullptr, nullptr, nullptr);
  return int(cudaGetLastError());
}
