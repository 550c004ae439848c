#include "runtime/model/dense_ops.h"

#include <cblas.h>

#include <cmath>

namespace ferry::model {

void RmsNorm(const float* x, const float* weight, int64_t rows, int dim, double eps, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* yr = out + r * dim;
    // Sum of squares in double: the mean of many fp32 squares loses digits otherwise, and HF's
    // reference runs this in fp32 or fp64, so the extra precision only moves us closer.
    double ss = 0;
    for (int i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
    const float scale = static_cast<float>(1.0 / std::sqrt(ss / dim + eps));
    for (int i = 0; i < dim; ++i) yr[i] = weight[i] * (xr[i] * scale);
  }
}

std::vector<float> RopeInvFreq(const RopeConfig& rope, int head_dim) {
  const int half = head_dim / 2;
  std::vector<float> inv(half);
  const float base = static_cast<float>(rope.theta);
  for (int i = 0; i < half; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    inv[i] = 1.0f / std::pow(base, exponent);
  }
  if (rope.type == RopeType::kLlama3) {
    const float factor = static_cast<float>(rope.factor);
    const float low = static_cast<float>(rope.low_freq_factor);
    const float high = static_cast<float>(rope.high_freq_factor);
    const float old_len = static_cast<float>(rope.original_max_position_embeddings);
    const float low_freq_wavelen = old_len / low;
    const float high_freq_wavelen = old_len / high;
    for (int i = 0; i < half; ++i) {
      const float wavelen = 2.0f * static_cast<float>(M_PI) / inv[i];
      if (wavelen < high_freq_wavelen) continue;  // high frequencies stay as they are
      if (wavelen > low_freq_wavelen) {
        inv[i] = inv[i] / factor;  // low frequencies are stretched by the full factor
      } else {
        const float smooth = (old_len / wavelen - low) / (high - low);
        inv[i] = (1.0f - smooth) * inv[i] / factor + smooth * inv[i];
      }
    }
  }
  return inv;
}

void RopeCosSin(const std::vector<float>& inv_freq, int64_t position, float* cos_sin) {
  const int half = static_cast<int>(inv_freq.size());
  for (int i = 0; i < half; ++i) {
    const float angle = static_cast<float>(position) * inv_freq[i];
    cos_sin[i] = static_cast<float>(std::cos(static_cast<double>(angle)));
    cos_sin[half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
  }
}

void ApplyRope(float* x, int num_heads, int head_dim, const float* cos_sin) {
  const int half = head_dim / 2;
  for (int h = 0; h < num_heads; ++h) {
    float* xh = x + h * head_dim;
    for (int i = 0; i < half; ++i) {
      const float x1 = xh[i], x2 = xh[i + half];
      const float c = cos_sin[i], s = cos_sin[half + i];
      xh[i] = x1 * c - x2 * s;
      xh[i + half] = x2 * c + x1 * s;
    }
  }
}

void SwiGlu(const float* gate_up, int64_t rows, int inter, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* g = gate_up + r * 2 * inter;
    const float* u = g + inter;
    float* o = out + r * inter;
    for (int i = 0; i < inter; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

void Linear(const float* x, int64_t rows, int in, const float* w, int out, const float* bias,
            float* y, bool accumulate) {
  if (rows == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows), out, in, 1.0f, x,
              in, w, in, accumulate ? 1.0f : 0.0f, y, out);
  if (bias != nullptr) {
    for (int64_t r = 0; r < rows; ++r) {
      float* yr = y + r * out;
      for (int i = 0; i < out; ++i) yr[i] += bias[i];
    }
  }
}

}  // namespace ferry::model
