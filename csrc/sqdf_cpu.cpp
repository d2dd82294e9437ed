// Fused CPU kernels of the SQDF ops, called through ctypes from sqdf_fast/ops/cpp.py (which documents the maths).
//
// Plain C++17 without torch: every function takes raw pointers of contiguous tensors, the batch size B and the
// number D of elements per sample. Element dtypes: float32, float64, float16, bfloat16; the arithmetic runs in
// double for float64 and in float otherwise. Per-sample inputs (schedule values, k, reward, ...) and the KL/loss
// outputs have the compute dtype ("ct": double for float64, float otherwise). Optional inputs and unwanted
// outputs are null pointers. Exported functions return 0, or -1 for an unsupported dtype code.
//
// Work is split into fixed chunks of one sample (never depending on the thread count), so every reduction sums
// the same partial values in the same order whatever the number of threads: results are bitwise reproducible.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <type_traits>

#ifndef SQDF_BUILD_FLAGS  // set by setup.py
#define SQDF_BUILD_FLAGS "unknown"
#endif
#define SQDF_STR2(v) #v
#define SQDF_STR(v) SQDF_STR2(v)
#ifdef _OPENMP
#define SQDF_OPENMP SQDF_STR(_OPENMP)
#else
#define SQDF_OPENMP "no"
#endif
#if defined(__clang__)
#define SQDF_COMPILER "clang " __clang_version__
#elif defined(__GNUC__)
#define SQDF_COMPILER "gcc " __VERSION__
#else
#define SQDF_COMPILER "unknown"
#endif

namespace {

constexpr int64_t kChunk = 4096;         // elements per work item: a few L1-resident rows of each operand
constexpr int64_t kParallelMin = 32768;  // below this many elements a thread team costs more than it saves

enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// 16-bit storage types; converted with integer code that gcc vectorises (its _Float16 conversions are scalar).
struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float widen(float v) { return v; }
inline double widen(double v) { return v; }
inline float widen(BFloat16 v) { return float_of(uint32_t(v.bits) << 16); }
inline float widen(Half v) {
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  const uint32_t a = v.bits & 0x7fffu;
  const uint32_t normal = (a << 13) + 0x38000000u;    // exponent bias 15 -> 127
  const uint32_t special = (a << 13) | 0x7f800000u;   // inf and NaN, payload kept
  const uint32_t tiny = bits_of(float(int32_t(a)) * 0x1p-24f);  // zero and subnormals, exact
  const uint32_t f = a < 0x0400u ? tiny : (a >= 0x7c00u ? special : normal);
  return float_of(sign | f);
}

template <typename T> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };
template <typename T> using compute_t = typename Compute<T>::type;

