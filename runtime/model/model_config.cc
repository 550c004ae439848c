#include "runtime/model/model_config.h"

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "ferry/status.h"
#include "nlohmann/json.hpp"

namespace ferry::model {
namespace {

using Json = nlohmann::json;

absl::Status KeyError(std::string_view key, std::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("config.json: \"", std::string(key), "\" ", std::string(what)));
}

// Reads an integer key. `required` false leaves *out untouched when the key is absent or null.
absl::Status GetInt(const Json& j, const char* key, bool required, int64_t* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    return required ? KeyError(key, "is missing") : absl::OkStatus();
  }
  if (!it->is_number_integer()) return KeyError(key, "is not an integer");
  *out = it->get<int64_t>();
  return absl::OkStatus();
}

absl::Status GetPositiveInt(const Json& j, const char* key, bool required, int* out) {
  int64_t value = *out;
  FERRY_RETURN_IF_ERROR(GetInt(j, key, required, &value));
  if (value <= 0 || value > (int64_t{1} << 30)) return KeyError(key, "is out of range");
  *out = static_cast<int>(value);
  return absl::OkStatus();
}

absl::Status GetDouble(const Json& j, const char* key, bool required, double* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    return required ? KeyError(key, "is missing") : absl::OkStatus();
  }
  if (!it->is_number()) return KeyError(key, "is not a number");
  *out = it->get<double>();
  return absl::OkStatus();
}

absl::Status GetBool(const Json& j, const char* key, bool* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_boolean()) return KeyError(key, "is not a boolean");
  *out = it->get<bool>();
  return absl::OkStatus();
}

// rope_scaling (< 5) or rope_parameters (>= 5): the same keys, except that the latter also holds
// rope_theta. "type" is the pre-4.45 spelling of "rope_type".
absl::Status ParseRope(const Json& params, const char* key, RopeConfig* rope) {
  if (!params.is_object()) return KeyError(key, "is not an object");
  std::string type = "default";
  for (const char* type_key : {"rope_type", "type"}) {
    auto it = params.find(type_key);
    if (it != params.end() && !it->is_null()) {
      if (!it->is_string()) return KeyError(key, "has a non-string rope_type");
      type = it->get<std::string>();
      break;
    }
  }
  FERRY_RETURN_IF_ERROR(GetDouble(params, "rope_theta", false, &rope->theta));
  if (type == "default") {
    rope->type = RopeType::kDefault;
  } else if (type == "llama3") {
    rope->type = RopeType::kLlama3;
    FERRY_RETURN_IF_ERROR(GetDouble(params, "factor", true, &rope->factor));
    FERRY_RETURN_IF_ERROR(GetDouble(params, "low_freq_factor", true, &rope->low_freq_factor));
    FERRY_RETURN_IF_ERROR(GetDouble(params, "high_freq_factor", true, &rope->high_freq_factor));
    FERRY_RETURN_IF_ERROR(GetInt(params, "original_max_position_embeddings", true,
                                 &rope->original_max_position_embeddings));
    if (rope->factor <= 0 || rope->low_freq_factor <= 0 ||
        rope->high_freq_factor <= rope->low_freq_factor ||
        rope->original_max_position_embeddings <= 0) {
      return KeyError(key, "has inconsistent llama3 factors");
    }
  } else {
    return absl::UnimplementedError(absl::StrCat("config.json: rope type \"", type,
                                                 "\" is not supported (default, llama3)"));
  }
  if (!(rope->theta > 0)) return KeyError("rope_theta", "must be positive");
  return absl::OkStatus();
}

absl::Status ParseTokenIds(const Json& j, const char* key, std::vector<int32_t>* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  auto one = [&](const Json& v) -> absl::Status {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX) {
      return KeyError(key, "holds something other than a token id");
    }
    out->push_back(static_cast<int32_t>(v.get<int64_t>()));
    return absl::OkStatus();
  };
  if (it->is_array()) {
    for (const Json& v : *it) FERRY_RETURN_IF_ERROR(one(v));
    return absl::OkStatus();
  }
  return one(*it);
}

}  // namespace

