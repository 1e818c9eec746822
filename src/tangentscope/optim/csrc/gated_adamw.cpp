// tangentscope: the fused gated-AdamW step on CPU, one pass over each parameter's state.
//
// Registers torch.ops.tangentscope_optim.gated_adamw_step_ (built and loaded by optim/_native.py).
// Per tensor, in one pass element by element (each state tensor read and written once): the
// streaming noise EMA (or the exact noise variance from the statistics' sums), the gate (hard
// or soft, on the update), the Adam moments, the denominator's sqrt, the decoupled weight
// decay and the update. The arithmetic is the reference chain's (optim/transforms.py)
// operation for operation, each rounded the way torch's CPU kernel rounds it (FMA where
// torch's kernel contracts: sub with alpha, lerp, addcmul), so moments, noise state and gate
// are the reference's bit for bit and the weights differ only through the denominator's
// correctly rounded hardware sqrt (see below); compiled with -ffp-contract=off so that the
// compiler adds no other contraction. The scalar coefficients (bias corrections, the
// deviation inflation) are computed in double exactly as the Python reference computes them.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per work item (at::parallel_for)

enum Mode : int64_t { kOff = 0, kHard = 1, kSoft = 2 };
enum Source : int64_t { kNone = 0, kStreaming = 1, kExact = 2 };

// Per-tensor coefficients, already rounded to the tensor's dtype as torch rounds a Python
// scalar argument (``Scalar.to<scalar_t>()``).
template <typename T>
struct Coef {
  T decay, w1, w1m1, beta2, omb2, bc2s, eps, neg_step;  // Adam
  T neg_scale, noise_beta, dev_w;                        // streaming noise update
  T gate_val;     // hard: -1/(tau c); soft: -(tau c)
  T count, cm1;   // exact: b, b - 1
  bool small_w1, update_noise, open, tau0;
};

template <typename T>
inline T lerp_t(T self, T end, T coeff, T small) {
  // torch's lerp (ATen/native/Lerp.h, vectorized form): fmadd(coeff, end - self, base) with
  // coeff = w, base = self for |w| < 0.5, else coeff = w - 1, base = end. `small` is 1 or 0 as
  // a T, compared in the loop: GCC does not vectorize a select on a loop-invariant bool.
  const T base = small > T(0) ? self : end;
  return std::fma(coeff, end - self, base);
}

template <typename T>
inline T clamp_min0(T x) {  // torch.clamp_(min=0): NaN propagates
  return x < T(0) ? T(0) : x;
}

template <typename T>
inline T nan_to_num0(T x) {  // torch.nan_to_num_(nan=0.0), as selects (vectorizes)
  constexpr T inf = std::numeric_limits<T>::infinity();
  T y = (x == x) ? x : T(0);
  y = y == inf ? std::numeric_limits<T>::max() : y;
  return y == -inf ? std::numeric_limits<T>::lowest() : y;
}

// The denominator takes the hardware sqrt (correctly rounded), as torch's own fused AdamW does.
// torch's eager CPU sqrt is MKL's vector sqrt where torch links MKL (ATen/cpu/vml.h), which is
// not correctly rounded on every CPU (on this project's AMD EPYC about 20% of float32 results
// are one ulp off, and its generic path costs about 0.4 ns per element): so the weights agree
// with the eager reference to rounding (~1e-7 relative), the moments and noise bit for bit.

constexpr int64_t kChunk = 512;  // elements per block of the gate sum (a float partial sum)

