#include "runtime/model/checkpoint.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "ferry/kernels/dtype.h"
#include "ferry/kernels/thread_pool.h"
#include "ferry/status.h"
#include "nlohmann/json.hpp"
#include "runtime/common/log.h"
#include "runtime/model/safetensors.h"

namespace ferry::model {
namespace {

struct Source {
  const SafetensorsFile* file;
  const TensorInfo* info;
};

// One tensor the model needs: where it lands and at which row offset (for stacked matrices).
struct Need {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float>* dest;
  int64_t dest_offset;  // elements
};

void ConvertToFloat(const uint8_t* src, TensorDType dtype, int64_t n, float* dst) {
  switch (dtype) {
    case TensorDType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(n) * 4);
      break;
    case TensorDType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t bits;
        std::memcpy(&bits, src + 2 * i, 2);
        dst[i] = BFloat16BitsToFloat(bits);
      }
      break;
    case TensorDType::kF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t bits;
        std::memcpy(&bits, src + 2 * i, 2);
        dst[i] = Float16BitsToFloat(bits);
      }
      break;
    default:
      break;  // rejected before conversion
  }
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) absl::StrAppend(&s, i ? ", " : "", shape[i]);
  return s + "]";
}

absl::StatusOr<std::vector<std::string>> ShardFiles(const std::string& dir) {
  namespace fs = std::filesystem;
  const std::string single = dir + "/model.safetensors";
  const std::string index = dir + "/model.safetensors.index.json";
  if (fs::exists(index)) {
    std::ifstream in(index);
    std::ostringstream text;
    text << in.rdbuf();
    auto j = nlohmann::json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object() || !j.contains("weight_map") ||
        !j["weight_map"].is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(index, ": no weight_map object"));
    }
    std::set<std::string> files;
    for (const auto& [name, file] : j["weight_map"].items()) {
      if (!file.is_string()) {
        return absl::InvalidArgumentError(absl::StrCat(index, ": \"", name, "\" maps to a non-string"));
      }
      const std::string f = file.get<std::string>();
      // Shards live in the model folder: no path separators or parent references.
      if (f.empty() || f.find('/') != std::string::npos || f == "." || f == "..") {
        return absl::InvalidArgumentError(absl::StrCat(index, ": bad shard name \"", f, "\""));
      }
      files.insert(f);
    }
    std::vector<std::string> out;
    for (const auto& f : files) out.push_back(dir + "/" + f);
    if (out.empty()) return absl::InvalidArgumentError(absl::StrCat(index, ": empty weight_map"));
    return out;
  }
  if (fs::exists(single)) return std::vector<std::string>{single};
  return absl::NotFoundError(
      absl::StrCat(dir, ": neither model.safetensors nor model.safetensors.index.json"));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> LoadModel(const std::string& dir,
                                                 const LoadOptions& options) {
  auto model = std::make_unique<Model>();
  FERRY_ASSIGN_OR_RETURN(model->config, LoadModelConfig(dir));
  const ModelConfig& c = model->config;

  FERRY_ASSIGN_OR_RETURN(std::vector<std::string> paths, ShardFiles(dir));
  std::vector<std::unique_ptr<SafetensorsFile>> files;
  std::map<std::string, Source> sources;
  for (const auto& path : paths) {
    FERRY_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(path));
    for (const auto& info : file->tensors()) {
      if (!sources.emplace(info.name, Source{file.get(), &info}).second) {
        return absl::InvalidArgumentError(
            absl::StrCat(dir, ": tensor \"", info.name, "\" appears in more than one shard"));
      }
    }
    files.push_back(std::move(file));
  }

  const int64_t h = c.hidden_size, inter = c.intermediate_size, v = c.vocab_size;
  const int64_t q_out = int64_t{c.num_heads} * c.head_dim;
  const int64_t kv_out = int64_t{c.num_kv_heads} * c.head_dim;
  std::vector<Need> needs;
  needs.push_back({"model.embed_tokens.weight", {v, h}, &model->embed, 0});
  model->layers.resize(c.num_layers);
  for (int l = 0; l < c.num_layers; ++l) {
    LayerWeights& w = model->layers[l];
    const std::string p = absl::StrCat("model.layers.", l, ".");
    needs.push_back({p + "input_layernorm.weight", {h}, &w.input_norm, 0});
    needs.push_back({p + "self_attn.q_proj.weight", {q_out, h}, &w.wqkv, 0});
    needs.push_back({p + "self_attn.k_proj.weight", {kv_out, h}, &w.wqkv, q_out * h});
    needs.push_back({p + "self_attn.v_proj.weight", {kv_out, h}, &w.wqkv, (q_out + kv_out) * h});
    if (c.qkv_bias) {
      needs.push_back({p + "self_attn.q_proj.bias", {q_out}, &w.bqkv, 0});
      needs.push_back({p + "self_attn.k_proj.bias", {kv_out}, &w.bqkv, q_out});
      needs.push_back({p + "self_attn.v_proj.bias", {kv_out}, &w.bqkv, q_out + kv_out});
    }
    needs.push_back({p + "self_attn.o_proj.weight", {h, q_out}, &w.wo, 0});
    if (c.o_bias) needs.push_back({p + "self_attn.o_proj.bias", {h}, &w.bo, 0});
    needs.push_back({p + "post_attention_layernorm.weight", {h}, &w.post_norm, 0});
    needs.push_back({p + "mlp.gate_proj.weight", {inter, h}, &w.w_gate_up, 0});
    needs.push_back({p + "mlp.up_proj.weight", {inter, h}, &w.w_gate_up, inter * h});
    needs.push_back({p + "mlp.down_proj.weight", {h, inter}, &w.w_down, 0});
  }
  needs.push_back({"model.norm.weight", {h}, &model->final_norm, 0});
  if (!c.tie_word_embeddings) needs.push_back({"lm_head.weight", {v, h}, &model->lm_head, 0});

  // Validate everything before allocating.
  std::map<std::vector<float>*, int64_t> sizes;
  std::set<std::string> used;
  int64_t total_bytes = 0;
  int dtype_mismatches = 0;
  for (const Need& need : needs) {
    auto it = sources.find(need.name);
    if (it == sources.end()) {
      return absl::NotFoundError(absl::StrCat(dir, ": missing tensor \"", need.name, "\""));
    }
    const TensorInfo& info = *it->second.info;
    if (info.dtype != TensorDType::kF32 && info.dtype != TensorDType::kF16 &&
        info.dtype != TensorDType::kBF16) {
      return absl::InvalidArgumentError(absl::StrCat(it->second.file->path(), ": tensor \"",
                                                     need.name, "\" has dtype ",
                                                     std::string(TensorDTypeName(info.dtype)),
                                                     "; expected F32, F16 or BF16"));
    }
    if (info.shape != need.shape) {
      return absl::InvalidArgumentError(absl::StrCat(
          it->second.file->path(), ": tensor \"", need.name, "\" has shape ",
          ShapeString(info.shape), " but config.json implies ", ShapeString(need.shape)));
    }
    const TensorDType declared = c.dtype == DType::kFloat32   ? TensorDType::kF32
                                 : c.dtype == DType::kFloat16 ? TensorDType::kF16
                                                              : TensorDType::kBF16;
    if (info.dtype != declared) ++dtype_mismatches;
    int64_t& size = sizes[need.dest];
    size = std::max(size, need.dest_offset + info.num_elements());
    used.insert(need.name);
    total_bytes += static_cast<int64_t>(info.end - info.begin);
  }
  if (dtype_mismatches > 0) {
    // Harmless for loading (everything becomes fp32) but worth knowing: the checkpoint and its
    // config disagree, so the reference implementation may compute in another dtype.
    FERRY_LOG_WARN("model {}: {} tensors are not in config.json's dtype {}", dir, dtype_mismatches,
                   std::string(DTypeName(c.dtype)));
  }
  std::vector<std::string> unused;
  for (const auto& [name, src] : sources) {
    if (!used.count(name)) unused.push_back(name);
  }
  if (!unused.empty()) {
    if (options.strict) {
      return absl::InvalidArgumentError(absl::StrCat(dir, ": ", unused.size(),
                                                     " tensors the model does not use (strict), "
                                                     "first \"", unused[0], "\""));
    }
    for (const auto& name : unused) FERRY_LOG_WARN("model {}: skipping unused tensor {}", dir, name);
  }

  for (auto& [dest, size] : sizes) dest->assign(static_cast<size_t>(size), 0.0f);
  // Conversion runs on every core in slices of 4M elements, so that a multi-gigabyte checkpoint
  // converts about as fast as the page cache delivers it. Progress is per tensor, in order.
  struct Slice {
    const Need* need;
    int64_t first, count;
  };
  constexpr int64_t kSliceElements = int64_t{1} << 22;
  kernels::ThreadPool pool(0);
  int64_t done_bytes = 0;
  int next_tenth = 1;
  std::vector<Slice> slices;
  auto flush = [&]() {
    pool.ParallelFor(static_cast<int64_t>(slices.size()), [&](int64_t i) {
      const Slice& s = slices[i];
      const Source& src = sources.at(s.need->name);
      const int elem = TensorDTypeSize(src.info->dtype);
      ConvertToFloat(src.file->Data(*src.info) + s.first * elem, src.info->dtype, s.count,
                     s.need->dest->data() + s.need->dest_offset + s.first);
    });
    slices.clear();
  };
  for (const Need& need : needs) {
    const Source& src = sources.at(need.name);
    const int64_t n = src.info->num_elements();
    for (int64_t first = 0; first < n; first += kSliceElements) {
      slices.push_back({&need, first, std::min(kSliceElements, n - first)});
    }
    done_bytes += static_cast<int64_t>(src.info->end - src.info->begin);
    if (static_cast<int64_t>(slices.size()) >= 4 * pool.num_threads()) flush();
    if (options.show_progress && total_bytes > 0) {
      while (next_tenth <= 10 && done_bytes * 10 >= total_bytes * next_tenth) {
        flush();
        FERRY_LOG_INFO("model {}: loaded {}% of {:.1f} MB", dir, next_tenth * 10,
                       total_bytes / 1e6);
        ++next_tenth;
      }
    }
  }
  flush();
  return model;
}

}  // namespace ferry::model