std::string_view LinearFeatureMapName(kernels::LinearFeatureMap map) {
  switch (map) {
    case kernels::LinearFeatureMap::kOnePlusXMaxNorm: return "1+x";
    case kernels::LinearFeatureMap::kEluPlusOne: return "elu+1";
    case kernels::LinearFeatureMap::kIdentity: return "identity";
  }
  return "unknown";
}

bool ParseLinearFeatureMap(std::string_view name, kernels::LinearFeatureMap* map) {
  for (kernels::LinearFeatureMap m :
       {kernels::LinearFeatureMap::kOnePlusXMaxNorm, kernels::LinearFeatureMap::kEluPlusOne,
        kernels::LinearFeatureMap::kIdentity}) {
    if (name == LinearFeatureMapName(m)) {
      *map = m;
      return true;
    }
  }
  return false;
}

std::string_view ArchitectureName(Architecture arch) {
  switch (arch) {
    case Architecture::kLlama: return "LlamaForCausalLM";
    case Architecture::kMistral: return "MistralForCausalLM";
    case Architecture::kQwen2: return "Qwen2ForCausalLM";
  }
  return "unknown";
}

absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text) {
  Json j = Json::parse(json_text.begin(), json_text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError("config.json: not a JSON object");
  }
  ModelConfig c;

  auto arch_it = j.find("architectures");
  if (arch_it == j.end() || !arch_it->is_array() || arch_it->empty() ||
      !(*arch_it)[0].is_string()) {
    return KeyError("architectures", "is missing or not a list of names");
  }
  const std::string arch = (*arch_it)[0].get<std::string>();
  if (arch == "LlamaForCausalLM") {
    c.arch = Architecture::kLlama;
  } else if (arch == "MistralForCausalLM") {
    c.arch = Architecture::kMistral;
  } else if (arch == "Qwen2ForCausalLM") {
    c.arch = Architecture::kQwen2;
  } else {
    return absl::UnimplementedError(absl::StrCat(
        "config.json: architecture ", arch,
        " is not supported (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"));
  }

  FERRY_RETURN_IF_ERROR(GetPositiveInt(j, "hidden_size", true, &c.hidden_size));
  FERRY_RETURN_IF_ERROR(GetPositiveInt(j, "intermediate_size", true, &c.intermediate_size));
  FERRY_RETURN_IF_ERROR(GetPositiveInt(j, "num_hidden_layers", true, &c.num_layers));
  FERRY_RETURN_IF_ERROR(GetPositiveInt(j, "num_attention_heads", true, &c.num_heads));
  c.num_kv_heads = c.num_heads;  // HF's default when the key is absent (multi-head attention)
  FERRY_RETURN_IF_ERROR(GetPositiveInt(j, "num_key_value_heads", false, &c.num_kv_heads));
  if (c.hidden_size % c.num_heads != 0 && !j.contains("head_dim")) {
    return KeyError("hidden_size", "is not a multiple of num_attention_heads and no head_dim");
  }
  c.head_dim = c.hidden_size / c.num_heads;
  FERRY_RETURN_IF_ERROR(GetPositiveInt(j, "head_dim", false, &c.head_dim));
  if (c.head_dim % 2 != 0) return KeyError("head_dim", "must be even (RoPE rotates pairs)");
  if (c.num_heads % c.num_kv_heads != 0) {
    return KeyError("num_key_value_heads", "does not divide num_attention_heads");
  }
  FERRY_RETURN_IF_ERROR(GetPositiveInt(j, "vocab_size", true, &c.vocab_size));
  c.max_position_embeddings = 4096;
  FERRY_RETURN_IF_ERROR(GetInt(j, "max_position_embeddings", false, &c.max_position_embeddings));
  if (c.max_position_embeddings <= 0) return KeyError("max_position_embeddings", "must be > 0");
  FERRY_RETURN_IF_ERROR(GetDouble(j, "rms_norm_eps", false, &c.rms_norm_eps));
  if (!(c.rms_norm_eps > 0)) return KeyError("rms_norm_eps", "must be positive");
  FERRY_RETURN_IF_ERROR(GetBool(j, "tie_word_embeddings", &c.tie_word_embeddings));

  // RoPE: the >= 5 form wins when both are present, as transformers 5 reads it.
  FERRY_RETURN_IF_ERROR(GetDouble(j, "rope_theta", false, &c.rope.theta));
  if (auto it = j.find("rope_parameters"); it != j.end() && !it->is_null()) {
    FERRY_RETURN_IF_ERROR(ParseRope(*it, "rope_parameters", &c.rope));
  } else if (auto it2 = j.find("rope_scaling"); it2 != j.end() && !it2->is_null()) {
    FERRY_RETURN_IF_ERROR(ParseRope(*it2, "rope_scaling", &c.rope));
  }
  if (!(c.rope.theta > 0)) return KeyError("rope_theta", "must be positive");

  switch (c.arch) {
    case Architecture::kQwen2: {
      c.qkv_bias = true;
      bool sliding = false;
      FERRY_RETURN_IF_ERROR(GetBool(j, "use_sliding_window", &sliding));
      if (sliding) {
        return absl::UnimplementedError("config.json: Qwen2 use_sliding_window is not supported");
      }
      break;
    }
    case Architecture::kLlama: {
      bool attention_bias = false, mlp_bias = false;
      FERRY_RETURN_IF_ERROR(GetBool(j, "attention_bias", &attention_bias));
      FERRY_RETURN_IF_ERROR(GetBool(j, "mlp_bias", &mlp_bias));
      if (mlp_bias) return absl::UnimplementedError("config.json: mlp_bias is not supported");
      c.qkv_bias = c.o_bias = attention_bias;
      break;
    }
    case Architecture::kMistral:
      FERRY_RETURN_IF_ERROR(GetInt(j, "sliding_window", false, &c.sliding_window));
      break;
  }
  if (auto it = j.find("hidden_act"); it != j.end() && !it->is_null()) {
    if (!it->is_string() || it->get<std::string>() != "silu") {
      return absl::UnimplementedError("config.json: hidden_act other than silu is not supported");
    }
  }

  // dtype (>= 5) or torch_dtype (< 5); absent means the checkpoint's tensors decide (fp32 here).
  c.dtype = DType::kFloat32;
  for (const char* key : {"dtype", "torch_dtype"}) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) continue;
    if (!it->is_string() || !ParseDType(it->get<std::string>(), &c.dtype)) {
      return KeyError(key, "is not float32, float16 or bfloat16");
    }
    break;
  }

  if (auto it = j.find("attention_kind"); it != j.end() && !it->is_null()) {
    const std::string kind = it->is_string() ? it->get<std::string>() : "";
    if (kind == "linear") {
      c.attention_kind = AttentionKind::kLinear;
    } else if (kind != "softmax") {
      return KeyError("attention_kind", "is not \"softmax\" or \"linear\"");
    }
  }
  for (const char* key : {"linear_feature_map", "linear_normalize"}) {
    if (j.contains(key) && c.attention_kind != AttentionKind::kLinear) {
      return KeyError(key, "needs \"attention_kind\": \"linear\"");
    }
  }
  if (auto it = j.find("linear_feature_map"); it != j.end() && !it->is_null()) {
    if (!it->is_string() || !ParseLinearFeatureMap(it->get<std::string>(), &c.linear_feature_map)) {
      return KeyError("linear_feature_map", "is not \"1+x\", \"elu+1\" or \"identity\"");
    }
  }
  FERRY_RETURN_IF_ERROR(GetBool(j, "linear_normalize", &c.linear_normalize));
  if (c.attention_kind == AttentionKind::kLinear && c.linear_normalize &&
      c.linear_feature_map == kernels::LinearFeatureMap::kIdentity) {
    return KeyError("linear_feature_map", "\"identity\" needs \"linear_normalize\": false");
  }

  FERRY_RETURN_IF_ERROR(ParseTokenIds(j, "eos_token_id", &c.eos_token_ids));
  std::vector<int32_t> bos;
  FERRY_RETURN_IF_ERROR(ParseTokenIds(j, "bos_token_id", &bos));
  if (!bos.empty()) c.bos_token_id = bos[0];
  for (int32_t id : c.eos_token_ids) {
    if (id >= c.vocab_size) return KeyError("eos_token_id", "is not below vocab_size");
  }
  return c;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir) {
  const std::string path = dir + "/config.json";
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::ostringstream text;
  text << in.rdbuf();
  auto config = ParseModelConfig(text.str());
  if (!config.ok()) {
    return absl::Status(config.status().code(),
                        absl::StrCat(path, ": ", config.status().message()));
  }
  return config;
}

