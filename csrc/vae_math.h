// vae_math.h: the per-element math of vae_loss / gaussian_kl, shared by the C++ CPU kernels
// (vae_loss.cpp) and the CUDA kernels (vae_loss.cu), so the CPU tests exercise the formulas the
// GPU runs. See dualdiff/ops/vae.py for the loss and its gradients:
//   bce  r = max(l, 0) - l x + log(1 + exp(-|l|))     dr/dl = s - x              (s = sigmoid(l))
//   mse  r = (s - x)^2                                 dr/dl = 2 (s - x) s (1 - s)
//   kl   k = -0.5 (1 + logvar - mu^2 - exp(logvar))   dk/dmu = mu, dk/dlogvar = 0.5 (exp(logvar) - 1)
//
// Templates over T: float in the CUDA kernels and the scalar CPU code, a GCC vector of floats in
// the vectorised CPU loops (an arithmetic operation with a scalar operand broadcasts it; a vector
// comparison feeds the vector ?:). Exponentials and logarithms are the caller's (__expf / log1pf
// on the GPU, vector polynomials on the CPU) and come in as arguments. DD_HD marks the functions
// __host__ __device__ under nvcc; g++ (no CUDA) sees plain always-inline functions.
#pragma once

#include "dd_hd.h"

namespace dualdiff {
namespace vae {

// max(l, 0)
template <typename T>
DD_HD T relu(T l) {
  const T zero = T{};
  return l > zero ? l : zero;
}

// -|l| (its exp is in (0, 1]: no overflow)
template <typename T>
DD_HD T neg_abs(T l) {
  return l < -l ? l : -l;
}

// sigmoid(l) from e = exp(-l)
template <typename T>
DD_HD T sigmoid_from_exp(T e_neg) {
  return 1.0f / (1.0f + e_neg);
}

// BCE(sigmoid(l), x) from the logit, softplus form: log1p_e = log(1 + exp(neg_abs(l)))
template <typename T>
DD_HD T bce_term(T l, T x, T log1p_e) {
  return relu(l) - l * x + log1p_e;
}

// d BCE / d l from s = sigmoid(l)
template <typename T>
DD_HD T bce_grad(T s, T x) {
  return s - x;
}

// (sigmoid(l) - x)^2 from s = sigmoid(l)
template <typename T>
DD_HD T mse_term(T s, T x) {
  const T d = s - x;
  return d * d;
}

// d (sigmoid(l) - x)^2 / d l from s = sigmoid(l)
template <typename T>
DD_HD T mse_grad(T s, T x) {
  return 2.0f * (s - x) * s * (1.0f - s);
}

// one latent element's KL term from exp_lv = exp(logvar)
template <typename T>
DD_HD T kl_term(T mu, T logvar, T exp_lv) {
  return -0.5f * (1.0f + logvar - mu * mu - exp_lv);
}

template <typename T>
DD_HD T kl_grad_mu(T mu) {
  return mu;
}

template <typename T>
DD_HD T kl_grad_logvar(T exp_lv) {
  return 0.5f * (exp_lv - 1.0f);
}

}  // namespace vae
}  // namespace dualdiff