// One range [b, e) of one tensor in a single pass, element by element: (1) the noise state,
// (2) the gate, (3) moments, denominator, decay and update. One loop (not three over a cached
// block) so each element's state is read and written once and nothing goes through a buffer.
// Returns the sum of the gate values over the range (per block of kChunk in the tensor's dtype,
// the blocks summed in double; a separate loop over the block's buffered gates, because GCC
// does not vectorize the pass itself with an omp-simd reduction in it).
template <typename T, int64_t MODE, int64_t SRC, bool OPEN, bool UPD>
double run_range(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m,
                 T* __restrict__ v, T* __restrict__ s, const T* __restrict__ s1,
                 const T* __restrict__ s2, const Coef<T>& c, int64_t b, int64_t e) {
  constexpr bool kGated = MODE != kOff && !OPEN;
  constexpr bool kNoise = SRC == kStreaming && UPD;
  alignas(64) T gbuf[kGated ? kChunk : 1];  // the block's gate values, summed after the pass
  double total = 0.0;
  const T decay = c.decay, coeff1 = c.small_w1 ? c.w1 : c.w1m1, beta2 = c.beta2;
  const T omb2 = c.omb2;
  const T bc2s = c.bc2s, eps = c.eps, neg_step = c.neg_step;
  const T neg_scale = c.neg_scale, nb = c.noise_beta, dev_w = c.dev_w, gv = c.gate_val;
  const T cnt = c.count, cm1 = c.cm1;
  const T small = c.small_w1 ? T(1) : T(0);
  const T t0 = c.tau0 ? T(1) : T(0);
  for (int64_t cb = b; cb < e; cb += kChunk) {
    const int64_t len = std::min(kChunk, e - cb);
    T* __restrict__ pc = p + cb;
    const T* __restrict__ gc = g + cb;
    T* __restrict__ mc = m + cb;
    T* __restrict__ vc = v + cb;
    T* __restrict__ sc = SRC == kStreaming ? s + cb : nullptr;
    const T* __restrict__ ac = SRC == kExact ? s1 + cb : nullptr;
    const T* __restrict__ qc = SRC == kExact ? s2 + cb : nullptr;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const T gi = gc[i];
      const T m0 = mc[i];
      T gate = T(1);
      T s_new = T(0);
      if constexpr (kNoise) {
        // streaming_noise_: d = sub(g, m, alpha=scale); s = s*beta + (w*d)*d
        const T d = std::fma(neg_scale, m0, gi);
        const T si = sc[i] * nb;
        s_new = std::fma(dev_w * d, d, si);
        sc[i] = s_new;
      }
      if constexpr (kGated) {
        T sig, nu;
        if constexpr (SRC == kStreaming) {
          sig = gi;
          nu = kNoise ? s_new : sc[i];
        } else {
          // noise_variance: ((b*S2 - S1*S1) / (b - 1)).clamp_(min=0)
          sig = ac[i];
          const T x = cnt * qc[i];
          const T y = sig * sig;
          nu = clamp_min0((x - y) / cm1);
        }
        if constexpr (MODE == kHard) {
          // addcmul(nu, sig, sig, value=-1/(tau c)) < 0; tau = 0: sig != 0 (branch-free)
          const T z = std::fma(gv * sig, sig, nu);
          const T by_z = z < T(0) ? T(1) : T(0);
          const T nonzero = (sig == T(0)) ? T(0) : T(1);
          gate = by_z + t0 * (nonzero - by_z);  // exact: 0/1 values, t0 = 1[tau = 0]
        } else {
          // div(nu, sig*sig).mul_(-(tau c)).add_(1).clamp_(min=0).nan_to_num_(nan=0)
          T r = nu / (sig * sig);
          r = r * gv;
          r = r + T(1);
          gate = nan_to_num0(clamp_min0(r));
        }
        gbuf[i] = gate;
      }
      const T mi = lerp_t(m0, gi, coeff1, small);  // adam_moments_
      const T vi = std::fma(omb2 * gi, gi, vc[i] * beta2);
      mc[i] = mi;
      vc[i] = vi;
      const T den = std::sqrt(vi) / bc2s + eps;        // adam_denominator
      const T num = kGated ? mi * gate : mi;
      const T pi = pc[i] * decay;                       // decay_weights_
      pc[i] = pi + (neg_step * num) / den;              // adam_apply_ (addcdiv)
    }
    if constexpr (kGated) {
      T part = T(0);
#pragma omp simd reduction(+ : part)
      for (int64_t i = 0; i < len; ++i) part += gbuf[i];
      total += static_cast<double>(part);
    } else {
      total += static_cast<double>(len);
    }
  }
  return total;
}

