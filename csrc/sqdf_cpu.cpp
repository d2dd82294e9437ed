// Fused CPU kernels of the SQDF ops, and the CPython extension module sqdf_fast._sqdf_cpu that launches them
// (sqdf_fast/ops/cpp.py wraps it and documents the maths).
//
// Plain C++17 without torch headers: every kernel takes raw pointers of contiguous tensors, the batch size B and
// the number D of elements per sample. Element dtypes: float32, float64, float16, bfloat16; the arithmetic runs in
// double for float64 and in float otherwise. Per-sample inputs (schedule values, k, reward, ...) and the KL/loss
// outputs have the compute dtype ("ct": double for float64, float otherwise). Optional inputs and unwanted
// outputs are null pointers. The module's launchers (at the end of this file) reach the tensors through torch's
// Python API: they check them, allocate the outputs with torch.empty/empty_like and run the kernel without the GIL.
//
// Work is split into fixed chunks of one sample (never depending on the thread count), so every reduction sums
// the same partial values in the same order whatever the number of threads: results are bitwise reproducible.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

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

// Per-sample DDIM coefficients in double whatever the element dtype: x_prev = c_x x + c_eps eps + sigma noise and
// ratio = c_eps / sigma (the KL is ratio^2 mean (eps - eps_ref)^2). The forms avoid cancellation; the maths, the
// domain 0 < a <= a' <= 1 and the edges are those of sqdf_fast/ops/reference.py's ddim_coefficients, computed in
// the same order of operations (kernels/guided_step.py does too): the identity at a = a', NaN outside the domain,
// ratio NaN where sigma = 0 at a < a'.
struct StepCoef {
  double c_x, c_eps, sigma, ratio;
};

StepCoef step_coef(double a, double ap, double eta) {
  constexpr double nan = std::numeric_limits<double>::quiet_NaN();
  if (a > 0 && a == ap && ap <= 1) return {1, 0, 0, 0};
  if (!(a > 0 && a < ap && ap <= 1)) return {nan, nan, nan, nan};
  const double one_a = 1 - a, one_ap = 1 - ap, delta = ap - a, eta2 = eta * eta;
  const double r = delta / (one_a * ap);  // in (0, 1]: sigma^2 = eta^2 (1 - a') r
  const double sigma_sq = eta2 * one_ap * r;
  const double v = one_ap * ((1 - eta2) + eta2 * (a * one_ap / (one_a * ap)));  // 1 - a' - sigma^2
  if (!(v >= 0)) return {nan, nan, nan, nan};  // only at eta > 1
  const double c_x = std::sqrt(ap) / std::sqrt(a);
  const double c_eps = -(delta / a + sigma_sq) / (std::sqrt(v) + c_x * std::sqrt(one_a));
  const double sigma = eta * std::sqrt(one_ap * r);
  return {c_x, c_eps, sigma, sigma > 0 ? c_eps / sigma : nan};
}

