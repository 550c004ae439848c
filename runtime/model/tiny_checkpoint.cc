#include "runtime/model/tiny_checkpoint.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "ferry/status.h"
#include "runtime/model/safetensors.h"

namespace ferry::model {
namespace {

uint64_t SplitMix64(uint64_t* state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// FNV-1a, to give each tensor name its own stream.
uint64_t HashName(const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char ch : name) h = (h ^ ch) * 0x100000001b3ull;
  return h;
}

class Stream {
 public:
  Stream(uint64_t seed, const std::string& name) : state_(seed * 0x9e3779b97f4a7c15ull ^ HashName(name)) {}
  // Uniform in (0, 1).
  double Uniform() { return (static_cast<double>(SplitMix64(&state_) >> 11) + 0.5) * 0x1.0p-53; }
  double Normal() {
    const double u1 = Uniform(), u2 = Uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
  }

 private:
  uint64_t state_;
};

TensorToWrite MakeTensor(const std::string& name, std::vector<int64_t> shape, DType dtype,
                         uint64_t seed, double scale, double offset, bool uniform) {
  Stream stream(seed, name);
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  TensorToWrite t;
  t.name = name;
  t.shape = std::move(shape);
  t.dtype = dtype == DType::kFloat32   ? TensorDType::kF32
            : dtype == DType::kFloat16 ? TensorDType::kF16
                                       : TensorDType::kBF16;
  t.bytes.resize(static_cast<size_t>(n) * DTypeSize(dtype));
  for (int64_t i = 0; i < n; ++i) {
    const double r = uniform ? (2.0 * stream.Uniform() - 1.0) : stream.Normal();
    const float value = static_cast<float>(offset + scale * r);
    if (dtype == DType::kFloat32) {
      std::memcpy(t.bytes.data() + 4 * i, &value, 4);
    } else {
      const uint16_t bits =
          dtype == DType::kFloat16 ? FloatToFloat16Bits(value) : FloatToBFloat16Bits(value);
      std::memcpy(t.bytes.data() + 2 * i, &bits, 2);
    }
  }
  return t;
}

}  // namespace

absl::StatusOr<ModelConfig> TinyConfig(const TinyCheckpointOptions& o) {
  ModelConfig c;
  c.arch = o.arch;
  c.hidden_size = o.hidden_size;
  c.intermediate_size = o.intermediate_size > 0 ? o.intermediate_size : 2 * o.hidden_size;
  c.num_layers = o.num_layers;
  c.num_heads = o.num_heads;
  c.num_kv_heads = o.num_kv_heads;
  if (o.num_layers <= 0 || o.hidden_size <= 0 || o.num_heads <= 0 || o.num_kv_heads <= 0 ||
      o.vocab_size < 4 || o.max_positions <= 0) {
    return absl::InvalidArgumentError("make-tiny: sizes must be positive (vocab at least 4)");
  }
  if (o.num_heads % o.num_kv_heads != 0) {
    return absl::InvalidArgumentError("make-tiny: kv-heads must divide heads");
  }
  if (o.head_dim == 0 && o.hidden_size % o.num_heads != 0) {
    return absl::InvalidArgumentError("make-tiny: heads must divide hidden");
  }
  c.head_dim = o.head_dim > 0 ? o.head_dim : o.hidden_size / o.num_heads;
  if (c.head_dim % 2 != 0) return absl::InvalidArgumentError("make-tiny: head_dim must be even");
  c.vocab_size = o.vocab_size;
  c.max_position_embeddings = o.max_positions;
  c.rms_norm_eps = 1e-5;
  c.rope.theta = o.rope_theta;
  if (o.rope_llama3) {
    c.rope.type = RopeType::kLlama3;
    c.rope.factor = 8.0;
    c.rope.low_freq_factor = 1.0;
    c.rope.high_freq_factor = 4.0;
    c.rope.original_max_position_embeddings = std::max<int64_t>(1, o.max_positions / 4);
  }
  c.tie_word_embeddings = o.tie_word_embeddings;
  c.qkv_bias = o.arch == Architecture::kQwen2 || (o.arch == Architecture::kLlama && o.attention_bias);
  c.o_bias = o.arch == Architecture::kLlama && o.attention_bias;
  if (o.attention_bias && o.arch == Architecture::kMistral) {
    return absl::InvalidArgumentError("make-tiny: Mistral has no attention bias");
  }
  c.dtype = o.dtype;
  c.attention_kind = o.attention_kind;
  c.linear_feature_map = o.linear_feature_map;
  c.linear_normalize = o.linear_normalize;
  if (c.attention_kind == AttentionKind::kLinear && c.linear_normalize &&
      c.linear_feature_map == kernels::LinearFeatureMap::kIdentity) {
    return absl::InvalidArgumentError("make-tiny: the identity feature map is unnormalised only");
  }
  c.bos_token_id = 1;
  c.eos_token_ids = {2};
  return c;
}

absl::Status WriteTinyCheckpoint(const TinyCheckpointOptions& o) {
  FERRY_ASSIGN_OR_RETURN(ModelConfig c, TinyConfig(o));
  std::error_code ec;
  std::filesystem::create_directories(o.out_dir, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat("cannot create ", o.out_dir, ": ", ec.message()));

  const int64_t h = c.hidden_size, inter = c.intermediate_size, v = c.vocab_size;
  const int64_t q_out = int64_t{c.num_heads} * c.head_dim;
  const int64_t kv_out = int64_t{c.num_kv_heads} * c.head_dim;
  const double inv_h = 1.0 / std::sqrt(static_cast<double>(h));
  std::vector<TensorToWrite> tensors;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, double scale, double offset,
                 bool uniform) {
    tensors.push_back(MakeTensor(name, std::move(shape), c.dtype, o.seed, scale, offset, uniform));
  };
  // Tied: the embedding doubles as the LM head, so it takes the head's scale (a unit-variance
  // head would make every logit vector peak at the current token).
  add("model.embed_tokens.weight", {v, h}, c.tie_word_embeddings ? 3.0 * inv_h : 1.0, 0, false);
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    add(p + "input_layernorm.weight", {h}, 0.2, 1.0, true);
    add(p + "self_attn.q_proj.weight", {q_out, h}, inv_h, 0, false);
    add(p + "self_attn.k_proj.weight", {kv_out, h}, inv_h, 0, false);
    add(p + "self_attn.v_proj.weight", {kv_out, h}, inv_h, 0, false);
    if (c.qkv_bias) {
      add(p + "self_attn.q_proj.bias", {q_out}, 0.1, 0, false);
      add(p + "self_attn.k_proj.bias", {kv_out}, 0.1, 0, false);
      add(p + "self_attn.v_proj.bias", {kv_out}, 0.1, 0, false);
    }
    add(p + "self_attn.o_proj.weight", {h, q_out}, 1.0 / std::sqrt(static_cast<double>(q_out)), 0,
        false);
    if (c.o_bias) add(p + "self_attn.o_proj.bias", {h}, 0.1, 0, false);
    add(p + "post_attention_layernorm.weight", {h}, 0.2, 1.0, true);
    add(p + "mlp.gate_proj.weight", {inter, h}, inv_h, 0, false);
    add(p + "mlp.up_proj.weight", {inter, h}, inv_h, 0, false);
    add(p + "mlp.down_proj.weight", {h, inter}, 1.0 / std::sqrt(static_cast<double>(inter)), 0,
        false);
  }
  add("model.norm.weight", {h}, 0.2, 1.0, true);
  if (!c.tie_word_embeddings) add("lm_head.weight", {v, h}, 3.0 * inv_h, 0, false);

  FERRY_RETURN_IF_ERROR(WriteSafetensors(o.out_dir + "/model.safetensors", tensors));
  const std::string config_path = o.out_dir + "/config.json";
  std::ofstream out(config_path, std::ios::trunc);
  out << ModelConfigToJson(c, o.transformers5_form);
  out.close();
  if (!out) return absl::DataLossError(absl::StrCat("error writing ", config_path));
  return absl::OkStatus();
}

}  // namespace ferry::model
