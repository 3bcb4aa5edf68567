// ferrotune's CUDA kernels (built into PTX by build.rs with the `cuda` feature).
//
// What candle's CUDA backend runs as many composed kernels, each a pass over a large tensor,
// done here in one or two passes per row:
//   - the attention softmax `softmax(scale * scores + mask)` and its backward;
//   - the next-token log-probability `logit[target] - logsumexp(logits)` of a row and its
//     backward, so the [tokens, vocab] logits are never copied to f32 or log-softmaxed whole;
//   - AdamW's moment and weight updates, in place;
//   - RMSNorm forward and backward (f32 statistics, as HF computes them, also for bf16);
//   - SwiGLU and the rotary embedding, forward and backward, elementwise;
//   - the embedding table's gradient, one thread per (token, column) summing in order;
//   - greedy decoding's argmax per row (the first maximum, as torch.argmax and the CPU pick
//     it), so only the token ids cross to the host, not the [batch, vocab] logits.
// Math is f32 whatever the storage type (f32 or bf16). Reductions go through shared memory and
// __syncthreads only (no warp intrinsics), so the same source also runs on the CPU under
// cuda/emulate/ (tests/integration/cuda_emulation.rs), where threads are threads and
// __syncthreads is a barrier.

#include <cuda_bf16.h>
#include <stdint.h>

#define SOFTMAX_BLOCK 256
#define VOCAB_BLOCK 1024

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ void store(float* p, int64_t i, float x) { p[i] = x; }
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float x) {
  p[i] = __float2bfloat16(x);
}

// Sum of `v` over the block's N threads (N a power of two). Every thread gets the total; the
// last barrier keeps `buf` from being overwritten by a next reduction before all have read it.
template <int N>
__device__ float block_sum(float v, float* buf) {
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int s = N / 2; s > 0; s >>= 1) {
    if ((int)threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  float total = buf[0];
  __syncthreads();
  return total;
}

template <int N>
__device__ float block_max(float v, float* buf) {
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int s = N / 2; s > 0; s >>= 1) {
    if ((int)threadIdx.x < s) buf[threadIdx.x] = fmaxf(buf[threadIdx.x], buf[threadIdx.x + s]);
    __syncthreads();
  }
  float total = buf[0];
  __syncthreads();
  return total;
}

// One block per row of scores [B, H, T, S] (rows in b, h, t order); `mask` is [B, 1, T, S],
// shared by the heads, in the scores' type. A fully masked row (finite mask) is uniform.
template <typename T>
__device__ void masked_softmax_fwd(const T* scores, const T* mask, T* probs, int heads,
                                   int queries, int keys, float scale) {
  __shared__ float buf[SOFTMAX_BLOCK];
  const int64_t row = blockIdx.x;
  const int64_t b = row / ((int64_t)heads * queries);
  const int64_t t = row % queries;
  const int64_t x0 = row * keys;
  const int64_t m0 = (b * queries + t) * keys;
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < keys; j += SOFTMAX_BLOCK)
    mx = fmaxf(mx, load(scores, x0 + j) * scale + load(mask, m0 + j));
  mx = block_max<SOFTMAX_BLOCK>(mx, buf);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < keys; j += SOFTMAX_BLOCK)
    sum += expf(load(scores, x0 + j) * scale + load(mask, m0 + j) - mx);
  sum = block_sum<SOFTMAX_BLOCK>(sum, buf);
  const float inv = 1.0f / sum;
  for (int j = threadIdx.x; j < keys; j += SOFTMAX_BLOCK)
    store(probs, x0 + j, expf(load(scores, x0 + j) * scale + load(mask, m0 + j) - mx) * inv);
}

// d scores = scale * p * (g - sum_row(p * g)), one block per row.
template <typename T>
__device__ void masked_softmax_bwd(const T* probs, const T* grad, T* dscores, int keys,
                                   float scale) {
  __shared__ float buf[SOFTMAX_BLOCK];
  const int64_t x0 = (int64_t)blockIdx.x * keys;
  float dot = 0.0f;
  for (int j = threadIdx.x; j < keys; j += SOFTMAX_BLOCK)
    dot += load(probs, x0 + j) * load(grad, x0 + j);
  dot = block_sum<SOFTMAX_BLOCK>(dot, buf);
  for (int j = threadIdx.x; j < keys; j += SOFTMAX_BLOCK)
    store(dscores, x0 + j, scale * load(probs, x0 + j) * (load(grad, x0 + j) - dot));
}