template <typename T, int64_t MODE, int64_t SRC>
double run_range_any(T* p, const T* g, T* m, T* v, T* s, const T* s1, const T* s2,
                     const Coef<T>& c, int64_t b, int64_t e) {
  if (c.open) {
    return c.update_noise ? run_range<T, MODE, SRC, true, true>(p, g, m, v, s, s1, s2, c, b, e)
                          : run_range<T, MODE, SRC, true, false>(p, g, m, v, s, s1, s2, c, b, e);
  }
  return c.update_noise ? run_range<T, MODE, SRC, false, true>(p, g, m, v, s, s1, s2, c, b, e)
                        : run_range<T, MODE, SRC, false, false>(p, g, m, v, s, s1, s2, c, b, e);
}

template <typename T, int64_t MODE, int64_t SRC>
double run_tensor(T* p, const T* g, T* m, T* v, T* s, const T* s1, const T* s2,
                  const Coef<T>& c, int64_t n) {
  if (n <= kGrain) return run_range_any<T, MODE, SRC>(p, g, m, v, s, s1, s2, c, 0, n);
  const int64_t chunks = (n + kGrain - 1) / kGrain;
  std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t k = cb; k < ce; ++k) {
      const int64_t b = k * kGrain, e = std::min(n, b + kGrain);
      partial[static_cast<size_t>(k)] = run_range_any<T, MODE, SRC>(p, g, m, v, s, s1, s2, c, b, e);
    }
  });
  double total = 0.0;  // fixed order: the same sum whatever the thread count
  for (double x : partial) total += x;
  return total;
}

double deviation_inflation(double beta, int64_t n) {  // transforms.deviation_inflation
  if (beta == 0.0) return 2.0;
  const double bn = std::pow(beta, static_cast<double>(n));
  return 1.0 + (1 - beta) * (1 + bn) / ((1 + beta) * (1 - bn));
}

template <typename T>
double step_all(const at::TensorList params, const at::TensorList grads,
                const at::TensorList exp_avgs, const at::TensorList exp_avg_sqs,
                const at::TensorList noise, const at::TensorList sums, const at::TensorList sq_sums,
                const std::vector<int64_t>& ts, std::vector<int64_t>& noise_n,
                const std::vector<double>& hp, int64_t mode, int64_t source, int64_t count) {
  const double lr = hp[0], beta1 = hp[1], beta2 = hp[2], eps = hp[3], wd = hp[4];
  const double nb = hp[5], tau = hp[6];
  const int64_t warmup = static_cast<int64_t>(hp[7]);
  double total = 0.0;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t t = ts[i];
    Coef<T> c{};
    const double w1 = 1 - beta1;
    c.decay = static_cast<T>(1 - lr * wd);
    c.w1 = static_cast<T>(w1);
    c.w1m1 = static_cast<T>(w1) - T(1);
    c.small_w1 = std::abs(static_cast<T>(w1)) < T(0.5);
    c.beta2 = static_cast<T>(beta2);
    c.omb2 = static_cast<T>(1 - beta2);
    c.bc2s = static_cast<T>(std::pow(1 - std::pow(beta2, static_cast<double>(t)), 0.5));
    c.eps = static_cast<T>(eps);
    c.neg_step = static_cast<T>(-(lr / (1 - std::pow(beta1, static_cast<double>(t)))));
    c.open = mode == kOff;
    c.update_noise = false;
    double te = 0.0;  // tau * (noise scale)
    if (source == kStreaming) {
      const int64_t nm = t - 1;  // gradients in exp_avg (the update placement's mean)
      if (nm >= 1) {
        c.update_noise = true;
        c.neg_scale = static_cast<T>(-(1 / (1 - std::pow(beta1, static_cast<double>(nm)))));
        c.noise_beta = static_cast<T>(nb);
        c.dev_w = static_cast<T>((1 - nb) / deviation_inflation(beta1, nm));
        noise_n[i] += 1;
      }
      if (noise_n[i] < 1) {
        c.open = true;
      } else {
        te = tau * (1 / (1 - std::pow(nb, static_cast<double>(noise_n[i]))));
      }
    } else if (source == kExact) {
      c.count = static_cast<T>(count);
      c.cm1 = static_cast<T>(count - 1);
      te = tau * 1.0;
    }
    if (mode != kOff && t <= warmup) c.open = true;
    c.tau0 = te == 0.0;
    c.gate_val = mode == kSoft ? static_cast<T>(-te) : (c.tau0 ? T(0) : static_cast<T>(-1.0 / te));

    const int64_t n = params[i].numel();
    T* p = params[i].data_ptr<T>();
    const T* g = grads[i].data_ptr<T>();
    T* m = exp_avgs[i].data_ptr<T>();
    T* v = exp_avg_sqs[i].data_ptr<T>();
    T* s = source == kStreaming ? noise[i].data_ptr<T>() : nullptr;
    const T* s1 = source == kExact ? sums[i].data_ptr<T>() : nullptr;
    const T* s2 = source == kExact ? sq_sums[i].data_ptr<T>() : nullptr;
    double r;
    if (mode == kOff) {
      r = run_tensor<T, kOff, kNone>(p, g, m, v, s, s1, s2, c, n);
    } else if (source == kStreaming) {
      r = mode == kHard ? run_tensor<T, kHard, kStreaming>(p, g, m, v, s, s1, s2, c, n)
                        : run_tensor<T, kSoft, kStreaming>(p, g, m, v, s, s1, s2, c, n);
    } else {
      r = mode == kHard ? run_tensor<T, kHard, kExact>(p, g, m, v, s, s1, s2, c, n)
                        : run_tensor<T, kSoft, kExact>(p, g, m, v, s, s1, s2, c, n);
    }
    total += r;
  }
  return total;
}

