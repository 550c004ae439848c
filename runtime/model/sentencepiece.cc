// Tokenizer::FromSentencePiece: a sentencepiece BPE tokenizer.model read with a minimal protobuf
// wire-format reader (fields Ferry needs; unknown fields skipped). See tokenizer.h for the
// contract.
#include <algorithm>
#include <cstring>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "ferry/status.h"
#include "runtime/model/tokenizer.h"

namespace ferry::model {
namespace {

// Protobuf field numbers (sentencepiece_model.proto).
constexpr int kModelPieces = 1, kModelTrainerSpec = 2, kModelNormalizerSpec = 3;
constexpr int kPieceText = 1, kPieceScore = 2, kPieceType = 3;
constexpr int kTrainerModelType = 3, kTrainerByteFallback = 35, kTrainerUnkId = 40;
constexpr int kNormalizerAddDummyPrefix = 3, kNormalizerRemoveExtraWhitespaces = 4;
constexpr int kTypeNormal = 1, kTypeUnknown = 2, kTypeControl = 3, kTypeUnused = 5, kTypeByte = 6;
constexpr int kModelTypeBpe = 2;

const char kSpace[] = "\xe2\x96\x81";  // U+2581, sentencepiece's visible space

class WireReader {
 public:
  explicit WireReader(std::string_view bytes) : p_(bytes.data()), end_(bytes.data() + bytes.size()) {}
  bool done() const { return p_ >= end_; }
  absl::Status Varint(uint64_t* out) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p_ >= end_) return absl::InvalidArgumentError("truncated varint");
      const uint8_t b = static_cast<uint8_t>(*p_++);
      v |= uint64_t{b & 0x7fu} << shift;
      if ((b & 0x80) == 0) {
        *out = v;
        return absl::OkStatus();
      }
    }
    return absl::InvalidArgumentError("varint longer than 10 bytes");
  }
  // Reads one field: its number, wire type, and (for length-delimited) its bytes or (varint,
  // fixed) its value.
  absl::Status Field(int* number, int* wire, uint64_t* value, std::string_view* bytes) {
    uint64_t tag = 0;
    FERRY_RETURN_IF_ERROR(Varint(&tag));
    *number = static_cast<int>(tag >> 3);
    *wire = static_cast<int>(tag & 7);
    switch (*wire) {
      case 0:
        return Varint(value);
      case 1:
      case 5: {
        const size_t n = *wire == 1 ? 8 : 4;
        if (static_cast<size_t>(end_ - p_) < n) return absl::InvalidArgumentError("truncated fixed field");
        *value = 0;
        std::memcpy(value, p_, n);  // little-endian host
        p_ += n;
        return absl::OkStatus();
      }
      case 2: {
        uint64_t len = 0;
        FERRY_RETURN_IF_ERROR(Varint(&len));
        if (len > static_cast<uint64_t>(end_ - p_)) {
          return absl::InvalidArgumentError("length-delimited field runs past the end");
        }
        *bytes = std::string_view(p_, len);
        p_ += len;
        return absl::OkStatus();
      }
      default:
        return absl::InvalidArgumentError(absl::StrCat("unsupported wire type ", *wire));
    }
  }

 private:
  const char* p_;
  const char* end_;
};

size_t Utf8Length(std::string_view s, size_t i) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 1;
  return i + n > s.size() ? 1 : n;
}

