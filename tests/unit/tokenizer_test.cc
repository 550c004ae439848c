// Byte-level BPE on a tokenizer.json this test writes itself: GPT-2's byte alphabet as the base
// vocabulary, a few merges, two added tokens and a Llama 3 style post-processor with a BOS.
#include "runtime/model/tokenizer.h"

#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace ferry::model {
namespace {

std::string Utf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s.push_back(static_cast<char>(cp));
  } else {
    s.push_back(static_cast<char>(0xc0 | (cp >> 6)));
    s.push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  }
  return s;
}

// The byte alphabet, written independently of the tokenizer: printable Latin-1 bytes stand for
// themselves, the 68 others take code points 256.. in byte order.
std::vector<std::string> ByteSymbols() {
  std::vector<std::string> out(256);
  int next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || b >= 0xae;
    out[b] = Utf8(printable ? b : next++);
  }
  return out;
}

std::string MakeTokenizerJson(bool merges_as_pairs) {
  const auto sym = ByteSymbols();
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) vocab[sym[b]] = b;
  const std::string G = sym[' '];  // "Ġ"
  vocab["he"] = 256;
  vocab[G + "t"] = 257;
  vocab[G + "the"] = 258;
  vocab["in"] = 259;
  vocab[G + "in"] = 260;
  std::vector<std::pair<std::string, std::string>> merges = {
      {"h", "e"}, {G, "t"}, {G + "t", "he"}, {"i", "n"}, {G, "in"}};
  nlohmann::json m = nlohmann::json::array();
  for (const auto& [a, b] : merges) {
    if (merges_as_pairs) {
      m.push_back({a, b});
    } else {
      m.push_back(a + " " + b);
    }
  }
  nlohmann::json j;
  j["version"] = "1.0";
  j["added_tokens"] = {{{"id", 300}, {"content", "<|begin_of_text|>"}, {"special", true}},
                       {{"id", 301}, {"content", "<|eot_id|>"}, {"special", true}}};
  j["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers",
       {{{"type", "Split"},
         {"pattern",
          {{"Regex",
            "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
            "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}}},
         {"behavior", "Isolated"}},
        {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  nlohmann::json bos_special = {{"id", "<|begin_of_text|>"}, {"ids", {300}}};
  nlohmann::json template_processing = nlohmann::json::object();
  template_processing["type"] = "TemplateProcessing";
  template_processing["single"] = nlohmann::json::array(
      {nlohmann::json{{"SpecialToken", {{"id", "<|begin_of_text|>"}, {"type_id", 0}}}},
       nlohmann::json{{"Sequence", {{"id", "A"}, {"type_id", 0}}}}});
  template_processing["special_tokens"] = {{"<|begin_of_text|>", bos_special}};
  j["post_processor"] = {{"type", "Sequence"},
                         {"processors", nlohmann::json::array({nlohmann::json{{"type", "ByteLevel"}},
                                                               template_processing})}};
  j["decoder"] = {{"type", "ByteLevel"}};
  j["model"] = {{"type", "BPE"}, {"vocab", vocab}, {"merges", m}, {"ignore_merges", false}};
  return j.dump();
}

TEST(TokenizerTest, AppliesMergesByRank) {
  for (bool pairs : {false, true}) {
    auto tok = Tokenizer::FromJson(MakeTokenizerJson(pairs));
    ASSERT_TRUE(tok.ok()) << tok.status();
    auto ids = (*tok)->Encode("the the in", /*add_bos=*/false);
    ASSERT_TRUE(ids.ok()) << ids.status();
    // "the" -> t + he; " the" -> Ġthe; " in" -> Ġin.
    EXPECT_EQ(*ids, (std::vector<int32_t>{'t', 256, 258, 260}));
  }
}

TEST(TokenizerTest, BosAndAddedTokens) {
  auto tok = Tokenizer::FromJson(MakeTokenizerJson(false));
  ASSERT_TRUE(tok.ok());
  auto ids = (*tok)->Encode("a<|eot_id|>b", /*add_bos=*/true);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(*ids, (std::vector<int32_t>{300, 'a', 301, 'b'}));
  EXPECT_EQ((*tok)->Decode(*ids), "<|begin_of_text|>a<|eot_id|>b");
}

TEST(TokenizerTest, SplitsDigitsInThrees) {
  auto tok = Tokenizer::FromJson(MakeTokenizerJson(false));
  ASSERT_TRUE(tok.ok());
  auto ids = (*tok)->Encode("12345", false);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(ids->size(), 5u);  // no digit merges: one id per byte either way
  EXPECT_EQ((*tok)->Decode(*ids), "12345");
}

TEST(TokenizerTest, RoundTripsArbitraryText) {
  auto tok = Tokenizer::FromJson(MakeTokenizerJson(false));
  ASSERT_TRUE(tok.ok());
  const std::string texts[] = {
      "Hello, world! 12345 67",
      "  leading spaces\n\n\ttabs and\r\nnewlines   \n",
      "it's they'll I'M we'd",
      "\xc3\xbc" "n" "\xc3\xaf" "c" "\xc3\xb6" "d" "\xc3\xa9 \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e \xf0\x9f\x98\x80!",
      std::string("raw bytes \x01\x02\xff\xfe" " end", 18),
      "",
  };
  for (const std::string& text : texts) {
    auto ids = (*tok)->Encode(text, false);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ((*tok)->Decode(*ids), text);
  }
}

TEST(TokenizerTest, RejectsOtherModels) {
  EXPECT_EQ(Tokenizer::FromJson(R"({"model": {"type": "WordPiece", "vocab": {}}})").status().code(),
            absl::StatusCode::kUnimplemented);
  EXPECT_EQ(Tokenizer::FromJson("nope").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ferry::model
