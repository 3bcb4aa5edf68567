// Runs every kernel of cuda/kernels.cu under the CPU emulation (cuda_emulate.h) and compares it
// with a double-precision reference written out from the formulas here. Rows are longer than
// a block (so the strided loops wrap), one attention row is fully masked, and the bf16 kernels
// read and write rounded values. Prints one line per check; exits 1 on the first failure.
//
// Built and run by tests/integration/cuda_emulation.rs:
//   c++ -std=c++17 -O1 -pthread -I cuda/emulate -include cuda_emulate.h cuda/emulate/harness.cpp

#include "../kernels.cu"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>

static std::mt19937 rng(7);

static std::vector<float> uniform(size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// Storage of type T holding `v` (rounded for bf16), and its values read back as floats.
template <typename T>
struct Buf {
  std::vector<T> data;
  explicit Buf(const std::vector<float>& v) {
    for (float x : v) data.push_back(from(x));
  }
  explicit Buf(size_t n) : data(n, from(0.0f)) {}
  static T from(float x);
  float at(size_t i) const;
  size_t size() const { return data.size(); }
};
template <> float Buf<float>::from(float x) { return x; }
template <> float Buf<float>::at(size_t i) const { return data[i]; }
template <> __nv_bfloat16 Buf<__nv_bfloat16>::from(float x) { return __float2bfloat16(x); }
template <> float Buf<__nv_bfloat16>::at(size_t i) const { return __bfloat162float(data[i]); }

static void check(const char* what, double got, double want, double tol) {
  if (!(fabs(got - want) <= tol)) {
    printf("FAIL %s: got %.9g, want %.9g (tolerance %.3g)\n", what, got, want, tol);
    exit(1);
  }
}

template <typename T>
static void softmax_case(const char* name, double rel) {
  const int B = 2, H = 3, T_ = 4, S = 600;
  const float scale = 0.125f;
  auto scores = Buf<T>(uniform((size_t)B * H * T_ * S, -30.0f, 30.0f));
  // Causal over the last T_ keys, batch row 1 with its first 7 keys padded, and in batch row 0
  // query 2 sees nothing (uniform, as the composed softmax gives it with a finite mask).
  std::vector<float> m((size_t)B * T_ * S);
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T_; ++t)
      for (int j = 0; j < S; ++j) {
        bool visible = j <= S - T_ + t && !(b == 1 && j < 7) && !(b == 0 && t == 2);
        m[((size_t)b * T_ + t) * S + j] = visible ? 0.0f : -1e9f;
      }
  auto mask = Buf<T>(m);
  Buf<T> probs((size_t)B * H * T_ * S);
  emulate_launch(B * H * T_, SOFTMAX_BLOCK, [&] {
    if (sizeof(T) == 4)
      masked_softmax_fwd_f32((const float*)scores.data.data(), (const float*)mask.data.data(),
                             (float*)probs.data.data(), H, T_, S, scale);
    else
      masked_softmax_fwd_bf16((const __nv_bfloat16*)scores.data.data(),
                              (const __nv_bfloat16*)mask.data.data(),
                              (__nv_bfloat16*)probs.data.data(), H, T_, S, scale);
  });
  for (int row = 0; row < B * H * T_; ++row) {
    int b = row / (H * T_), t = row % T_;
    std::vector<double> z(S);
    double mx = -INFINITY, sum = 0;
    for (int j = 0; j < S; ++j) {
      // The masked score in f32, as the kernels and the CPU path form it: beside -1e9 a
      // score's own value is lost, so a fully masked row comes out uniform.
      z[j] = scores.at((size_t)row * S + j) * scale + mask.at(((size_t)b * T_ + t) * S + j);
      mx = fmax(mx, z[j]);
    }
    for (int j = 0; j < S; ++j) sum += exp(z[j] - mx);
    for (int j = 0; j < S; ++j) {
      double want = exp(z[j] - mx) / sum;
      check("masked_softmax_fwd", probs.at((size_t)row * S + j), want, rel * want + 1e-7);
    }
  }
  printf("ok masked_softmax_fwd_%s\n", name);

  auto p = Buf<T>(uniform((size_t)B * H * T_ * S, 0.0f, 0.01f));
  auto g = Buf<T>(uniform((size_t)B * H * T_ * S, -1.0f, 1.0f));
  Buf<T> ds((size_t)B * H * T_ * S);
  emulate_launch(B * H * T_, SOFTMAX_BLOCK, [&] {
    if (sizeof(T) == 4)
      masked_softmax_bwd_f32((const float*)p.data.data(), (const float*)g.data.data(),
                             (float*)ds.data.data(), S, scale);
    else
      masked_softmax_bwd_bf16((const __nv_bfloat16*)p.data.data(),
                              (const __nv_bfloat16*)g.data.data(),
                              (__nv_bfloat16*)ds.data.data(), S, scale);
  });
  for (int row = 0; row < B * H * T_; ++row) {
    double dot = 0;
    for (int j = 0; j < S; ++j) dot += (double)p.at((size_t)row * S + j) * g.at((size_t)row * S + j);
    for (int j = 0; j < S; ++j) {
      size_t i = (size_t)row * S + j;
      double want = scale * p.at(i) * (g.at(i) - dot);
      check("masked_softmax_bwd", ds.at(i), want, rel * fabs(want) + 1e-7);
    }
  }
  printf("ok masked_softmax_bwd_%s\n", name);
}

