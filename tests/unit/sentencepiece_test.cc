// sentencepiece BPE (tokenizer.model) on a ModelProto this test serialises itself.
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "runtime/model/tokenizer.h"

namespace ferry::model {
namespace {

void Varint(uint64_t v, std::string* out) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>(v | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}
void Tag(int field, int wire, std::string* out) { Varint((uint64_t(field) << 3) | wire, out); }
void Bytes(int field, const std::string& b, std::string* out) {
  Tag(field, 2, out);
  Varint(b.size(), out);
  *out += b;
}
void Int(int field, uint64_t v, std::string* out) {
  Tag(field, 0, out);
  Varint(v, out);
}

std::string Piece(const std::string& text, float score, int type) {
  std::string p;
  Bytes(1, text, &p);
  Tag(2, 5, &p);
  char f[4];
  std::memcpy(f, &score, 4);
  p.append(f, 4);
  Int(3, type, &p);
  return p;
}

const std::string kU = "\xe2\x96\x81";  // ▁

std::string MakeModel(bool bpe) {
  std::string m;
  Bytes(1, Piece("<unk>", 0, 2), &m);
  Bytes(1, Piece("<s>", 0, 3), &m);
  Bytes(1, Piece("</s>", 0, 3), &m);
  for (int b = 0; b < 256; ++b) Bytes(1, Piece(absl::StrFormat("<0x%02X>", b), 0, 6), &m);
  const std::vector<std::pair<std::string, float>> normal = {
      {kU, -0.5f},        {"h", -0.6f},           {"e", -0.7f},       {"l", -0.8f},
      {"o", -0.9f},       {"w", -1.0f},           {"r", -1.1f},       {"d", -1.2f},
      {kU + "h", -1.0f},  {"he", -5.0f},          {"ll", -2.0f},      {kU + "he", -3.0f},
      {"llo", -4.0f},     {kU + "hello", -6.0f},  {kU + "w", -1.5f},  {"or", -2.5f},
      {kU + "wor", -3.5f}, {"ld", -2.6f},         {kU + "world", -7.0f}};
  for (const auto& [text, score] : normal) Bytes(1, Piece(text, score, 1), &m);
  std::string trainer;
  if (bpe) Int(3, 2, &trainer);
  Int(35, 1, &trainer);  // byte_fallback
  Int(40, 0, &trainer);  // unk_id
  Bytes(2, trainer, &m);
  std::string normalizer;
  Int(3, 1, &normalizer);  // add_dummy_prefix
  Int(4, 0, &normalizer);  // remove_extra_whitespaces off, as Llama 2
  Bytes(3, normalizer, &m);
  return m;
}

int32_t IdOf(const std::string& text) {
  // Ids follow MakeModel's order: 3 specials, 256 bytes, then the normal pieces.
  const std::vector<std::string> normal = {kU, "h", "e", "l", "o", "w", "r", "d", kU + "h", "he",
                                           "ll", kU + "he", "llo", kU + "hello", kU + "w", "or",
                                           kU + "wor", "ld", kU + "world"};
  for (size_t i = 0; i < normal.size(); ++i) {
    if (normal[i] == text) return static_cast<int32_t>(259 + i);
  }
  return -1;
}

TEST(SentencePieceTest, MergesByScoreWithBosAndByteFallback) {
  auto tok = Tokenizer::FromSentencePiece(MakeModel(true));
  ASSERT_TRUE(tok.ok()) << tok.status();
  auto ids = (*tok)->Encode("hello world", /*add_bos=*/true);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(*ids, (std::vector<int32_t>{1, IdOf(kU + "hello"), IdOf(kU + "world")}));
  EXPECT_EQ((*tok)->Decode(*ids), "hello world");

  ids = (*tok)->Encode("h\xc3\xa9!", false);
  ASSERT_TRUE(ids.ok());
  EXPECT_EQ(*ids, (std::vector<int32_t>{IdOf(kU + "h"), 3 + 0xc3, 3 + 0xa9, 3 + '!'}));
  EXPECT_EQ((*tok)->Decode(*ids), "h\xc3\xa9!");
}

TEST(SentencePieceTest, RoundTripsText) {
  auto tok = Tokenizer::FromSentencePiece(MakeModel(true));
  ASSERT_TRUE(tok.ok());
  for (const std::string text : {"hello  world", "held low", "x y\nz \xe6\x97\xa5"}) {
    auto ids = (*tok)->Encode(text, false);
    ASSERT_TRUE(ids.ok());
    EXPECT_EQ((*tok)->Decode(*ids), text);
  }
}

TEST(SentencePieceTest, RejectsUnigramAndTruncatedFiles) {
  EXPECT_EQ(Tokenizer::FromSentencePiece(MakeModel(false)).status().code(),
            absl::StatusCode::kUnimplemented);
  const std::string m = MakeModel(true);
  EXPECT_EQ(Tokenizer::FromSentencePiece(m.substr(0, m.size() / 2 + 3)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ferry::model
