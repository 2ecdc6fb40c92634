// vae_loss: C++ CPU kernels (and registration of the CUDA launchers). PLACEHOLDER: being written.
#include "dualdiff.h"

namespace dualdiff {

void register_vae_loss(py::module_& m) { (void)m; }

}  // namespace dualdiff