template <typename C>
std::vector<StepCoef> step_coefs(int64_t batch, const C* alpha_t, const C* alpha_prev, double eta) {
  std::vector<StepCoef> out(batch);
  for (int64_t b = 0; b < batch; ++b) out[b] = step_coef(alpha_t[b], alpha_prev[b], eta);
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
  const auto kl = static_cast<C*>(kl_);  // null without a reference
  if (d == 0) {  // empty tensors have null data pointers: only the KL to write, 0 (NaN outside the domain)
    for (int64_t b = 0; kl != nullptr && b < batch; ++b) kl[b] = C(coef[b].ratio * coef[b].ratio * 0.0);
    return;
  }
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
  for (int64_t b = 0; b < batch; ++b) {
    double sum = 0;
    for (int64_t c = 0; c < chunks; ++c) sum += partial[b * chunks + c];
    const double ratio = coef[b].ratio;
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
    const double ratio = coef[b].ratio;
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
    // NaN outside the domain 0 < a <= 1 (at a = 0 the quotients below would be infinite, not NaN)
    const double a = alpha_t[b] > 0 && alpha_t[b] <= 1 ? double(alpha_t[b]) : std::numeric_limits<double>::quiet_NaN();
    const double skip = c_skip ? double(c_skip[b]) : 0.0, out = c_out ? double(c_out[b]) : 1.0;
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

// gamma^k for k >= 0 steps left; NaN for a negative k (outside the domain: the ops layer rejects it where it can).
inline double sqdf_discount(double gamma, double k) {
  return k >= 0 ? std::pow(gamma, k) : std::numeric_limits<double>::quiet_NaN();
}

// The loss works on (B,) vectors: one serial pass in double, summed in index order.
template <typename C>
void loss_forward(int64_t batch, const C* reward, const C* kl, const C* k, double gamma, double alpha,
                  const C* weight, C* loss) {
  double sum = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const double term = -sqdf_discount(gamma, k[b]) * reward[b] + alpha * kl[b];
    sum += weight ? weight[b] * term : term;
  }
  *loss = C(sum / double(batch));
}

template <typename C>
void loss_backward(int64_t batch, const C* grad, const C* reward, const C* kl, const C* k, double gamma,
                   double alpha, const C* weight, C* g_reward, C* g_kl, C* g_weight) {
  const double scale = double(*grad) / double(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const double wg = weight ? weight[b] * scale : scale, discount = sqdf_discount(gamma, k[b]);
    if (g_reward) g_reward[b] = C(-wg * discount);
    if (g_kl) g_kl[b] = C(wg * alpha);
    if (g_weight) g_weight[b] = C(scale * (-discount * reward[b] + alpha * kl[b]));
  }
}

// --- the Python module -----------------------------------------------------------------------------------------
// Six launchers over the kernels above, METH_FASTCALL functions taking the tensors themselves: each checks what
// keeps the kernels in bounds (dtype, element count, contiguity, CPU), allocates its outputs with torch and runs the
// kernel without the GIL. sqdf_fast/ops/cpp.py documents their contract.

// Torch objects the launchers use, looked up once when the module is imported.
struct Torch {
  PyObject* dtypes[4];  // torch.float32, torch.float64, torch.float16, torch.bfloat16: indexed by DType
  PyObject *empty, *empty_like, *get_num_threads;
  PyObject *dtype_kwnames;  // ("dtype",), for torch.empty(size, dtype=...)
  PyObject *s_dtype, *s_is_cpu, *s_numel, *s_is_contiguous, *s_data_ptr, *s_shape, *s_device;
};
Torch torch_;

// An owned reference, released when it goes out of scope.
class Ref {
 public:
  Ref() = default;
  explicit Ref(PyObject* p) : p_(p) {}
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
  ~Ref() { Py_XDECREF(p_); }
  void reset(PyObject* p) { Py_XDECREF(p_); p_ = p; }
  PyObject* get() const { return p_; }
  PyObject* release() { PyObject* p = p_; p_ = nullptr; return p; }
  explicit operator bool() const { return p_ != nullptr; }

 private:
  PyObject* p_ = nullptr;
};

PyObject* call_method(PyObject* self, PyObject* name) { return PyObject_VectorcallMethod(name, &self, 1, nullptr); }

// 1 when t.name() (a method) or t.name (an attribute) is True, 0 when not, -1 with the error set.
int method_is_true(PyObject* t, PyObject* name) {
  Ref v(call_method(t, name));
  return v ? v.get() == Py_True : -1;
}
int attr_is_true(PyObject* t, PyObject* name) {
  Ref v(PyObject_GetAttr(t, name));
  return v ? v.get() == Py_True : -1;
}

// t.dtype; a TypeError naming the argument when t is no tensor.
PyObject* dtype_of(PyObject* t, const char* what) {
  PyObject* dtype = PyObject_GetAttr(t, torch_.s_dtype);
  if (dtype == nullptr && PyErr_ExceptionMatches(PyExc_AttributeError)) {
    PyErr_Clear();
    PyErr_Format(PyExc_TypeError, "C++ launcher: %s must be a torch.Tensor, got %s", what, Py_TYPE(t)->tp_name);
  }
  return dtype;
}

bool data_ptr(PyObject* t, void** out) {
  Ref v(call_method(t, torch_.s_data_ptr));
  if (!v) return false;
  *out = PyLong_AsVoidPtr(v.get());
  return !PyErr_Occurred();
}

// Raises the ValueError for tensor argument t that failed input_ptr's checks (unless an error is already set).
void bad_tensor(PyObject* t, const char* what, PyObject* dtype, int64_t numel) {
  if (PyErr_Occurred()) return;
  Ref size(PyObject_GetAttr(t, torch_.s_shape));
  Ref shape(size ? PySequence_Tuple(size.get()) : nullptr);
  Ref got(shape ? PyObject_GetAttr(t, torch_.s_dtype) : nullptr);
  Ref device(got ? PyObject_GetAttr(t, torch_.s_device) : nullptr);
  Ref contiguous(device ? call_method(t, torch_.s_is_contiguous) : nullptr);
  if (!contiguous) return;
  PyErr_Format(PyExc_ValueError,
               "C++ launcher: %s must be a contiguous CPU tensor of %lld elements and dtype %S, got shape %R, "
               "dtype %S, device %S, contiguous=%R", what, static_cast<long long>(numel), dtype, shape.get(),
               got.get(), device.get(), contiguous.get());
}

// The data of tensor argument t (`what` in errors) after the checks that keep the kernels in bounds: `numel`
// contiguous elements of `dtype` on the CPU. None gives nullptr where `optional`, else raises.
bool input_ptr(PyObject* t, const char* what, PyObject* dtype, int64_t numel, bool optional, const void** out) {
  *out = nullptr;
  if (t == Py_None) {
    if (optional) return true;
    PyErr_Format(PyExc_ValueError, "C++ launcher: %s must be a tensor, got None", what);
    return false;
  }
  Ref got(dtype_of(t, what));
  if (!got) return false;
  bool ok = got.get() == dtype && attr_is_true(t, torch_.s_is_cpu) == 1;
  if (ok) {
    Ref count(call_method(t, torch_.s_numel));
    ok = count && PyLong_AsLongLong(count.get()) == numel && method_is_true(t, torch_.s_is_contiguous) == 1;
  }
  void* ptr = nullptr;
  if (!ok || !data_ptr(t, &ptr)) {
    bad_tensor(t, what, dtype, numel);
    return false;
  }
  *out = ptr;
  return true;
}

// x's dtype code, batch size B and elements per sample D: x must be float32/float64/float16/bfloat16 with a
// non-empty batch dimension (`loss`: float32/float64 of shape (B,)).
bool sizes(PyObject* x, const char* what, bool loss, int* code, int64_t* batch, int64_t* d) {
  Ref dtype(dtype_of(x, what));
  Ref size(dtype ? PyObject_GetAttr(x, torch_.s_shape) : nullptr);
  Ref shape(size ? PySequence_Tuple(size.get()) : nullptr);
  if (!shape) return false;
  *code = -1;
  for (int c = 0; c < (loss ? 2 : 4); ++c)
    if (dtype.get() == torch_.dtypes[c]) *code = c;
  const Py_ssize_t dim = PyTuple_GET_SIZE(shape.get());
  int64_t numel = 1;
  for (Py_ssize_t i = 0; i < dim; ++i) numel *= PyLong_AsLongLong(PyTuple_GET_ITEM(shape.get(), i));
  if (PyErr_Occurred()) return false;
  *batch = dim > 0 ? PyLong_AsLongLong(PyTuple_GET_ITEM(shape.get(), 0)) : 0;
  if (*code < 0 || *batch <= 0 || (loss && dim != 1)) {
    PyErr_Format(PyExc_ValueError, loss ? "C++ launcher: %s must be a non-empty float32/float64 (B,) tensor, got %S "
                                          "of shape %R"
                                        : "C++ launcher: %s must be float32/float64/float16/bfloat16 with a "
                                          "non-empty batch dimension, got %S of shape %R",
                 what, dtype.get(), shape.get());
    return false;
  }
  *d = numel / *batch;
  return true;
}

// A new uninitialised output tensor; out receives its data.
PyObject* new_like(PyObject* like, void** out) {
  Ref t(PyObject_CallOneArg(torch_.empty_like, like));
  return t && data_ptr(t.get(), out) ? t.release() : nullptr;
}
PyObject* new_tensor(PyObject* size, PyObject* dtype, void** out) {
  PyObject* args[] = {size, dtype};
  Ref t(PyObject_Vectorcall(torch_.empty, args, 1, torch_.dtype_kwnames));
  return t && data_ptr(t.get(), out) ? t.release() : nullptr;
}
// new_like(like) when wanted, else None and a null pointer.
PyObject* new_like_if(bool wanted, PyObject* like, void** out) {
  *out = nullptr;
  return wanted ? new_like(like, out) : Py_NewRef(Py_None);
}

bool as_double(PyObject* o, double* out) {
  *out = PyFloat_AsDouble(o);
  return !(*out == -1.0 && PyErr_Occurred());
}
bool as_bool(PyObject* o, bool* out) {
  const int v = PyObject_IsTrue(o);
  *out = v == 1;
  return v >= 0;
}
bool num_threads(int* out) {
  Ref v(PyObject_CallNoArgs(torch_.get_num_threads));
  *out = v ? int(PyLong_AsLong(v.get())) : 1;
  return v && !PyErr_Occurred();
}
bool nargs_is(const char* name, Py_ssize_t nargs, Py_ssize_t expected) {
  if (nargs == expected) return true;
  PyErr_Format(PyExc_TypeError, "%s() takes %zd positional arguments (%zd given)", name, expected, nargs);
  return false;
}

// Runs a kernel without the GIL; false with a Python error when it threw (out of memory) or rejected the dtype.
template <typename F>
bool run_kernel(F&& kernel) {
  bool ok = false, no_memory = false;
  std::string error;
  Py_BEGIN_ALLOW_THREADS
  try {
    ok = kernel();
  } catch (const std::bad_alloc&) {
    no_memory = true;
  } catch (const std::exception& err) {
    error = err.what();
  }
  Py_END_ALLOW_THREADS
  if (ok) return true;
  if (no_memory)
    PyErr_NoMemory();
  else
    PyErr_SetString(PyExc_RuntimeError, error.empty() ? "C++ launcher: unsupported dtype" : error.c_str());
  return false;
}

// One guidance flag serves policy and reference: a reference must be guided exactly when the policy is.
bool check_guidance(PyObject* eps_uncond, PyObject* eps_ref_cond, PyObject* eps_ref_uncond) {
  if ((eps_ref_cond == Py_None && eps_ref_uncond != Py_None) ||
      (eps_ref_cond != Py_None && (eps_uncond == Py_None) != (eps_ref_uncond == Py_None))) {
    PyErr_SetString(PyExc_ValueError,
                    "C++ launcher: eps_ref_uncond must be given exactly when eps_uncond and eps_ref_cond are");
    return false;
  }
  return true;
}

PyObject* compute_dtype(int code) { return torch_.dtypes[code == kFloat64 ? kFloat64 : kFloat32]; }

// guided_step_forward(x, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, noise, alpha_t, alpha_prev, eta, w)
//   -> (x_prev, kl)
PyObject* py_guided_step_forward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (!nargs_is("guided_step_forward", nargs, 10)) return nullptr;
  PyObject* x = args[0];
  int code, threads;
  int64_t batch, d;
  double eta, w;
  if (!sizes(x, "x", false, &code, &batch, &d) || !check_guidance(args[2], args[3], args[4])) return nullptr;
  PyObject *dtype = torch_.dtypes[code], *ct = compute_dtype(code);
  const int64_t n = batch * d;
  const void* in[8];
  static const char* const names[] = {"x", "eps_cond", "eps_uncond", "eps_ref_cond", "eps_ref_uncond", "noise"};
  for (int i = 0; i < 6; ++i)
    if (!input_ptr(args[i], names[i], dtype, n, i >= 2, &in[i])) return nullptr;
  if (!input_ptr(args[6], "alpha_t", ct, batch, false, &in[6]) ||
      !input_ptr(args[7], "alpha_prev", ct, batch, false, &in[7]) || !as_double(args[8], &eta) ||
      !as_double(args[9], &w) || !num_threads(&threads))
    return nullptr;
  const bool ref = args[3] != Py_None;
  void *x_prev_ptr, *kl_ptr;
  Ref x_prev(new_like(x, &x_prev_ptr));
  Ref kl_len(x_prev ? PyLong_FromLongLong(ref ? batch : 0) : nullptr);
  Ref kl(kl_len ? new_tensor(kl_len.get(), ct, &kl_ptr) : nullptr);
  if (!kl) return nullptr;
  if (!ref) kl_ptr = nullptr;
  const bool ok = run_kernel([&] {
    return with_dtype(code, [&](auto tag) {
      guided_step_forward<decltype(tag)>(batch, d, in[0], in[1], in[2], in[3], in[4], in[5], in[6], in[7], eta, w,
                                         x_prev_ptr, kl_ptr, threads);
    });
  });
  return ok ? PyTuple_Pack(2, x_prev.get(), kl.get()) : nullptr;
}

