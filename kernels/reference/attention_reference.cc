#include "attention_reference.h"

#include <cmath>
#include <limits>

namespace ferry::kernels::reference {

double LoadAsDouble(const void* data, DType dtype, int64_t index) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(data)[index];
    case DType::kFloat16: return Float16BitsToFloat(static_cast<const uint16_t*>(data)[index]);
    case DType::kBFloat16: return BFloat16BitsToFloat(static_cast<const uint16_t*>(data)[index]);
  }
  return std::numeric_limits<double>::quiet_NaN();
}

ReferenceStates DecodeAttentionReference(const DecodeAttentionArgs& args) {
  const PagedKvView& kv = args.kv;
  const int d = kv.head_dim;
  const int group = args.num_q_heads / kv.num_kv_heads;
  ReferenceStates states;
  states.o.assign(int64_t{args.num_seqs} * args.num_q_heads * d, 0.0);
  states.lse.assign(int64_t{args.num_seqs} * args.num_q_heads,
                    -std::numeric_limits<double>::infinity());
  std::vector<double> scores;
  for (int s = 0; s < args.num_seqs; ++s) {
    const int64_t begin = args.kv_begin ? args.kv_begin[s] : 0;
    const int64_t end = args.kv_end ? args.kv_end[s] : args.seq_lens[s];
    if (end <= begin) continue;
    const int32_t* blocks = args.block_table + args.block_table_indptr[s];
    auto row_of = [&](int64_t pos, int kv_head) {
      return ((int64_t{blocks[pos / kv.block_size]} * kv.num_kv_heads + kv_head) * kv.block_size +
              pos % kv.block_size) * d;
    };
    for (int h = 0; h < args.num_q_heads; ++h) {
      const int kv_head = h / group;
      const int64_t q_row = int64_t{s} * args.num_q_heads + h;
      const float* q = args.q + q_row * d;
      scores.assign(end - begin, 0.0);
      double max_score = -std::numeric_limits<double>::infinity();
      for (int64_t pos = begin; pos < end; ++pos) {
        const int64_t row = row_of(pos, kv_head);
        double dot = 0.0;
        for (int c = 0; c < d; ++c) dot += double{q[c]} * LoadAsDouble(kv.k_pool, kv.dtype, row + c);
        scores[pos - begin] = dot * args.softmax_scale;
        max_score = std::max(max_score, scores[pos - begin]);
      }
      double sum = 0.0;
      double* o = &states.o[q_row * d];
      for (int64_t pos = begin; pos < end; ++pos) {
        const double weight = std::exp(scores[pos - begin] - max_score);
        sum += weight;
        const int64_t row = row_of(pos, kv_head);
        for (int c = 0; c < d; ++c) o[c] += weight * LoadAsDouble(kv.v_pool, kv.dtype, row + c);
      }
      for (int c = 0; c < d; ++c) o[c] /= sum;
      states.lse[q_row] = max_score + std::log(sum);
    }
  }
  return states;
}

double RelativeError(const std::vector<double>& actual, const std::vector<double>& expected) {
  double diff = 0.0, norm = 0.0;
  for (size_t i = 0; i < expected.size(); ++i) {
    const double delta = (i < actual.size() ? actual[i] : std::nan("")) - expected[i];
    diff += delta * delta;
    norm += expected[i] * expected[i];
  }
  if (actual.size() != expected.size()) return std::numeric_limits<double>::infinity();
  if (std::isnan(diff)) return std::numeric_limits<double>::infinity();
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

}  // namespace ferry::kernels::reference
