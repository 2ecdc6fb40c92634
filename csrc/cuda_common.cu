// CUDA helpers shared by the kernels of dualdiff._C.
#include <cuda_runtime.h>

#include "dualdiff.h"

namespace dualdiff {

void check_cuda_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("dualdiff._C: CUDA launch of ") + what +
                             " failed: " + cudaGetErrorString(err));
  }
}

}  // namespace dualdiff