// guided_step_backward(grad_x_prev, grad_kl, eps_cond, eps_uncond, eps_ref_cond, eps_ref_uncond, alpha_t,
//   alpha_prev, eta, w, need_x, need_eps, need_ref, need_noise)
//   -> (grad_x, grad_eps_cond, grad_eps_uncond, grad_eps_ref_cond, grad_eps_ref_uncond, grad_noise)
PyObject* py_guided_step_backward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (!nargs_is("guided_step_backward", nargs, 14)) return nullptr;
  PyObject* eps_cond = args[2];
  int code, threads;
  int64_t batch, d;
  double eta, w;
  bool need[4];
  if (!sizes(eps_cond, "eps_cond", false, &code, &batch, &d) || !check_guidance(args[3], args[4], args[5]))
    return nullptr;
  PyObject *dtype = torch_.dtypes[code], *ct = compute_dtype(code);
  const int64_t n = batch * d;
  const void* in[8];
  static const char* const names[] = {"grad_x_prev", "grad_kl", "eps_cond", "eps_uncond", "eps_ref_cond",
                                      "eps_ref_uncond", "alpha_t", "alpha_prev"};
  for (int i = 0; i < 8; ++i) {
    const bool per_sample = i == 1 || i >= 6, optional = i < 2 || (i >= 3 && i <= 5);
    if (!input_ptr(args[i], names[i], per_sample ? ct : dtype, per_sample ? batch : n, optional, &in[i]))
      return nullptr;
  }
  if (!as_double(args[8], &eta) || !as_double(args[9], &w) || !num_threads(&threads)) return nullptr;
  for (int i = 0; i < 4; ++i)
    if (!as_bool(args[10 + i], &need[i])) return nullptr;
  const bool wanted[6] = {need[0], need[1], need[1] && args[3] != Py_None, need[2] && args[4] != Py_None,
                          need[2] && args[5] != Py_None, need[3]};
  Ref grads[6];
  void* out[6];
  for (int i = 0; i < 6; ++i) {
    grads[i].reset(new_like_if(wanted[i], eps_cond, &out[i]));
    if (!grads[i]) return nullptr;
  }
  const bool ok = run_kernel([&] {
    return with_dtype(code, [&](auto tag) {
      guided_step_backward<decltype(tag)>(batch, d, in[0], in[1], in[2], in[3], in[4], in[5], in[6], in[7], eta, w,
                                          out[0], out[1], out[2], out[3], out[4], out[5], threads);
    });
  });
  return ok ? PyTuple_Pack(6, grads[0].get(), grads[1].get(), grads[2].get(), grads[3].get(), grads[4].get(),
                           grads[5].get())
            : nullptr;
}