std::string ModelConfigToJson(const ModelConfig& c, bool transformers5_form) {
  Json j;
  j["architectures"] = {std::string(ArchitectureName(c.arch))};
  switch (c.arch) {
    case Architecture::kLlama: j["model_type"] = "llama"; break;
    case Architecture::kMistral: j["model_type"] = "mistral"; break;
    case Architecture::kQwen2: j["model_type"] = "qwen2"; break;
  }
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.num_kv_heads;
  j["head_dim"] = c.head_dim;
  j["vocab_size"] = c.vocab_size;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["hidden_act"] = "silu";
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["initializer_range"] = 0.02;
  if (c.arch == Architecture::kLlama) {
    j["attention_bias"] = c.qkv_bias;
    j["mlp_bias"] = false;
  }
  if (c.arch == Architecture::kQwen2) j["use_sliding_window"] = false;
  if (c.arch == Architecture::kMistral) j["sliding_window"] = nullptr;
  j["attention_dropout"] = 0.0;
  j["use_cache"] = true;
  Json rope;
  rope["rope_type"] = c.rope.type == RopeType::kLlama3 ? "llama3" : "default";
  if (c.rope.type == RopeType::kLlama3) {
    rope["factor"] = c.rope.factor;
    rope["low_freq_factor"] = c.rope.low_freq_factor;
    rope["high_freq_factor"] = c.rope.high_freq_factor;
    rope["original_max_position_embeddings"] = c.rope.original_max_position_embeddings;
  }
  const char* dtype_name = c.dtype == DType::kFloat32   ? "float32"
                           : c.dtype == DType::kFloat16 ? "float16"
                                                        : "bfloat16";
  if (transformers5_form) {
    rope["rope_theta"] = c.rope.theta;
    j["rope_parameters"] = rope;
    j["dtype"] = dtype_name;
    j["transformers_version"] = "5.0.0";
  } else {
    j["rope_theta"] = c.rope.theta;
    j["rope_scaling"] = c.rope.type == RopeType::kLlama3 ? rope : Json(nullptr);
    j["torch_dtype"] = dtype_name;
    j["transformers_version"] = "4.46.0";
  }
  if (c.attention_kind == AttentionKind::kLinear) {
    j["attention_kind"] = "linear";
    j["linear_feature_map"] = std::string(LinearFeatureMapName(c.linear_feature_map));
    j["linear_normalize"] = c.linear_normalize;
  }
  if (c.bos_token_id >= 0) j["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_ids.size() == 1) {
    j["eos_token_id"] = c.eos_token_ids[0];
  } else if (!c.eos_token_ids.empty()) {
    j["eos_token_id"] = c.eos_token_ids;
  }
  return j.dump(2) + "\n";
}

}  // namespace ferry::model
