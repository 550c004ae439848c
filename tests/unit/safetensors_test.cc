// safetensors validation (a table of corrupt headers) and checkpoint loading errors, plus the
// make-tiny round trip and sharded checkpoints.
#include "runtime/model/safetensors.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "runtime/model/checkpoint.h"
#include "runtime/model/tiny_checkpoint.h"

namespace ferry::model {
namespace {

std::vector<uint8_t> FileBytes(const std::string& header, size_t data_bytes,
                               int64_t declared_len = -1) {
  std::vector<uint8_t> out(8);
  const uint64_t len = declared_len >= 0 ? static_cast<uint64_t>(declared_len) : header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(len >> (8 * i));
  out.insert(out.end(), header.begin(), header.end());
  out.resize(out.size() + data_bytes, 0);
  return out;
}

TEST(SafetensorsHeaderTest, ParsesAValidHeader) {
  const auto bytes = FileBytes(
      R"({"__metadata__": {"format": "pt"}, "b": {"dtype": "BF16", "shape": [2, 3],
          "data_offsets": [16, 28]}, "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
          "empty": {"dtype": "F16", "shape": [0, 5], "data_offsets": [28, 28]}})",
      28);
  auto tensors = ParseSafetensorsHeader(bytes.data(), bytes.size(), "t");
  ASSERT_TRUE(tensors.ok()) << tensors.status();
  ASSERT_EQ(tensors->size(), 3u);
  EXPECT_EQ((*tensors)[0].name, "a");
  EXPECT_EQ((*tensors)[1].shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ((*tensors)[1].dtype, TensorDType::kBF16);
}

TEST(SafetensorsHeaderTest, RejectsCorruptHeaders) {
  struct Case {
    const char* what;
    std::vector<uint8_t> bytes;
    const char* needle;
  };
  const std::string ok_entry = R"("a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})";
  const Case cases[] = {
      {"shorter than the prefix", {1, 2, 3}, "shorter"},
      {"header past the end", FileBytes("{}", 0, 1000), "runs past the end"},
      {"header over the limit", FileBytes("{}", 0, 200'000'000), "exceeds the limit"},
      {"not json", FileBytes("{nope", 0), "not valid JSON"},
      {"not an object", FileBytes("[1, 2]", 0), "not a JSON object"},
      {"entry not an object", FileBytes(R"({"a": 3})", 0), "entry is not an object"},
      {"unknown dtype",
       FileBytes(R"({"a": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 2]}})", 2),
       "unknown dtype"},
      {"missing dtype", FileBytes(R"({"a": {"shape": [2], "data_offsets": [0, 8]}})", 8),
       "dtype missing"},
      {"negative dim",
       FileBytes(R"({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})", 8),
       "negative"},
      {"shape overflow",
       FileBytes(R"({"a": {"dtype": "F32", "shape": [4294967296, 4294967296, 4294967296],
                 "data_offsets": [0, 8]}})", 8),
       "overflows"},
      {"offsets not a pair",
       FileBytes(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}})", 8),
       "data_offsets"},
      {"offsets reversed",
       FileBytes(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}})", 8),
       "end before"},
      {"offsets past the end", FileBytes("{" + ok_entry + "}", 4), "run past the data section"},
      {"size mismatch",
       FileBytes(R"({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", 8),
       "need 12"},
      {"overlap",
       FileBytes("{" + ok_entry +
                     R"(, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                 12),
       "overlap"},
      {"bad metadata", FileBytes(R"({"__metadata__": 5})", 0), "__metadata__"},
  };
  for (const Case& c : cases) {
    auto parsed = ParseSafetensorsHeader(c.bytes.data(), c.bytes.size(), "corrupt.safetensors");
    ASSERT_FALSE(parsed.ok()) << c.what;
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument) << c.what;
    EXPECT_NE(parsed.status().message().find(c.needle), std::string::npos)
        << c.what << ": " << parsed.status();
    EXPECT_NE(parsed.status().message().find("corrupt.safetensors"), std::string::npos);
  }
}

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "/ferry_ckpt_" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(dir_);
    TinyCheckpointOptions o;
    o.out_dir = dir_;
    o.num_layers = 2;
    o.hidden_size = 128;
    o.num_heads = 2;
    o.num_kv_heads = 1;
    o.vocab_size = 64;
    o.dtype = DType::kFloat16;
    ASSERT_TRUE(WriteTinyCheckpoint(o).ok());
    std::ifstream in(dir_ + "/model.safetensors", std::ios::binary);
    bytes_.assign(std::istreambuf_iterator<char>(in), {});
    uint64_t len = 0;
    for (int i = 7; i >= 0; --i) len = (len << 8) | static_cast<uint8_t>(bytes_[i]);
    header_ = nlohmann::json::parse(bytes_.begin() + 8, bytes_.begin() + 8 + len);
    data_.assign(bytes_.begin() + 8 + len, bytes_.end());
  }

  // Rewrites model.safetensors with a modified header and the original data section.
  void Rewrite(const nlohmann::json& header, size_t data_bytes) {
    std::string text = header.dump();
    std::ofstream out(dir_ + "/model.safetensors", std::ios::binary | std::ios::trunc);
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(uint64_t{text.size()} >> (8 * i));
    out.write(reinterpret_cast<const char*>(len), 8);
    out.write(text.data(), text.size());
    out.write(data_.data(), std::min(data_bytes, data_.size()));
  }

  void ExpectLoadError(absl::StatusCode code, const std::string& needle, bool strict = false) {
    LoadOptions options;
    options.strict = strict;
    auto model = LoadModel(dir_, options);
    ASSERT_FALSE(model.ok()) << needle;
    EXPECT_EQ(model.status().code(), code) << model.status();
    EXPECT_NE(model.status().message().find(needle), std::string::npos) << model.status();
  }

  std::string dir_;
  std::string bytes_;
  nlohmann::json header_;
  std::string data_;
};