void check_same(const at::Tensor& ref, const at::TensorList xs, const char* what) {
  for (const auto& x : xs) {
    TORCH_CHECK(x.defined() && x.device() == ref.device() && x.scalar_type() == ref.scalar_type(),
                "gated_adamw_step_: ", what, " must match the parameters' dtype and device");
  }
}

// Returns (sum of the gate values: 0-d float64, new noise counts: int64 [n]).
std::tuple<at::Tensor, at::Tensor> gated_adamw_step_cpu(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList noise, at::TensorList sums,
    at::TensorList sq_sums, at::TensorList steps, at::IntArrayRef noise_n,
    at::ArrayRef<double> hyper, int64_t mode, int64_t source, int64_t count) {
  const size_t n = params.size();
  TORCH_CHECK(n > 0, "gated_adamw_step_: no parameters");
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  steps.size() == n && noise_n.size() == n,
              "gated_adamw_step_: lists of different lengths");
  TORCH_CHECK(hyper.size() == 8, "gated_adamw_step_: hyper = [lr, beta1, beta2, eps, wd, "
              "noise_beta, threshold, warmup]");
  TORCH_CHECK(mode >= kOff && mode <= kSoft && source >= kNone && source <= kExact,
              "gated_adamw_step_: bad mode/source");
  TORCH_CHECK((mode == kOff) == (source == kNone), "gated_adamw_step_: mode/source mismatch");
  TORCH_CHECK(source != kStreaming || noise.size() == n, "gated_adamw_step_: noise list");
  TORCH_CHECK(source != kExact || (sums.size() == n && sq_sums.size() == n && count >= 2),
              "gated_adamw_step_: exact statistics need sums, squared sums and count >= 2");
  const at::Tensor& ref = params[0];
  TORCH_CHECK(ref.device().is_cpu(), "gated_adamw_step_: CPU tensors only");
  TORCH_CHECK(ref.scalar_type() == at::kFloat || ref.scalar_type() == at::kDouble,
              "gated_adamw_step_: float32 or float64 only");
  check_same(ref, params, "params");
  check_same(ref, grads, "grads");
  check_same(ref, exp_avgs, "exp_avgs");
  check_same(ref, exp_avg_sqs, "exp_avg_sqs");
  if (source == kStreaming) check_same(ref, noise, "noise");
  if (source == kExact) {
    check_same(ref, sums, "sums");
    check_same(ref, sq_sums, "sq_sums");
  }
  for (size_t i = 0; i < n; ++i) {  // everything checked before anything is written
    const int64_t numel = params[i].numel();
    auto ok = [&](const at::Tensor& x) { return x.is_contiguous() && x.numel() == numel; };
    TORCH_CHECK(ok(params[i]) && ok(grads[i]) && ok(exp_avgs[i]) && ok(exp_avg_sqs[i]) &&
                    (source != kStreaming || ok(noise[i])) &&
                    (source != kExact || (ok(sums[i]) && ok(sq_sums[i]))),
                "gated_adamw_step_: tensor ", i, " is not contiguous or has the wrong size");
    const at::Tensor& st = steps[i];
    TORCH_CHECK(st.device().is_cpu() && st.scalar_type() == at::kFloat && st.numel() == 1,
                "gated_adamw_step_: steps must be CPU float32 scalars");
  }
  std::vector<int64_t> ts(n);
  for (size_t i = 0; i < n; ++i) {  // state["step"] += 1; t = int(state["step"].item())
    float* sp = steps[i].data_ptr<float>();
    *sp = *sp + 1.0f;
    ts[i] = static_cast<int64_t>(static_cast<double>(*sp));
  }
  std::vector<int64_t> nn(noise_n.begin(), noise_n.end());
  std::vector<double> hp(hyper.begin(), hyper.end());
  double total;
  if (ref.scalar_type() == at::kFloat) {
    total = step_all<float>(params, grads, exp_avgs, exp_avg_sqs, noise, sums, sq_sums, ts, nn,
                            hp, mode, source, count);
  } else {
    total = step_all<double>(params, grads, exp_avgs, exp_avg_sqs, noise, sums, sq_sums, ts, nn,
                             hp, mode, source, count);
  }
  at::Tensor counts = at::empty({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kLong));
  int64_t* cp = counts.data_ptr<int64_t>();
  for (size_t i = 0; i < n; ++i) cp[i] = nn[i];
  return {at::scalar_tensor(total, at::TensorOptions().dtype(at::kDouble)), counts};
}