// x0_estimate_forward(x, eps, alpha_t, c_skip, c_out) -> x0
PyObject* py_x0_estimate_forward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (!nargs_is("x0_estimate_forward", nargs, 5)) return nullptr;
  PyObject* x = args[0];
  int code, threads;
  int64_t batch, d;
  if (!sizes(x, "x", false, &code, &batch, &d)) return nullptr;
  PyObject *dtype = torch_.dtypes[code], *ct = compute_dtype(code);
  const void *px, *peps, *alpha_t, *c_skip, *c_out;
  if (!input_ptr(x, "x", dtype, batch * d, false, &px) || !input_ptr(args[1], "eps", dtype, batch * d, false, &peps) ||
      !input_ptr(args[2], "alpha_t", ct, batch, false, &alpha_t) ||
      !input_ptr(args[3], "c_skip", ct, batch, true, &c_skip) ||
      !input_ptr(args[4], "c_out", ct, batch, true, &c_out) || !num_threads(&threads))
    return nullptr;
  void* out;
  Ref x0(new_like(x, &out));
  if (!x0) return nullptr;
  const bool ok = run_kernel([&] {
    return with_dtype(code, [&](auto tag) {
      x0_estimate_forward<decltype(tag)>(batch, d, px, peps, alpha_t, c_skip, c_out, out, threads);
    });
  });
  return ok ? x0.release() : nullptr;
}

