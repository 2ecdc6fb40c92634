// weighted_dice_math.h: the per-element math of the weighted Dice loss and the CUDA launch
// geometry, shared by the C++ CPU kernels (weighted_dice.cpp) and the CUDA kernels
// (weighted_dice.cu), so the CPU tests exercise the formulas the GPU runs.
//
// Formula (see dualdiff/ops/weighted_dice.py): for the row r = b*C + c,
//   I, P, G = sums of p*g, p (p^2), g (g^2) over the pixels
//   dice    = 1 - (2 I + nr) / (P + G + dr),   loss term = weight * dice
//   dL/dp   = ca * g + cb * dP/dp,  ca = -2 k / D,  cb = k N / D^2  (k = dL/d dice, N, D the ratio's parts)
//   dL/dx   = dL/dp * p (1 - p)                          (sigmoid)
//           = p_c (dL/dp_c - sum_c' p_c' dL/dp_c')        (softmax over C)
//
// The element functions are templates over T: float in the CUDA kernels and the scalar CPU code,
// a GCC vector of 8 or 16 floats in the vectorised CPU loops (an arithmetic operation with a
// scalar operand broadcasts it). The exponential is the caller's (__expf on the GPU, a vector
// polynomial on the CPU). DD_HD marks them __host__ __device__ under nvcc; g++ (no CUDA) sees
// plain always-inline functions, which the per-ISA CPU variants inline into their own code.
#pragma once

#include <cstdint>

#include "dd_hd.h"

namespace dualdiff {
namespace dice {

// Integer codes shared with dualdiff/ops/weighted_dice.py (ACT_CODES, RED_CODES).
constexpr int ACT_SIGMOID = 0, ACT_SOFTMAX = 1, ACT_NONE = 2;
constexpr int RED_NONE = 0, RED_MEAN = 1, RED_SUM = 2;

// ---- element math ---------------------------------------------------------------------------
// v in every lane (T{} + v is v itself for T = float).
template <typename T>
DD_HD T splat(float v) {
  return T{} + v;
}

// sigmoid(x) from e = exp(-x).
template <typename T>
DD_HD T sigmoid_from_exp(T e_neg) {
  return 1.0f / (1.0f + e_neg);
}

// Softmax p_c = exp(x_c - m) * softmax_scale(sum_c exp(x_c - m)), m = max_c x_c.
template <typename T>
DD_HD T softmax_scale(T den) {
  return 1.0f / den;
}

// Adds one element's Dice terms: pg += p*g, ps += p (p^2), gs += g (g^2).
template <typename T>
DD_HD void add_terms(T p, T g, bool squared, T& pg, T& ps, T& gs) {
  pg += p * g;
  ps += squared ? p * p : p;
  gs += squared ? g * g : g;
}

// dL/dp of one element from the row's coefficients.
template <typename T>
DD_HD T grad_p(T p, T g, float ca, float cb, bool squared) {
  return ca * g + (squared ? (2.0f * cb) * p : splat<T>(cb));
}

// dL/dx through the sigmoid.
template <typename T>
DD_HD T sigmoid_grad(T dp, T p) {
  return dp * p * (1.0f - p);
}

// dL/dx_c through the softmax: dot = sum_c p_c * dL/dp_c over the pixel's channels.
template <typename T>
DD_HD T softmax_grad(T dp, T p, T dot) {
  return p * (dp - dot);
}

// ---- per-row math (row r = b*C + c) ---------------------------------------------------------
// Dice of one row from its sums.
DD_HD float dice_value(float inter, float psum, float gsum, float nr, float dr) {
  return 1.0f - (2.0f * inter + nr) / (psum + gsum + dr);
}

// The weight of row r: w[b] (per sample), w[r] (per sample and channel: [B, C] row-major over
// all C channels) or 1 (no weight).
DD_HD float row_weight(const float* w, bool per_channel, int64_t r, int64_t C) {
  return w ? w[per_channel ? r : r / C] : 1.0f;
}

// k = dL/d dice of row r: the upstream grad of its loss element (reduction none, [B, C - c0]) or
// of the scalar loss times scale (1/(B (C - c0)) for mean, 1 for sum), times the row's weight;
// 0 for the dropped background channel (c < c0).
DD_HD float upstream_k(const float* go, const float* w, bool per_channel, int64_t r, int64_t C, int c0, int red,
                       float scale) {
  const int64_t b = r / C, c = r % C;
  if (c < c0) return 0.0f;
  const float k = red == RED_NONE ? go[b * (C - c0) + c - c0] : go[0] * scale;
  return k * row_weight(w, per_channel, r, C);
}

// The row's coefficients of dL/dp = ca * g + cb * dP/dp.
DD_HD void grad_coefficients(float k, float inter, float psum, float gsum, float nr, float dr, float& ca,
                             float& cb) {
  const float den = psum + gsum + dr;
  ca = -2.0f * k / den;
  cb = k * (2.0f * inter + nr) / (den * den);
}

// ---- CUDA launch geometry (host arithmetic; bound to Python as weighted_dice_cuda_grid) --------
// A block covers cp consecutive rows (cp = C for softmax, 1 otherwise) with THREADS threads, each
// handling unroll(nc) pixels per step; nc is the compile-time channel bucket of cp.
constexpr int CUDA_THREADS = 256;
constexpr int64_t CUDA_MAX_GRID_X = 2147483647;  // gridDim.x limit
constexpr int64_t CUDA_MAX_GRID_YZ = 65535;      // gridDim.y / gridDim.z limit

DD_HD constexpr int cuda_unroll(int nc) { return nc == 1 ? 4 : (nc <= 4 ? 2 : 1); }

inline int cuda_channel_bucket(int64_t cp) { return cp == 1 ? 1 : cp <= 4 ? 4 : cp <= 8 ? 8 : 32; }

struct CudaGrid {
  int64_t fwd_x, fwd_y;  // forward partial sums: x strides over row groups, y = spatial chunk
  int64_t bwd_x, bwd_y;  // backward: x strides over spatial tiles, y strides over row groups
  int64_t bwd_tiles;     // spatial tiles of THREADS * unroll pixels per row group
};

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// groups = B*C / cp row groups, S pixels per row, n_chunks spatial chunks of the forward.
// Every axis stays within its limit for any sizes: the kernels loop (grid-stride) over what a
// capped axis does not cover. Offsets are computed in int64 in the kernels.
inline CudaGrid cuda_grid(int64_t groups, int64_t S, int64_t cp, int64_t n_chunks) {
  const int64_t per_tile = static_cast<int64_t>(CUDA_THREADS) * cuda_unroll(cuda_channel_bucket(cp));
  const int64_t tiles = (S + per_tile - 1) / per_tile;
  return CudaGrid{min64(groups, CUDA_MAX_GRID_X), n_chunks, min64(tiles, CUDA_MAX_GRID_X),
                  min64(groups, CUDA_MAX_GRID_YZ), tiles};
}

}  // namespace dice
}  // namespace dualdiff