template <typename T>
static void logprob_case(const char* name, double rel) {
  const int N = 5, V = 3001;
  auto logits = Buf<T>(uniform((size_t)N * V, -8.0f, 8.0f));
  std::vector<uint32_t> targets = {0, 1, 1024, 2999, 3000};
  std::vector<float> out(2 * N);
  emulate_launch(N, VOCAB_BLOCK, [&] {
    if (sizeof(T) == 4)
      token_logprob_fwd_f32((const float*)logits.data.data(), targets.data(), out.data(), V);
    else
      token_logprob_fwd_bf16((const __nv_bfloat16*)logits.data.data(), targets.data(),
                             out.data(), V);
  });
  const float* logp = out.data();
  const float* lse = out.data() + N;
  std::vector<double> want_lse(N);
  for (int r = 0; r < N; ++r) {
    double mx = -INFINITY, sum = 0;
    for (int j = 0; j < V; ++j) mx = fmax(mx, (double)logits.at((size_t)r * V + j));
    for (int j = 0; j < V; ++j) sum += exp(logits.at((size_t)r * V + j) - mx);
    want_lse[r] = mx + log(sum);
    // f32 math over the same stored inputs: only the sum's rounding differs.
    check("token_logprob_fwd lse", lse[r], want_lse[r], 1e-5 * fabs(want_lse[r]));
    check("token_logprob_fwd logp", logp[r], logits.at((size_t)r * V + targets[r]) - want_lse[r],
          1e-5 * fabs(want_lse[r]));
  }
  // A target outside the vocabulary reads nothing and gives NaN.
  std::vector<uint32_t> bad = {(uint32_t)V, 0, 0, 0, 0};
  emulate_launch(N, VOCAB_BLOCK, [&] {
    if (sizeof(T) == 4)
      token_logprob_fwd_f32((const float*)logits.data.data(), bad.data(), out.data(), V);
    else
      token_logprob_fwd_bf16((const __nv_bfloat16*)logits.data.data(), bad.data(), out.data(), V);
  });
  if (!std::isnan(out[0]) || std::isnan(out[1])) {
    printf("FAIL token_logprob_fwd: out-of-vocabulary target gave %g\n", out[0]);
    exit(1);
  }
  printf("ok token_logprob_fwd_%s\n", name);

  // The backward's stats: the log-probs' gradients, then the forward's logsumexps.
  std::vector<float> stats = {1.0f, -0.5f, 0.0f, 2.0f, 0.25f};
  for (int r = 0; r < N; ++r) stats.push_back((float)want_lse[r]);
  const float* grad = stats.data();
  const float* lse_in = stats.data() + N;
  Buf<T> dlogits((size_t)N * V);
  emulate_launch(N, VOCAB_BLOCK, [&] {
    if (sizeof(T) == 4)
      token_logprob_bwd_f32((const float*)logits.data.data(), targets.data(), stats.data(),
                            (float*)dlogits.data.data(), V);
    else
      token_logprob_bwd_bf16((const __nv_bfloat16*)logits.data.data(), targets.data(),
                             stats.data(), (__nv_bfloat16*)dlogits.data.data(), V);
  });
  for (int r = 0; r < N; ++r)
    for (int j = 0; j < V; ++j) {
      size_t i = (size_t)r * V + j;
      double want = grad[r] * ((j == (int)targets[r] ? 1.0 : 0.0) - exp(logits.at(i) - (double)lse_in[r]));
      check("token_logprob_bwd", dlogits.at(i), want, rel * fabs(want) + 1e-7);
    }
  printf("ok token_logprob_bwd_%s\n", name);
}