// One block per row of logits [N, V] (N = the grid): out[row] = logits[row, target] - lse and
// out[N + row] = lse, the row's logsumexp (kept for the backward). Targets are checked by the
// caller.
template <typename T>
__device__ void token_logprob_fwd(const T* logits, const uint32_t* targets, float* out,
                                  int vocab) {
  __shared__ float buf[VOCAB_BLOCK];
  const int64_t row = blockIdx.x;
  const int64_t x0 = row * vocab;
  float mx = -INFINITY;
  for (int j = threadIdx.x; j < vocab; j += VOCAB_BLOCK) mx = fmaxf(mx, load(logits, x0 + j));
  mx = block_max<VOCAB_BLOCK>(mx, buf);
  float sum = 0.0f;
  for (int j = threadIdx.x; j < vocab; j += VOCAB_BLOCK) sum += expf(load(logits, x0 + j) - mx);
  sum = block_sum<VOCAB_BLOCK>(sum, buf);
  if (threadIdx.x == 0) {
    const float lse = mx + logf(sum);
    // A target outside the vocabulary reads nothing: its log-prob is NaN, which the trainer
    // reports as a non-finite loss (the decoder has checked the ids of its own inputs).
    const uint32_t target = targets[row];
    out[row] = target < (uint32_t)vocab ? load(logits, x0 + target) - lse : NAN;
    out[gridDim.x + row] = lse;
  }
}

// d logits[row, j] = g * ([j == target] - exp(logits[row, j] - lse)), with g = stats[row] (the
// log-prob's gradient) and lse = stats[N + row] (the forward's), one block per row.
template <typename T>
__device__ void token_logprob_bwd(const T* logits, const uint32_t* targets, const float* stats,
                                  T* dlogits, int vocab) {
  const int64_t row = blockIdx.x;
  const int64_t x0 = row * vocab;
  const float g = stats[row];
  const float lse = stats[gridDim.x + row];
  const int64_t target = targets[row];
  for (int j = threadIdx.x; j < vocab; j += VOCAB_BLOCK) {
    const float onehot = j == target ? 1.0f : 0.0f;
    store(dlogits, x0 + j, g * (onehot - expf(load(logits, x0 + j) - lse)));
  }
}

// RMSNorm with f32 statistics as HF Llama/Qwen2 compute them, whatever the storage type:
// y = x * rsqrt(mean(x^2) + eps) * w, rounded once (HF rounds x * r to the storage type before
// the product with w), one block per row of x [N, H].
template <typename T>
__device__ void rms_norm_fwd(const T* x, const T* w, T* y, int hidden, float eps) {
  __shared__ float buf[SOFTMAX_BLOCK];
  const int64_t x0 = (int64_t)blockIdx.x * hidden;
  float ss = 0.0f;
  for (int j = threadIdx.x; j < hidden; j += SOFTMAX_BLOCK) {
    const float v = load(x, x0 + j);
    ss += v * v;
  }
  const float r = rsqrtf(block_sum<SOFTMAX_BLOCK>(ss, buf) / hidden + eps);
  for (int j = threadIdx.x; j < hidden; j += SOFTMAX_BLOCK)
    store(y, x0 + j, load(x, x0 + j) * r * load(w, j));
}

// dx = r * (w * dy - x * r^2 * sum_j(w_j dy_j x_j) / H), one block per row.
template <typename T>
__device__ void rms_norm_bwd_x(const T* x, const T* w, const T* dy, T* dx, int hidden,
                               float eps) {
  __shared__ float buf[SOFTMAX_BLOCK];
  const int64_t x0 = (int64_t)blockIdx.x * hidden;
  float ss = 0.0f, dot = 0.0f;
  for (int j = threadIdx.x; j < hidden; j += SOFTMAX_BLOCK) {
    const float v = load(x, x0 + j);
    ss += v * v;
    dot += load(w, j) * load(dy, x0 + j) * v;
  }
  const float r = rsqrtf(block_sum<SOFTMAX_BLOCK>(ss, buf) / hidden + eps);
  dot = block_sum<SOFTMAX_BLOCK>(dot, buf);
  const float c = r * r * dot / hidden;
  for (int j = threadIdx.x; j < hidden; j += SOFTMAX_BLOCK)
    store(dx, x0 + j, r * (load(w, j) * load(dy, x0 + j) - load(x, x0 + j) * c));
}

