// timestep_embedding: registration of the CUDA launcher of the fused DualTimestepEmbedding
// forward (csrc/timestep_embedding.cu). There is no C++ CPU kernel of the op: on the CPU it runs
// the PyTorch reference (two tiny MLPs are matmul-bound, where ATen's BLAS already does well).
// The CPU entry points below evaluate the CUDA kernel's element math (sinusoidal features, SiLU;
// csrc/timestep_embedding_math.h) so the CPU tests check the formulas the GPU runs.
#include <cstdint>

#include "dualdiff.h"
#include "timestep_embedding_math.h"

namespace dualdiff {

#ifdef DUALDIFF_WITH_CUDA
void timestep_embedding_forward_cuda(std::uintptr_t t0, std::int64_t stride_t0, int t0_code,
                                     std::uintptr_t t1, std::int64_t stride_t1, int t1_code,
                                     std::uintptr_t freqs, std::uintptr_t w00, std::uintptr_t b00,
                                     std::uintptr_t w02, std::uintptr_t b02, std::uintptr_t w10,
                                     std::uintptr_t b10, std::uintptr_t w12, std::uintptr_t b12,
                                     std::uintptr_t wo, std::uintptr_t bo, std::uintptr_t out,
                                     std::int64_t B, std::int64_t F, std::int64_t H, int dtype,
                                     std::uintptr_t scratch, std::uintptr_t stream);
#endif

namespace {

// out[b, col] = sinusoid(t[b], freqs, col, F / 2) for fp32 t [B], out [B, F].
void timestep_features_cpu(std::uintptr_t t, std::int64_t B, std::uintptr_t freqs, std::int64_t F,
                           std::uintptr_t out) {
  DUALDIFF_CHECK(B >= 0 && F >= 2 && F < (1 << 20), "timestep_features_cpu: bad sizes");
  const float* tv = ptr<const float>(t);
  float* o = ptr<float>(out);
  const int f = static_cast<int>(F);
  for (std::int64_t b = 0; b < B; ++b)
    for (int col = 0; col < f; ++col) o[b * F + col] = temb::sinusoid(tv[b], ptr<const float>(freqs), col, f / 2);
}

// out[i] = silu(x[i]) for fp32 x, out [n].
void silu_cpu(std::uintptr_t x, std::int64_t n, std::uintptr_t out) {
  const float* xv = ptr<const float>(x);
  float* o = ptr<float>(out);
  for (std::int64_t i = 0; i < n; ++i) o[i] = temb::silu(xv[i]);
}

}  // namespace

void register_timestep_embedding(py::module_& m) {
  m.def("timestep_features_cpu", &timestep_features_cpu,
        "The CUDA kernel's sinusoidal features on the CPU (testing): (t fp32 [B], B, freqs fp32 "
        "[F/2], F, out fp32 [B, F])");
  m.def("silu_cpu", &silu_cpu, "The CUDA kernel's SiLU on the CPU (testing): (x fp32 [n], n, out)");
#ifdef DUALDIFF_WITH_CUDA
  m.def("timestep_embedding_forward_cuda", &timestep_embedding_forward_cuda,
        "Fused DualTimestepEmbedding forward: (t0, stride_t0, t0_code, t1, stride_t1, t1_code, "
        "freqs, w00, b00, w02, b02, w10, b10, w12, b12, wo, bo, out, B, F, H, dtype, scratch, "
        "stream); pointers as integers, contiguous weights of one dtype (DType code), out [B, H]; "
        "scratch: 0 (shared-memory workspace) or an fp32 buffer of cdiv(B, 8) * 8 * (F + 3H).");
#else
  (void)m;
#endif
}

}  // namespace dualdiff
