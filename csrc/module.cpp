// dualdiff._C: pybind11 module that gathers the C++ CPU and CUDA kernels of every op.
#include "dualdiff.h"

#ifdef DUALDIFF_WITH_OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "dualdiff C++/CUDA kernels (raw pointers in, no libtorch)";
#ifdef DUALDIFF_WITH_CUDA
  m.attr("has_cuda") = true;
  m.attr("cuda_archs") = DUALDIFF_CUDA_ARCHS;
#else
  m.attr("has_cuda") = false;
  m.attr("cuda_archs") = "";
#endif
#ifdef DUALDIFF_WITH_OPENMP
  m.attr("has_openmp") = true;
  m.def("openmp_max_threads", []() { return omp_get_max_threads(); });
#else
  m.attr("has_openmp") = false;
  m.def("openmp_max_threads", []() { return 1; });
#endif
  dualdiff::register_weighted_dice(m);
  dualdiff::register_vae_loss(m);
  dualdiff::register_timestep_embedding(m);
}