// First maximum per row: ties inside one thread's columns, across threads, a constant row, and
// rows narrower than the block (most threads see no column).
template <typename T>
static void argmax_case(const char* name) {
  for (int V : {3001, 10}) {
    const int N = 4;
    auto v = uniform((size_t)N * V, -1.0f, 1.0f);
    std::vector<uint32_t> want(N);
    if (V > 2000) {
      v[0 * V + 2500] = 5.0f;  // unique
      v[1 * V + 2000] = 5.0f, v[1 * V + 7] = 5.0f;  // threads 976 and 7
      v[2 * V + 1030] = 5.0f, v[2 * V + 1029] = 5.0f, v[2 * V + 5] = 4.0f;  // threads 6 and 5
      want = {2500, 7, 1029, 0};
    } else {
      v[0 * V + 9] = 5.0f;
      v[1 * V + 3] = 5.0f, v[1 * V + 8] = 5.0f;
      v[2 * V + 0] = 5.0f;
      want = {9, 3, 0, 0};
    }
    for (int j = 0; j < V; ++j) v[3 * (size_t)V + j] = 0.5f;  // all equal
    auto x = Buf<T>(v);
    std::vector<uint32_t> out(N, 12345);
    emulate_launch(N, VOCAB_BLOCK, [&] {
      if (sizeof(T) == 4)
        argmax_rows_f32((const float*)x.data.data(), out.data(), V);
      else
        argmax_rows_bf16((const __nv_bfloat16*)x.data.data(), out.data(), V);
    });
    for (int r = 0; r < N; ++r) check("argmax_rows", out[r], want[r], 0.0);
  }
  printf("ok argmax_rows_%s\n", name);
}

