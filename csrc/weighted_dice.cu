// weighted_dice: CUDA kernels (fp32 / fp16 / bf16 logits, fp32 / fp16 / bf16 / uint8 targets,
// fp32 accumulation). Formula: see dualdiff/ops/weighted_dice.py.
//
// Layout: x, g [B, C, S] contiguous. A block covers CP consecutive (b, c) rows -- CP = C for
// softmax (all channels of a pixel in one thread), CP = 1 otherwise -- and a part of S.
//   fwd_partial_kernel  grid (groups, n_chunks): partial sums of p*g, p (p^2), g (g^2)
//   fwd_finalize_kernel one block: adds the partials in a fixed order -> sums [3, B*C], loss
//   bwd_kernel          grid (groups, cdiv(S, 256 * UNROLL)): elementwise, recomputes p
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dualdiff.h"

namespace dualdiff {
namespace {

constexpr int ACT_SIGMOID = 0, ACT_SOFTMAX = 1;
constexpr int RED_NONE = 0;
constexpr int THREADS = 256;

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// Target element i; gt is the DType code (uniform across the grid, so the switch does not diverge).
__device__ __forceinline__ float load_g(const void* g, int64_t i, int gt) {
  switch (gt) {
    case 0: return __ldg(static_cast<const float*>(g) + i);
    case 1: return __half2float(static_cast<const __half*>(g)[i]);
    case 2: return __bfloat162float(static_cast<const __nv_bfloat16*>(g)[i]);
    default: return static_cast<float>(static_cast<const uint8_t*>(g)[i]);
  }
}

__device__ __forceinline__ float sigmoidf(float x) { return 1.0f / (1.0f + __expf(-x)); }

// p for the CP channels of one pixel (softmax when NC > 1; sigmoid or identity when NC == 1).
template <int NC>
__device__ __forceinline__ void activate(float (&v)[NC], int cp, int act) {
  if (NC == 1) {
    if (act == ACT_SIGMOID) v[0] = sigmoidf(v[0]);
    return;
  }
  float mx = v[0];
#pragma unroll
  for (int c = 1; c < NC; ++c)
    if (c < cp) mx = fmaxf(mx, v[c]);
  float den = 0.f;
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    v[c] = c < cp ? __expf(v[c] - mx) : 0.f;
    den += v[c];
  }
  const float inv = 1.0f / den;
#pragma unroll
  for (int c = 0; c < NC; ++c) v[c] *= inv;
}

template <int NC>
__host__ __device__ constexpr int unroll_of() { return NC == 1 ? 4 : (NC <= 4 ? 2 : 1); }

template <int NC, typename XT>
__global__ void __launch_bounds__(THREADS) fwd_partial_kernel(
    const XT* __restrict__ x,  // [B, C, S] logits
    const void* __restrict__ g,  // [B, C, S] target (dtype code gt)
    float* __restrict__ part,  // [B*C, n_chunks, 3] out: partial sums
    int64_t S, int cp, int64_t n_chunks, int64_t chunk, int act, bool squared, int gt) {
  constexpr int U = unroll_of<NC>();
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * cp;
  const int64_t base = row0 * S;
  const int64_t lo = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t hi = min(S, lo + chunk);
  float acc[NC][3];
#pragma unroll
  for (int c = 0; c < NC; ++c) acc[c][0] = acc[c][1] = acc[c][2] = 0.f;
  for (int64_t s0 = lo + threadIdx.x; s0 < hi; s0 += static_cast<int64_t>(THREADS) * U) {
    float xv[U][NC], gv[U][NC];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t s = s0 + static_cast<int64_t>(u) * THREADS;
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const bool ok = s < hi && c < cp;
        xv[u][c] = ok ? to_f(x[base + c * S + s]) : 0.f;
        gv[u][c] = ok ? load_g(g, base + c * S + s, gt) : 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (s0 + static_cast<int64_t>(u) * THREADS >= hi) break;
      activate<NC>(xv[u], cp, act);
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const float p = xv[u][c], q = gv[u][c];
        acc[c][0] += p * q;
        acc[c][1] += squared ? p * p : p;
        acc[c][2] += squared ? q * q : q;
      }
    }
  }
  // Block reduction: warp shuffles, then one value per warp in shared memory.
  __shared__ float red[THREADS / 32][NC * 3];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int c = 0; c < NC; ++c)
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      float v = acc[c][k];
#pragma unroll
      for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
      if (lane == 0) red[warp][c * 3 + k] = v;
    }
  __syncthreads();
  for (int j = threadIdx.x; j < cp * 3; j += THREADS) {
    float v = 0.f;
    for (int w = 0; w < THREADS / 32; ++w) v += red[w][j];
    const int c = j / 3, k = j % 3;
    part[((row0 + c) * n_chunks + blockIdx.y) * 3 + k] = v;
  }
}

