// timestep_embedding: C++ CPU kernels (and registration of the CUDA launchers). PLACEHOLDER: being written.
#include "dualdiff.h"

namespace dualdiff {

void register_timestep_embedding(py::module_& m) { (void)m; }

}  // namespace dualdiff