template <typename T> T narrow(compute_t<T> v);
template <> inline float narrow<float>(float v) { return v; }
template <> inline double narrow<double>(double v) { return v; }
template <> inline BFloat16 narrow<BFloat16>(float v) {
  // Round to nearest even on the top 16 bits (a carry into the exponent gives inf); NaN stays a quiet NaN.
  const uint32_t u = bits_of(v);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return {uint16_t((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded)};
}
template <> inline Half narrow<Half>(float v) {
  const uint32_t u = bits_of(v);
  const uint32_t a = u & 0x7fffffffu;
  // Normal halves: rebias the exponent and round the mantissa to 10 bits, ties to even; a carry rolls into the
  // exponent, and magnitudes from 65520 up saturate to inf.
  const uint32_t normal = std::min((a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13, 0x7c00u);
  // Below 2^-14, adding 0.5f rounds |v| to a multiple of 2^-24 (ties to even): the subnormal half step.
  const uint32_t tiny = bits_of(float_of(a) + 0.5f) - 0x3f000000u;
  const uint32_t h = a > 0x7f800000u ? 0x7e00u : (a < 0x38800000u ? tiny : normal);
  return {uint16_t(((u >> 16) & 0x8000u) | h)};
}

// Runs body(item, b, lo, hi) over the chunks [lo, hi) of the flattened (B, D) elements, item = index of the
// chunk; the threads split the chunks statically, so which thread runs a chunk never changes what it computes.
template <typename Body>
void for_chunks(int64_t batch, int64_t d, int num_threads, Body&& body) {
  const int64_t chunks = (d + kChunk - 1) / kChunk;
  const int64_t items = batch * chunks;
  [[maybe_unused]] const int threads = batch * d >= kParallelMin && num_threads > 1 ? num_threads : 1;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t b = it / chunks;
    const int64_t lo = b * d + (it % chunks) * kChunk;
    body(it, b, lo, std::min(lo + kChunk, (b + 1) * d));
  }
}

// Calls f with one std::integral_constant<bool> per runtime flag, so kernels get their options as template
// parameters and every loop is branch-free.
template <typename F>
void with_flags(F&& f) { f(); }
template <typename F, typename... Rest>
void with_flags(F&& f, bool first, Rest... rest) {
  if (first)
    with_flags([&](auto... tail) { f(std::true_type{}, tail...); }, rest...);
  else
    with_flags([&](auto... tail) { f(std::false_type{}, tail...); }, rest...);
}

// Calls f with a value of the storage type named by dtype; false for an unknown code.
template <typename F>
bool with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); return true;
    case kFloat64: f(double{}); return true;
    case kFloat16: f(Half{}); return true;
    case kBFloat16: f(BFloat16{}); return true;
    default: return false;
  }
}

// Per-sample DDIM coefficients, in double whatever the element dtype.
struct StepCoef {
  double c_x, c_eps, sigma;
};

template <typename C>
std::vector<StepCoef> step_coefs(int64_t batch, const C* alpha_t, const C* alpha_prev, double eta) {
  std::vector<StepCoef> out(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const double a = alpha_t[b], ap = alpha_prev[b];
    const double sigma = eta * std::sqrt((1 - ap) / (1 - a) * (1 - a / ap));
    const double c_x = std::sqrt(ap) / std::sqrt(a);
    out[b] = {c_x, std::sqrt(1 - ap - sigma * sigma) - c_x * std::sqrt(1 - a), sigma};
  }
  return out;
}

// The guided epsilon u + w (c - u), or c alone without the unconditional output.
template <bool kUncond, typename T, typename C>
inline C guided(const T* __restrict__ cond, const T* __restrict__ uncond, int64_t i, C w) {
  const C c = widen(cond[i]);
  if constexpr (kUncond) {
    const C u = widen(uncond[i]);
    return u + w * (c - u);
  } else {
    return c;
  }
}

// x_prev over [lo, hi); returns sum (eps - eps_ref)^2 there (in double) when kRef.
template <typename T, bool kUncond, bool kNoise, bool kRef>
double step_forward_chunk(int64_t lo, int64_t hi, const T* __restrict__ x, const T* __restrict__ eps_c,
                          const T* __restrict__ eps_u, const T* __restrict__ ref_c, const T* __restrict__ ref_u,
                          const T* __restrict__ noise, T* __restrict__ x_prev, compute_t<T> c_x,
                          compute_t<T> c_eps, compute_t<T> sigma, compute_t<T> w) {
  using C = compute_t<T>;
  double acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = lo; i < hi; ++i) {
    const C eps = guided<kUncond>(eps_c, eps_u, i, w);
    C v = c_x * widen(x[i]) + c_eps * eps;
    if constexpr (kNoise) v += sigma * widen(noise[i]);
    x_prev[i] = narrow<T>(v);
    if constexpr (kRef) {
      const C diff = eps - guided<kUncond>(ref_c, ref_u, i, w);
      acc += double(diff) * double(diff);
    }
  }
  return acc;
}

