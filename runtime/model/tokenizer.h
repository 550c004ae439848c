// Text <-> token ids for Hugging Face tokenizer.json files with a byte-level BPE model (the
// Llama 3 and Qwen2 family).
//
// Encode: added tokens (special or not) are matched first, longest first, and map to their ids;
// the text between them is split by the pre-tokenizer, each piece's UTF-8 bytes are mapped to
// GPT-2's printable byte alphabet, and BPE merges are applied by rank (with ignore_merges, a piece
// that is itself in the vocabulary is taken whole, as Llama 3 configures). With add_bos, the
// special tokens that the post-processor's TemplateProcessing puts before the text are prepended.
// The pre-tokenizer implements the Llama 3 split pattern (and Qwen2's, which splits digits one
// at a time) by hand: contractions, letter runs with one optional leading non-letter, digit runs,
// punctuation runs, newlines, whitespace. Approximation: every non-ASCII code point counts as a
// letter (\p{L}); non-ASCII digits and spaces are therefore grouped with letters.
// Decode: inverse byte mapping; added tokens are emitted verbatim; invalid UTF-8 is passed through
// as bytes. Unknown ids decode to nothing.
// Errors: INVALID_ARGUMENT naming what is wrong in the file; UNIMPLEMENTED for other models
// (WordPiece, Unigram) and for sentencepiece tokenizer.model files.
// Threads: immutable after load; Encode/Decode may run concurrently.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"

namespace ferry::model {

class Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(std::string_view json_text);
  // Reads <dir>/tokenizer.json; NOT_FOUND when there is none.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> LoadFromDir(const std::string& dir);

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_bos) const;
  std::string Decode(std::span<const int32_t> ids) const;
  int32_t vocab_size() const { return static_cast<int32_t>(id_to_token_.size()); }

 private:
  Tokenizer() = default;
  absl::Status EncodePiece(std::string_view piece, std::vector<int32_t>* out) const;
  void PreTokenize(std::string_view text, std::vector<std::string_view>* pieces) const;

  std::unordered_map<std::string, int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> id_is_added_;
  std::unordered_map<std::string, int32_t> merge_ranks_;  // "left right" -> rank
  std::vector<std::pair<std::string, int32_t>> added_;    // sorted longest first
  std::vector<int32_t> bos_ids_;
  bool ignore_merges_ = false;
  int max_digits_ = 3;
  std::string byte_to_symbol_[256];
  std::unordered_map<std::string, uint8_t> symbol_to_byte_;
};

}  // namespace ferry::model