template <typename T>
static void rms_norm_case(const char* name, double rel) {
  const int N = 70, H = 600, RPB = 16;
  const float eps = 1e-6f;
  auto x = Buf<T>(uniform((size_t)N * H, -2.0f, 2.0f));
  auto w = Buf<T>(uniform(H, 0.5f, 1.5f));
  auto dy = Buf<T>(uniform((size_t)N * H, -1.0f, 1.0f));
  Buf<T> y((size_t)N * H), dx((size_t)N * H);
  const int blocks = (N + RPB - 1) / RPB;
  std::vector<float> partial((size_t)blocks * H, 12345.0f);
  auto p = [](const Buf<T>& b) { return (const T*)b.data.data(); };
  auto q = [](Buf<T>& b) { return (T*)b.data.data(); };
  emulate_launch(N, SOFTMAX_BLOCK, [&] {
    if (sizeof(T) == 4)
      rms_norm_fwd_f32((const float*)p(x), (const float*)p(w), (float*)q(y), H, eps);
    else
      rms_norm_fwd_bf16((const __nv_bfloat16*)p(x), (const __nv_bfloat16*)p(w),
                        (__nv_bfloat16*)q(y), H, eps);
  });
  emulate_launch(N, SOFTMAX_BLOCK, [&] {
    if (sizeof(T) == 4)
      rms_norm_bwd_x_f32((const float*)p(x), (const float*)p(w), (const float*)p(dy),
                         (float*)q(dx), H, eps);
    else
      rms_norm_bwd_x_bf16((const __nv_bfloat16*)p(x), (const __nv_bfloat16*)p(w),
                          (const __nv_bfloat16*)p(dy), (__nv_bfloat16*)q(dx), H, eps);
  });
  emulate_launch(blocks, SOFTMAX_BLOCK, [&] {
    if (sizeof(T) == 4)
      rms_norm_bwd_w_f32((const float*)p(x), (const float*)p(dy), partial.data(), N, H, RPB, eps);
    else
      rms_norm_bwd_w_bf16((const __nv_bfloat16*)p(x), (const __nv_bfloat16*)p(dy), partial.data(),
                          N, H, RPB, eps);
  });
  std::vector<double> dw(H, 0.0);
  for (int r = 0; r < N; ++r) {
    double ss = 0, dot = 0;
    for (int j = 0; j < H; ++j) {
      size_t i = (size_t)r * H + j;
      ss += (double)x.at(i) * x.at(i);
      dot += (double)w.at(j) * dy.at(i) * x.at(i);
    }
    double rr = 1.0 / sqrt(ss / H + eps);
    for (int j = 0; j < H; ++j) {
      size_t i = (size_t)r * H + j;
      double want_y = x.at(i) * rr * w.at(j);
      check("rms_norm_fwd", y.at(i), want_y, rel * fabs(want_y) + 1e-6);
      double want_dx = rr * (w.at(j) * dy.at(i) - x.at(i) * rr * rr * dot / H);
      // dx cancels two terms: tolerance on their size.
      check("rms_norm_bwd_x", dx.at(i), want_dx,
            rel * rr * (fabs(w.at(j) * dy.at(i)) + fabs(x.at(i) * rr * rr * dot / H)) + 1e-6);
      dw[j] += dy.at(i) * x.at(i) * rr;
    }
  }
  for (int j = 0; j < H; ++j) {
    double got = 0, size = 0;
    for (int b = 0; b < blocks; ++b) got += partial[(size_t)b * H + j];
    for (int r = 0; r < N; ++r) size += fabs(dy.at((size_t)r * H + j) * x.at((size_t)r * H + j));
    check("rms_norm_bwd_w", got, dw[j], 1e-5 * size + 1e-6);
  }
  printf("ok rms_norm_%s\n", name);
}