// x0_estimate_backward(grad, alpha_t, c_skip, c_out, need_x, need_eps) -> (grad_x, grad_eps)
PyObject* py_x0_estimate_backward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (!nargs_is("x0_estimate_backward", nargs, 6)) return nullptr;
  PyObject* grad = args[0];
  int code, threads;
  int64_t batch, d;
  bool need_x, need_eps;
  if (!sizes(grad, "grad", false, &code, &batch, &d)) return nullptr;
  PyObject* ct = compute_dtype(code);
  const void *g, *alpha_t, *c_skip, *c_out;
  if (!input_ptr(grad, "grad", torch_.dtypes[code], batch * d, false, &g) ||
      !input_ptr(args[1], "alpha_t", ct, batch, false, &alpha_t) ||
      !input_ptr(args[2], "c_skip", ct, batch, true, &c_skip) ||
      !input_ptr(args[3], "c_out", ct, batch, true, &c_out) || !as_bool(args[4], &need_x) ||
      !as_bool(args[5], &need_eps) || !num_threads(&threads))
    return nullptr;
  void *out_x, *out_eps;
  Ref grad_x(new_like_if(need_x, grad, &out_x));
  Ref grad_eps(grad_x ? new_like_if(need_eps, grad, &out_eps) : nullptr);
  if (!grad_eps) return nullptr;
  const bool ok = run_kernel([&] {
    return with_dtype(code, [&](auto tag) {
      x0_estimate_backward<decltype(tag)>(batch, d, g, alpha_t, c_skip, c_out, out_x, out_eps, threads);
    });
  });
  return ok ? PyTuple_Pack(2, grad_x.get(), grad_eps.get()) : nullptr;
}