// Gradients of the epsilons over [lo, hi): ge = c_eps g + h (eps - eps_ref) and gr = -h (eps - eps_ref), split
// into the conditional (w) and unconditional (1 - w) parts when guided. kGrad: g given (else 0); kKl: h != 0.
template <typename T, bool kGrad, bool kKl, bool kUncond, bool kEps, bool kRef>
void step_backward_chunk(int64_t lo, int64_t hi, const T* __restrict__ g, const T* __restrict__ eps_c,
                         const T* __restrict__ eps_u, const T* __restrict__ ref_c, const T* __restrict__ ref_u,
                         T* __restrict__ g_eps_c, T* __restrict__ g_eps_u, T* __restrict__ g_ref_c,
                         T* __restrict__ g_ref_u, compute_t<T> c_eps, compute_t<T> h, compute_t<T> w) {
  using C = compute_t<T>;
  const C w_u = C(1) - w;
  for (int64_t i = lo; i < hi; ++i) {
    C diff = 0;
    if constexpr (kKl) diff = guided<kUncond>(eps_c, eps_u, i, w) - guided<kUncond>(ref_c, ref_u, i, w);
    if constexpr (kEps) {
      C ge = kKl ? h * diff : C(0);
      if constexpr (kGrad) ge += c_eps * widen(g[i]);
      g_eps_c[i] = narrow<T>(kUncond ? w * ge : ge);
      if constexpr (kUncond) g_eps_u[i] = narrow<T>(w_u * ge);
    }
    if constexpr (kRef) {
      const C gr = kKl ? -h * diff : C(0);
      g_ref_c[i] = narrow<T>(kUncond ? w * gr : gr);
      if constexpr (kUncond) g_ref_u[i] = narrow<T>(w_u * gr);
    }
  }
}

// out = scale * g over [lo, hi); zeros when g is absent.
template <typename T>
void scale_chunk(int64_t lo, int64_t hi, const T* __restrict__ g, T* __restrict__ out, compute_t<T> scale) {
  if (g == nullptr) {
    std::fill(out + lo, out + hi, narrow<T>(0));
    return;
  }
  for (int64_t i = lo; i < hi; ++i) out[i] = narrow<T>(scale * widen(g[i]));
}

// out = k_a * a + k_b * b over [lo, hi).
template <typename T>
void axpby_chunk(int64_t lo, int64_t hi, const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out,
                 compute_t<T> k_a, compute_t<T> k_b) {
  for (int64_t i = lo; i < hi; ++i) out[i] = narrow<T>(k_a * widen(a[i]) + k_b * widen(b[i]));
}

template <typename T>
void guided_step_forward(int64_t batch, int64_t d, const void* x_, const void* eps_c_, const void* eps_u_,
                         const void* ref_c_, const void* ref_u_, const void* noise_, const void* alpha_t,
                         const void* alpha_prev, double eta, double w_, void* x_prev_, void* kl_, int threads) {
  using C = compute_t<T>;
  const auto x = static_cast<const T*>(x_), eps_c = static_cast<const T*>(eps_c_);
  const auto eps_u = static_cast<const T*>(eps_u_), ref_c = static_cast<const T*>(ref_c_);
  const auto ref_u = static_cast<const T*>(ref_u_), noise = static_cast<const T*>(noise_);
  const auto x_prev = static_cast<T*>(x_prev_);
  const auto coef = step_coefs(batch, static_cast<const C*>(alpha_t), static_cast<const C*>(alpha_prev), eta);
  const C w = C(w_);
  const int64_t chunks = (d + kChunk - 1) / kChunk;
  std::vector<double> partial(ref_c ? batch * chunks : 0);
  with_flags([&](auto uncond, auto has_noise, auto ref) {
    for_chunks(batch, d, threads, [&](int64_t it, int64_t b, int64_t lo, int64_t hi) {
      const double sum = step_forward_chunk<T, decltype(uncond)::value, decltype(has_noise)::value,
                                            decltype(ref)::value>(
          lo, hi, x, eps_c, eps_u, ref_c, ref_u, noise, x_prev, C(coef[b].c_x), C(coef[b].c_eps),
          C(coef[b].sigma), w);
      if constexpr (decltype(ref)::value) partial[it] = sum;
    });
  }, eps_u != nullptr, noise != nullptr, ref_c != nullptr);
  if (ref_c == nullptr) return;
  const auto kl = static_cast<C*>(kl_);
  for (int64_t b = 0; b < batch; ++b) {
    double sum = 0;
    for (int64_t c = 0; c < chunks; ++c) sum += partial[b * chunks + c];
    const double ratio = coef[b].c_eps / coef[b].sigma;
    kl[b] = C(ratio * ratio * sum / double(d));
  }
}

