// timestep_embedding: registration of the CUDA launcher of the fused DualTimestepEmbedding
// forward (csrc/timestep_embedding.cu). There is no C++ CPU kernel: on the CPU the op runs the
// PyTorch reference (two tiny MLPs are matmul-bound, where ATen's BLAS already does well).
#include "dualdiff.h"

namespace dualdiff {

#ifdef DUALDIFF_WITH_CUDA
void timestep_embedding_forward_cuda(std::uintptr_t t0, std::int64_t stride_t0, int t0_code,
                                     std::uintptr_t t1, std::int64_t stride_t1, int t1_code,
                                     std::uintptr_t freqs, std::uintptr_t w00, std::uintptr_t b00,
                                     std::uintptr_t w02, std::uintptr_t b02, std::uintptr_t w10,
                                     std::uintptr_t b10, std::uintptr_t w12, std::uintptr_t b12,
                                     std::uintptr_t wo, std::uintptr_t bo, std::uintptr_t out,
                                     std::int64_t B, std::int64_t F, std::int64_t H, int dtype,
                                     std::uintptr_t stream);
#endif

void register_timestep_embedding(py::module_& m) {
#ifdef DUALDIFF_WITH_CUDA
  m.def("timestep_embedding_forward_cuda", &timestep_embedding_forward_cuda,
        "Fused DualTimestepEmbedding forward: (t0, stride_t0, t0_code, t1, stride_t1, t1_code, "
        "freqs, w00, b00, w02, b02, w10, b10, w12, b12, wo, bo, out, B, F, H, dtype, stream); "
        "pointers as integers, contiguous weights of one dtype (DType code), out [B, H].");
#else
  (void)m;
#endif
}

}  // namespace dualdiff
