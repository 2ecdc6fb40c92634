// timestep_embedding: fused forward of dualdiff.ops.DualTimestepEmbedding on CUDA.
//
// out = Linear_o(SiLU([mlp0(sin‖cos(t0 * freqs)), mlp1(sin‖cos(t1 * freqs))])),
// mlpX = Linear(H, H) ∘ SiLU ∘ Linear(F, H); freqs[k] = exp(-ln(10000) k / half), half = F / 2
// (odd F: the last feature column is 0).
//
// One launch. A block owns kRows batch rows and runs the whole chain for them: the features,
// the hidden activations and the concatenated branch outputs live in shared memory (fp32,
// rounded to the weight dtype at the same points as the unfused module), or, for widths whose
// workspace exceeds the device's shared memory per block (hidden > ~2300 on an H100), in a
// per-block slice of a global scratch buffer passed by the caller. Each linear layer is
// computed by warps that own kCols output columns: the lanes split
// the reduction dimension (coalesced weight loads, conflict-free shared loads), each lane keeps
// kCols x kRows = 32 partial sums, and one 31-shuffle transpose-reduction leaves lane l with the
// total of (column l / kRows, row l % kRows). Weights fp32 / fp16 / bf16; fp32 accumulation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dualdiff.h"
#include "timestep_embedding_math.h"

