// vae_loss: C++ CPU kernels (OpenMP) and registration of the CUDA launchers (csrc/vae_loss.cu).
//
//   recon "bce": mean/sum over i of  max(l, 0) - l * x + log(1 + exp(-|l|))
//   recon "mse": mean/sum over i of  (sigmoid(l) - x)^2
//   kl         : mean/sum over b of  -0.5 * sum_j (1 + logvar - mu^2 - exp(logvar))
//   total      = recon + kl_weight * kl
// The CPU kernels take fp32 (the Python layer upcasts fp16/bf16). exp and log1p on the hot
// path are branch-free polynomials on 8-float vectors, compiled twice (target_clones): an
// x86-64-v3 (AVX2 + FMA) clone, picked at load time where the CPU has it, and a baseline one.
// The reductions are deterministic (fixed chunks summed in order, in double).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_parallel.h"
#include "dualdiff.h"
#include "vae_math.h"

#ifdef DUALDIFF_WITH_OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DUALDIFF_VAE_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DUALDIFF_VAE_CLONES
#endif
#if defined(__GNUC__)
// the helpers must inline into each target clone for the loops to vectorise
#define DUALDIFF_VAE_INLINE inline __attribute__((always_inline))
#else
#define DUALDIFF_VAE_INLINE inline
#endif