template <typename T>
void guided_step_backward(int64_t batch, int64_t d, const void* g_, const void* grad_kl_, const void* eps_c_,
                          const void* eps_u_, const void* ref_c_, const void* ref_u_, const void* alpha_t,
                          const void* alpha_prev, double eta, double w_, void* g_x_, void* g_eps_c_,
                          void* g_eps_u_, void* g_ref_c_, void* g_ref_u_, void* g_noise_, int threads) {
  using C = compute_t<T>;
  const auto g = static_cast<const T*>(g_), eps_c = static_cast<const T*>(eps_c_);
  const auto eps_u = static_cast<const T*>(eps_u_), ref_c = static_cast<const T*>(ref_c_);
  const auto ref_u = static_cast<const T*>(ref_u_);
  const auto g_x = static_cast<T*>(g_x_), g_eps_c = static_cast<T*>(g_eps_c_), g_eps_u = static_cast<T*>(g_eps_u_);
  const auto g_ref_c = static_cast<T*>(g_ref_c_), g_ref_u = static_cast<T*>(g_ref_u_);
  const auto g_noise = static_cast<T*>(g_noise_);
  const auto grad_kl = static_cast<const C*>(grad_kl_);
  const auto coef = step_coefs(batch, static_cast<const C*>(alpha_t), static_cast<const C*>(alpha_prev), eta);
  const bool kl_term = grad_kl != nullptr && ref_c != nullptr;
  std::vector<C> h(batch, C(0));  // d kl_b / d eps = h_b (eps - eps_ref), times grad_kl[b]
  for (int64_t b = 0; kl_term && b < batch; ++b) {
    const double ratio = coef[b].c_eps / coef[b].sigma;
    h[b] = C(double(grad_kl[b]) * 2 * ratio * ratio / double(d));
  }
  const C w = C(w_);
  with_flags([&](auto grad, auto kl, auto uncond, auto need_eps, auto need_ref) {
    constexpr bool kEps = decltype(need_eps)::value, kRef = decltype(need_ref)::value;
    for_chunks(batch, d, threads, [&](int64_t, int64_t b, int64_t lo, int64_t hi) {
      if constexpr (kEps || kRef)
        step_backward_chunk<T, decltype(grad)::value, decltype(kl)::value, decltype(uncond)::value, kEps, kRef>(
            lo, hi, g, eps_c, eps_u, ref_c, ref_u, g_eps_c, g_eps_u, g_ref_c, g_ref_u, C(coef[b].c_eps), h[b], w);
      // The chunk of g is cache-resident by now: these passes cost no extra memory traffic.
      if (g_x) scale_chunk(lo, hi, g, g_x, C(coef[b].c_x));
      if (g_noise) scale_chunk(lo, hi, g, g_noise, C(coef[b].sigma));
    });
  }, g != nullptr, kl_term, eps_u != nullptr, g_eps_c != nullptr, g_ref_c != nullptr);
}

// x0 = k_x x + k_eps eps with k_x = c_skip + c_out / sqrt(a), k_eps = -c_out sqrt(1 - a) / sqrt(a).
template <typename C>
void x0_coefs(int64_t batch, const C* alpha_t, const C* c_skip, const C* c_out, std::vector<C>& k_x,
              std::vector<C>& k_eps) {
  k_x.resize(batch);
  k_eps.resize(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const double a = alpha_t[b], skip = c_skip ? double(c_skip[b]) : 0.0, out = c_out ? double(c_out[b]) : 1.0;
    k_x[b] = C(skip + out / std::sqrt(a));
    k_eps[b] = C(-out * std::sqrt(1 - a) / std::sqrt(a));
  }
}