namespace dualdiff {
namespace {

constexpr int kRows = 8;       // batch rows per block
constexpr int kCols = 4;       // output columns per warp step; kRows * kCols == 32 (one per lane)
constexpr int kThreads = 256;  // 8 warps
constexpr unsigned kFull = 0xffffffffu;
static_assert(kRows * kCols == 32, "one (column, row) result per lane");

// Timestep dtype codes; must match _T_CODES in dualdiff/ops/timestep_embedding.py.
enum TCode : int { kTF32 = 0, kTF16 = 1, kTBF16 = 2, kTU8 = 3, kTF64 = 10, kTI32 = 11, kTI64 = 12,
                   kTI16 = 13, kTI8 = 14 };

__device__ __forceinline__ float load_t(const void* p, int code, int64_t i) {
  switch (code) {
    case kTF32: return static_cast<const float*>(p)[i];
    case kTF16: return __half2float(static_cast<const __half*>(p)[i]);
    case kTBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case kTU8: return static_cast<float>(static_cast<const uint8_t*>(p)[i]);
    case kTF64: return static_cast<float>(static_cast<const double*>(p)[i]);
    case kTI32: return static_cast<float>(static_cast<const int32_t*>(p)[i]);
    case kTI64: return static_cast<float>(static_cast<const int64_t*>(p)[i]);
    case kTI16: return static_cast<float>(static_cast<const int16_t*>(p)[i]);
    case kTI8: return static_cast<float>(static_cast<const int8_t*>(p)[i]);
    default: return 0.0f;
  }
}

template <typename W> __device__ __forceinline__ float to_f(W x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename W> __device__ __forceinline__ W from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// x rounded to the precision of W (what storing an intermediate in the weight dtype does).
template <typename W> __device__ __forceinline__ float round_w(float x) { return to_f<W>(from_f<W>(x)); }

using temb::silu;  // csrc/timestep_embedding_math.h, shared with the CPU entry points

// y[r][j] = sum_k x[r][k] * w[j][k] + b[j] for r < kRows, j < N, with x in shared memory (row
// stride ldx, K columns). kToGlobal: store round(y) to y_global (row stride N, rows < nrows);
// else store round(silu(round(y))) to y_smem (row stride ldy, all kRows rows).
template <typename W, bool kToGlobal>
__device__ void linear_rows(const float* x, int ldx, int K, const W* __restrict__ w,
                            const W* __restrict__ b, int N, float* y_smem, int ldy, W* y_global,
                            int nrows) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  for (int j0 = warp * kCols; j0 < N; j0 += nwarps * kCols) {
    float acc[kCols * kRows];
#pragma unroll
    for (int i = 0; i < kCols * kRows; ++i) acc[i] = 0.0f;
    const W* wrow[kCols];
    bool valid[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      valid[c] = j0 + c < N;
      wrow[c] = w + static_cast<int64_t>(valid[c] ? j0 + c : j0) * K;
    }
#pragma unroll 2
    for (int k = lane; k < K; k += 32) {
      float xv[kRows];
#pragma unroll
      for (int r = 0; r < kRows; ++r) xv[r] = x[r * ldx + k];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const float wv = valid[c] ? to_f<W>(wrow[c][k]) : 0.0f;
#pragma unroll
        for (int r = 0; r < kRows; ++r) acc[c * kRows + r] = fmaf(wv, xv[r], acc[c * kRows + r]);
      }
    }
    // Transpose-reduction: after the step with offset s, acc[i] (i < s) holds index
    // i + (lane & s); at the end acc[0] is the warp total of index `lane`.
#pragma unroll
    for (int step = 0; step < 5; ++step) {
      const int s = 16 >> step;
      const bool upper = (lane & s) != 0;
#pragma unroll
      for (int i = 0; i < s; ++i) {
        const float send = upper ? acc[i] : acc[i + s];
        const float keep = upper ? acc[i + s] : acc[i];
        acc[i] = keep + __shfl_xor_sync(kFull, send, s);
      }
    }
    const int c = lane / kRows;
    const int r = lane % kRows;
    const int j = j0 + c;
    if (j < N) {
      const float v = round_w<W>(acc[0] + to_f<W>(b[j]));
      if (kToGlobal) {
        if (r < nrows) y_global[static_cast<int64_t>(r) * N + j] = from_f<W>(v);
      } else {
        y_smem[r * ldy + j] = round_w<W>(silu(v));
      }
    }
  }
}

template <typename W>
__global__ void __launch_bounds__(kThreads)
dual_timestep_embedding_fwd_kernel(const void* t0, int64_t st0, int code0, const void* t1, int64_t st1,
                                   int code1, const float* __restrict__ freqs,
                                   const W* __restrict__ w00, const W* __restrict__ b00,
                                   const W* __restrict__ w02, const W* __restrict__ b02,
                                   const W* __restrict__ w10, const W* __restrict__ b10,
                                   const W* __restrict__ w12, const W* __restrict__ b12,
                                   const W* __restrict__ wo, const W* __restrict__ bo,
                                   W* __restrict__ out, int B, int F, int half, int H,
                                   float* __restrict__ scratch) {
  // Per-block workspace: dynamic shared memory, or (scratch != nullptr, when kRows * (F + 3H)
  // floats exceed the device's shared memory per block) this block's slice of a global buffer.
  extern __shared__ float smem[];
  float* base = scratch != nullptr
                    ? scratch + static_cast<int64_t>(blockIdx.x) * kRows * (F + 3 * static_cast<int64_t>(H))
                    : smem;
  float* feat = base;              // [kRows][F]
  float* hid = feat + kRows * F;   // [kRows][H]
  float* cat = hid + kRows * H;    // [kRows][2H]: branch 0 | branch 1
  const int row0 = blockIdx.x * kRows;
  const int nrows = min(kRows, B - row0);
  for (int br = 0; br < 2; ++br) {
    const void* t = br ? t1 : t0;
    const int64_t st = br ? st1 : st0;
    const int code = br ? code1 : code0;
    for (int i = threadIdx.x; i < kRows * F; i += blockDim.x) {
      const int r = i / F;
      const int col = i - r * F;
      float v = 0.0f;  // rows past B are 0 (and sinusoid() is 0 in the odd-F pad column)
      if (r < nrows) v = temb::sinusoid(load_t(t, code, static_cast<int64_t>(row0 + r) * st), freqs, col, half);
      feat[i] = round_w<W>(v);
    }
    __syncthreads();
    linear_rows<W, false>(feat, F, F, br ? w10 : w00, br ? b10 : b00, H, hid, H, nullptr, nrows);
    __syncthreads();
    linear_rows<W, false>(hid, H, H, br ? w12 : w02, br ? b12 : b02, H, cat + br * H, 2 * H, nullptr,
                          nrows);
    __syncthreads();
  }
  linear_rows<W, true>(cat, 2 * H, 2 * H, wo, bo, H, nullptr, 0,
                       out + static_cast<int64_t>(row0) * H, nrows);
}

// Bytes of the per-block workspace (features, hidden, concatenation; fp32); must match
// dualdiff.ops.timestep_embedding.cuda_workspace_bytes.
size_t workspace_bytes(int F, int H) {
  return sizeof(float) * kRows * (static_cast<size_t>(F) + 3 * static_cast<size_t>(H));
}

template <typename W>
void launch(std::uintptr_t t0, std::int64_t st0, int code0, std::uintptr_t t1, std::int64_t st1, int code1,
            std::uintptr_t freqs, const std::uintptr_t* w, std::uintptr_t out, int B, int F, int H,
            std::uintptr_t scratch, cudaStream_t stream) {
  const size_t smem = scratch != 0 ? 0 : workspace_bytes(F, H);
  auto kernel = dual_timestep_embedding_fwd_kernel<W>;
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
    if (err != cudaSuccess) {
      cudaGetLastError();
      throw std::invalid_argument(std::string("dualdiff._C: timestep_embedding needs ") +
                                  std::to_string(smem) + " bytes of shared memory (freq_dim " +
                                  std::to_string(F) + ", hidden_dim " + std::to_string(H) +
                                  "): " + cudaGetErrorString(err));
    }
  }
  // in int64: (B + kRows - 1) in int would wrap for 2^31 - kRows < B < 2^31 (accepted below)
  const int grid = static_cast<int>((static_cast<int64_t>(B) + kRows - 1) / kRows);
  kernel<<<grid, kThreads, smem, stream>>>(
      reinterpret_cast<const void*>(t0), st0, code0, reinterpret_cast<const void*>(t1), st1, code1,
      ptr<const float>(freqs), ptr<const W>(w[0]), ptr<const W>(w[1]), ptr<const W>(w[2]),
      ptr<const W>(w[3]), ptr<const W>(w[4]), ptr<const W>(w[5]), ptr<const W>(w[6]),
      ptr<const W>(w[7]), ptr<const W>(w[8]), ptr<const W>(w[9]), ptr<W>(out), B, F, F / 2, H,
      scratch != 0 ? ptr<float>(scratch) : nullptr);
  check_cuda_launch("timestep_embedding_forward_cuda");
}

}  // namespace

