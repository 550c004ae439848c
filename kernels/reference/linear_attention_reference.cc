#include "linear_attention_reference.h"

#include <algorithm>
#include <cmath>

namespace ferry::kernels::reference {
namespace {

double Dot(const double* a, const double* b, int d) {
  double sum = 0.0;
  for (int i = 0; i < d; ++i) sum += a[i] * b[i];
  return sum;
}

double EluPlusOne(double x) { return x > 0.0 ? x + 1.0 : std::exp(x); }

// Out rows of one sequence of `len` tokens; the pointers address the sequence's first token.
void SequenceReference(const LinearAttentionConfig& c, int64_t len, const double* q,
                       const double* k, const double* v, double* out) {
  const int d = c.head_dim;
  const int group = c.num_q_heads / c.num_kv_heads;
  std::vector<double> phi_q(d), phi_k(d);
  for (int h = 0; h < c.num_q_heads; ++h) {
    const int kv_head = h / group;
    auto q_row = [&](int64_t i) { return q + (i * c.num_q_heads + h) * d; };
    auto k_row = [&](int64_t j) { return k + (j * c.num_kv_heads + kv_head) * d; };
    auto v_row = [&](int64_t j) { return v + (j * c.num_kv_heads + kv_head) * d; };
    double q_max = 0.0, k_max = 0.0;
    for (int64_t i = 0; i < len; ++i) {
      q_max = std::max(q_max, std::sqrt(Dot(q_row(i), q_row(i), d)));
      k_max = std::max(k_max, std::sqrt(Dot(k_row(i), k_row(i), d)));
      const double a = std::max<double>(kLinearNormFloor, q_max);
      const double b = std::max<double>(kLinearNormFloor, k_max);
      for (int x = 0; x < d; ++x) phi_q[x] = EluPlusOne(q_row(i)[x]);
      double* o = out + (i * c.num_q_heads + h) * d;
      std::fill(o, o + d, 0.0);
      double weight_sum = 0.0;
      for (int64_t j = 0; j <= i; ++j) {
        double w = 0.0;
        switch (c.feature_map) {
          case LinearFeatureMap::kOnePlusXMaxNorm:
            w = 1.0 + Dot(q_row(i), k_row(j), d) / (a * b);
            break;
          case LinearFeatureMap::kEluPlusOne:
            for (int x = 0; x < d; ++x) phi_k[x] = EluPlusOne(k_row(j)[x]);
            w = Dot(phi_q.data(), phi_k.data(), d);
            break;
          case LinearFeatureMap::kIdentity:
            w = Dot(q_row(i), k_row(j), d);
            break;
        }
        weight_sum += w;
        for (int x = 0; x < d; ++x) o[x] += w * v_row(j)[x];
      }
      if (c.normalize) {
        for (int x = 0; x < d; ++x) o[x] /= weight_sum;
      }
    }
  }
}

}  // namespace

std::vector<double> LinearAttentionReference(const LinearAttentionConfig& config,
                                             const int32_t* cu_seqlens, const double* q,
                                             const double* k, const double* v) {
  const int d = config.head_dim;
  std::vector<double> out(int64_t{cu_seqlens[config.num_seqs]} * config.num_q_heads * d, 0.0);
  for (int s = 0; s < config.num_seqs; ++s) {
    const int64_t first = cu_seqlens[s];
    SequenceReference(config, cu_seqlens[s + 1] - first, q + first * config.num_q_heads * d,
                      k + first * config.num_kv_heads * d, v + first * config.num_kv_heads * d,
                      out.data() + first * config.num_q_heads * d);
  }
  return out;
}

LinearAttentionGradients LinearAttentionFiniteDifferenceGradients(
    const LinearAttentionConfig& config, const int32_t* cu_seqlens, const std::vector<double>& q,
    const std::vector<double>& k, const std::vector<double>& v, const std::vector<double>& dout,
    double step) {
  const int d = config.head_dim;
  const int64_t q_width = int64_t{config.num_q_heads} * d;
  const int64_t kv_width = int64_t{config.num_kv_heads} * d;
  std::vector<double> qq = q, kk = k, vv = v;
  LinearAttentionGradients grads;
  grads.dq.assign(q.size(), 0.0);
  grads.dk.assign(k.size(), 0.0);
  grads.dv.assign(v.size(), 0.0);
  std::vector<double> out;
  for (int s = 0; s < config.num_seqs; ++s) {
    const int64_t first = cu_seqlens[s];
    const int64_t len = cu_seqlens[s + 1] - first;
    out.assign(len * q_width, 0.0);
    // A perturbation inside sequence s changes only sequence s's part of the loss.
    auto loss = [&]() {
      SequenceReference(config, len, qq.data() + first * q_width, kk.data() + first * kv_width,
                        vv.data() + first * kv_width, out.data());
      return Dot(out.data(), dout.data() + first * q_width, static_cast<int>(len * q_width));
    };
    auto differentiate = [&](std::vector<double>& x, std::vector<double>& grad, int64_t width) {
      for (int64_t e = first * width; e < (first + len) * width; ++e) {
        const double saved = x[e];
        const double h = step * std::max(1.0, std::fabs(saved));
        x[e] = saved + h;
        const double plus = loss();
        x[e] = saved - h;
        const double minus = loss();
        x[e] = saved;
        grad[e] = (plus - minus) / (2.0 * h);
      }
    };
    differentiate(qq, grads.dq, q_width);
    differentiate(kk, grads.dk, kv_width);
    differentiate(vv, grads.dv, kv_width);
  }
  return grads;
}

}  // namespace ferry::kernels::reference