template <typename T>
void x0_estimate_forward(int64_t batch, int64_t d, const void* x, const void* eps, const void* alpha_t,
                         const void* c_skip, const void* c_out, void* x0, int threads) {
  using C = compute_t<T>;
  std::vector<C> k_x, k_eps;
  x0_coefs(batch, static_cast<const C*>(alpha_t), static_cast<const C*>(c_skip), static_cast<const C*>(c_out),
           k_x, k_eps);
  for_chunks(batch, d, threads, [&](int64_t, int64_t b, int64_t lo, int64_t hi) {
    axpby_chunk(lo, hi, static_cast<const T*>(x), static_cast<const T*>(eps), static_cast<T*>(x0), k_x[b],
                k_eps[b]);
  });
}

template <typename T>
void x0_estimate_backward(int64_t batch, int64_t d, const void* grad, const void* alpha_t, const void* c_skip,
                          const void* c_out, void* g_x, void* g_eps, int threads) {
  using C = compute_t<T>;
  std::vector<C> k_x, k_eps;
  x0_coefs(batch, static_cast<const C*>(alpha_t), static_cast<const C*>(c_skip), static_cast<const C*>(c_out),
           k_x, k_eps);
  const auto g = static_cast<const T*>(grad);
  for_chunks(batch, d, threads, [&](int64_t, int64_t b, int64_t lo, int64_t hi) {
    if (g_x) scale_chunk(lo, hi, g, static_cast<T*>(g_x), k_x[b]);
    if (g_eps) scale_chunk(lo, hi, g, static_cast<T*>(g_eps), k_eps[b]);
  });
}

// The loss works on (B,) vectors: one serial pass in double, summed in index order.
template <typename C>
void loss_forward(int64_t batch, const C* reward, const C* kl, const C* k, double gamma, double alpha,
                  const C* weight, C* loss) {
  double sum = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const double term = -std::pow(gamma, double(k[b])) * reward[b] + alpha * kl[b];
    sum += weight ? weight[b] * term : term;
  }
  *loss = C(sum / double(batch));
}

template <typename C>
void loss_backward(int64_t batch, const C* grad, const C* reward, const C* kl, const C* k, double gamma,
                   double alpha, const C* weight, C* g_reward, C* g_kl, C* g_weight) {
  const double scale = double(*grad) / double(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const double wg = weight ? weight[b] * scale : scale, discount = std::pow(gamma, double(k[b]));
    if (g_reward) g_reward[b] = C(-wg * discount);
    if (g_kl) g_kl[b] = C(wg * alpha);
    if (g_weight) g_weight[b] = C(scale * (-discount * reward[b] + alpha * kl[b]));
  }
}

}  // namespace

