// How many OpenMP threads a CPU kernel uses for `work` elements (ATen's parallel_for rule).
//
// Below kGrainElements (ATen's at::internal::GRAIN_SIZE) a kernel runs on the calling thread: an
// OpenMP region costs microseconds, and on a busy machine it waits for the slowest of its
// threads, which may be descheduled for a whole time slice (measured on 2 loaded cores: the Dice
// loss on 64 elements 4x slower than plain PyTorch, the VAE loss on 16,384 elements 2x slower).
// Above it, one thread per kGrainElements, up to the OpenMP maximum (torch.set_num_threads
// sets it: torch and dualdiff._C share the process's OpenMP runtime).
#pragma once

#include <algorithm>
#include <cstdint>

#ifdef DUALDIFF_WITH_OPENMP
#include <omp.h>
#endif

namespace dualdiff {

constexpr std::int64_t kGrainElements = 32768;

inline int cpu_threads_for(std::int64_t work) {
#ifdef DUALDIFF_WITH_OPENMP
  if (work < kGrainElements || omp_in_parallel()) return 1;
  const std::int64_t tasks = (work + kGrainElements - 1) / kGrainElements;
  return static_cast<int>(std::min<std::int64_t>(omp_get_max_threads(), tasks));
#else
  (void)work;
  return 1;
#endif
}

}  // namespace dualdiff