// The loss's (B,) inputs reward, kl, k, then weight (optional), all of reward's dtype.
bool loss_inputs(PyObject* const* args, PyObject* dtype, int64_t batch, const void* in[4]) {
  return input_ptr(args[0], "reward", dtype, batch, false, &in[0]) &&
         input_ptr(args[1], "kl", dtype, batch, false, &in[1]) &&
         input_ptr(args[2], "k", dtype, batch, false, &in[2]) &&
         input_ptr(args[5], "weight", dtype, batch, true, &in[3]);
}

// The loss kernels for the compute dtype `code` (float32 or float64 only).
template <typename F>
bool with_loss_dtype(int code, F&& f) {
  if (code == kFloat64) f(double{});
  else if (code == kFloat32) f(float{});
  return code == kFloat64 || code == kFloat32;
}

// sqdf_loss_forward(reward, kl, k, gamma, alpha, weight) -> 0-dim loss
PyObject* py_sqdf_loss_forward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (!nargs_is("sqdf_loss_forward", nargs, 6)) return nullptr;
  int code;
  int64_t batch, d;
  double gamma, alpha;
  const void* in[4];
  if (!sizes(args[0], "reward", true, &code, &batch, &d)) return nullptr;
  PyObject* dtype = torch_.dtypes[code];
  if (!loss_inputs(args, dtype, batch, in) || !as_double(args[3], &gamma) || !as_double(args[4], &alpha))
    return nullptr;
  void* out;
  Ref size(PyTuple_New(0));
  Ref loss(size ? new_tensor(size.get(), dtype, &out) : nullptr);
  if (!loss) return nullptr;
  const bool ok = run_kernel([&] {
    return with_loss_dtype(code, [&](auto tag) {
      using C = decltype(tag);
      loss_forward(batch, static_cast<const C*>(in[0]), static_cast<const C*>(in[1]), static_cast<const C*>(in[2]),
                   gamma, alpha, static_cast<const C*>(in[3]), static_cast<C*>(out));
    });
  });
  return ok ? loss.release() : nullptr;
}

