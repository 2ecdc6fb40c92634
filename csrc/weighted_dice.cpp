// weighted_dice: C++ CPU kernels (OpenMP) and registration of the CUDA launchers.
//
// Layout: logits x [B, C, S] fp32 and target g [B, C, S] (fp32 or uint8; bool arrives as
// uint8), contiguous; weight [B] or [B, C] fp32, or none. Rows are the B*C (b, c) pairs. The
// formulas (activations, Dice terms, their derivatives) are the shared functions of
// weighted_dice_math.h, which the CUDA kernels use too.
//
// forward: work items (row, spatial chunk) -- or (b, chunk) for softmax, which needs every
// channel of a pixel -- compute partial sums of p*g, p (p^2), g (g^2) in parallel (dynamic
// schedule: a thread that loses its core on a shared machine does not stall the rest); a serial
// pass adds them in a fixed order (deterministic for any thread count) and writes the
// [3, B, C] sums and the loss. backward: one parallel elementwise pass that recomputes p.
//
// The inner loops use explicit vectors (with a polynomial exp): 8 lanes compiled for the
// baseline ISA and for AVX2+FMA, 16 lanes for AVX-512, chosen at run time (DUALDIFF_CPU_ISA=
// base|avx2 caps the choice, for tests). Softmax over C = 2 .. 8 channels runs a body with C
// fixed at compile time that keeps the per-pixel exps and the accumulators in registers
// (one exp per element, one division per pixel); other C use a scratch-buffer body.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu_parallel.h"
#include "dualdiff.h"

// 32-byte vectors in the baseline-ISA variant: only passed between always-inline functions.
#pragma GCC diagnostic ignored "-Wpsabi"

#include "weighted_dice_math.h"  // after the pragma: its templates are instantiated on those vectors

#ifdef DUALDIFF_WITH_OPENMP
#include <omp.h>
#endif

