// Runs CUDA C kernels on the CPU, to test cuda/kernels.cu where there is no GPU: every thread of
// a block is an OS thread, blocks run one after another, `__shared__` variables are statics
// (one block at a time shares them), and __syncthreads is a barrier across the block. Enough
// for kernels that use shared memory and __syncthreads only (no warp intrinsics, no atomics).
#pragma once
#include <math.h>
#include <pthread.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;
inline pthread_barrier_t emulate_barrier;

inline void __syncthreads() { pthread_barrier_wait(&emulate_barrier); }

// Device math the kernels use beyond <math.h>.
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
using std::min;

// Runs `kernel` (a call of one kernel with its arguments bound) on a 1-D grid of 1-D blocks.
inline void emulate_launch(unsigned blocks, unsigned threads, const std::function<void()>& kernel) {
  gridDim.x = blocks;
  blockDim.x = threads;
  pthread_barrier_init(&emulate_barrier, nullptr, threads);
  for (unsigned b = 0; b < blocks; ++b) {
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, b, t] {
        blockIdx.x = b;
        threadIdx.x = t;
        kernel();
      });
    }
    for (auto& th : pool) th.join();
  }
  pthread_barrier_destroy(&emulate_barrier);
}
