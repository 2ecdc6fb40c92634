// timestep_embedding_math.h: the per-element math of the fused DualTimestepEmbedding, shared by
// the CUDA kernel (timestep_embedding.cu) and the CPU entry points of timestep_embedding.cpp
// (which exist so that the CPU tests exercise the formulas the GPU runs):
//   feature col of timestep t: sin(t f_col) (col < half), cos(t f_{col - half}) (col < 2 half),
//                              0 beyond (the pad column of an odd freq_dim)
//   silu(x) = x / (1 + exp(-x))
// sinf / cosf / expf are the CUDA device functions under nvcc, the C library's on the host.
#pragma once

#include <cmath>

#include "dd_hd.h"

namespace dualdiff {
namespace temb {

// Column col of the sinusoidal features of t; freqs = [half] fp32 table.
DD_HD float sinusoid(float t, const float* freqs, int col, int half) {
  if (col >= 2 * half) return 0.0f;
  const float a = t * freqs[col < half ? col : col - half];
  return col < half ? sinf(a) : cosf(a);
}

DD_HD float silu(float x) { return x / (1.0f + expf(-x)); }

}  // namespace temb
}  // namespace dualdiff
