#include "tests/common/decoder_reference.h"

#include <algorithm>
#include <cmath>

#include "linear_attention_reference.h"
#include "runtime/model/dense_ops.h"

namespace ferry::model::ref {

std::vector<double> ReferenceLogits(const Model& m, const std::vector<int32_t>& tokens) {
  const ModelConfig& c = m.config;
  const int H = c.hidden_size, hd = c.head_dim, nh = c.num_heads, nkv = c.num_kv_heads;
  const int I = c.intermediate_size, qo = nh * hd, ko = nkv * hd, T = static_cast<int>(tokens.size());
  const auto inv = RopeInvFreq(c.rope, hd);
  auto norm = [&](const std::vector<double>& x, const std::vector<float>& w) {
    std::vector<double> y(x.size());
    for (int t = 0; t < static_cast<int>(x.size()) / H; ++t) {
      double ss = 0;
      for (int i = 0; i < H; ++i) ss += x[t * H + i] * x[t * H + i];
      const double s = 1.0 / std::sqrt(ss / H + c.rms_norm_eps);
      for (int i = 0; i < H; ++i) y[t * H + i] = w[i] * x[t * H + i] * s;
    }
    return y;
  };
  // y (T, out) = x (T, in) W^T (+b), W rows starting at row0 of a stacked matrix.
  auto linear = [&](const std::vector<double>& x, int in, const std::vector<float>& w, int row0,
                    int out, const std::vector<float>* b, int b0) {
    std::vector<double> y(static_cast<size_t>(T) * out);
    for (int t = 0; t < T; ++t) {
      for (int o = 0; o < out; ++o) {
        double acc = b && !b->empty() ? (*b)[b0 + o] : 0.0;
        for (int i = 0; i < in; ++i) acc += x[t * in + i] * w[(int64_t{row0} + o) * in + i];
        y[t * out + o] = acc;
      }
    }
    return y;
  };
  auto rope = [&](std::vector<double>& x, int heads) {
    for (int t = 0; t < T; ++t) {
      for (int h = 0; h < heads; ++h) {
        for (int i = 0; i < hd / 2; ++i) {
          const double angle = static_cast<double>(static_cast<float>(t) * inv[i]);
          double& a = x[(t * heads + h) * hd + i];
          double& b = x[(t * heads + h) * hd + i + hd / 2];
          const double a0 = a, b0 = b;
          a = a0 * std::cos(angle) - b0 * std::sin(angle);
          b = b0 * std::cos(angle) + a0 * std::sin(angle);
        }
      }
    }
  };
  std::vector<double> x(static_cast<size_t>(T) * H);
  for (int t = 0; t < T; ++t) {
    for (int i = 0; i < H; ++i) x[t * H + i] = m.embed[int64_t{tokens[t]} * H + i];
  }
  for (const LayerWeights& w : m.layers) {
    auto h = norm(x, w.input_norm);
    auto q = linear(h, H, w.wqkv, 0, qo, &w.bqkv, 0);
    auto k = linear(h, H, w.wqkv, qo, ko, &w.bqkv, qo);
    auto v = linear(h, H, w.wqkv, qo + ko, ko, &w.bqkv, qo + ko);
    rope(q, nh);
    rope(k, nkv);
    std::vector<double> attn(static_cast<size_t>(T) * qo);
    if (c.attention_kind == AttentionKind::kLinear) {
      kernels::LinearAttentionConfig lc;
      lc.num_seqs = 1;
      lc.num_q_heads = nh;
      lc.num_kv_heads = nkv;
      lc.head_dim = hd;
      lc.feature_map = c.linear_feature_map;
      lc.normalize = c.linear_normalize;
      const int32_t cu_seqlens[2] = {0, T};
      attn = kernels::reference::LinearAttentionReference(lc, cu_seqlens, q.data(), k.data(),
                                                          v.data());
    }
    for (int t = 0; t < T && c.attention_kind == AttentionKind::kSoftmax; ++t) {
      for (int hq = 0; hq < nh; ++hq) {
        const int hk = hq / (nh / nkv);
        std::vector<double> s(t + 1);
        double mx = -INFINITY;
        for (int j = 0; j <= t; ++j) {
          double dot = 0;
          for (int i = 0; i < hd; ++i) dot += q[(t * nh + hq) * hd + i] * k[(j * nkv + hk) * hd + i];
          s[j] = dot / std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, s[j]);
        }
        double l = 0;
        for (auto& e : s) l += (e = std::exp(e - mx));
        for (int i = 0; i < hd; ++i) {
          double acc = 0;
          for (int j = 0; j <= t; ++j) acc += s[j] * v[(j * nkv + hk) * hd + i];
          attn[(t * nh + hq) * hd + i] = acc / l;
        }
      }
    }
    auto o = linear(attn, qo, w.wo, 0, H, &w.bo, 0);
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    h = norm(x, w.post_norm);
    auto g = linear(h, H, w.w_gate_up, 0, I, nullptr, 0);
    auto u = linear(h, H, w.w_gate_up, I, I, nullptr, 0);
    std::vector<double> act(g.size());
    for (size_t i = 0; i < g.size(); ++i) act[i] = g[i] / (1 + std::exp(-g[i])) * u[i];
    auto d = linear(act, I, w.w_down, 0, H, nullptr, 0);
    for (size_t i = 0; i < x.size(); ++i) x[i] += d[i];
  }
  std::vector<double> last(x.end() - H, x.end());
  double ss = 0;
  for (double e : last) ss += e * e;
  const double s = 1.0 / std::sqrt(ss / H + c.rms_norm_eps);
  std::vector<double> logits(c.vocab_size);
  const float* head = m.lm_head_data();
  for (int vtok = 0; vtok < c.vocab_size; ++vtok) {
    double acc = 0;
    for (int i = 0; i < H; ++i) acc += m.final_norm[i] * last[i] * s * head[int64_t{vtok} * H + i];
    logits[vtok] = acc;
  }
  return logits;
}

double RelError(const float* got, const std::vector<double>& want) {
  double max_diff = 0, max_ref = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::isnan(got[i])) return INFINITY;
    max_diff = std::max(max_diff, std::abs(got[i] - want[i]));
    max_ref = std::max(max_ref, std::abs(want[i]));
  }
  return max_diff / max_ref;
}

double RelError(const float* got, const float* want, int n) {
  return RelError(got, std::vector<double>(want, want + n));
}

}  // namespace ferry::model::ref
