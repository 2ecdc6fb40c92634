// weighted_dice: CUDA kernels (fp32 / fp16 / bf16 logits, fp32 / fp16 / bf16 / uint8 targets,
// fp32 accumulation; weight [B] or [B, C] fp32, or none). The formulas are the shared functions
// of weighted_dice_math.h (the C++ CPU kernels use the same ones).
//
// Layout: x, g [B, C, S] contiguous. A block covers CP consecutive (b, c) rows -- a row group;
// CP = C for softmax (all channels of a pixel in one thread), CP = 1 otherwise -- and a part of S.
// Grids come from dice::cuda_grid (Python sees it as _C.weighted_dice_cuda_grid); an axis capped at
// its limit is covered by a grid-stride loop, and every offset is int64.
//   fwd_partial_kernel  grid (row groups, n_chunks): partial sums of p*g, p (p^2), g (g^2)
//   fwd_finalize_kernel one block: adds the partials in a fixed order -> sums [3, B*C], loss
//   bwd_kernel          grid (spatial tiles, row groups): elementwise, recomputes p
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dualdiff.h"
#include "weighted_dice_math.h"

namespace dualdiff {
namespace {

using dice::ACT_SIGMOID;
using dice::ACT_SOFTMAX;
using dice::RED_NONE;
constexpr int THREADS = dice::CUDA_THREADS;

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

// p for the CP channels of one pixel (softmax when NC > 1; sigmoid or identity when NC == 1).
template <int NC>
__device__ __forceinline__ void activate(float (&v)[NC], int cp, int act) {
  if (NC == 1) {
    if (act == ACT_SIGMOID) v[0] = dice::sigmoid_from_exp(__expf(-v[0]));
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
  const float inv = dice::softmax_scale(den);
#pragma unroll
  for (int c = 0; c < NC; ++c) v[c] *= inv;
}

template <int NC, typename XT>
__global__ void __launch_bounds__(THREADS) fwd_partial_kernel(
    const XT* __restrict__ x,    // [B, C, S] logits
    const void* __restrict__ g,  // [B, C, S] target (dtype code gt)
    float* __restrict__ part,    // [B*C, n_chunks, 3] out: partial sums
    int64_t groups, int64_t S, int cp, int64_t n_chunks, int64_t chunk, int act, bool squared, int gt) {
  constexpr int U = dice::cuda_unroll(NC);
  __shared__ float red[THREADS / 32][NC * 3];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t lo = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t hi = min(S, lo + chunk);
  // Grid-stride over row groups (gridDim.x is capped at 2^31 - 1); the condition is uniform per block.
  for (int64_t grp = blockIdx.x; grp < groups; grp += gridDim.x) {
    const int64_t row0 = grp * cp;
    const int64_t base = row0 * S;
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
        for (int c = 0; c < NC; ++c) dice::add_terms(xv[u][c], gv[u][c], squared, acc[c][0], acc[c][1], acc[c][2]);
      }
    }
    // Block reduction: warp shuffles, then one value per warp in shared memory.
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
    __syncthreads();  // red is rewritten by the next group
  }
}

__global__ void __launch_bounds__(THREADS) fwd_finalize_kernel(
    const float* __restrict__ part,  // [R, n_chunks, 3] partial sums
    const float* __restrict__ w,     // [B] or [B, C] weight (w_per_channel), or nullptr
    float* __restrict__ sums,        // [3, R] out
    float* __restrict__ loss,        // [B, C - c0] or [] out
    bool w_per_channel, int64_t R, int64_t C, int c0, int64_t n_chunks, float nr, float dr, float scale,
    int red) {
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
    const float d = dice::dice_value(s[0], s[1], s[2], nr, dr) * dice::row_weight(w, w_per_channel, r, C);
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
    const float* __restrict__ w,     // [B] or [B, C] weight (w_per_channel), or nullptr
    const float* __restrict__ sums,  // [3, R] saved sums
    const float* __restrict__ go,    // [B, C - c0] or [] upstream grad
    XT* __restrict__ dx,             // [B, C, S] out
    bool w_per_channel, int64_t groups, int64_t tiles, int64_t S, int cp, int64_t C, int c0, float nr, float dr,
    float scale, int red, int act, bool squared, int gt) {
  constexpr int U = dice::cuda_unroll(NC);
  const int64_t R = groups * cp;
  // Row groups on y and spatial tiles on x, each grid-stride (gridDim.y <= 65535 < groups is legal).
  for (int64_t grp = blockIdx.y; grp < groups; grp += gridDim.y) {
    const int64_t row0 = grp * cp;
    const int64_t base = row0 * S;
    float ca[NC], cb[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      ca[c] = cb[c] = 0.f;
      if (c >= cp) continue;
      const int64_t r = row0 + c;
      const float k = dice::upstream_k(go, w, w_per_channel, r, C, c0, red, scale);
      dice::grad_coefficients(k, sums[r], sums[R + r], sums[2 * R + r], nr, dr, ca[c], cb[c]);
    }
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const int64_t s0 = tile * THREADS * U + threadIdx.x;
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
          dp[c] = dice::grad_p(p[c], gv[u][c], ca[c], cb[c], squared);
          dot += p[c] * dp[c];
        }
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          if (c >= cp) break;
          float v;
          if (NC > 1)
            v = dice::softmax_grad(dp[c], p[c], dot);
          else if (act == ACT_SIGMOID)
            v = dice::sigmoid_grad(dp[c], p[c]);
          else
            v = dp[c];
          dx[base + c * S + s] = from_f<XT>(v);
        }
      }
    }
  }
}