// The weight's gradient sum_rows(dy * x * r) in parts: block b sums rows
// [b * rows_per_block, (b + 1) * rows_per_block) into partial[b, :] (f32), in row order; the
// caller adds the parts (candle's fixed reduction tree), so the result does not depend on
// scheduling. hidden <= RMS_MAX_HIDDEN.
#define RMS_MAX_HIDDEN 8192
template <typename T>
__device__ void rms_norm_bwd_w(const T* x, const T* dy, float* partial, int rows, int hidden,
                               int rows_per_block, float eps) {
  __shared__ float buf[SOFTMAX_BLOCK];
  __shared__ float acc[RMS_MAX_HIDDEN];
  for (int j = threadIdx.x; j < hidden; j += SOFTMAX_BLOCK) acc[j] = 0.0f;
  const int first = blockIdx.x * rows_per_block;
  const int last = min(rows, first + rows_per_block);
  for (int row = first; row < last; ++row) {
    const int64_t x0 = (int64_t)row * hidden;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < hidden; j += SOFTMAX_BLOCK) {
      const float v = load(x, x0 + j);
      ss += v * v;
    }
    const float r = rsqrtf(block_sum<SOFTMAX_BLOCK>(ss, buf) / hidden + eps);
    // Each thread owns columns j = threadIdx.x + k * SOFTMAX_BLOCK of acc: no sharing.
    for (int j = threadIdx.x; j < hidden; j += SOFTMAX_BLOCK)
      acc[j] += load(dy, x0 + j) * load(x, x0 + j) * r;
  }
  for (int j = threadIdx.x; j < hidden; j += SOFTMAX_BLOCK)
    partial[(int64_t)blockIdx.x * hidden + j] = acc[j];
}

// SwiGLU, out = silu(gate) * up, elementwise over n (grid-stride).
template <typename T>
__device__ void swiglu_fwd(const T* gate, const T* up, T* out, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (int64_t)blockDim.x * gridDim.x) {
    const float g = load(gate, i);
    const float s = 1.0f / (1.0f + expf(-g));
    store(out, i, g * s * load(up, i));
  }
}

// Its backward into one buffer of 2n: d gate = dy * up * s * (1 + g * (1 - s)) at [0, n), and
// d up = dy * silu(g) at [n, 2n), with s = sigmoid(g) recomputed.
template <typename T>
__device__ void swiglu_bwd(const T* gate, const T* up, const T* dy, T* grads, int64_t n) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (int64_t)blockDim.x * gridDim.x) {
    const float g = load(gate, i);
    const float d = load(dy, i);
    const float s = 1.0f / (1.0f + expf(-g));
    store(grads, i, d * load(up, i) * s * (1.0f + g * (1.0f - s)));
    store(grads, n + i, d * g * s);
  }
}

// Rotary embedding, y = x * cos + rotate_half(x) * sin with rotate_half([x1, x2]) = [-x2, x1],
// or with `transpose` the transposed map (the backward: dx = dy * cos + [a2, -a1] for
// [a1, a2] = dy * sin). x [B, H, T, D] is read through strides (sb, sh, st; unit stride in D),
// so the decoder's transposed projection needs no copy; y is contiguous [B, H, T, D]; tables
// cos, sin are [B, 1, T, D]. One thread per (row, k < D/2) pair writes y[k] and y[k + D/2].
// Index type I: 32-bit when every index fits (the caller says), else 64-bit.
template <typename T, typename I>
__device__ void rope_pairs(const T* x, const T* cos, const T* sin, T* y, int heads,
                           int positions, int dim, I pairs, I sb, I sh, I st, bool transpose) {
  const I half = dim / 2;
  for (I p = (I)blockIdx.x * blockDim.x + threadIdx.x; p < pairs;
       p += (I)blockDim.x * gridDim.x) {
    const I row = p / half;
    const I k = p - row * half;
    const I t = row % positions;
    const I bh = row / positions;
    const I b = bh / heads;
    const I h = bh - b * heads;
    const I xi = b * sb + h * sh + t * st + k;
    const I c = (b * positions + t) * dim + k;
    const I yi = row * dim + k;
    const float x1 = load(x, xi), x2 = load(x, xi + half);
    const float c1 = load(cos, c), c2 = load(cos, c + half);
    const float s1 = load(sin, c), s2 = load(sin, c + half);
    if (transpose) {
      store(y, yi, x1 * c1 + x2 * s2);
      store(y, yi + half, x2 * c2 - x1 * s1);
    } else {
      store(y, yi, x1 * c1 - x2 * s1);
      store(y, yi + half, x2 * c2 + x1 * s2);
    }
  }
}