namespace dualdiff {
namespace {

constexpr std::int64_t kChunk = 8192;  // elements per reduction chunk (and per OpenMP task)

// The hot loops work on 8 floats at a time with GCC/Clang vector extensions (one AVX register in
// the haswell clone, two SSE registers in the default one), so exp / log1p / sigmoid vectorise
// whatever the compiler's auto-vectoriser decides. Tails are padded to a full vector.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // the vector helpers are always inlined: no ABI crossing
#endif
constexpr int kW = 8;
typedef float vf __attribute__((vector_size(kW * sizeof(float))));
typedef std::int32_t vi __attribute__((vector_size(kW * sizeof(float))));

DUALDIFF_VAE_INLINE vf splat(float v) { return vf{} + v; }

DUALDIFF_VAE_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

DUALDIFF_VAE_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

DUALDIFF_VAE_INLINE vf vmax(vf a, vf b) { return a > b ? a : b; }
DUALDIFF_VAE_INLINE vf vmin(vf a, vf b) { return a < b ? a : b; }

// exp(x), relative error ~1e-7, for x clamped to [-87, 87] (so 2^n stays a normal float).
DUALDIFF_VAE_INLINE vf vexp(vf x) {
  x = vmin(vmax(x, splat(-87.0f)), splat(87.0f));
  const vf t = x * 1.44269504088896341f;
  const vf n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  const vf r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-06f;  // |r| <= ln2/2
  vf p = splat(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;  // 2^n, |n| <= 126
  return p * (vf)bits;  // same-size vector cast: reinterprets the bits
}

// log(1 + e) for e in [0, 1]: 2 atanh(z), z = e / (2 + e) <= 1/3, series to z^13 (rel. error < 2e-8).
DUALDIFF_VAE_INLINE vf vlog1p_unit(vf e) {
  const vf z = e / (2.0f + e);
  const vf z2 = z * z;
  vf p = splat(1.0f / 13.0f);
  p = p * z2 + 1.0f / 11.0f;
  p = p * z2 + 1.0f / 9.0f;
  p = p * z2 + 1.0f / 7.0f;
  p = p * z2 + 1.0f / 5.0f;
  p = p * z2 + 1.0f / 3.0f;
  p = p * z2 + 1.0f;
  return 2.0f * z * p;
}

// The element terms are csrc/vae_math.h's (the CUDA kernels' formulas) on 8-float vectors, with
// the polynomial exp / log1p above.
// softplus form of BCE(sigmoid(l), x): max(l, 0) - l x + log(1 + exp(-|l|)).
DUALDIFF_VAE_INLINE vf vbce(vf l, vf x) {
  return vae::bce_term(l, x, vlog1p_unit(vexp(vae::neg_abs(l))));  // exp(-|l|) in (0, 1]
}

// 1 / (1 + exp(-l)): no cancellation on either side; |l| > 87 saturates at 1 or ~1.6e-38.
DUALDIFF_VAE_INLINE vf vsigmoid(vf l) { return vae::sigmoid_from_exp(vexp(-l)); }

DUALDIFF_VAE_INLINE vf vterm(vf l, vf x, bool mse) {
  if (mse) return vae::mse_term(vsigmoid(l), x);
  return vbce(l, x);
}

DUALDIFF_VAE_INLINE vf vgrad(vf l, vf x, float scale, bool mse) {
  const vf s = vsigmoid(l);
  if (mse) return vae::mse_grad(s, x) * scale;
  return vae::bce_grad(s, x) * scale;
}

DUALDIFF_VAE_CLONES
float recon_chunk_sum(const float* l, const float* x, std::int64_t n, bool mse) {
  vf acc = splat(0.0f);
  std::int64_t i = 0;
  for (; i + kW <= n; i += kW) acc += vterm(load(l + i), load(x + i), mse);
  float sum = 0.0f;
  if (i < n) {  // tail: pad with zeros, count only the real lanes
    float lt[kW] = {}, xt[kW] = {}, out[kW];
    std::memcpy(lt, l + i, (n - i) * sizeof(float));
    std::memcpy(xt, x + i, (n - i) * sizeof(float));
    store(out, vterm(load(lt), load(xt), mse));
    for (std::int64_t j = 0; j < n - i; ++j) sum += out[j];
  }
  for (int j = 0; j < kW; ++j) sum += acc[j];
  return sum;
}

DUALDIFF_VAE_CLONES
void recon_chunk_grad(const float* l, const float* x, float* g, std::int64_t n, float scale,
                      bool mse) {
  std::int64_t i = 0;
  for (; i + kW <= n; i += kW) store(g + i, vgrad(load(l + i), load(x + i), scale, mse));
  if (i < n) {
    float lt[kW] = {}, xt[kW] = {}, out[kW];
    std::memcpy(lt, l + i, (n - i) * sizeof(float));
    std::memcpy(xt, x + i, (n - i) * sizeof(float));
    store(out, vgrad(load(lt), load(xt), scale, mse));
    std::memcpy(g + i, out, (n - i) * sizeof(float));
  }
}

double recon_sum(const float* l, const float* x, std::int64_t n, bool mse) {
  const std::int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(chunks));
  const int threads = cpu_threads_for(n);
#ifdef DUALDIFF_WITH_OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
#endif
  for (std::int64_t c = 0; c < chunks; ++c) {
    const std::int64_t start = c * kChunk;
    const std::int64_t len = std::min(kChunk, n - start);
    partial[c] = recon_chunk_sum(l + start, x + start, len, mse);
  }
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

// -0.5 * (1 + logvar - mu^2 - exp(logvar)); exp saturates at logvar = 87 (the reference gives inf).
DUALDIFF_VAE_INLINE vf vkl(vf u, vf lv) { return vae::kl_term(u, lv, vexp(lv)); }

DUALDIFF_VAE_CLONES
float kl_chunk_sum(const float* mu, const float* logvar, std::int64_t n) {
  vf acc = splat(0.0f);
  std::int64_t i = 0;
  for (; i + kW <= n; i += kW) acc += vkl(load(mu + i), load(logvar + i));
  float sum = 0.0f;
  if (i < n) {
    float ut[kW] = {}, lt[kW] = {}, out[kW];
    std::memcpy(ut, mu + i, (n - i) * sizeof(float));
    std::memcpy(lt, logvar + i, (n - i) * sizeof(float));
    store(out, vkl(load(ut), load(lt)));
    for (std::int64_t j = 0; j < n - i; ++j) sum += out[j];
  }
  for (int j = 0; j < kW; ++j) sum += acc[j];
  return sum;
}

DUALDIFF_VAE_CLONES
void kl_chunk_grad(const float* mu, const float* logvar, float* gmu, float* glogvar,
                   std::int64_t n, float scale) {
  std::int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    store(gmu + i, vae::kl_grad_mu(load(mu + i)) * scale);
    store(glogvar + i, vae::kl_grad_logvar(vexp(load(logvar + i))) * scale);
  }
  for (; i < n; ++i) {
    gmu[i] = vae::kl_grad_mu(mu[i]) * scale;
    glogvar[i] = vae::kl_grad_logvar(std::exp(logvar[i])) * scale;
  }
}

double kl_sum(const float* mu, const float* logvar, std::int64_t m) {
  const std::int64_t chunks = (m + kChunk - 1) / kChunk;
  double total = 0.0;  // latents are small: one thread, chunks summed in order
  for (std::int64_t c = 0; c < chunks; ++c) {
    const std::int64_t start = c * kChunk;
    total += kl_chunk_sum(mu + start, logvar + start, std::min(kChunk, m - start));
  }
  return total;
}

void vae_loss_forward_cpu(std::uintptr_t logits, std::uintptr_t x, std::int64_t n,
                          std::uintptr_t mu, std::uintptr_t logvar, std::int64_t m,
                          std::uintptr_t total, std::uintptr_t recon, std::uintptr_t kl,
                          double recon_scale, double kl_scale, double kl_weight, bool mse,
                          bool has_recon) {
  DUALDIFF_CHECK(m > 0, "vae_loss_forward_cpu: empty latents");
  const double k = kl_sum(ptr<const float>(mu), ptr<const float>(logvar), m) * kl_scale;
  *ptr<float>(kl) = static_cast<float>(k);
  if (has_recon) {
    DUALDIFF_CHECK(n > 0, "vae_loss_forward_cpu: empty recon_logits");
    const double r = recon_sum(ptr<const float>(logits), ptr<const float>(x), n, mse) * recon_scale;
    *ptr<float>(recon) = static_cast<float>(r);
    *ptr<float>(total) = static_cast<float>(r + kl_weight * k);
  }
}

void vae_loss_backward_cpu(std::uintptr_t logits, std::uintptr_t x, std::uintptr_t glogits,
                           std::int64_t n, std::uintptr_t mu, std::uintptr_t logvar,
                           std::uintptr_t gmu, std::uintptr_t glogvar, std::int64_t m,
                           std::uintptr_t gtotal, std::uintptr_t grecon, std::uintptr_t gkl,
                           double recon_scale, double kl_scale, double kl_weight, bool mse,
                           bool has_recon) {
  // Upstream gradients are 0-d fp32 CPU tensors: g_recon_total = g_recon + g_total,
  // g_kl_total = g_kl + kl_weight * g_total.
  float g_kl = *ptr<const float>(gkl);
  float g_total = 0.0f;
  if (has_recon) {
    g_total = *ptr<const float>(gtotal);
    g_kl += static_cast<float>(kl_weight) * g_total;
    const float g_r = (*ptr<const float>(grecon) + g_total) * static_cast<float>(recon_scale);
    const float* l = ptr<const float>(logits);
    const float* xx = ptr<const float>(x);
    float* g = ptr<float>(glogits);
    const std::int64_t chunks = (n + kChunk - 1) / kChunk;
    const int threads = cpu_threads_for(n);
#ifdef DUALDIFF_WITH_OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
#endif
    for (std::int64_t c = 0; c < chunks; ++c) {
      const std::int64_t start = c * kChunk;
      recon_chunk_grad(l + start, xx + start, g + start, std::min(kChunk, n - start), g_r, mse);
    }
  }
  const float gk = g_kl * static_cast<float>(kl_scale);
  const float* u = ptr<const float>(mu);
  const float* lv = ptr<const float>(logvar);
  float* gu = ptr<float>(gmu);
  float* glv = ptr<float>(glogvar);
  kl_chunk_grad(u, lv, gu, glv, m, gk);
}

}  // namespace

#ifdef DUALDIFF_WITH_CUDA
void vae_loss_forward_cuda(std::uintptr_t logits, std::uintptr_t x, std::int64_t n, int recon_dtype,
                           std::uintptr_t mu, std::uintptr_t logvar, std::int64_t m,
                           int latent_dtype, std::uintptr_t partials, std::int64_t p_r,
                           std::int64_t p_k, std::uintptr_t total, std::uintptr_t recon,
                           std::uintptr_t kl, double recon_scale, double kl_scale,
                           double kl_weight, bool mse, bool has_recon, std::uintptr_t stream);
void vae_loss_backward_cuda(std::uintptr_t logits, std::uintptr_t x, std::uintptr_t glogits,
                            std::int64_t n, std::int64_t g_r, std::int64_t g_k, int recon_dtype, std::uintptr_t mu,
                            std::uintptr_t logvar, std::uintptr_t gmu, std::uintptr_t glogvar,
                            std::int64_t m, int latent_dtype, std::uintptr_t gtotal,
                            std::uintptr_t grecon, std::uintptr_t gkl, double recon_scale,
                            double kl_scale, double kl_weight, bool mse, bool has_recon,
                            std::uintptr_t stream);
#endif

void register_vae_loss(py::module_& m) {
  m.def("vae_loss_forward_cpu", &vae_loss_forward_cpu,
        "VAE loss forward on fp32 CPU buffers: writes total, recon, kl",
        py::arg("logits"), py::arg("x"), py::arg("n"), py::arg("mu"), py::arg("logvar"),
        py::arg("m"), py::arg("total"), py::arg("recon"), py::arg("kl"), py::arg("recon_scale"),
        py::arg("kl_scale"), py::arg("kl_weight"), py::arg("mse"), py::arg("has_recon"),
        py::call_guard<py::gil_scoped_release>());
  m.def("vae_loss_backward_cpu", &vae_loss_backward_cpu,
        "VAE loss backward on fp32 CPU buffers: writes grad_logits, grad_mu, grad_logvar",
        py::arg("logits"), py::arg("x"), py::arg("glogits"), py::arg("n"), py::arg("mu"),
        py::arg("logvar"), py::arg("gmu"), py::arg("glogvar"), py::arg("m"), py::arg("gtotal"),
        py::arg("grecon"), py::arg("gkl"), py::arg("recon_scale"), py::arg("kl_scale"),
        py::arg("kl_weight"), py::arg("mse"), py::arg("has_recon"),
        py::call_guard<py::gil_scoped_release>());
#ifdef DUALDIFF_WITH_CUDA
  m.def("vae_loss_forward_cuda", &vae_loss_forward_cuda,
        "VAE loss forward on CUDA buffers (fp32/fp16/bf16): partial sums + finalize, no sync");
  m.def("vae_loss_backward_cuda", &vae_loss_backward_cuda,
        "VAE loss backward on CUDA buffers: one launch writes all gradients");
#endif
}

}  // namespace dualdiff