template <typename T>
static void swiglu_rope_case(const char* name, double rel) {
  auto p = [](const Buf<T>& b) { return (const T*)b.data.data(); };
  auto q = [](Buf<T>& b) { return (T*)b.data.data(); };
  const bool f32 = sizeof(T) == 4;
  {
    const int64_t n = 3000;
    auto g = Buf<T>(uniform(n, -12.0f, 12.0f)), u = Buf<T>(uniform(n, -2.0f, 2.0f)),
         dy = Buf<T>(uniform(n, -1.0f, 1.0f));
    Buf<T> y(n), grads(2 * n);
    emulate_launch(3, 256, [&] {
      if (f32) swiglu_fwd_f32((const float*)p(g), (const float*)p(u), (float*)q(y), n);
      else swiglu_fwd_bf16((const __nv_bfloat16*)p(g), (const __nv_bfloat16*)p(u), (__nv_bfloat16*)q(y), n);
    });
    emulate_launch(3, 256, [&] {
      if (f32) swiglu_bwd_f32((const float*)p(g), (const float*)p(u), (const float*)p(dy), (float*)q(grads), n);
      else swiglu_bwd_bf16((const __nv_bfloat16*)p(g), (const __nv_bfloat16*)p(u), (const __nv_bfloat16*)p(dy), (__nv_bfloat16*)q(grads), n);
    });
    for (int64_t i = 0; i < n; ++i) {
      double gg = g.at(i), s = 1.0 / (1.0 + exp(-gg));
      double want = gg * s * u.at(i);
      check("swiglu_fwd", y.at(i), want, rel * fabs(want) + 1e-6);
      double dg = dy.at(i) * u.at(i) * (s + gg * s * (1 - s));
      check("swiglu_bwd gate", grads.at(i), dg, rel * fabs(dg) + 1e-5);
      double du = dy.at(i) * gg * s;
      check("swiglu_bwd up", grads.at(n + i), du, rel * fabs(du) + 1e-6);
    }
  }
  for (int small : {1, 0}) {
    const int B = 2, H = 3, T_ = 5, D = 8;
    const int64_t n = (int64_t)B * H * T_ * D;
    // x as the decoder hands it over: a [B, T, H, D] projection seen as [B, H, T, D].
    auto xm = Buf<T>(uniform(n, -2.0f, 2.0f)), dy = Buf<T>(uniform(n, -1.0f, 1.0f));
    auto x_at = [&](int b, int h, int t, int d) { return xm.at((((size_t)b * T_ + t) * H + h) * D + d); };
    auto angles = uniform((size_t)B * T_ * D, -3.0f, 3.0f);
    std::vector<float> cv, sv;
    for (float a : angles) cv.push_back(cosf(a)), sv.push_back(sinf(a));
    auto c = Buf<T>(cv), sn = Buf<T>(sv);
    Buf<T> y(n), dx(n);
    const int64_t pairs = n / 2;
    emulate_launch(2, 16, [&] {
      if (f32) rope_f32((const float*)p(xm), (const float*)p(c), (const float*)p(sn), (float*)q(y), H, T_, D, pairs, (int64_t)T_ * H * D, D, (int64_t)H * D, 0, small);
      else rope_bf16((const __nv_bfloat16*)p(xm), (const __nv_bfloat16*)p(c), (const __nv_bfloat16*)p(sn), (__nv_bfloat16*)q(y), H, T_, D, pairs, (int64_t)T_ * H * D, D, (int64_t)H * D, 0, small);
    });
    emulate_launch(2, 16, [&] {
      if (f32) rope_f32((const float*)p(dy), (const float*)p(c), (const float*)p(sn), (float*)q(dx), H, T_, D, pairs, (int64_t)H * T_ * D, (int64_t)T_ * D, D, 1, small);
      else rope_bf16((const __nv_bfloat16*)p(dy), (const __nv_bfloat16*)p(c), (const __nv_bfloat16*)p(sn), (__nv_bfloat16*)q(dx), H, T_, D, pairs, (int64_t)H * T_ * D, (int64_t)T_ * D, D, 1, small);
    });
    // The forward element by element; the backward as the transpose of the forward's linear
    // map: <dy, J x> = <J^T dy, x> per (b, h, t) row.
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h)
        for (int t = 0; t < T_; ++t) {
          int64_t r0 = (((int64_t)b * H + h) * T_ + t) * D, c0 = ((int64_t)b * T_ + t) * D;
          double lhs = 0, rhs = 0, size = 0;
          for (int d = 0; d < D; ++d) {
            double rot = d < D / 2 ? -x_at(b, h, t, d + D / 2) : x_at(b, h, t, d - D / 2);
            double xv = x_at(b, h, t, d);
            double want = xv * c.at(c0 + d) + rot * sn.at(c0 + d);
            check("rope forward", y.at(r0 + d), want, rel * (fabs(xv) + fabs(rot)) + 1e-6);
            lhs += (double)dy.at(r0 + d) * want;
            rhs += (double)dx.at(r0 + d) * xv;
            size += fabs(dy.at(r0 + d)) * (fabs(xv) + fabs(rot));
          }
          check("rope backward (adjoint)", rhs, lhs, 4 * rel * size + 1e-5);
        }
  }
  printf("ok swiglu_rope_%s\n", name);
}

