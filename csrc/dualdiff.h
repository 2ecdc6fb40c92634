// Shared declarations of dualdiff._C.
//
// Convention: every kernel entry point takes raw data pointers (uintptr_t from torch's
// Tensor.data_ptr()), sizes, and for CUDA the stream (uintptr_t from
// torch.cuda.current_stream().cuda_stream). Nothing here links libtorch, so the
// extension builds without torch and works with any torch >= 2.6.
// Inputs are contiguous; the Python layer checks shapes, dtypes and devices.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include <pybind11/pybind11.h>

namespace dualdiff {

namespace py = pybind11;

// dtype codes shared with dualdiff/_backend.py (DTYPE_CODES).
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, UInt8 = 3, Bool = 4 };

template <typename T>
inline T* ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

#define DUALDIFF_CHECK(cond, msg)                                   \
  do {                                                              \
    if (!(cond)) throw std::invalid_argument(std::string("dualdiff._C: ") + (msg)); \
  } while (0)

// One registration function per op module; each defines its CPU entry points and, under
// DUALDIFF_WITH_CUDA, its CUDA entry points.
void register_weighted_dice(py::module_& m);
void register_vae_loss(py::module_& m);
void register_timestep_embedding(py::module_& m);

#ifdef DUALDIFF_WITH_CUDA
// Throws std::runtime_error with the CUDA error string if the last launch failed.
void check_cuda_launch(const char* what);
#endif

}  // namespace dualdiff