// The index of the row's largest value, the first one on ties, one block per row of x [N, V].
// (A row with NaNs may pick differently from the CPU's argmax; no finite model gives one.)
template <typename T>
__device__ void argmax_rows(const T* x, uint32_t* out, int cols) {
  __shared__ float best_value[VOCAB_BLOCK];
  __shared__ int best_index[VOCAB_BLOCK];
  const int64_t x0 = (int64_t)blockIdx.x * cols;
  // Each thread's first maximum over its strided columns (increasing, so strict > keeps the
  // first); a thread with no column holds index `cols`, which loses every comparison.
  float value = -INFINITY;
  int index = cols;
  for (int j = threadIdx.x; j < cols; j += VOCAB_BLOCK) {
    const float v = load(x, x0 + j);
    if (index == cols || v > value) {
      value = v;
      index = j;
    }
  }
  best_value[threadIdx.x] = value;
  best_index[threadIdx.x] = index;
  __syncthreads();
  for (int s = VOCAB_BLOCK / 2; s > 0; s >>= 1) {
    if ((int)threadIdx.x < s) {
      const float v = best_value[threadIdx.x + s];
      const int i = best_index[threadIdx.x + s];
      const int mine = best_index[threadIdx.x];
      const bool larger = v > best_value[threadIdx.x];
      const bool tie_before = v == best_value[threadIdx.x] && i < mine;
      if (i < cols && (mine == cols || larger || tie_before)) {
        best_value[threadIdx.x] = v;
        best_index[threadIdx.x] = i;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = best_index[0] < cols ? best_index[0] : 0;
}

// The embedding table's gradient, deterministic and without atomics. Segment s holds the
// positions order[starts[s]] .. order[starts[s + 1] - 1] (increasing) that looked up token
// ids[s]; the thread of pair i = (s, column c) sums column c of their gradient rows in f32, in
// that order, and writes the sum to row ids[s] of `out`, which the caller zeroed (the rows of
// tokens no position looked up stay zero). These are the sums, in the order, of candle's CPU
// index_add; candle's CUDA one walks all positions in one thread per column.
template <typename T>
__device__ void embedding_bwd(const T* grad, const uint32_t* order, const uint32_t* starts,
                              const uint32_t* ids, T* out, int64_t pairs, int64_t width) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < pairs;
       i += (int64_t)blockDim.x * gridDim.x) {
    const int64_t s = i / width;
    const int64_t c = i - s * width;
    float acc = 0.0f;
    for (uint32_t k = starts[s]; k < starts[s + 1]; ++k)
      acc += load(grad, (int64_t)order[k] * width + c);
    store(out, (int64_t)ids[s] * width + c, acc);
  }
}

#define ROW_KERNELS(NAME, T)                                                                \
  extern "C" __global__ void __launch_bounds__(SOFTMAX_BLOCK) masked_softmax_fwd_##NAME(    \
      const T* scores, const T* mask, T* probs, int heads, int queries, int keys,           \
      float scale) {                                                                        \
    masked_softmax_fwd<T>(scores, mask, probs, heads, queries, keys, scale);               \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(SOFTMAX_BLOCK) masked_softmax_bwd_##NAME(    \
      const T* probs, const T* grad, T* dscores, int keys, float scale) {                   \
    masked_softmax_bwd<T>(probs, grad, dscores, keys, scale);                               \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(VOCAB_BLOCK) token_logprob_fwd_##NAME(       \
      const T* logits, const uint32_t* targets, float* out, int vocab) {                    \
    token_logprob_fwd<T>(logits, targets, out, vocab);                                      \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(VOCAB_BLOCK) token_logprob_bwd_##NAME(       \
      const T* logits, const uint32_t* targets, const float* stats, T* dlogits, int vocab) { \
    token_logprob_bwd<T>(logits, targets, stats, dlogits, vocab);                           \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(VOCAB_BLOCK) argmax_rows_##NAME(             \
      const T* x, uint32_t* out, int cols) {                                                \
    argmax_rows<T>(x, out, cols);                                                           \
  }                                                                                         \
  extern "C" __global__ void swiglu_fwd_##NAME(const T* gate, const T* up, T* out,         \
                                               int64_t n) {                                 \
    swiglu_fwd<T>(gate, up, out, n);                                                        \
  }                                                                                         \
  extern "C" __global__ void swiglu_bwd_##NAME(const T* gate, const T* up, const T* dy,     \
                                               T* grads, int64_t n) {                       \
    swiglu_bwd<T>(gate, up, dy, grads, n);                                                  \
  }                                                                                         \
  extern "C" __global__ void rope_##NAME(const T* x, const T* cos, const T* sin, T* y,      \
                                         int heads, int positions, int dim, int64_t pairs,  \
                                         int64_t sb, int64_t sh, int64_t st, int transpose, \
                                         int small) {                                       \
    if (small)                                                                              \
      rope_pairs<T, uint32_t>(x, cos, sin, y, heads, positions, dim, (uint32_t)pairs,       \
                              (uint32_t)sb, (uint32_t)sh, (uint32_t)st, transpose != 0);    \
    else                                                                                    \
      rope_pairs<T, int64_t>(x, cos, sin, y, heads, positions, dim, pairs, sb, sh, st,      \
                             transpose != 0);                                               \
  }                                                                                         \
  extern "C" __global__ void embedding_bwd_##NAME(const T* grad, const uint32_t* order,     \
                                                  const uint32_t* starts, const uint32_t* ids, \
                                                  T* out, int64_t pairs, int64_t width) {   \
    embedding_bwd<T>(grad, order, starts, ids, out, pairs, width);                          \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(SOFTMAX_BLOCK) rms_norm_fwd_##NAME(          \
      const T* x, const T* w, T* y, int hidden, float eps) {                                \
    rms_norm_fwd<T>(x, w, y, hidden, eps);                                                  \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(SOFTMAX_BLOCK) rms_norm_bwd_x_##NAME(        \
      const T* x, const T* w, const T* dy, T* dx, int hidden, float eps) {                  \
    rms_norm_bwd_x<T>(x, w, dy, dx, hidden, eps);                                           \
  }                                                                                         \
  extern "C" __global__ void __launch_bounds__(SOFTMAX_BLOCK) rms_norm_bwd_w_##NAME(        \
      const T* x, const T* dy, float* partial, int rows, int hidden, int rows_per_block,    \
      float eps) {                                                                          \
    rms_norm_bwd_w<T>(x, dy, partial, rows, hidden, rows_per_block, eps);                   \
  }

ROW_KERNELS(f32, float)
ROW_KERNELS(bf16, __nv_bfloat16)

// m <- beta * m + (1 - beta) * g (or g * g with `squared`), in place over n elements.
extern "C" __global__ void adamw_moment_f32(float* m, const float* g, int64_t n, float beta,
                                            float one_minus_beta, int squared) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (int64_t)blockDim.x * gridDim.x) {
    float gi = g[i];
    if (squared) gi = gi * gi;
    m[i] = m[i] * beta + gi * one_minus_beta;
  }
}

// w <- w * decay - step * m / (sqrt(v) * inv_bias2_sqrt + epsilon), in place over n elements.
extern "C" __global__ void adamw_apply_f32(float* w, const float* m, const float* v, int64_t n,
                                           float decay, float step, float inv_bias2_sqrt,
                                           float epsilon) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (int64_t)blockDim.x * gridDim.x) {
    const float denom = sqrtf(v[i]) * inv_bias2_sqrt + epsilon;
    w[i] = w[i] * decay - (m[i] / denom) * step;
  }
}