// sqdf_loss_backward(grad, reward, kl, k, gamma, alpha, weight, need_reward, need_kl, need_weight)
//   -> (grad_reward, grad_kl, grad_weight)
PyObject* py_sqdf_loss_backward(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (!nargs_is("sqdf_loss_backward", nargs, 10)) return nullptr;
  int code;
  int64_t batch, d;
  double gamma, alpha;
  bool need[3];
  const void *g, *in[4];
  if (!sizes(args[1], "reward", true, &code, &batch, &d)) return nullptr;
  PyObject* dtype = torch_.dtypes[code];
  if (!input_ptr(args[0], "grad", dtype, 1, false, &g) || !loss_inputs(args + 1, dtype, batch, in) ||
      !as_double(args[4], &gamma) || !as_double(args[5], &alpha))
    return nullptr;
  for (int i = 0; i < 3; ++i)
    if (!as_bool(args[7 + i], &need[i])) return nullptr;
  need[2] = need[2] && args[6] != Py_None;
  Ref grads[3];
  void* out[3];
  for (int i = 0; i < 3; ++i) {
    grads[i].reset(new_like_if(need[i], args[1], &out[i]));
    if (!grads[i]) return nullptr;
  }
  const bool ok = run_kernel([&] {
    return with_loss_dtype(code, [&](auto tag) {
      using C = decltype(tag);
      loss_backward(batch, static_cast<const C*>(g), static_cast<const C*>(in[0]), static_cast<const C*>(in[1]),
                    static_cast<const C*>(in[2]), gamma, alpha, static_cast<const C*>(in[3]),
                    static_cast<C*>(out[0]), static_cast<C*>(out[1]), static_cast<C*>(out[2]));
    });
  });
  return ok ? PyTuple_Pack(3, grads[0].get(), grads[1].get(), grads[2].get()) : nullptr;
}

// Bumped whenever a launcher's signature or results change (3: the domain edges of docs/ops.md §5);
// sqdf_fast/ops/cpp.py refuses a module built from other sources.
constexpr long kAbiVersion = 3;

PyObject* py_abi_version(PyObject*, PyObject*) { return PyLong_FromLong(kAbiVersion); }

// "key=value" lines: compiler, flags, openmp (the supported OpenMP version date, or "no").
PyObject* py_build_info(PyObject*, PyObject*) {
  return PyUnicode_FromString("compiler=" SQDF_COMPILER "\nflags=" SQDF_BUILD_FLAGS "\nopenmp=" SQDF_OPENMP);
}

#define SQDF_FASTCALL(name) {#name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_##name)), \
                              METH_FASTCALL, nullptr}
PyMethodDef methods[] = {
    SQDF_FASTCALL(guided_step_forward),
    SQDF_FASTCALL(guided_step_backward),
    SQDF_FASTCALL(x0_estimate_forward),
    SQDF_FASTCALL(x0_estimate_backward),
    SQDF_FASTCALL(sqdf_loss_forward),
    SQDF_FASTCALL(sqdf_loss_backward),
    {"abi_version", py_abi_version, METH_NOARGS, nullptr},
    {"build_info", py_build_info, METH_NOARGS, nullptr},
    {nullptr, nullptr, 0, nullptr},
};
#undef SQDF_FASTCALL

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_sqdf_cpu", "Fused CPU kernels of the SQDF ops.", -1, methods,
                          nullptr, nullptr, nullptr, nullptr};

// Fills torch_ from the torch module (new references, kept for the life of the process).
bool bind_torch() {
  Ref torch(PyImport_ImportModule("torch"));
  if (!torch) return false;
  static const char* const dtype_names[] = {"float32", "float64", "float16", "bfloat16"};
  for (int c = 0; c < 4; ++c)
    if (!(torch_.dtypes[c] = PyObject_GetAttrString(torch.get(), dtype_names[c]))) return false;
  struct { PyObject** slot; const char* name; } attrs[] = {
      {&torch_.empty, "empty"}, {&torch_.empty_like, "empty_like"}, {&torch_.get_num_threads, "get_num_threads"}};
  for (auto& a : attrs)
    if (!(*a.slot = PyObject_GetAttrString(torch.get(), a.name))) return false;
  struct { PyObject** slot; const char* name; } names[] = {
      {&torch_.s_dtype, "dtype"}, {&torch_.s_is_cpu, "is_cpu"}, {&torch_.s_numel, "numel"},
      {&torch_.s_is_contiguous, "is_contiguous"}, {&torch_.s_data_ptr, "data_ptr"}, {&torch_.s_shape, "shape"},
      {&torch_.s_device, "device"}};
  for (auto& s : names)
    if (!(*s.slot = PyUnicode_InternFromString(s.name))) return false;
  return (torch_.dtype_kwnames = Py_BuildValue("(s)", "dtype")) != nullptr;
}

}  // namespace

PyMODINIT_FUNC PyInit__sqdf_cpu() { return bind_torch() ? PyModule_Create(&module_def) : nullptr; }