// Positions grouped by token as the host groups them (tokens increasing, positions increasing
// within a token): token 3 is looked up by many positions, token 7 once, most tokens never.
template <typename T>
static void embedding_case(const char* name, double rel) {
  const int N = 40, V = 12, W = 300;
  std::vector<uint32_t> tokens(N);
  for (int p = 0; p < N; ++p) tokens[p] = p % 3 == 0 ? 3 : (p == 17 ? 7 : 9 + p % 2);
  std::vector<uint32_t> ids, starts, order;
  for (uint32_t tok = 0; tok < (uint32_t)V; ++tok) {
    size_t before = order.size();
    for (int p = 0; p < N; ++p)
      if (tokens[p] == tok) order.push_back(p);
    if (order.size() > before) ids.push_back(tok), starts.push_back(before);
  }
  starts.push_back(order.size());
  auto g = Buf<T>(uniform((size_t)N * W, -1.0f, 1.0f));
  Buf<T> out((size_t)V * W);
  const int64_t pairs = (int64_t)ids.size() * W;
  // Fewer threads than pairs, so the grid-stride loop wraps.
  emulate_launch(3, 64, [&] {
    if (sizeof(T) == 4)
      embedding_bwd_f32((const float*)g.data.data(), order.data(), starts.data(), ids.data(),
                        (float*)out.data.data(), pairs, W);
    else
      embedding_bwd_bf16((const __nv_bfloat16*)g.data.data(), order.data(), starts.data(),
                         ids.data(), (__nv_bfloat16*)out.data.data(), pairs, W);
  });
  for (int v = 0; v < V; ++v)
    for (int c = 0; c < W; ++c) {
      double want = 0, size = 0;
      for (int p = 0; p < N; ++p)
        if (tokens[p] == (uint32_t)v) {
          want += g.at((size_t)p * W + c);
          size += fabs(g.at((size_t)p * W + c));
        }
      check("embedding_bwd", out.at((size_t)v * W + c), want, rel * fabs(want) + 1e-6 * size);
    }
  printf("ok embedding_bwd_%s\n", name);
}

static void adamw_case() {
  const long n = 5000;
  auto g = uniform(n, -1.0f, 1.0f), m = uniform(n, -0.1f, 0.1f), v = uniform(n, 0.0f, 0.01f),
       w = uniform(n, -1.0f, 1.0f);
  auto m2 = m, v2 = v, w2 = w;
  const float b1 = 0.9f, b2 = 0.999f, decay = 0.99f, step = 1e-3f, ib = 3.0f, eps = 1e-8f;
  emulate_launch(3, 128, [&] { adamw_moment_f32(m2.data(), g.data(), n, b1, 1.0f - b1, 0); });
  emulate_launch(3, 128, [&] { adamw_moment_f32(v2.data(), g.data(), n, b2, 1.0f - b2, 1); });
  emulate_launch(3, 128, [&] {
    adamw_apply_f32(w2.data(), m2.data(), v2.data(), n, decay, step, ib, eps);
  });
  for (long i = 0; i < n; ++i) {
    // The kernels get 1 - beta already rounded to f32.
    double mm = (double)m[i] * b1 + (double)g[i] * (double)(1.0f - b1);
    double vv = (double)v[i] * b2 + (double)g[i] * g[i] * (double)(1.0f - b2);
    double ww = (double)w[i] * decay - mm / (sqrt(vv) * ib + eps) * step;
    // f32 rounding of each term (the terms can cancel).
    check("adamw m", m2[i], mm, 1e-6 * (fabs(m[i] * b1) + fabs(g[i] * 0.1)));
    check("adamw v", v2[i], vv, 1e-6 * (fabs(v[i] * b2) + g[i] * g[i] * 1e-3));
    check("adamw w", w2[i], ww, 1e-6 * (fabs(w[i]) + fabs(mm / (sqrt(vv) * ib + eps) * step)));
  }
  printf("ok adamw_moment_f32 adamw_apply_f32\n");
}

int main() {
  softmax_case<float>("f32", 1e-5);
  softmax_case<__nv_bfloat16>("bf16", 1.0 / 128);
  logprob_case<float>("f32", 1e-5);
  logprob_case<__nv_bfloat16>("bf16", 1.0 / 128);
  rms_norm_case<float>("f32", 1e-5);
  rms_norm_case<__nv_bfloat16>("bf16", 1.0 / 128);
  swiglu_rope_case<float>("f32", 1e-5);
  swiglu_rope_case<__nv_bfloat16>("bf16", 1.0 / 128);
  argmax_case<float>("f32");
  argmax_case<__nv_bfloat16>("bf16");
  embedding_case<float>("f32", 1e-6);
  embedding_case<__nv_bfloat16>("bf16", 1.0 / 256);
  adamw_case();
  return 0;
}
