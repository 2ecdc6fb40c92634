// weighted_dice: C++ CPU kernels (and registration of the CUDA launchers). PLACEHOLDER: being written.
#include "dualdiff.h"

namespace dualdiff {

void register_weighted_dice(py::module_& m) { (void)m; }

}  // namespace dualdiff