template <typename XT>
void launch_fwd(const void* x, const void* g, int gt, const float* w, bool w_per_channel, float* part,
                int64_t n_chunks, int64_t chunk, float* sums, float* loss, int64_t B, int64_t C, int64_t S, int act,
                bool squared, int c0, float nr, float dr, int red, cudaStream_t st) {
  const int cp = act == ACT_SOFTMAX ? static_cast<int>(C) : 1;
  const int64_t groups = B * C / cp;
  const dice::CudaGrid gr = dice::cuda_grid(groups, S, cp, n_chunks);
  const dim3 grid(static_cast<unsigned>(gr.fwd_x), static_cast<unsigned>(gr.fwd_y));
  const XT* xt = static_cast<const XT*>(x);
#define DD_FWD(NC)                                                                                                \
  fwd_partial_kernel<NC, XT><<<grid, THREADS, 0, st>>>(xt, g, part, groups, S, cp, n_chunks, chunk, act, squared, \
                                                       gt)
  switch (dice::cuda_channel_bucket(cp)) {
    case 1: DD_FWD(1); break;
    case 4: DD_FWD(4); break;
    case 8: DD_FWD(8); break;
    default: DD_FWD(32);
  }
#undef DD_FWD
  check_cuda_launch("weighted_dice fwd_partial_kernel");
  const float scale = red == dice::RED_MEAN ? 1.0f / static_cast<float>(B * (C - c0)) : 1.0f;
  fwd_finalize_kernel<<<1, THREADS, 0, st>>>(part, w, sums, loss, w_per_channel, B * C, C, c0, n_chunks, nr, dr,
                                             scale, red);
  check_cuda_launch("weighted_dice fwd_finalize_kernel");
}