__global__ void __launch_bounds__(THREADS) fwd_finalize_kernel(
    const float* __restrict__ part,  // [R, n_chunks, 3] partial sums
    const float* __restrict__ w,     // [B] weight or nullptr
    float* __restrict__ sums,        // [3, R] out
    float* __restrict__ loss,        // [B, C - c0] or [] out
    int64_t R, int64_t C, int c0, int64_t n_chunks, float nr, float dr, float scale, int red) {
  float local = 0.f;
  for (int64_t r = threadIdx.x; r < R; r += THREADS) {
    float s[3] = {0.f, 0.f, 0.f};
    for (int64_t ch = 0; ch < n_chunks; ++ch)
#pragma unroll
      for (int k = 0; k < 3; ++k) s[k] += part[(r * n_chunks + ch) * 3 + k];
#pragma unroll
    for (int k = 0; k < 3; ++k) sums[k * R + r] = s[k];
    const int64_t b = r / C, c = r % C;
    if (c < c0) continue;
    float d = 1.0f - (2.0f * s[0] + nr) / (s[1] + s[2] + dr);
    if (w) d *= w[b];
    if (red == RED_NONE)
      loss[b * (C - c0) + c - c0] = d;
    else
      local += d;
  }
  if (red == RED_NONE) return;
  __shared__ float buf[THREADS];
  buf[threadIdx.x] = local;
  __syncthreads();
  for (int off = THREADS / 2; off > 0; off /= 2) {
    if (threadIdx.x < off) buf[threadIdx.x] += buf[threadIdx.x + off];
    __syncthreads();
  }
  if (threadIdx.x == 0) loss[0] = buf[0] * scale;
}

template <int NC, typename XT>
__global__ void __launch_bounds__(THREADS) bwd_kernel(
    const XT* __restrict__ x,        // [B, C, S] logits
    const void* __restrict__ g,      // [B, C, S] target (dtype code gt)
    const float* __restrict__ w,     // [B] weight or nullptr
    const float* __restrict__ sums,  // [3, R] saved sums
    const float* __restrict__ go,    // [B, C - c0] or [] upstream grad
    XT* __restrict__ dx,             // [B, C, S] out
    int64_t S, int cp, int64_t C, int c0, float nr, float dr, float scale, int red, int act, bool squared,
    int gt) {
  constexpr int U = unroll_of<NC>();
  const int64_t R = static_cast<int64_t>(gridDim.x) * cp;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * cp;
  const int64_t base = row0 * S;
  float ca[NC], cb[NC];
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    ca[c] = cb[c] = 0.f;
    if (c >= cp) continue;
    const int64_t r = row0 + c, b = r / C, cc = r % C;
    float k = 0.f;
    if (cc >= c0) k = red == RED_NONE ? go[b * (C - c0) + cc - c0] : go[0] * scale;
    if (w) k *= w[b];
    const float den = sums[R + r] + sums[2 * R + r] + dr;
    ca[c] = -2.0f * k / den;
    cb[c] = k * (2.0f * sums[r] + nr) / (den * den);
  }
  const int64_t s0 = static_cast<int64_t>(blockIdx.y) * THREADS * U + threadIdx.x;
  float xv[U][NC], gv[U][NC];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t s = s0 + static_cast<int64_t>(u) * THREADS;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const bool ok = s < S && c < cp;
      xv[u][c] = ok ? to_f(x[base + c * S + s]) : 0.f;
      gv[u][c] = ok ? load_g(g, base + c * S + s, gt) : 0.f;
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t s = s0 + static_cast<int64_t>(u) * THREADS;
    if (s >= S) break;
    float p[NC], dp[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) p[c] = xv[u][c];
    activate<NC>(p, cp, act);
    float dot = 0.f;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      dp[c] = ca[c] * gv[u][c] + (squared ? cb[c] * 2.0f * p[c] : cb[c]);
      dot += p[c] * dp[c];
    }
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      if (c >= cp) break;
      float v;
      if (NC > 1)
        v = p[c] * (dp[c] - dot);  // softmax
      else if (act == ACT_SIGMOID)
        v = dp[c] * p[c] * (1.0f - p[c]);
      else
        v = dp[c];
      dx[base + c * S + s] = from_f<XT>(v);
    }
  }
}