namespace dualdiff {
namespace {

using dice::ACT_NONE;
using dice::ACT_SIGMOID;
using dice::ACT_SOFTMAX;
using dice::RED_MEAN;
using dice::RED_NONE;
using dice::splat;
constexpr int64_t CHUNK = 2048;  // pixels per work item

#define DD_INLINE inline __attribute__((always_inline))

// Vectors (GCC/Clang vector extensions) of W = 8 or 16 floats. Explicit vectors because the
// auto-vectoriser turns the exp clamp into branches and gives up. The 8-lane code is compiled
// for the baseline ISA (SSE pairs) and for AVX2+FMA, the 16-lane code for AVX-512; the variant
// is chosen at run time.
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef uint8_t vu8x8 __attribute__((vector_size(8)));
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
typedef uint8_t vu8x16 __attribute__((vector_size(16)));

template <typename V>
struct VT;
template <>
struct VT<vf8> {
  using I = vi8;
  using U8 = vu8x8;
  static constexpr int W = 8;
};
template <>
struct VT<vf16> {
  using I = vi16;
  using U8 = vu8x16;
  static constexpr int W = 16;
};
constexpr int MAX_W = 16;
constexpr int MAX_FIXED_C = 8;  // softmax bodies with C fixed at compile time: C = 2 .. 8

template <typename V, typename M>
DD_INLINE V vsel(M m, V a, V b) {
  return m ? a : b;
}
template <typename V>
DD_INLINE V vmax(V a, V b) {
  return a > b ? a : b;
}
template <typename V>
DD_INLINE typename VT<V>::I lanes_below(int n) {
  typename VT<V>::I idx;
  for (int i = 0; i < VT<V>::W; ++i) idx[i] = i;
  return idx < (typename VT<V>::I{} + n);
}

template <typename V>
DD_INLINE V loadv(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V>
DD_INLINE V loadv(const uint8_t* p) {
  typename VT<V>::U8 u;
  std::memcpy(&u, p, sizeof(u));
  return __builtin_convertvector(u, V);
}
// First n (< W) elements, zero padded.
template <typename V, typename T>
DD_INLINE V loadv_n(const T* p, int n) {
  T tmp[VT<V>::W] = {};
  for (int i = 0; i < n; ++i) tmp[i] = p[i];
  return loadv<V>(tmp);
}
// FULL: all W lanes; else the first n.
template <typename V, bool FULL, typename T>
DD_INLINE V ld(const T* p, int n) {
  return FULL ? loadv<V>(p) : loadv_n<V>(p, n);
}
template <typename V>
DD_INLINE void storev(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename V, bool FULL>
DD_INLINE void st(float* p, V v, int n) {
  if (FULL) {
    storev(p, v);
  } else {
    float tmp[VT<V>::W];
    storev(tmp, v);
    for (int i = 0; i < n; ++i) p[i] = tmp[i];
  }
}
template <typename V>
DD_INLINE double hsum(V v) {
  double s = 0.0;
  for (int i = 0; i < VT<V>::W; ++i) s += v[i];
  return s;
}

// e^x, ~2 ulp: Cody-Waite reduction x = r ln2 + f, then a degree-5 polynomial fitted to e^f on
// |f| <= ln2/2 (max relative error 2.1e-7 in fp32 arithmetic), scaled by 2^r through the
// exponent bits. x is clamped to [-87, 88] (UPPER = false: the caller knows x <= 0). NaN stays
// NaN. 2^r comes from the bits of the rounding sum t = x/ln2 + 1.5*2^23, whose low mantissa
// bits hold r (two's complement): ((bits(t) + 127) << 23) == (r + 127) << 23 mod 2^32.
template <bool UPPER = true, typename V>
DD_INLINE V vexp(V x) {
  using I = typename VT<V>::I;
  x = vsel(x < splat<V>(-87.0f), splat<V>(-87.0f), x);
  if (UPPER) x = vsel(x > splat<V>(88.0f), splat<V>(88.0f), x);
  const V t = x * 1.44269504088896341f + 12582912.0f;
  const V r = t - 12582912.0f;  // round(x / ln2)
  const V f = (x - r * 0.693359375f) + r * 2.12194440e-4f;
  V p = splat<V>(0.008297654800117016f);
  p = p * f + 0.04191538318991661f;
  p = p * f + 0.16667574644088745f;
  p = p * f + 0.49998894333839417f;
  p = p * f + 0.9999997019767761f;
  p = p * f + 1.0000001192092896f;
  I bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits = (bits + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <int ACT, typename V>
DD_INLINE V activate(V x) {
  if (ACT == ACT_SIGMOID) return dice::sigmoid_from_exp(vexp(-x));
  return x;  // ACT_NONE (softmax is handled across channels)
}

struct Params {
  int64_t B, C, S;
  int64_t n_chunks;
  int c0;
  float smooth_nr, smooth_dr;
};

// ---- forward items -----------------------------------------------------------------------
// Sums of one row over pixels [lo, hi) -> part[3].
template <typename V, int ACT, bool SQ, typename GT>
DD_INLINE void fwd_row_item(const float* x, const GT* g, int64_t lo, int64_t hi, double* part) {
  constexpr int W = VT<V>::W;
  V a0 = {}, a1 = {}, a2 = {};
  int64_t i = lo;
  for (; i + W <= hi; i += W) {
    dice::add_terms(activate<ACT>(loadv<V>(x + i)), loadv<V>(g + i), SQ, a0, a1, a2);
  }
  if (i < hi) {
    const int n = static_cast<int>(hi - i);
    const V p = vsel(lanes_below<V>(n), activate<ACT>(loadv_n<V>(x + i, n)), splat<V>(0.f));
    dice::add_terms(p, loadv_n<V>(g + i, n), SQ, a0, a1, a2);
  }
  part[0] = hsum(a0);
  part[1] = hsum(a1);
  part[2] = hsum(a2);
}

// Softmax over NC (compile-time) channels of stride S at pixels [i, i + W) (the first n when
// !FULL): p[c] (zero in the lanes past n).
template <typename V, int NC, bool FULL>
DD_INLINE void softmax_block(const float* x, int64_t S, int64_t i, int n, V* p) {
  V mx = ld<V, FULL>(x + i, n);
  for (int c = 0; c < NC; ++c) {
    p[c] = ld<V, FULL>(x + c * S + i, n);
    mx = vmax(mx, p[c]);
  }
  V den = {};
  for (int c = 0; c < NC; ++c) {
    p[c] = vexp<false>(p[c] - mx);
    den += p[c];
  }
  V inv = dice::softmax_scale(den);
  if (!FULL) inv = vsel(lanes_below<V>(n), inv, splat<V>(0.f));
  for (int c = 0; c < NC; ++c) p[c] *= inv;
}

template <typename V, int NC, bool SQ, bool FULL, typename GT>
DD_INLINE void fwd_softmax_block(const float* x, const GT* g, int64_t S, int64_t i, int n, V* acc) {
  V p[NC];
  softmax_block<V, NC, FULL>(x, S, i, n, p);
  for (int c = 0; c < NC; ++c)
    dice::add_terms(p[c], ld<V, FULL>(g + c * S + i, n), SQ, acc[3 * c], acc[3 * c + 1], acc[3 * c + 2]);
}

// Softmax over NC channels (stride S) of one sample, pixels [lo, hi) -> part[c * 3 + k];
// the accumulators stay in registers.
template <typename V, int NC, bool SQ, typename GT>
DD_INLINE void fwd_softmax_fixed(const float* x, const GT* g, int64_t S, int64_t lo, int64_t hi, double* part) {
  constexpr int W = VT<V>::W;
  V acc[3 * NC];
  for (int k = 0; k < 3 * NC; ++k) acc[k] = V{};
  int64_t i = lo;
  for (; i + W <= hi; i += W) fwd_softmax_block<V, NC, SQ, true>(x, g, S, i, W, acc);
  if (i < hi) fwd_softmax_block<V, NC, SQ, false>(x, g, S, i, static_cast<int>(hi - i), acc);
  for (int k = 0; k < 3 * NC; ++k) part[k] = hsum(acc[k]);
}

// Softmax over C channels of the W pixels at i (n of them valid): writes exp(x_c - max) for every
// c to e[c*W ...] and returns 1 / sum_c exp(x_c - max).
template <typename V>
DD_INLINE V softmax_exps(const float* x, int64_t C, int64_t S, int64_t i, int n, float* e) {
  constexpr int W = VT<V>::W;
  const bool full = n == W;
  V mx = full ? loadv<V>(x + i) : loadv_n<V>(x + i, n);
  for (int64_t c = 1; c < C; ++c) mx = vmax(mx, full ? loadv<V>(x + c * S + i) : loadv_n<V>(x + c * S + i, n));
  V den = {};
  for (int64_t c = 0; c < C; ++c) {
    const V ec = vexp<false>((full ? loadv<V>(x + c * S + i) : loadv_n<V>(x + c * S + i, n)) - mx);
    storev(e + c * W, ec);
    den += ec;
  }
  return dice::softmax_scale(den);
}

// Any C: buf holds 4*C*W floats of scratch (accessed unaligned).
template <typename V, bool SQ, typename GT>
DD_INLINE void fwd_softmax_any(const float* x, const GT* g, int64_t C, int64_t S, int64_t lo, int64_t hi,
                               double* part, float* buf) {
  constexpr int W = VT<V>::W;
  float* e = buf;
  float* acc = buf + C * W;
  for (int64_t k = 0; k < 3 * C * W; ++k) acc[k] = 0.f;
  for (int64_t i = lo; i < hi; i += W) {
    const int n = static_cast<int>(std::min<int64_t>(W, hi - i));
    const bool full = n == W;
    V inv = softmax_exps<V>(x, C, S, i, n, e);
    if (!full) inv = vsel(lanes_below<V>(n), inv, splat<V>(0.f));
    for (int64_t c = 0; c < C; ++c) {
      const V p = loadv<V>(e + c * W) * inv;
      const V q = full ? loadv<V>(g + c * S + i) : loadv_n<V>(g + c * S + i, n);
      float* a = acc + 3 * c * W;
      V pg = loadv<V>(a), ps = loadv<V>(a + W), gs = loadv<V>(a + 2 * W);
      dice::add_terms(p, q, SQ, pg, ps, gs);
      storev(a, pg);
      storev(a + W, ps);
      storev(a + 2 * W, gs);
    }
  }
  for (int64_t k = 0; k < 3 * C; ++k) part[k] = hsum(loadv<V>(acc + k * W));
}

// ---- backward items ----------------------------------------------------------------------
template <int ACT, bool SQ, typename V>
DD_INLINE V row_grad(V xv, V q, float ca, float cb) {
  const V p = activate<ACT>(xv);
  const V dp = dice::grad_p(p, q, ca, cb, SQ);
  return ACT == ACT_SIGMOID ? dice::sigmoid_grad(dp, p) : dp;
}

template <typename V, int ACT, bool SQ, typename GT>
DD_INLINE void bwd_row_item(const float* x, const GT* g, float* dx, int64_t lo, int64_t hi, float ca, float cb) {
  constexpr int W = VT<V>::W;
  int64_t i = lo;
  for (; i + W <= hi; i += W) storev(dx + i, row_grad<ACT, SQ>(loadv<V>(x + i), loadv<V>(g + i), ca, cb));
  if (i < hi) {
    const int n = static_cast<int>(hi - i);
    st<V, false>(dx + i, row_grad<ACT, SQ>(loadv_n<V>(x + i, n), loadv_n<V>(g + i, n), ca, cb), n);
  }
}

template <typename V, int NC, bool SQ, bool FULL, typename GT>
DD_INLINE void bwd_softmax_block(const float* x, const GT* g, float* dx, int64_t S, int64_t i, int n,
                                 const float* ca, const float* cb) {
  V p[NC], dp[NC];
  softmax_block<V, NC, FULL>(x, S, i, n, p);
  V dot = {};
  for (int c = 0; c < NC; ++c) {
    dp[c] = dice::grad_p(p[c], ld<V, FULL>(g + c * S + i, n), ca[c], cb[c], SQ);
    dot += p[c] * dp[c];
  }
  for (int c = 0; c < NC; ++c) st<V, FULL>(dx + c * S + i, dice::softmax_grad(dp[c], p[c], dot), n);
}

template <typename V, int NC, bool SQ, typename GT>
DD_INLINE void bwd_softmax_fixed(const float* x, const GT* g, float* dx, int64_t S, int64_t lo, int64_t hi,
                                 const float* ca_, const float* cb_) {
  constexpr int W = VT<V>::W;
  float ca[NC], cb[NC];
  for (int c = 0; c < NC; ++c) ca[c] = ca_[c], cb[c] = cb_[c];
  int64_t i = lo;
  for (; i + W <= hi; i += W) bwd_softmax_block<V, NC, SQ, true>(x, g, dx, S, i, W, ca, cb);
  if (i < hi) bwd_softmax_block<V, NC, SQ, false>(x, g, dx, S, i, static_cast<int>(hi - i), ca, cb);
}

// Any C: buf holds 2*C*W floats of scratch (accessed unaligned).
template <typename V, bool SQ, typename GT>
DD_INLINE void bwd_softmax_any(const float* x, const GT* g, float* dx, int64_t C, int64_t S, int64_t lo,
                               int64_t hi, const float* ca, const float* cb, float* buf) {
  constexpr int W = VT<V>::W;
  float* pb = buf;
  float* dpb = buf + C * W;
  for (int64_t i = lo; i < hi; i += W) {
    const int n = static_cast<int>(std::min<int64_t>(W, hi - i));
    const bool full = n == W;
    const V inv = softmax_exps<V>(x, C, S, i, n, pb);
    V dot = {};
    for (int64_t c = 0; c < C; ++c) {
      const V p = loadv<V>(pb + c * W) * inv;
      const V q = full ? loadv<V>(g + c * S + i) : loadv_n<V>(g + c * S + i, n);
      const V dp = dice::grad_p(p, q, ca[c], cb[c], SQ);
      storev(pb + c * W, p);
      storev(dpb + c * W, dp);
      dot += p * dp;
    }
    for (int64_t c = 0; c < C; ++c) {
      const V d = dice::softmax_grad(loadv<V>(dpb + c * W), loadv<V>(pb + c * W), dot);
      if (full)
        storev(dx + c * S + i, d);
      else
        st<V, false>(dx + c * S + i, d, n);
    }
  }
}

// ---- per-ISA entry of one work item (the bodies above are inlined and vectorised per ISA) ----
// Softmax over C = 2 .. MAX_FIXED_C uses the fixed-C bodies, other C the generic one.
#define DD_DEFINE_ITEMS(SUFFIX, ATTR, V)                                                                \
  template <int ACT, bool SQ, typename GT>                                                              \
  ATTR void fwd_item_##SUFFIX(const float* x, const GT* g, const Params& P, int64_t item, double* part, \
                              float* buf) {                                                             \
    const int64_t grp = item / P.n_chunks, chunk = item % P.n_chunks;                                   \
    const int64_t lo = chunk * CHUNK, hi = std::min(P.S, lo + CHUNK);                                   \
    if (ACT == ACT_SOFTMAX) {                                                                           \
      const int64_t off = grp * P.C * P.S;                                                              \
      switch (P.C) {                                                                                    \
        case 2: fwd_softmax_fixed<V, 2, SQ, GT>(x + off, g + off, P.S, lo, hi, part); break;            \
        case 3: fwd_softmax_fixed<V, 3, SQ, GT>(x + off, g + off, P.S, lo, hi, part); break;            \
        case 4: fwd_softmax_fixed<V, 4, SQ, GT>(x + off, g + off, P.S, lo, hi, part); break;            \
        case 5: fwd_softmax_fixed<V, 5, SQ, GT>(x + off, g + off, P.S, lo, hi, part); break;            \
        case 6: fwd_softmax_fixed<V, 6, SQ, GT>(x + off, g + off, P.S, lo, hi, part); break;            \
        case 7: fwd_softmax_fixed<V, 7, SQ, GT>(x + off, g + off, P.S, lo, hi, part); break;            \
        case 8: fwd_softmax_fixed<V, 8, SQ, GT>(x + off, g + off, P.S, lo, hi, part); break;            \
        default: fwd_softmax_any<V, SQ, GT>(x + off, g + off, P.C, P.S, lo, hi, part, buf);             \
      }                                                                                                 \
    } else {                                                                                            \
      fwd_row_item<V, ACT, SQ, GT>(x + grp * P.S, g + grp * P.S, lo, hi, part);                         \
    }                                                                                                   \
  }                                                                                                     \
  template <int ACT, bool SQ, typename GT>                                                              \
  ATTR void bwd_item_##SUFFIX(const float* x, const GT* g, float* dx, const Params& P, int64_t item,    \
                              const float* ca, const float* cb, float* buf) {                           \
    const int64_t grp = item / P.n_chunks, chunk = item % P.n_chunks;                                   \
    const int64_t lo = chunk * CHUNK, hi = std::min(P.S, lo + CHUNK);                                   \
    if (ACT == ACT_SOFTMAX) {                                                                           \
      const int64_t off = grp * P.C * P.S;                                                              \
      const float *a = ca + grp * P.C, *b = cb + grp * P.C;                                             \
      switch (P.C) {                                                                                    \
        case 2: bwd_softmax_fixed<V, 2, SQ, GT>(x + off, g + off, dx + off, P.S, lo, hi, a, b); break;  \
        case 3: bwd_softmax_fixed<V, 3, SQ, GT>(x + off, g + off, dx + off, P.S, lo, hi, a, b); break;  \
        case 4: bwd_softmax_fixed<V, 4, SQ, GT>(x + off, g + off, dx + off, P.S, lo, hi, a, b); break;  \
        case 5: bwd_softmax_fixed<V, 5, SQ, GT>(x + off, g + off, dx + off, P.S, lo, hi, a, b); break;  \
        case 6: bwd_softmax_fixed<V, 6, SQ, GT>(x + off, g + off, dx + off, P.S, lo, hi, a, b); break;  \
        case 7: bwd_softmax_fixed<V, 7, SQ, GT>(x + off, g + off, dx + off, P.S, lo, hi, a, b); break;  \
        case 8: bwd_softmax_fixed<V, 8, SQ, GT>(x + off, g + off, dx + off, P.S, lo, hi, a, b); break;  \
        default: bwd_softmax_any<V, SQ, GT>(x + off, g + off, dx + off, P.C, P.S, lo, hi, a, b, buf);   \
      }                                                                                                 \
    } else {                                                                                            \
      const int64_t off = grp * P.S;                                                                    \
      bwd_row_item<V, ACT, SQ, GT>(x + off, g + off, dx + off, lo, hi, ca[grp], cb[grp]);               \
    }                                                                                                   \
  }

DD_DEFINE_ITEMS(base, , vf8)
#if defined(__x86_64__) && defined(__GNUC__)
#define DD_HAVE_X86 1
DD_DEFINE_ITEMS(avx2, __attribute__((target("avx2,fma"))), vf8)
DD_DEFINE_ITEMS(avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"))), vf16)
#endif

enum class Isa { Base, Avx2, Avx512 };

Isa pick_isa() {
#ifdef DD_HAVE_X86
  static const Isa isa = [] {
    __builtin_cpu_init();
    // DUALDIFF_CPU_ISA=base|avx2 caps the variant (to test the other code paths on this CPU).
    const char* cap = std::getenv("DUALDIFF_CPU_ISA");
    if (cap && std::strcmp(cap, "base") == 0) return Isa::Base;
    const bool allow512 = !(cap && std::strcmp(cap, "avx2") == 0);
    if (allow512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      return Isa::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
    return Isa::Base;
  }();
  return isa;
#else
  return Isa::Base;
#endif
}

// ---- drivers -------------------------------------------------------------------------------
template <int ACT, bool SQ, typename GT>
void forward(const float* x, const GT* g, const float* w, bool w_per_channel, float* sums, float* loss, const Params& P,
             int red) {
  const int64_t R = P.B * P.C;
  const int64_t groups = ACT == ACT_SOFTMAX ? P.B : R;
  const int64_t cp = ACT == ACT_SOFTMAX ? P.C : 1;  // rows per group
  const int64_t items = groups * P.n_chunks;
  // part[(group * n_chunks + chunk) * cp * 3 + c * 3 + k]
  std::vector<double> part(static_cast<size_t>(items * cp * 3));
  const Isa isa = pick_isa();
  const int threads = items > 1 ? cpu_threads_for(P.B * P.C * P.S) : 1;
#ifdef DUALDIFF_WITH_OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
  {
    std::vector<float> buf(ACT == ACT_SOFTMAX && P.C > MAX_FIXED_C ? static_cast<size_t>(4 * P.C * MAX_W) : 0);
#ifdef DUALDIFF_WITH_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t it = 0; it < items; ++it) {
      double* pt = part.data() + it * cp * 3;
#ifdef DD_HAVE_X86
      if (isa == Isa::Avx512) {
        fwd_item_avx512<ACT, SQ, GT>(x, g, P, it, pt, buf.data());
        continue;
      }
      if (isa == Isa::Avx2) {
        fwd_item_avx2<ACT, SQ, GT>(x, g, P, it, pt, buf.data());
        continue;
      }
#endif
      fwd_item_base<ACT, SQ, GT>(x, g, P, it, pt, buf.data());
    }
  }
  (void)isa;
  double total = 0.0;
  const int64_t kept = P.C - P.c0;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t grp = r / cp, c = r % cp;
    double s[3] = {0, 0, 0};
    for (int64_t ch = 0; ch < P.n_chunks; ++ch)
      for (int k = 0; k < 3; ++k) s[k] += part[((grp * P.n_chunks + ch) * cp + c) * 3 + k];
    for (int k = 0; k < 3; ++k) sums[k * R + r] = static_cast<float>(s[k]);
    const int64_t b = r / P.C, cc = r % P.C;
    if (cc < P.c0) continue;
    const float d = dice::dice_value(sums[r], sums[R + r], sums[2 * R + r], P.smooth_nr, P.smooth_dr) *
                    dice::row_weight(w, w_per_channel, r, P.C);
    if (red == RED_NONE)
      loss[b * kept + cc - P.c0] = d;
    else
      total += d;
  }
  if (red != RED_NONE) loss[0] = static_cast<float>(red == RED_MEAN ? total / static_cast<double>(P.B * kept) : total);
}

template <int ACT, bool SQ, typename GT>
void backward(const float* x, const GT* g, const float* w, bool w_per_channel, const float* sums, const float* go,
              float* dx, const Params& P, int red) {
  const int64_t R = P.B * P.C;
  const int64_t kept = P.C - P.c0;
  std::vector<float> ca(R), cb(R);
  const float scale = red == RED_MEAN ? 1.0f / static_cast<float>(P.B * kept) : 1.0f;
  for (int64_t r = 0; r < R; ++r) {
    const float k = dice::upstream_k(go, w, w_per_channel, r, P.C, P.c0, red, scale);
    dice::grad_coefficients(k, sums[r], sums[R + r], sums[2 * R + r], P.smooth_nr, P.smooth_dr, ca[r], cb[r]);
  }
  const int64_t groups = ACT == ACT_SOFTMAX ? P.B : R;
  const int64_t items = groups * P.n_chunks;
  const Isa isa = pick_isa();
  const int threads = items > 1 ? cpu_threads_for(P.B * P.C * P.S) : 1;
#ifdef DUALDIFF_WITH_OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
  {
    std::vector<float> buf(ACT == ACT_SOFTMAX && P.C > MAX_FIXED_C ? static_cast<size_t>(2 * P.C * MAX_W) : 0);
#ifdef DUALDIFF_WITH_OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t it = 0; it < items; ++it) {
#ifdef DD_HAVE_X86
      if (isa == Isa::Avx512) {
        bwd_item_avx512<ACT, SQ, GT>(x, g, dx, P, it, ca.data(), cb.data(), buf.data());
        continue;
      }
      if (isa == Isa::Avx2) {
        bwd_item_avx2<ACT, SQ, GT>(x, g, dx, P, it, ca.data(), cb.data(), buf.data());
        continue;
      }
#endif
      bwd_item_base<ACT, SQ, GT>(x, g, dx, P, it, ca.data(), cb.data(), buf.data());
    }
  }
  (void)isa;
}

// Dispatch on (activation, squared, target dtype) to a template instance.
template <template <int, bool, typename> class F, typename... Args>
void dispatch(int act, bool squared, int g_dtype, Args... args) {
  DUALDIFF_CHECK(g_dtype == static_cast<int>(DType::Float32) || g_dtype == static_cast<int>(DType::UInt8) ||
                     g_dtype == static_cast<int>(DType::Bool),
                 "weighted_dice cpu: target must be float32 or uint8/bool");
  DUALDIFF_CHECK(act >= 0 && act <= 2, "weighted_dice cpu: bad activation code");
  const bool u8 = g_dtype != static_cast<int>(DType::Float32);
#define DD_CASE(A, SQ)                                      \
  if (act == A && squared == SQ) {                          \
    if (u8)                                                 \
      F<A, SQ, uint8_t>::run(args...);                      \
    else                                                    \
      F<A, SQ, float>::run(args...);                        \
    return;                                                 \
  }
  DD_CASE(ACT_SIGMOID, false) DD_CASE(ACT_SIGMOID, true) DD_CASE(ACT_SOFTMAX, false)
  DD_CASE(ACT_SOFTMAX, true) DD_CASE(ACT_NONE, false) DD_CASE(ACT_NONE, true)
#undef DD_CASE
}

template <int ACT, bool SQ, typename GT>
struct Fwd {
  static void run(std::uintptr_t x, std::uintptr_t g, std::uintptr_t w, bool w_per_channel, std::uintptr_t sums,
                  std::uintptr_t loss, Params P, int red) {
    forward<ACT, SQ, GT>(ptr<const float>(x), ptr<const GT>(g), w ? ptr<const float>(w) : nullptr, w_per_channel,
                         ptr<float>(sums), ptr<float>(loss), P, red);
  }
};

template <int ACT, bool SQ, typename GT>
struct Bwd {
  static void run(std::uintptr_t x, std::uintptr_t g, std::uintptr_t w, bool w_per_channel, std::uintptr_t sums,
                  std::uintptr_t go, std::uintptr_t dx, Params P, int red) {
    backward<ACT, SQ, GT>(ptr<const float>(x), ptr<const GT>(g), w ? ptr<const float>(w) : nullptr, w_per_channel,
                          ptr<const float>(sums), ptr<const float>(go), ptr<float>(dx), P, red);
  }
};

Params make_params(int64_t B, int64_t C, int64_t S, int c0, float nr, float dr, int red) {
  DUALDIFF_CHECK(B > 0 && C > 0 && S > 0, "weighted_dice: empty input");
  DUALDIFF_CHECK(c0 == 0 || (c0 == 1 && C > 1), "weighted_dice: bad c0");
  DUALDIFF_CHECK(red >= 0 && red <= 2, "weighted_dice: bad reduction code");
  return Params{B, C, S, (S + CHUNK - 1) / CHUNK, c0, nr, dr};
}

}  // namespace

#ifdef DUALDIFF_WITH_CUDA
// weighted_dice.cu
void weighted_dice_fwd_cuda(std::uintptr_t x, int x_dtype, std::uintptr_t g, int g_dtype, std::uintptr_t w,
                            bool w_per_channel, std::uintptr_t partials, int64_t n_chunks, int64_t chunk,
                            std::uintptr_t sums, std::uintptr_t loss, int64_t B, int64_t C, int64_t S, int act,
                            bool squared, int c0, float smooth_nr, float smooth_dr, int red, std::uintptr_t stream);
void weighted_dice_bwd_cuda(std::uintptr_t x, int x_dtype, std::uintptr_t g, int g_dtype, std::uintptr_t w,
                            bool w_per_channel, std::uintptr_t sums, std::uintptr_t go, std::uintptr_t dx, int64_t B,
                            int64_t C, int64_t S, int act, bool squared, int c0, float smooth_nr, float smooth_dr,
                            int red, std::uintptr_t stream);
#endif

void register_weighted_dice(py::module_& m) {
  m.def(
      "weighted_dice_fwd_cpu",
      [](std::uintptr_t x, std::uintptr_t g, int g_dtype, std::uintptr_t w, bool w_per_channel, std::uintptr_t sums,
         std::uintptr_t loss, int64_t B, int64_t C, int64_t S, int act, bool squared, int c0, float smooth_nr,
         float smooth_dr, int red) {
        const Params P = make_params(B, C, S, c0, smooth_nr, smooth_dr, red);
        dispatch<Fwd>(act, squared, g_dtype, x, g, w, w_per_channel, sums, loss, P, red);
      },
      "Weighted Dice forward on the CPU: x [B,C,S] fp32, target fp32/uint8, weight fp32 [B] "
      "(w_per_channel false) or [B,C] (true) or 0 -> sums [3,B,C] fp32, loss ([] or [B,C-c0]) fp32",
      py::arg("x"), py::arg("g"), py::arg("g_dtype"), py::arg("w"), py::arg("w_per_channel"), py::arg("sums"),
      py::arg("loss"), py::arg("B"), py::arg("C"), py::arg("S"), py::arg("act"), py::arg("squared"), py::arg("c0"),
      py::arg("smooth_nr"), py::arg("smooth_dr"), py::arg("reduction"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "weighted_dice_bwd_cpu",
      [](std::uintptr_t x, std::uintptr_t g, int g_dtype, std::uintptr_t w, bool w_per_channel, std::uintptr_t sums,
         std::uintptr_t go, std::uintptr_t dx, int64_t B, int64_t C, int64_t S, int act, bool squared, int c0,
         float smooth_nr, float smooth_dr, int red) {
        const Params P = make_params(B, C, S, c0, smooth_nr, smooth_dr, red);
        dispatch<Bwd>(act, squared, g_dtype, x, g, w, w_per_channel, sums, go, dx, P, red);
      },
      "Weighted Dice backward on the CPU: dx [B,C,S] fp32 from the upstream grad go and the saved sums",
      py::arg("x"), py::arg("g"), py::arg("g_dtype"), py::arg("w"), py::arg("w_per_channel"), py::arg("sums"),
      py::arg("go"), py::arg("dx"), py::arg("B"), py::arg("C"), py::arg("S"), py::arg("act"), py::arg("squared"),
      py::arg("c0"), py::arg("smooth_nr"), py::arg("smooth_dr"), py::arg("reduction"),
      py::call_guard<py::gil_scoped_release>());
  // Built with or without CUDA, so that tests check the launch geometry on any machine.
  m.def(
      "weighted_dice_cuda_grid",
      [](int64_t groups, int64_t S, int64_t cp, int64_t n_chunks) {
        const dice::CudaGrid gr = dice::cuda_grid(groups, S, cp, n_chunks);
        return py::make_tuple(gr.fwd_x, gr.fwd_y, gr.bwd_x, gr.bwd_y, gr.bwd_tiles);
      },
      "Grids of the CUDA Dice kernels for `groups` row groups of `cp` rows, S pixels, n_chunks forward chunks: "
      "(fwd_x, fwd_y, bwd_x, bwd_y, bwd_tiles); the kernels grid-stride over what a capped axis leaves",
      py::arg("groups"), py::arg("S"), py::arg("cp"), py::arg("n_chunks"));
#ifdef DUALDIFF_WITH_CUDA
  m.def("weighted_dice_fwd_cuda", &weighted_dice_fwd_cuda,
        "Weighted Dice forward on the GPU (partials [B*C, n_chunks, 3] fp32 workspace)", py::arg("x"),
        py::arg("x_dtype"), py::arg("g"), py::arg("g_dtype"), py::arg("w"), py::arg("w_per_channel"),
        py::arg("partials"), py::arg("n_chunks"), py::arg("chunk"), py::arg("sums"), py::arg("loss"), py::arg("B"),
        py::arg("C"), py::arg("S"), py::arg("act"), py::arg("squared"), py::arg("c0"), py::arg("smooth_nr"),
        py::arg("smooth_dr"), py::arg("reduction"), py::arg("stream"));
  m.def("weighted_dice_bwd_cuda", &weighted_dice_bwd_cuda, "Weighted Dice backward on the GPU", py::arg("x"),
        py::arg("x_dtype"), py::arg("g"), py::arg("g_dtype"), py::arg("w"), py::arg("w_per_channel"),
        py::arg("sums"), py::arg("go"), py::arg("dx"), py::arg("B"), py::arg("C"), py::arg("S"), py::arg("act"),
        py::arg("squared"), py::arg("c0"), py::arg("smooth_nr"), py::arg("smooth_dr"), py::arg("reduction"),
        py::arg("stream"));
#endif
}

}  // namespace dualdiff