template <typename XT>
void launch_bwd(const void* x, const void* g, int gt, const float* w, bool w_per_channel, const float* sums,
                const float* go, void* dx, int64_t B, int64_t C, int64_t S, int act, bool squared, int c0, float nr,
                float dr, int red, cudaStream_t st) {
  const int cp = act == ACT_SOFTMAX ? static_cast<int>(C) : 1;
  const int64_t groups = B * C / cp;
  const dice::CudaGrid gr = dice::cuda_grid(groups, S, cp, 1);
  const dim3 grid(static_cast<unsigned>(gr.bwd_x), static_cast<unsigned>(gr.bwd_y));
  const float scale = red == dice::RED_MEAN ? 1.0f / static_cast<float>(B * (C - c0)) : 1.0f;
  const XT* xt = static_cast<const XT*>(x);
  XT* dxt = static_cast<XT*>(dx);
#define DD_BWD(NC)                                                                                                  \
  bwd_kernel<NC, XT><<<grid, THREADS, 0, st>>>(xt, g, w, sums, go, dxt, w_per_channel, groups, gr.bwd_tiles, S, cp, \
                                               C, c0, nr, dr, scale, red, act, squared, gt)
  switch (dice::cuda_channel_bucket(cp)) {
    case 1: DD_BWD(1); break;
    case 4: DD_BWD(4); break;
    case 8: DD_BWD(8); break;
    default: DD_BWD(32);
  }
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
                            bool w_per_channel, std::uintptr_t partials, int64_t n_chunks, int64_t chunk,
                            std::uintptr_t sums, std::uintptr_t loss, int64_t B, int64_t C, int64_t S, int act,
                            bool squared, int c0, float smooth_nr, float smooth_dr, int red, std::uintptr_t stream) {
  check_args(x_dtype, g_dtype, B, C, S, act, c0, red);
  DUALDIFF_CHECK(n_chunks > 0 && n_chunks <= dice::CUDA_MAX_GRID_YZ && chunk > 0 && n_chunks * chunk >= S,
                 "weighted_dice cuda: bad chunking");
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const int gt = g_dtype == 4 ? 3 : g_dtype;  // bool is stored as one byte 0/1
  const void* xp = reinterpret_cast<const void*>(x);
  const void* gp = reinterpret_cast<const void*>(g);
  const float* wp = w ? ptr<const float>(w) : nullptr;
  float* part = ptr<float>(partials);
  float* sp = ptr<float>(sums);
  float* lp = ptr<float>(loss);
  if (x_dtype == 0)
    launch_fwd<float>(xp, gp, gt, wp, w_per_channel, part, n_chunks, chunk, sp, lp, B, C, S, act, squared, c0,
                      smooth_nr, smooth_dr, red, st);
  else if (x_dtype == 1)
    launch_fwd<__half>(xp, gp, gt, wp, w_per_channel, part, n_chunks, chunk, sp, lp, B, C, S, act, squared, c0,
                       smooth_nr, smooth_dr, red, st);
  else
    launch_fwd<__nv_bfloat16>(xp, gp, gt, wp, w_per_channel, part, n_chunks, chunk, sp, lp, B, C, S, act, squared,
                              c0, smooth_nr, smooth_dr, red, st);
}

void weighted_dice_bwd_cuda(std::uintptr_t x, int x_dtype, std::uintptr_t g, int g_dtype, std::uintptr_t w,
                            bool w_per_channel, std::uintptr_t sums, std::uintptr_t go, std::uintptr_t dx, int64_t B,
                            int64_t C, int64_t S, int act, bool squared, int c0, float smooth_nr, float smooth_dr,
                            int red, std::uintptr_t stream) {
  check_args(x_dtype, g_dtype, B, C, S, act, c0, red);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const int gt = g_dtype == 4 ? 3 : g_dtype;
  const void* xp = reinterpret_cast<const void*>(x);
  const void* gp = reinterpret_cast<const void*>(g);
  const float* wp = w ? ptr<const float>(w) : nullptr;
  void* dxp = reinterpret_cast<void*>(dx);
  const float* sp = ptr<const float>(sums);
  const float* gop = ptr<const float>(go);
  if (x_dtype == 0)
    launch_bwd<float>(xp, gp, gt, wp, w_per_channel, sp, gop, dxp, B, C, S, act, squared, c0, smooth_nr, smooth_dr,
                      red, st);
  else if (x_dtype == 1)
    launch_bwd<__half>(xp, gp, gt, wp, w_per_channel, sp, gop, dxp, B, C, S, act, squared, c0, smooth_nr, smooth_dr,
                       red, st);
  else
    launch_bwd<__nv_bfloat16>(xp, gp, gt, wp, w_per_channel, sp, gop, dxp, B, C, S, act, squared, c0, smooth_nr,
                              smooth_dr, red, st);
}

}  // namespace dualdiff