// True if every element of every tensor is finite: one read-only pass (x*0 is NaN exactly
// for NaN/Inf; the block sums are checked as they go), one call for all the gradients.
template <typename T>
bool all_finite_t(const T* __restrict__ x, int64_t n) {
  for (int64_t b = 0; b < n; b += 4 * kChunk) {
    const int64_t e = std::min(n, b + 4 * kChunk);
    T acc = T(0);
#pragma omp simd reduction(+ : acc)
    for (int64_t i = b; i < e; ++i) acc += x[i] * T(0);
    if (!(acc == acc)) return false;
  }
  return true;
}

bool all_finite_cpu(at::TensorList xs) {
  for (const auto& x : xs) {
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() &&
                    (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
                "all_finite: contiguous float32/float64 CPU tensors only");
  }
  for (const auto& x : xs) {
    const bool ok = x.scalar_type() == at::kFloat ? all_finite_t(x.data_ptr<float>(), x.numel())
                                                  : all_finite_t(x.data_ptr<double>(), x.numel());
    if (!ok) return false;
  }
  return true;
}

}  // namespace

TORCH_LIBRARY(tangentscope_optim, m) {
  m.def(
      "gated_adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] noise, Tensor[] sums, Tensor[] sq_sums, "
      "Tensor(e!)[] steps, int[] noise_n, float[] hyper, int mode, int source, int count) "
      "-> (Tensor, Tensor)");
  m.def("all_finite(Tensor[] xs) -> bool");
}

TORCH_LIBRARY_IMPL(tangentscope_optim, CPU, m) {
  m.impl("gated_adamw_step_", &gated_adamw_step_cpu);
  m.impl("all_finite", &all_finite_cpu);
}