TEST_F(CheckpointTest, MakeTinyRoundTrips) {
  auto model = LoadModel(dir_);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->config.hidden_size, 128);
  EXPECT_EQ((*model)->embed.size(), 64u * 128u);
  // fp16 values survive exactly: compare a weight against the file's own bits.
  const auto& info = header_["model.layers.1.mlp.down_proj.weight"];
  const uint64_t begin = info["data_offsets"][0];
  uint16_t bits;
  std::memcpy(&bits, data_.data() + begin + 2 * 5, 2);
  EXPECT_EQ((*model)->layers[1].w_down[5], Float16BitsToFloat(bits));
  // Deterministic: the same options write the same bytes.
  TinyCheckpointOptions o;
  o.out_dir = dir_ + "_again";
  o.num_layers = 2;
  o.hidden_size = 128;
  o.num_heads = 2;
  o.num_kv_heads = 1;
  o.vocab_size = 64;
  o.dtype = DType::kFloat16;
  ASSERT_TRUE(WriteTinyCheckpoint(o).ok());
  std::ifstream again(o.out_dir + "/model.safetensors", std::ios::binary);
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(again), {}), bytes_);
}

TEST_F(CheckpointTest, TruncatedFile) {
  std::filesystem::resize_file(dir_ + "/model.safetensors", bytes_.size() - 100);
  ExpectLoadError(absl::StatusCode::kInvalidArgument, "run past the data section");
}

TEST_F(CheckpointTest, OffsetsPastTheEnd) {
  header_["model.norm.weight"]["data_offsets"][1] = data_.size() + 2;
  header_["model.norm.weight"]["data_offsets"][0] = data_.size() + 2 - 256;
  Rewrite(header_, data_.size());
  ExpectLoadError(absl::StatusCode::kInvalidArgument, "run past the data section");
}

TEST_F(CheckpointTest, OverlappingTensors) {
  header_["model.norm.weight"]["data_offsets"] = header_["lm_head.weight"]["data_offsets"];
  header_["model.norm.weight"]["data_offsets"][1] =
      header_["model.norm.weight"]["data_offsets"][0].get<uint64_t>() + 256;
  Rewrite(header_, data_.size());
  ExpectLoadError(absl::StatusCode::kInvalidArgument, "overlap");
}

TEST_F(CheckpointTest, WrongShape) {
  header_["model.norm.weight"]["shape"] = {2, 64};
  Rewrite(header_, data_.size());
  ExpectLoadError(absl::StatusCode::kInvalidArgument, "config.json implies [128]");
}

