// dualdiff._C: pybind11 module that gathers the C++ CPU and CUDA kernels of every op.
#include "cpu_parallel.h"
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
  m.attr("cpu_grain_elements") = dualdiff::kGrainElements;
  m.def("cpu_threads_for", &dualdiff::cpu_threads_for, py::arg("work"),
        "OpenMP threads the CPU kernels use for `work` elements: 1 below cpu_grain_elements, "
        "else one per grain up to the OpenMP maximum (ATen's parallel_for rule)");
  dualdiff::register_weighted_dice(m);
  dualdiff::register_vae_loss(m);
  dualdiff::register_timestep_embedding(m);
}
