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
// (WordPiece, Unigram).
// Threads: immutable after load; Encode/Decode may run concurrently.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace ferry::model {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // tokenizer.json (byte-level BPE).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(std::string_view json_text);
  // A sentencepiece tokenizer.model (serialised ModelProto) of BPE type, as Llama 2 and Mistral
  // ship: spaces become U+2581, a dummy prefix is added when the normaliser says so, pieces merge
  // by highest score (leftmost on ties), unknown characters fall back to <0xXX> byte pieces when
  // the model has them (else the unk id). Unigram models are UNIMPLEMENTED.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromSentencePiece(std::string_view model_bytes);
  // Reads <dir>/tokenizer.json, else <dir>/tokenizer.model; NOT_FOUND when neither is there.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> LoadFromDir(const std::string& dir);

  virtual absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                                      bool add_bos) const = 0;
  virtual std::string Decode(std::span<const int32_t> ids) const = 0;
};

}  // namespace ferry::model
