// dd_hd.h: DD_HD marks the shared per-element math functions (csrc/*_math.h) __host__ __device__
// under nvcc; g++ (no CUDA) sees plain always-inline functions.
#pragma once

#if defined(__CUDACC__)
#define DD_HD __host__ __device__ __forceinline__
#else
#define DD_HD inline __attribute__((always_inline))
#endif