template <typename XT>
void launch_fwd(const void* x, const void* g, int gt, const float* w, float* part, int64_t n_chunks, int64_t chunk,
                float* sums, float* loss, int64_t B, int64_t C, int64_t S, int act, bool squared, int c0, float nr,
                float dr, int red, cudaStream_t st) {
  const int cp = act == ACT_SOFTMAX ? static_cast<int>(C) : 1;
  const dim3 grid(static_cast<unsigned>(B * C / cp), static_cast<unsigned>(n_chunks));
  const XT* xt = static_cast<const XT*>(x);
#define DD_FWD(NC) fwd_partial_kernel<NC, XT><<<grid, THREADS, 0, st>>>(xt, g, part, S, cp, n_chunks, chunk, act, squared, gt)
  if (cp == 1) DD_FWD(1);
  else if (cp <= 4) DD_FWD(4);
  else if (cp <= 8) DD_FWD(8);
  else DD_FWD(32);
#undef DD_FWD
  check_cuda_launch("weighted_dice fwd_partial_kernel");
  const float scale = red == 1 ? 1.0f / static_cast<float>(B * (C - c0)) : 1.0f;
  fwd_finalize_kernel<<<1, THREADS, 0, st>>>(part, w, sums, loss, B * C, C, c0, n_chunks, nr, dr, scale, red);
  check_cuda_launch("weighted_dice fwd_finalize_kernel");
}

template <typename XT>
void launch_bwd(const void* x, const void* g, int gt, const float* w, const float* sums, const float* go, void* dx,
                int64_t B, int64_t C, int64_t S, int act, bool squared, int c0, float nr, float dr, int red,
                cudaStream_t st) {
  const int cp = act == ACT_SOFTMAX ? static_cast<int>(C) : 1;
  const float scale = red == 1 ? 1.0f / static_cast<float>(B * (C - c0)) : 1.0f;
  const XT* xt = static_cast<const XT*>(x);
  XT* dxt = static_cast<XT*>(dx);
#define DD_BWD(NC)                                                                                          \
  do {                                                                                                      \
    constexpr int per_block = THREADS * unroll_of<NC>();                                                    \
    const int64_t nb = (S + per_block - 1) / per_block;                                                     \
    DUALDIFF_CHECK(nb <= 65535, "weighted_dice cuda: spatial size too large for one grid dimension");       \
    const dim3 grid(static_cast<unsigned>(B * C / cp), static_cast<unsigned>(nb));                          \
    bwd_kernel<NC, XT><<<grid, THREADS, 0, st>>>(xt, g, w, sums, go, dxt, S, cp, C, c0, nr, dr, scale, red, \
                                                 act, squared, gt);                                         \
  } while (0)
  if (cp == 1) DD_BWD(1);
  else if (cp <= 4) DD_BWD(4);
  else if (cp <= 8) DD_BWD(8);
  else DD_BWD(32);
#undef DD_BWD
  check_cuda_launch("weighted_dice bwd_kernel");
}