extern "C" {

// Bumped whenever an exported signature changes; sqdf_fast/ops/cpp.py refuses a library built from other sources.
int sqdf_abi_version() { return 1; }

// "key=value" lines: compiler, flags, openmp (the supported OpenMP version date, or "no").
const char* sqdf_build_info() {
  return "compiler=" SQDF_COMPILER "\nflags=" SQDF_BUILD_FLAGS "\nopenmp=" SQDF_OPENMP;
}

int sqdf_guided_step_forward(int dtype, int64_t batch, int64_t d, const void* x, const void* eps_cond,
                             const void* eps_uncond, const void* eps_ref_cond, const void* eps_ref_uncond,
                             const void* noise, const void* alpha_t, const void* alpha_prev, double eta, double w,
                             void* x_prev, void* kl, int num_threads) {
  const bool ok = with_dtype(dtype, [&](auto tag) {
    guided_step_forward<decltype(tag)>(batch, d, x, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, noise,
                                       alpha_t, alpha_prev, eta, w, x_prev, kl, num_threads);
  });
  return ok ? 0 : -1;
}

int sqdf_guided_step_backward(int dtype, int64_t batch, int64_t d, const void* grad_x_prev, const void* grad_kl,
                              const void* eps_cond, const void* eps_uncond, const void* eps_ref_cond,
                              const void* eps_ref_uncond, const void* alpha_t, const void* alpha_prev, double eta,
                              double w, void* grad_x, void* grad_eps_cond, void* grad_eps_uncond,
                              void* grad_eps_ref_cond, void* grad_eps_ref_uncond, void* grad_noise,
                              int num_threads) {
  const bool ok = with_dtype(dtype, [&](auto tag) {
    guided_step_backward<decltype(tag)>(batch, d, grad_x_prev, grad_kl, eps_cond, eps_uncond, eps_ref_cond,
                                        eps_ref_uncond, alpha_t, alpha_prev, eta, w, grad_x, grad_eps_cond,
                                        grad_eps_uncond, grad_eps_ref_cond, grad_eps_ref_uncond, grad_noise,
                                        num_threads);
  });
  return ok ? 0 : -1;
}

int sqdf_x0_estimate_forward(int dtype, int64_t batch, int64_t d, const void* x, const void* eps,
                             const void* alpha_t, const void* c_skip, const void* c_out, void* x0,
                             int num_threads) {
  const bool ok = with_dtype(dtype, [&](auto tag) {
    x0_estimate_forward<decltype(tag)>(batch, d, x, eps, alpha_t, c_skip, c_out, x0, num_threads);
  });
  return ok ? 0 : -1;
}

int sqdf_x0_estimate_backward(int dtype, int64_t batch, int64_t d, const void* grad, const void* alpha_t,
                              const void* c_skip, const void* c_out, void* grad_x, void* grad_eps,
                              int num_threads) {
  const bool ok = with_dtype(dtype, [&](auto tag) {
    x0_estimate_backward<decltype(tag)>(batch, d, grad, alpha_t, c_skip, c_out, grad_x, grad_eps, num_threads);
  });
  return ok ? 0 : -1;
}

// dtype: the compute dtype of the (B,) vectors, kFloat32 or kFloat64.
int sqdf_loss_forward(int dtype, int64_t batch, const void* reward, const void* kl, const void* k, double gamma,
                      double alpha, const void* weight, void* loss) {
  if (dtype == kFloat64)
    loss_forward(batch, static_cast<const double*>(reward), static_cast<const double*>(kl),
                 static_cast<const double*>(k), gamma, alpha, static_cast<const double*>(weight),
                 static_cast<double*>(loss));
  else if (dtype == kFloat32)
    loss_forward(batch, static_cast<const float*>(reward), static_cast<const float*>(kl),
                 static_cast<const float*>(k), gamma, alpha, static_cast<const float*>(weight),
                 static_cast<float*>(loss));
  else
    return -1;
  return 0;
}

int sqdf_loss_backward(int dtype, int64_t batch, const void* grad, const void* reward, const void* kl,
                       const void* k, double gamma, double alpha, const void* weight, void* grad_reward,
                       void* grad_kl, void* grad_weight) {
  if (dtype == kFloat64)
    loss_backward(batch, static_cast<const double*>(grad), static_cast<const double*>(reward),
                  static_cast<const double*>(kl), static_cast<const double*>(k), gamma, alpha,
                  static_cast<const double*>(weight), static_cast<double*>(grad_reward),
                  static_cast<double*>(grad_kl), static_cast<double*>(grad_weight));
  else if (dtype == kFloat32)
    loss_backward(batch, static_cast<const float*>(grad), static_cast<const float*>(reward),
                  static_cast<const float*>(kl), static_cast<const float*>(k), gamma, alpha,
                  static_cast<const float*>(weight), static_cast<float*>(grad_reward),
                  static_cast<float*>(grad_kl), static_cast<float*>(grad_weight));
  else
    return -1;
  return 0;
}

}  // extern "C"