void timestep_embedding_forward_cuda(std::uintptr_t t0, std::int64_t stride_t0, int t0_code,
                                     std::uintptr_t t1, std::int64_t stride_t1, int t1_code,
                                     std::uintptr_t freqs, std::uintptr_t w00, std::uintptr_t b00,
                                     std::uintptr_t w02, std::uintptr_t b02, std::uintptr_t w10,
                                     std::uintptr_t b10, std::uintptr_t w12, std::uintptr_t b12,
                                     std::uintptr_t wo, std::uintptr_t bo, std::uintptr_t out,
                                     std::int64_t B, std::int64_t F, std::int64_t H, int dtype,
                                     std::uintptr_t scratch, std::uintptr_t stream) {
  DUALDIFF_CHECK(B > 0 && B < (1LL << 31), "timestep_embedding: batch size out of range");
  DUALDIFF_CHECK(F >= 2 && H > 0 && F < (1 << 20) && H < (1 << 20),
                 "timestep_embedding: freq_dim must be >= 2 and hidden_dim > 0");
  const std::uintptr_t w[10] = {w00, b00, w02, b02, w10, b10, w12, b12, wo, bo};
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int b = static_cast<int>(B), f = static_cast<int>(F), h = static_cast<int>(H);
  switch (static_cast<DType>(dtype)) {
    case DType::Float32: launch<float>(t0, stride_t0, t0_code, t1, stride_t1, t1_code, freqs, w, out, b, f, h, scratch, s); break;
    case DType::Float16: launch<__half>(t0, stride_t0, t0_code, t1, stride_t1, t1_code, freqs, w, out, b, f, h, scratch, s); break;
    case DType::BFloat16: launch<__nv_bfloat16>(t0, stride_t0, t0_code, t1, stride_t1, t1_code, freqs, w, out, b, f, h, scratch, s); break;
    default: DUALDIFF_CHECK(false, "timestep_embedding: weights must be float32, float16 or bfloat16");
  }
}

}  // namespace dualdiff