void check_args(int x_dtype, int g_dtype, int64_t B, int64_t C, int64_t S, int act, int c0, int red) {
  DUALDIFF_CHECK(x_dtype >= 0 && x_dtype <= 2, "weighted_dice cuda: logits must be fp32, fp16 or bf16");
  DUALDIFF_CHECK(g_dtype >= 0 && g_dtype <= 4, "weighted_dice cuda: bad target dtype code");
  DUALDIFF_CHECK(B > 0 && C > 0 && S > 0, "weighted_dice cuda: empty input");
  DUALDIFF_CHECK(act >= 0 && act <= 2, "weighted_dice cuda: bad activation code");
  DUALDIFF_CHECK(act != ACT_SOFTMAX || C <= 32, "weighted_dice cuda: softmax supports at most 32 channels");
  DUALDIFF_CHECK(c0 == 0 || (c0 == 1 && C > 1), "weighted_dice cuda: bad c0");
  DUALDIFF_CHECK(red >= 0 && red <= 2, "weighted_dice cuda: bad reduction code");
}

}  // namespace

void weighted_dice_fwd_cuda(std::uintptr_t x, int x_dtype, std::uintptr_t g, int g_dtype, std::uintptr_t w,
                            std::uintptr_t partials, int64_t n_chunks, int64_t chunk, std::uintptr_t sums,
                            std::uintptr_t loss, int64_t B, int64_t C, int64_t S, int act, bool squared, int c0,
                            float smooth_nr, float smooth_dr, int red, std::uintptr_t stream) {
  check_args(x_dtype, g_dtype, B, C, S, act, c0, red);
  DUALDIFF_CHECK(n_chunks > 0 && n_chunks <= 65535 && chunk > 0 && n_chunks * chunk >= S,
                 "weighted_dice cuda: bad chunking");
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const int gt = g_dtype == 4 ? 3 : g_dtype;  // bool is stored as one byte 0/1
  const void* xp = reinterpret_cast<const void*>(x);
  const void* gp = reinterpret_cast<const void*>(g);
  const float* wp = w ? ptr<const float>(w) : nullptr;
  if (x_dtype == 0)
    launch_fwd<float>(xp, gp, gt, wp, ptr<float>(partials), n_chunks, chunk, ptr<float>(sums), ptr<float>(loss), B,
                      C, S, act, squared, c0, smooth_nr, smooth_dr, red, st);
  else if (x_dtype == 1)
    launch_fwd<__half>(xp, gp, gt, wp, ptr<float>(partials), n_chunks, chunk, ptr<float>(sums), ptr<float>(loss), B,
                       C, S, act, squared, c0, smooth_nr, smooth_dr, red, st);
  else
    launch_fwd<__nv_bfloat16>(xp, gp, gt, wp, ptr<float>(partials), n_chunks, chunk, ptr<float>(sums),
                              ptr<float>(loss), B, C, S, act, squared, c0, smooth_nr, smooth_dr, red, st);
}

void weighted_dice_bwd_cuda(std::uintptr_t x, int x_dtype, std::uintptr_t g, int g_dtype, std::uintptr_t w,
                            std::uintptr_t sums, std::uintptr_t go, std::uintptr_t dx, int64_t B, int64_t C,
                            int64_t S, int act, bool squared, int c0, float smooth_nr, float smooth_dr, int red,
                            std::uintptr_t stream) {
  check_args(x_dtype, g_dtype, B, C, S, act, c0, red);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const int gt = g_dtype == 4 ? 3 : g_dtype;
  const void* xp = reinterpret_cast<const void*>(x);
  const void* gp = reinterpret_cast<const void*>(g);
  const float* wp = w ? ptr<const float>(w) : nullptr;
  void* dxp = reinterpret_cast<void*>(dx);
  if (x_dtype == 0)
    launch_bwd<float>(xp, gp, gt, wp, ptr<const float>(sums), ptr<const float>(go), dxp, B, C, S, act, squared, c0,
                      smooth_nr, smooth_dr, red, st);
  else if (x_dtype == 1)
    launch_bwd<__half>(xp, gp, gt, wp, ptr<const float>(sums), ptr<const float>(go), dxp, B, C, S, act, squared, c0,
                       smooth_nr, smooth_dr, red, st);
  else
    launch_bwd<__nv_bfloat16>(xp, gp, gt, wp, ptr<const float>(sums), ptr<const float>(go), dxp, B, C, S, act,
                              squared, c0, smooth_nr, smooth_dr, red, st);
}

}  // namespace dualdiff