TEST_F(CheckpointTest, UnknownDtype) {
  header_["model.norm.weight"]["dtype"] = "F4";
  Rewrite(header_, data_.size());
  ExpectLoadError(absl::StatusCode::kInvalidArgument, "unknown dtype");
}

TEST_F(CheckpointTest, NonFloatDtype) {
  header_["model.norm.weight"]["dtype"] = "I16";
  Rewrite(header_, data_.size());
  ExpectLoadError(absl::StatusCode::kInvalidArgument, "expected F32, F16 or BF16");
}

TEST_F(CheckpointTest, MissingTensor) {
  header_.erase("model.layers.1.self_attn.k_proj.weight");
  Rewrite(header_, data_.size());
  ExpectLoadError(absl::StatusCode::kNotFound, "model.layers.1.self_attn.k_proj.weight");
}

TEST_F(CheckpointTest, UnusedTensorSkippedOrRefusedWhenStrict) {
  header_["model.layers.0.self_attn.rotary_emb.inv_freq"] = {
      {"dtype", "F32"}, {"shape", {0}}, {"data_offsets", {0, 0}}};
  Rewrite(header_, data_.size());
  EXPECT_TRUE(LoadModel(dir_).ok());
  ExpectLoadError(absl::StatusCode::kInvalidArgument, "rotary_emb.inv_freq", /*strict=*/true);
}

TEST_F(CheckpointTest, ShardedWithIndex) {
  // Split: the embedding in one shard, everything else in another.
  nlohmann::json first = {{"model.embed_tokens.weight", header_["model.embed_tokens.weight"]}};
  const uint64_t b = first["model.embed_tokens.weight"]["data_offsets"][0];
  const uint64_t e = first["model.embed_tokens.weight"]["data_offsets"][1];
  std::vector<TensorToWrite> shard1, shard2;
  nlohmann::json index = {{"metadata", nlohmann::json::object()}, {"weight_map", {}}};
  for (auto& [name, info] : header_.items()) {
    if (name == "__metadata__") continue;
    TensorToWrite t;
    t.name = name;
    t.dtype = TensorDType::kF16;
    t.shape = info["shape"].get<std::vector<int64_t>>();
    const uint64_t tb = info["data_offsets"][0], te = info["data_offsets"][1];
    t.bytes.assign(data_.begin() + tb, data_.begin() + te);
    const bool in_first = tb == b && te == e;
    index["weight_map"][name] = in_first ? "model-00001-of-00002.safetensors"
                                         : "model-00002-of-00002.safetensors";
    (in_first ? shard1 : shard2).push_back(std::move(t));
  }
  auto reference = LoadModel(dir_);
  ASSERT_TRUE(reference.ok());
  std::filesystem::remove(dir_ + "/model.safetensors");
  ASSERT_TRUE(WriteSafetensors(dir_ + "/model-00001-of-00002.safetensors", shard1).ok());
  ASSERT_TRUE(WriteSafetensors(dir_ + "/model-00002-of-00002.safetensors", shard2).ok());
  std::ofstream(dir_ + "/model.safetensors.index.json") << index.dump();
  auto sharded = LoadModel(dir_);
  ASSERT_TRUE(sharded.ok()) << sharded.status();
  EXPECT_EQ((*sharded)->embed, (*reference)->embed);
  EXPECT_EQ((*sharded)->layers[1].wqkv, (*reference)->layers[1].wqkv);
  // A shard that escapes the folder is refused.
  index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors";
  std::ofstream(dir_ + "/model.safetensors.index.json", std::ios::trunc) << index.dump();
  ExpectLoadError(absl::StatusCode::kInvalidArgument, "bad shard name");
}

TEST_F(CheckpointTest, MissingFolderContents) {
  std::filesystem::remove(dir_ + "/model.safetensors");
  ExpectLoadError(absl::StatusCode::kNotFound, "model.safetensors");
  std::filesystem::remove(dir_ + "/config.json");
  ExpectLoadError(absl::StatusCode::kNotFound, "config.json");
}

}  // namespace
}  // namespace ferry::model
