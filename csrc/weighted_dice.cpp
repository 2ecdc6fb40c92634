// weighted_dice: C++ CPU kernels (OpenMP) and registration of the CUDA launchers.
//
// Layout: logits x [B, C, S] fp32 and target g [B, C, S] (fp32 or uint8; bool arrives as
// uint8), contiguous. Rows are the B*C (b, c) pairs. Formula: see dualdiff/ops/weighted_dice.py.
//
// forward: work items (row, spatial chunk) -- or (b, chunk) for softmax, which needs every
// channel of a pixel -- compute partial sums of p*g, p (p^2), g (g^2) in parallel; a serial
// pass adds them in a fixed order (deterministic for any thread count) and writes the
// [3, B, C] sums and the loss. backward: one parallel elementwise pass that recomputes p.
//
// The inner loops use 8-lane vector extensions (with a polynomial exp) and are compiled
// twice on x86-64: for the baseline ISA and for AVX2+FMA, chosen at run time.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "dualdiff.h"

// 32-byte vectors in the baseline-ISA variant: only passed between always-inline functions.
#pragma GCC diagnostic ignored "-Wpsabi"

#ifdef DUALDIFF_WITH_OPENMP
#include <omp.h>
#endif

namespace dualdiff {
namespace {

constexpr int ACT_SIGMOID = 0, ACT_SOFTMAX = 1, ACT_NONE = 2;
constexpr int RED_NONE = 0, RED_MEAN = 1;
constexpr int64_t CHUNK = 2048;  // pixels per work item

#define DD_INLINE inline __attribute__((always_inline))

// 8-lane vectors (GCC/Clang vector extensions): compiled to AVX2 in the avx2 variant, to SSE
// pairs in the baseline one. Explicit vectors because the auto-vectoriser turns the exp clamp
// into branches and gives up.
constexpr int W = 8;
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
typedef uint8_t vu8 __attribute__((vector_size(8)));

DD_INLINE vf splat(float v) { return vf{v, v, v, v, v, v, v, v}; }
DD_INLINE vf vsel(vi m, vf a, vf b) { return m ? a : b; }
DD_INLINE vf vmax(vf a, vf b) { return vsel(a > b, a, b); }
DD_INLINE vi lanes_below(int n) {
  const vi idx = {0, 1, 2, 3, 4, 5, 6, 7};
  return idx < vi{n, n, n, n, n, n, n, n};
}

DD_INLINE vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
DD_INLINE vf loadv(const uint8_t* p) {
  vu8 u;
  std::memcpy(&u, p, sizeof(u));
  return __builtin_convertvector(u, vf);
}
// First n (< W) elements, zero padded.
template <typename T>
DD_INLINE vf loadv_n(const T* p, int n) {
  T tmp[W] = {};
  for (int i = 0; i < n; ++i) tmp[i] = p[i];
  return loadv(tmp);
}
DD_INLINE void storev(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
DD_INLINE void storev_n(float* p, vf v, int n) {
  float tmp[W];
  storev(tmp, v);
  for (int i = 0; i < n; ++i) p[i] = tmp[i];
}
DD_INLINE double hsum(vf v) {
  double s = 0.0;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

// e^x, ~2 ulp: Cody-Waite reduction x = r ln2 + f, degree-7 Taylor polynomial of e^f on
// |f| <= ln2/2, scale by 2^r through the exponent bits. x is clamped to [-87, 88].
DD_INLINE vf vexp(vf x) {
  x = vsel(x < splat(-87.0f), splat(-87.0f), x);
  x = vsel(x > splat(88.0f), splat(88.0f), x);
  const vf r = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
  const vf f = (x - r * 0.693359375f) + r * 2.12194440e-4f;
  vf p = splat(1.0f / 5040.0f);
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const vi bits = (__builtin_convertvector(r, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <int ACT>
DD_INLINE vf activate(vf x) {
  if (ACT == ACT_SIGMOID) return splat(1.0f) / (1.0f + vexp(-x));
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
template <int ACT, bool SQ, typename GT>
DD_INLINE void fwd_row_item(const float* x, const GT* g, int64_t lo, int64_t hi, double* part) {
  vf a0 = {}, a1 = {}, a2 = {};
  int64_t i = lo;
  for (; i + W <= hi; i += W) {
    const vf p = activate<ACT>(loadv(x + i)), q = loadv(g + i);
    a0 += p * q;
    a1 += SQ ? p * p : p;
    a2 += SQ ? q * q : q;
  }
  if (i < hi) {
    const int n = static_cast<int>(hi - i);
    const vf p = vsel(lanes_below(n), activate<ACT>(loadv_n(x + i, n)), splat(0.f)), q = loadv_n(g + i, n);
    a0 += p * q;
    a1 += SQ ? p * p : p;
    a2 += SQ ? q * q : q;
  }
  part[0] = hsum(a0);
  part[1] = hsum(a1);
  part[2] = hsum(a2);
}

// Softmax over C channels (stride S) of one sample, pixels [lo, hi) -> part[c * 3 + k].
// buf: 4*C*W floats of scratch (accessed unaligned).
template <bool SQ, typename GT>
DD_INLINE void fwd_softmax_item(const float* x, const GT* g, int64_t C, int64_t S, int64_t lo, int64_t hi,
                                double* part, float* buf) {
  float* e = buf;
  float* acc = buf + C * W;
  for (int64_t k = 0; k < 3 * C * W; ++k) acc[k] = 0.f;
  for (int64_t i = lo; i < hi; i += W) {
    const int n = static_cast<int>(std::min<int64_t>(W, hi - i));
    const bool full = n == W;
    vf mx = full ? loadv(x + i) : loadv_n(x + i, n);
    for (int64_t c = 1; c < C; ++c) mx = vmax(mx, full ? loadv(x + c * S + i) : loadv_n(x + c * S + i, n));
    vf den = {};
    for (int64_t c = 0; c < C; ++c) {
      const vf ec = vexp((full ? loadv(x + c * S + i) : loadv_n(x + c * S + i, n)) - mx);
      storev(e + c * W, ec);
      den += ec;
    }
    vf inv = splat(1.0f) / den;
    if (!full) inv = vsel(lanes_below(n), inv, splat(0.f));
    for (int64_t c = 0; c < C; ++c) {
      const vf p = loadv(e + c * W) * inv, q = full ? loadv(g + c * S + i) : loadv_n(g + c * S + i, n);
      float* a = acc + 3 * c * W;
      storev(a, loadv(a) + p * q);
      storev(a + W, loadv(a + W) + (SQ ? p * p : p));
      storev(a + 2 * W, loadv(a + 2 * W) + (SQ ? q * q : q));
    }
  }
  for (int64_t k = 0; k < 3 * C; ++k) part[k] = hsum(loadv(acc + k * W));
}

// ---- backward items ----------------------------------------------------------------------
template <int ACT, bool SQ>
DD_INLINE vf row_grad(vf xv, vf q, float ca, float cb) {
  const vf p = activate<ACT>(xv);
  const vf dp = ca * q + (SQ ? (2.0f * cb) * p : splat(cb));
  return ACT == ACT_SIGMOID ? dp * p * (1.0f - p) : dp;
}

template <int ACT, bool SQ, typename GT>
DD_INLINE void bwd_row_item(const float* x, const GT* g, float* dx, int64_t lo, int64_t hi, float ca, float cb) {
  int64_t i = lo;
  for (; i + W <= hi; i += W) storev(dx + i, row_grad<ACT, SQ>(loadv(x + i), loadv(g + i), ca, cb));
  if (i < hi) {
    const int n = static_cast<int>(hi - i);
    storev_n(dx + i, row_grad<ACT, SQ>(loadv_n(x + i, n), loadv_n(g + i, n), ca, cb), n);
  }
}

// buf: 2*C*W floats of scratch (accessed unaligned).
template <bool SQ, typename GT>
DD_INLINE void bwd_softmax_item(const float* x, const GT* g, float* dx, int64_t C, int64_t S, int64_t lo,
                                int64_t hi, const float* ca, const float* cb, float* buf) {
  float* pb = buf;
  float* dpb = buf + C * W;
  for (int64_t i = lo; i < hi; i += W) {
    const int n = static_cast<int>(std::min<int64_t>(W, hi - i));
    const bool full = n == W;
    vf mx = full ? loadv(x + i) : loadv_n(x + i, n);
    for (int64_t c = 1; c < C; ++c) mx = vmax(mx, full ? loadv(x + c * S + i) : loadv_n(x + c * S + i, n));
    vf den = {};
    for (int64_t c = 0; c < C; ++c) {
      const vf ec = vexp((full ? loadv(x + c * S + i) : loadv_n(x + c * S + i, n)) - mx);
      storev(pb + c * W, ec);
      den += ec;
    }
    const vf inv = splat(1.0f) / den;
    vf dot = {};
    for (int64_t c = 0; c < C; ++c) {
      const vf p = loadv(pb + c * W) * inv, q = full ? loadv(g + c * S + i) : loadv_n(g + c * S + i, n);
      const vf dp = ca[c] * q + (SQ ? (2.0f * cb[c]) * p : splat(cb[c]));
      storev(pb + c * W, p);
      storev(dpb + c * W, dp);
      dot += p * dp;
    }
    for (int64_t c = 0; c < C; ++c) {
      const vf d = loadv(pb + c * W) * (loadv(dpb + c * W) - dot);
      if (full)
        storev(dx + c * S + i, d);
      else
        storev_n(dx + c * S + i, d, n);
    }
  }
}

// ---- per-ISA entry of one work item (the bodies above are inlined and vectorised per ISA) ----
#define DD_DEFINE_ITEMS(SUFFIX, ATTR)                                                                   \
  template <int ACT, bool SQ, typename GT>                                                              \
  ATTR void fwd_item_##SUFFIX(const float* x, const GT* g, const Params& P, int64_t item, double* part, \
                              float* buf) {                                                             \
    const int64_t grp = item / P.n_chunks, chunk = item % P.n_chunks;                                   \
    const int64_t lo = chunk * CHUNK, hi = std::min(P.S, lo + CHUNK);                                   \
    if (ACT == ACT_SOFTMAX) {                                                                           \
      const int64_t off = grp * P.C * P.S;                                                              \
      fwd_softmax_item<SQ, GT>(x + off, g + off, P.C, P.S, lo, hi, part, buf);                          \
    } else {                                                                                            \
      fwd_row_item<ACT, SQ, GT>(x + grp * P.S, g + grp * P.S, lo, hi, part);                            \
    }                                                                                                   \
  }                                                                                                     \
  template <int ACT, bool SQ, typename GT>                                                              \
  ATTR void bwd_item_##SUFFIX(const float* x, const GT* g, float* dx, const Params& P, int64_t item,    \
                              const float* ca, const float* cb, float* buf) {                           \
    const int64_t grp = item / P.n_chunks, chunk = item % P.n_chunks;                                   \
    const int64_t lo = chunk * CHUNK, hi = std::min(P.S, lo + CHUNK);                                   \
    if (ACT == ACT_SOFTMAX) {                                                                           \
      const int64_t off = grp * P.C * P.S;                                                              \
      bwd_softmax_item<SQ, GT>(x + off, g + off, dx + off, P.C, P.S, lo, hi, ca + grp * P.C,            \
                               cb + grp * P.C, buf);                                                    \
    } else {                                                                                            \
      const int64_t off = grp * P.S;                                                                    \
      bwd_row_item<ACT, SQ, GT>(x + off, g + off, dx + off, lo, hi, ca[grp], cb[grp]);                  \
    }                                                                                                   \
  }

DD_DEFINE_ITEMS(base, )
#if defined(__x86_64__) && defined(__GNUC__)
#define DD_HAVE_AVX2 1
DD_DEFINE_ITEMS(avx2, __attribute__((target("avx2,fma"))))
#endif

bool use_avx2() {
#ifdef DD_HAVE_AVX2
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// ---- drivers -------------------------------------------------------------------------------
template <int ACT, bool SQ, typename GT>
void forward(const float* x, const GT* g, const float* w, float* sums, float* loss, const Params& P, int red) {
  const int64_t R = P.B * P.C;
  const int64_t groups = ACT == ACT_SOFTMAX ? P.B : R;
  const int64_t cp = ACT == ACT_SOFTMAX ? P.C : 1;  // rows per group
  const int64_t items = groups * P.n_chunks;
  // part[(group * n_chunks + chunk) * cp * 3 + c * 3 + k]
  std::vector<double> part(static_cast<size_t>(items * cp * 3));
  const bool avx2 = use_avx2();
#ifdef DUALDIFF_WITH_OPENMP
#pragma omp parallel
#endif
  {
    std::vector<float> buf(ACT == ACT_SOFTMAX ? static_cast<size_t>(4 * P.C * W) : 0);
#ifdef DUALDIFF_WITH_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t it = 0; it < items; ++it) {
      double* pt = part.data() + it * cp * 3;
#ifdef DD_HAVE_AVX2
      if (avx2) {
        fwd_item_avx2<ACT, SQ, GT>(x, g, P, it, pt, buf.data());
        continue;
      }
#endif
      fwd_item_base<ACT, SQ, GT>(x, g, P, it, pt, buf.data());
    }
  }
  (void)avx2;
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
    const float si = sums[r], sp = sums[R + r], sg = sums[2 * R + r];
    float d = 1.0f - (2.0f * si + P.smooth_nr) / (sp + sg + P.smooth_dr);
    if (w) d *= w[b];
    if (red == RED_NONE)
      loss[b * kept + cc - P.c0] = d;
    else
      total += d;
  }
  if (red != RED_NONE) loss[0] = static_cast<float>(red == RED_MEAN ? total / static_cast<double>(P.B * kept) : total);
}

template <int ACT, bool SQ, typename GT>
void backward(const float* x, const GT* g, const float* w, const float* sums, const float* go, float* dx,
              const Params& P, int red) {
  const int64_t R = P.B * P.C;
  const int64_t kept = P.C - P.c0;
  std::vector<float> ca(R), cb(R);
  const float scale = red == RED_MEAN ? 1.0f / static_cast<float>(P.B * kept) : 1.0f;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t b = r / P.C, c = r % P.C;
    float k = 0.f;
    if (c >= P.c0) k = red == RED_NONE ? go[b * kept + c - P.c0] : go[0] * scale;
    if (w) k *= w[b];
    const float den = sums[R + r] + sums[2 * R + r] + P.smooth_dr;
    ca[r] = -2.0f * k / den;
    cb[r] = k * (2.0f * sums[r] + P.smooth_nr) / (den * den);
  }
  const int64_t groups = ACT == ACT_SOFTMAX ? P.B : R;
  const int64_t items = groups * P.n_chunks;
  const bool avx2 = use_avx2();
#ifdef DUALDIFF_WITH_OPENMP
#pragma omp parallel
#endif
  {
    std::vector<float> buf(ACT == ACT_SOFTMAX ? static_cast<size_t>(2 * P.C * W) : 0);
#ifdef DUALDIFF_WITH_OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t it = 0; it < items; ++it) {
#ifdef DD_HAVE_AVX2
      if (avx2) {
        bwd_item_avx2<ACT, SQ, GT>(x, g, dx, P, it, ca.data(), cb.data(), buf.data());
        continue;
      }
#endif
      bwd_item_base<ACT, SQ, GT>(x, g, dx, P, it, ca.data(), cb.data(), buf.data());
    }
  }
  (void)avx2;
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
  static void run(std::uintptr_t x, std::uintptr_t g, std::uintptr_t w, std::uintptr_t sums, std::uintptr_t loss,
                  Params P, int red) {
    forward<ACT, SQ, GT>(ptr<const float>(x), ptr<const GT>(g), w ? ptr<const float>(w) : nullptr, ptr<float>(sums),
                         ptr<float>(loss), P, red);
  }
};

template <int ACT, bool SQ, typename GT>
struct Bwd {
  static void run(std::uintptr_t x, std::uintptr_t g, std::uintptr_t w, std::uintptr_t sums, std::uintptr_t go,
                  std::uintptr_t dx, Params P, int red) {
    backward<ACT, SQ, GT>(ptr<const float>(x), ptr<const GT>(g), w ? ptr<const float>(w) : nullptr,
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
void weighted_dice_fwd_cuda(std::uintptr_t x, int x_dtype, std::uintptr_t g, int g_dtype, std::uintptr_t w,
                            std::uintptr_t partials, int64_t n_chunks, int64_t chunk, std::uintptr_t sums,
                            std::uintptr_t loss, int64_t B, int64_t C, int64_t S, int act, bool squared, int c0,
                            float smooth_nr, float smooth_dr, int red, std::uintptr_t stream);
void weighted_dice_bwd_cuda(std::uintptr_t x, int x_dtype, std::uintptr_t g, int g_dtype, std::uintptr_t w,
                            std::uintptr_t sums, std::uintptr_t go, std::uintptr_t dx, int64_t B, int64_t C,
                            int64_t S, int act, bool squared, int c0, float smooth_nr, float smooth_dr, int red,
                            std::uintptr_t stream);
#endif

void register_weighted_dice(py::module_& m) {
  m.def(
      "weighted_dice_fwd_cpu",
      [](std::uintptr_t x, std::uintptr_t g, int g_dtype, std::uintptr_t w, std::uintptr_t sums, std::uintptr_t loss,
         int64_t B, int64_t C, int64_t S, int act, bool squared, int c0, float smooth_nr, float smooth_dr, int red) {
        const Params P = make_params(B, C, S, c0, smooth_nr, smooth_dr, red);
        dispatch<Fwd>(act, squared, g_dtype, x, g, w, sums, loss, P, red);
      },
      "Weighted Dice forward on the CPU: x [B,C,S] fp32, target fp32/uint8, weight [B] fp32 or 0 -> "
      "sums [3,B,C] fp32, loss ([] or [B,C-c0]) fp32",
      py::arg("x"), py::arg("g"), py::arg("g_dtype"), py::arg("w"), py::arg("sums"), py::arg("loss"), py::arg("B"),
      py::arg("C"), py::arg("S"), py::arg("act"), py::arg("squared"), py::arg("c0"), py::arg("smooth_nr"),
      py::arg("smooth_dr"), py::arg("reduction"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "weighted_dice_bwd_cpu",
      [](std::uintptr_t x, std::uintptr_t g, int g_dtype, std::uintptr_t w, std::uintptr_t sums, std::uintptr_t go,
         std::uintptr_t dx, int64_t B, int64_t C, int64_t S, int act, bool squared, int c0, float smooth_nr,
         float smooth_dr, int red) {
        const Params P = make_params(B, C, S, c0, smooth_nr, smooth_dr, red);
        dispatch<Bwd>(act, squared, g_dtype, x, g, w, sums, go, dx, P, red);
      },
      "Weighted Dice backward on the CPU: dx [B,C,S] fp32 from the upstream grad go and the saved sums",
      py::arg("x"), py::arg("g"), py::arg("g_dtype"), py::arg("w"), py::arg("sums"), py::arg("go"), py::arg("dx"),
      py::arg("B"), py::arg("C"), py::arg("S"), py::arg("act"), py::arg("squared"), py::arg("c0"),
      py::arg("smooth_nr"), py::arg("smooth_dr"), py::arg("reduction"), py::call_guard<py::gil_scoped_release>());
#ifdef DUALDIFF_WITH_CUDA
  m.def("weighted_dice_fwd_cuda", &weighted_dice_fwd_cuda,
        "Weighted Dice forward on the GPU (partials [B*C, n_chunks, 3] fp32 workspace)", py::arg("x"),
        py::arg("x_dtype"), py::arg("g"), py::arg("g_dtype"), py::arg("w"), py::arg("partials"), py::arg("n_chunks"),
        py::arg("chunk"), py::arg("sums"), py::arg("loss"), py::arg("B"), py::arg("C"), py::arg("S"), py::arg("act"),
        py::arg("squared"), py::arg("c0"), py::arg("smooth_nr"), py::arg("smooth_dr"), py::arg("reduction"),
        py::arg("stream"));
  m.def("weighted_dice_bwd_cuda", &weighted_dice_bwd_cuda, "Weighted Dice backward on the GPU", py::arg("x"),
        py::arg("x_dtype"), py::arg("g"), py::arg("g_dtype"), py::arg("w"), py::arg("sums"), py::arg("go"),
        py::arg("dx"), py::arg("B"), py::arg("C"), py::arg("S"), py::arg("act"), py::arg("squared"), py::arg("c0"),
        py::arg("smooth_nr"), py::arg("smooth_dr"), py::arg("reduction"), py::arg("stream"));
#endif
}

}  // namespace dualdiff