class SentencePieceTokenizer : public Tokenizer {
 public:
  struct Piece {
    std::string text;
    float score = 0;
    int type = kTypeNormal;
  };

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_bos) const override {
    std::vector<int32_t> ids;
    if (add_bos && bos_id_ >= 0) ids.push_back(bos_id_);
    std::string normalized;
    if (add_dummy_prefix_ && !text.empty()) normalized += kSpace;
    bool previous_space = add_dummy_prefix_;
    for (char ch : text) {
      if (ch == ' ') {
        if (remove_extra_whitespaces_ && previous_space) continue;
        normalized += kSpace;
        previous_space = true;
      } else {
        normalized.push_back(ch);
        previous_space = false;
      }
    }
    std::vector<std::string> symbols;
    for (size_t i = 0; i < normalized.size();) {
      const size_t n = Utf8Length(normalized, i);
      symbols.push_back(normalized.substr(i, n));
      i += n;
    }
    // Merge the adjacent pair whose union is the best-scoring piece, leftmost on ties.
    while (symbols.size() > 1) {
      float best_score = 0;
      size_t best = symbols.size();
      for (size_t i = 0; i + 1 < symbols.size(); ++i) {
        auto it = mergeable_.find(symbols[i] + symbols[i + 1]);
        if (it == mergeable_.end()) continue;
        const float score = pieces_[it->second].score;
        if (best == symbols.size() || score > best_score) {
          best_score = score;
          best = i;
        }
      }
      if (best == symbols.size()) break;
      symbols[best] += symbols[best + 1];
      symbols.erase(symbols.begin() + static_cast<std::ptrdiff_t>(best) + 1);
    }
    for (const std::string& sym : symbols) {
      auto it = ids_.find(sym);
      if (it != ids_.end()) {
        ids.push_back(it->second);
        continue;
      }
      if (byte_fallback_) {
        bool all = true;
        for (unsigned char b : sym) all &= byte_ids_[b] >= 0;
        if (all) {
          for (unsigned char b : sym) ids.push_back(byte_ids_[b]);
          continue;
        }
      }
      ids.push_back(unk_id_);
    }
    return ids;
  }

  std::string Decode(std::span<const int32_t> ids) const override {
    std::string out;
    bool first = true;
    for (int32_t id : ids) {
      if (id < 0 || static_cast<size_t>(id) >= pieces_.size()) continue;
      const Piece& p = pieces_[id];
      if (p.type == kTypeControl || p.type == kTypeUnused) continue;
      if (p.type == kTypeByte) {
        out.push_back(static_cast<char>(std::strtol(p.text.c_str() + 3, nullptr, 16)));
      } else if (p.type == kTypeUnknown) {
        out += " \xe2\x81\x87 ";  // sentencepiece's rendering of <unk>
      } else {
        std::string text;
        for (size_t i = 0; i < p.text.size();) {
          if (p.text.compare(i, 3, kSpace) == 0) {
            text.push_back(' ');
            i += 3;
          } else {
            text.push_back(p.text[i++]);
          }
        }
        // The dummy prefix's space is not part of the text.
        const size_t skip = first && add_dummy_prefix_ && !text.empty() && text[0] == ' ' ? 1 : 0;
        out.append(text, skip, std::string::npos);
      }
      first = false;
    }
    return out;
  }

  std::vector<Piece> pieces_;
  std::unordered_map<std::string, int32_t> ids_;        // normal and user-defined pieces
  std::unordered_map<std::string, int32_t> mergeable_;  // normal pieces of two or more symbols
  int32_t byte_ids_[256];
  int32_t unk_id_ = 0;
  int32_t bos_id_ = -1;
  bool byte_fallback_ = false;
  bool add_dummy_prefix_ = true;
  bool remove_extra_whitespaces_ = true;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromSentencePiece(std::string_view bytes) {
  auto tok = std::make_unique<SentencePieceTokenizer>();
  std::fill(std::begin(tok->byte_ids_), std::end(tok->byte_ids_), -1);
  int model_type = 1;  // proto default: unigram
  WireReader model(bytes);
  while (!model.done()) {
    int number, wire;
    uint64_t value = 0;
    std::string_view sub;
    FERRY_RETURN_IF_ERROR(model.Field(&number, &wire, &value, &sub));
    if (wire != 2) continue;
    WireReader r(sub);
    if (number == kModelPieces) {
      SentencePieceTokenizer::Piece piece;
      while (!r.done()) {
        int n, w;
        uint64_t v = 0;
        std::string_view b;
        FERRY_RETURN_IF_ERROR(r.Field(&n, &w, &v, &b));
        if (n == kPieceText && w == 2) piece.text = std::string(b);
        if (n == kPieceScore && w == 5) {
          const uint32_t bits = static_cast<uint32_t>(v);
          std::memcpy(&piece.score, &bits, 4);
        }
        if (n == kPieceType && w == 0) piece.type = static_cast<int>(v);
      }
      tok->pieces_.push_back(std::move(piece));
    } else if (number == kModelTrainerSpec || number == kModelNormalizerSpec) {
      while (!r.done()) {
        int n, w;
        uint64_t v = 0;
        std::string_view b;
        FERRY_RETURN_IF_ERROR(r.Field(&n, &w, &v, &b));
        if (w != 0) continue;
        if (number == kModelTrainerSpec) {
          if (n == kTrainerModelType) model_type = static_cast<int>(v);
          if (n == kTrainerByteFallback) tok->byte_fallback_ = v != 0;
          if (n == kTrainerUnkId) tok->unk_id_ = static_cast<int32_t>(v);
        } else {
          if (n == kNormalizerAddDummyPrefix) tok->add_dummy_prefix_ = v != 0;
          if (n == kNormalizerRemoveExtraWhitespaces) tok->remove_extra_whitespaces_ = v != 0;
        }
      }
    }
  }
  if (model_type != kModelTypeBpe) {
    return absl::UnimplementedError(
        absl::StrCat("sentencepiece model type ", model_type, " is not supported (BPE only)"));
  }
  if (tok->pieces_.empty()) return absl::InvalidArgumentError("sentencepiece model has no pieces");
  for (size_t i = 0; i < tok->pieces_.size(); ++i) {
    const auto& p = tok->pieces_[i];
    const int32_t id = static_cast<int32_t>(i);
    if (p.type == kTypeByte) {
      unsigned int b = 0;
      if (p.text.size() == 6 && std::sscanf(p.text.c_str(), "<0x%02X>", &b) == 1 && b < 256) {
        tok->byte_ids_[b] = id;
      }
      continue;
    }
    if (p.type == kTypeControl && p.text == "<s>") tok->bos_id_ = id;
    if (p.type == kTypeControl || p.type == kTypeUnused || p.type == kTypeUnknown) continue;
    tok->ids_.emplace(p.text, id);
    if (p.type == kTypeNormal && Utf8Length(p.text, 0) < p.text.size()) {
      tok->mergeable_.emplace(p.text, id);
    }
  }
  if (tok->unk_id_ < 0 || static_cast<size_t>(tok->unk_id_) >= tok->pieces_.size()) {
    return absl::InvalidArgumentError("sentencepiece unk_id is out of range");
  }
  return std::unique_ptr<Tokenizer>(std::move(tok));
}

}  // namespace ferry::model
