// vae_loss: CUDA kernels (fp32 / fp16 / bf16 in, fp32 accumulation), launched on the caller's stream.
//
// Forward, two launches, no host synchronisation:
//   vae_fwd_partials: blocks [0, p_r) reduce the reconstruction term over a grid-stride share of
//     the n image elements (16-byte vector loads when both pointers are aligned), blocks
//     [p_r, p_r + p_k) reduce the KL term over the m latent elements; one fp32 partial per block.
//   vae_fwd_finalize (one block): sums the partials in a fixed order (deterministic) and writes
//     total, recon and kl.
// Backward, one launch: blocks [0, g_r) write d/d logits elementwise (one 16-byte pack per
// thread), blocks [g_r, g_r + g_k) write d/d mu and d/d logvar. The upstream gradients are 0-d
// fp32 device tensors read inside the kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dualdiff.h"
#include "vae_math.h"

namespace dualdiff {
namespace {

constexpr int kThreads = 256;
constexpr int kFinalThreads = 1024;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
struct alignas(16) Pack {
  static constexpr int kVec = 16 / sizeof(T);
  T v[kVec];
};

// Element terms from csrc/vae_math.h (shared with the CPU kernels), with the GPU's exp / log1p.
template <bool MSE>
__device__ __forceinline__ float recon_term(float l, float x) {
  if (MSE) return vae::mse_term(vae::sigmoid_from_exp(__expf(-l)), x);
  return vae::bce_term(l, x, log1pf(__expf(vae::neg_abs(l))));
}

template <bool MSE>
__device__ __forceinline__ float recon_grad(float l, float x) {
  const float s = vae::sigmoid_from_exp(__expf(-l));
  return MSE ? vae::mse_grad(s, x) : vae::bce_grad(s, x);
}

// Sum of v over the block; the result is valid in thread 0. Fixed tree: deterministic.
template <int THREADS>
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[THREADS / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < THREADS / 32 ? warp_sums[threadIdx.x] : 0.0f;
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

template <typename T, typename TL, bool MSE>
__global__ void __launch_bounds__(kThreads)
vae_fwd_partials(const T* __restrict__ logits,    // [n]
                 const T* __restrict__ x,         // [n]
                 std::int64_t n, bool aligned,
                 const TL* __restrict__ mu,       // [m] = [B, latent]
                 const TL* __restrict__ logvar,   // [m]
                 std::int64_t m,
                 float* __restrict__ partials,    // [p_r + p_k] out
                 int p_r, int p_k) {
  float acc = 0.0f;
  const int b = blockIdx.x;
  if (b < p_r) {
    const std::int64_t stride = static_cast<std::int64_t>(p_r) * kThreads;
    const std::int64_t tid = static_cast<std::int64_t>(b) * kThreads + threadIdx.x;
    std::int64_t scalar_start = 0;
    if (aligned) {
      constexpr int V = Pack<T>::kVec;
      const std::int64_t nv = n / V;
      const Pack<T>* lp = reinterpret_cast<const Pack<T>*>(logits);
      const Pack<T>* xp = reinterpret_cast<const Pack<T>*>(x);
      for (std::int64_t i = tid; i < nv; i += stride) {
        const Pack<T> lv = lp[i], xv = xp[i];
#pragma unroll
        for (int j = 0; j < V; ++j) acc += recon_term<MSE>(to_f(lv.v[j]), to_f(xv.v[j]));
      }
      scalar_start = nv * V;
    }
    for (std::int64_t i = scalar_start + tid; i < n; i += stride)
      acc += recon_term<MSE>(to_f(logits[i]), to_f(x[i]));
  } else {
    const std::int64_t stride = static_cast<std::int64_t>(p_k) * kThreads;
    for (std::int64_t i = static_cast<std::int64_t>(b - p_r) * kThreads + threadIdx.x; i < m;
         i += stride) {
      const float u = to_f(mu[i]), lv = to_f(logvar[i]);
      acc += vae::kl_term(u, lv, __expf(lv));
    }
  }
  acc = block_sum<kThreads>(acc);
  if (threadIdx.x == 0) partials[b] = acc;
}

__global__ void __launch_bounds__(kFinalThreads)
vae_fwd_finalize(const float* __restrict__ partials,  // [p_r + p_k]
                 int p_r, int p_k,
                 float* __restrict__ total,  // [] out (unused without recon)
                 float* __restrict__ recon,  // [] out (unused without recon)
                 float* __restrict__ kl,     // [] out
                 float recon_scale, float kl_scale, float kl_weight, bool has_recon) {
  float r = 0.0f, k = 0.0f;
  for (int i = threadIdx.x; i < p_r; i += kFinalThreads) r += partials[i];
  for (int i = threadIdx.x; i < p_k; i += kFinalThreads) k += partials[p_r + i];
  r = block_sum<kFinalThreads>(r);
  __syncthreads();  // warp_sums is reused by the second reduction
  k = block_sum<kFinalThreads>(k);
  if (threadIdx.x == 0) {
    k *= kl_scale;
    *kl = k;
    if (has_recon) {
      r *= recon_scale;
      *recon = r;
      *total = r + kl_weight * k;
    }
  }
}

template <typename T, typename TL, bool MSE>
__global__ void __launch_bounds__(kThreads)
vae_bwd(const T* __restrict__ logits,    // [n]
        const T* __restrict__ x,         // [n]
        T* __restrict__ glogits,         // [n] out
        std::int64_t n, bool aligned, int g_r,
        const TL* __restrict__ mu,       // [m]
        const TL* __restrict__ logvar,   // [m]
        TL* __restrict__ gmu,            // [m] out
        TL* __restrict__ glogvar,        // [m] out
        std::int64_t m,
        const float* __restrict__ gtotal,  // [] (nullptr without recon)
        const float* __restrict__ grecon,  // [] (nullptr without recon)
        const float* __restrict__ gkl,     // []
        float recon_scale, float kl_scale, float kl_weight) {
  const float g_total = gtotal != nullptr ? *gtotal : 0.0f;
  constexpr int V = Pack<T>::kVec;
  if (static_cast<int>(blockIdx.x) < g_r) {
    const float g = (*grecon + g_total) * recon_scale;
    const std::int64_t t = static_cast<std::int64_t>(blockIdx.x) * kThreads + threadIdx.x;
    const std::int64_t start = t * V;
    if (aligned && start + V <= n) {
      const Pack<T> lv = reinterpret_cast<const Pack<T>*>(logits)[t];
      const Pack<T> xv = reinterpret_cast<const Pack<T>*>(x)[t];
      Pack<T> out;
#pragma unroll
      for (int j = 0; j < V; ++j) out.v[j] = from_f<T>(recon_grad<MSE>(to_f(lv.v[j]), to_f(xv.v[j])) * g);
      reinterpret_cast<Pack<T>*>(glogits)[t] = out;
    } else {
      for (std::int64_t i = start; i < start + V && i < n; ++i)
        glogits[i] = from_f<T>(recon_grad<MSE>(to_f(logits[i]), to_f(x[i])) * g);
    }
  } else {
    const float g = (*gkl + kl_weight * g_total) * kl_scale;
    const std::int64_t i = static_cast<std::int64_t>(blockIdx.x - g_r) * kThreads + threadIdx.x;
    if (i < m) {
      const float u = to_f(mu[i]), lv = to_f(logvar[i]);
      gmu[i] = from_f<TL>(vae::kl_grad_mu(u) * g);
      glogvar[i] = from_f<TL>(vae::kl_grad_logvar(__expf(lv)) * g);
    }
  }
}

bool aligned16(std::uintptr_t a, std::uintptr_t b, std::uintptr_t c = 0) {
  return ((a | b | c) & 15u) == 0;
}

template <typename F>
void dispatch_float(int code, F&& f) {
  switch (static_cast<DType>(code)) {
    case DType::Float32: f(float{}); break;
    case DType::Float16: f(__half{}); break;
    case DType::BFloat16: f(__nv_bfloat16{}); break;
    default: DUALDIFF_CHECK(false, "vae_loss: dtype code must be float32, float16 or bfloat16");
  }
}

}  // namespace

void vae_loss_forward_cuda(std::uintptr_t logits, std::uintptr_t x, std::int64_t n, int recon_dtype,
                           std::uintptr_t mu, std::uintptr_t logvar, std::int64_t m,
                           int latent_dtype, std::uintptr_t partials, std::int64_t p_r,
                           std::int64_t p_k, std::uintptr_t total, std::uintptr_t recon,
                           std::uintptr_t kl, double recon_scale, double kl_scale,
                           double kl_weight, bool mse, bool has_recon, std::uintptr_t stream) {
  DUALDIFF_CHECK(m > 0 && p_k > 0, "vae_loss_forward_cuda: empty latents");
  DUALDIFF_CHECK(!has_recon || (n > 0 && p_r > 0), "vae_loss_forward_cuda: empty recon_logits");
  if (!has_recon) { n = 0; p_r = 0; recon_dtype = latent_dtype; logits = x = mu; }
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int blocks = static_cast<int>(p_r + p_k);
  const bool al = aligned16(logits, x);
  dispatch_float(recon_dtype, [&](auto t) {
    using T = decltype(t);
    dispatch_float(latent_dtype, [&](auto tl) {
      using TL = decltype(tl);
      if (mse)
        vae_fwd_partials<T, TL, true><<<blocks, kThreads, 0, s>>>(
            ptr<const T>(logits), ptr<const T>(x), n, al, ptr<const TL>(mu), ptr<const TL>(logvar),
            m, ptr<float>(partials), static_cast<int>(p_r), static_cast<int>(p_k));
      else
        vae_fwd_partials<T, TL, false><<<blocks, kThreads, 0, s>>>(
            ptr<const T>(logits), ptr<const T>(x), n, al, ptr<const TL>(mu), ptr<const TL>(logvar),
            m, ptr<float>(partials), static_cast<int>(p_r), static_cast<int>(p_k));
    });
  });
  check_cuda_launch("vae_fwd_partials");
  vae_fwd_finalize<<<1, kFinalThreads, 0, s>>>(
      ptr<const float>(partials), static_cast<int>(p_r), static_cast<int>(p_k),
      ptr<float>(has_recon ? total : kl), ptr<float>(has_recon ? recon : kl), ptr<float>(kl),
      static_cast<float>(recon_scale), static_cast<float>(kl_scale), static_cast<float>(kl_weight),
      has_recon);
  check_cuda_launch("vae_fwd_finalize");
}

void vae_loss_backward_cuda(std::uintptr_t logits, std::uintptr_t x, std::uintptr_t glogits,
                            std::int64_t n, std::int64_t g_r, std::int64_t g_k, int recon_dtype, std::uintptr_t mu,
                            std::uintptr_t logvar, std::uintptr_t gmu, std::uintptr_t glogvar,
                            std::int64_t m, int latent_dtype, std::uintptr_t gtotal,
                            std::uintptr_t grecon, std::uintptr_t gkl, double recon_scale,
                            double kl_scale, double kl_weight, bool mse, bool has_recon,
                            std::uintptr_t stream) {
  DUALDIFF_CHECK(m > 0, "vae_loss_backward_cuda: empty latents");
  if (!has_recon) {
    n = 0; recon_dtype = latent_dtype; logits = x = mu; glogits = gmu; gtotal = grecon = 0;
  }
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const bool al = aligned16(logits, x, glogits);
  DUALDIFF_CHECK(g_r >= 0 && g_k > 0 && g_r + g_k <= 0x7fffffffLL,
                 "vae_loss_backward_cuda: grid out of range (tensor too large)");
  DUALDIFF_CHECK(g_k * kThreads >= m, "vae_loss_backward_cuda: g_k blocks do not cover the latents");
  dispatch_float(recon_dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int V = Pack<T>::kVec;
    // g_r (from dualdiff.ops.vae.cuda_backward_blocks): one V-element pack per thread
    DUALDIFF_CHECK(g_r * kThreads * V >= n, "vae_loss_backward_cuda: g_r blocks do not cover the image");
    dispatch_float(latent_dtype, [&](auto tl) {
      using TL = decltype(tl);
      auto kernel = mse ? vae_bwd<T, TL, true> : vae_bwd<T, TL, false>;
      kernel<<<static_cast<unsigned>(g_r + g_k), kThreads, 0, s>>>(
          ptr<const T>(logits), ptr<const T>(x), ptr<T>(glogits), n, al, static_cast<int>(g_r),
          ptr<const TL>(mu), ptr<const TL>(logvar), ptr<TL>(gmu), ptr<TL>(glogvar), m,
          has_recon ? ptr<const float>(gtotal) : nullptr,
          has_recon ? ptr<const float>(grecon) : nullptr, ptr<const float>(gkl),
          static_cast<float>(recon_scale), static_cast<float>(kl_scale),
          static_cast<float>(kl_weight));
    });
  });
  check_cuda_launch("vae_bwd");
}

}  // namespace dualdiff
