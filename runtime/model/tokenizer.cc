#include "runtime/model/tokenizer.h"

#include <algorithm>
#include <climits>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "ferry/status.h"
#include "nlohmann/json.hpp"

namespace ferry::model {
namespace {

using Json = nlohmann::json;

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xc0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  } else {
    out->push_back(static_cast<char>(0xe0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
  }
}

// Length of the UTF-8 sequence starting at s[i] (1 for a stray byte).
size_t Utf8Len(std::string_view s, size_t i) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xe ? 3 : (c >> 3) == 0x1e ? 4 : 1;
  if (i + n > s.size()) return 1;
  for (size_t k = 1; k < n; ++k) {
    if ((static_cast<unsigned char>(s[i + k]) & 0xc0) != 0x80) return 1;
  }
  return n;
}

enum class CharClass { kLetter, kDigit, kSpace, kNewline, kOther };

CharClass Classify(std::string_view s, size_t i) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  if (c >= 0x80) return CharClass::kLetter;  // see the header: an approximation of \p{L}
  if ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') return CharClass::kLetter;
  if (c >= '0' && c <= '9') return CharClass::kDigit;
  if (c == '\r' || c == '\n') return CharClass::kNewline;
  if (c == ' ' || c == '\t' || c == '\v' || c == '\f') return CharClass::kSpace;
  return CharClass::kOther;
}

bool IsSpaceClass(CharClass c) { return c == CharClass::kSpace || c == CharClass::kNewline; }

// Finds the TemplateProcessing's leading special tokens (the BOS) anywhere in the post-processor.
void FindBos(const Json& node, std::vector<int32_t>* bos) {
  if (!node.is_object()) return;
  if (node.value("type", "") == "TemplateProcessing" && node.contains("single") &&
      node["single"].is_array()) {
    for (const Json& item : node["single"]) {
      if (!item.is_object()) break;
      if (item.contains("Sequence")) break;
      if (!item.contains("SpecialToken") || !item["SpecialToken"].is_object()) break;
      const std::string id = item["SpecialToken"].value("id", "");
      const Json& specials = node.value("special_tokens", Json::object());
      if (!specials.is_object() || !specials.contains(id) || !specials[id].is_object()) continue;
      const Json& ids = specials[id].value("ids", Json::array());
      if (!ids.is_array()) continue;
      for (const Json& v : ids) {
        if (v.is_number_integer()) bos->push_back(v.get<int32_t>());
      }
    }
    return;
  }
  if (node.contains("processors") && node["processors"].is_array()) {
    for (const Json& p : node["processors"]) FindBos(p, bos);
  }
}

// Byte-level BPE from tokenizer.json.
class BpeTokenizer : public Tokenizer {
 public:
  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_bos) const override;
  std::string Decode(std::span<const int32_t> ids) const override;

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

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(std::string_view json_text) {
  Json j = Json::parse(json_text.begin(), json_text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError("tokenizer.json: not a JSON object");
  }
  if (!j.contains("model") || !j["model"].is_object()) {
    return absl::InvalidArgumentError("tokenizer.json: no model");
  }
  const Json& model = j["model"];
  if (model.value("type", "BPE") != "BPE") {
    return absl::UnimplementedError(absl::StrCat("tokenizer.json: model type ",
                                                 model.value("type", ""), " is not supported (BPE)"));
  }
  auto tok = std::make_unique<BpeTokenizer>();
  // GPT-2's byte alphabet: printable bytes stand for themselves, the rest shift to 256 and up.
  int shifted = 0;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
    std::string symbol;
    AppendUtf8(printable ? b : 256 + shifted++, &symbol);
    tok->byte_to_symbol_[b] = symbol;
    tok->symbol_to_byte_[symbol] = static_cast<uint8_t>(b);
  }
  if (!model.contains("vocab") || !model["vocab"].is_object()) {
    return absl::InvalidArgumentError("tokenizer.json: model.vocab is not an object");
  }
  auto add_id = [&](const std::string& token, int64_t id, bool added) -> absl::Status {
    if (id < 0 || id > (1 << 24)) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: bad id ", id));
    }
    if (static_cast<size_t>(id) >= tok->id_to_token_.size()) {
      tok->id_to_token_.resize(id + 1);
      tok->id_is_added_.resize(id + 1, false);
    }
    tok->id_to_token_[id] = token;
    if (added) tok->id_is_added_[id] = true;
    return absl::OkStatus();
  };
  for (const auto& [token, id] : model["vocab"].items()) {
    if (!id.is_number_integer()) return absl::InvalidArgumentError("tokenizer.json: bad vocab id");
    tok->vocab_[token] = id.get<int32_t>();
    FERRY_RETURN_IF_ERROR(add_id(token, id.get<int64_t>(), false));
  }
  if (model.contains("merges") && model["merges"].is_array()) {
    int32_t rank = 0;
    for (const Json& m : model["merges"]) {
      std::string key;
      if (m.is_string()) {
        key = m.get<std::string>();  // "left right"
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        key = m[0].get<std::string>() + " " + m[1].get<std::string>();
      } else {
        return absl::InvalidArgumentError("tokenizer.json: a merge is neither \"a b\" nor [a, b]");
      }
      tok->merge_ranks_.emplace(std::move(key), rank++);
    }
  }
  tok->ignore_merges_ = model.value("ignore_merges", false);
  if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
    for (const Json& a : j["added_tokens"]) {
      if (!a.is_object() || !a.contains("id") || !a["id"].is_number_integer() ||
          !a.contains("content") || !a["content"].is_string()) {
        return absl::InvalidArgumentError("tokenizer.json: malformed added token");
      }
      const std::string content = a["content"].get<std::string>();
      if (content.empty()) continue;
      tok->added_.emplace_back(content, a["id"].get<int32_t>());
      FERRY_RETURN_IF_ERROR(add_id(content, a["id"].get<int64_t>(), true));
    }
  }
  std::sort(tok->added_.begin(), tok->added_.end(),
            [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  // Qwen2's pattern takes digits one at a time; Llama 3's up to three.
  const std::string pre = j.contains("pre_tokenizer") ? j["pre_tokenizer"].dump() : "";
  tok->max_digits_ = pre.find("\\\\p{N}{1,3}") != std::string::npos ? 3
                     : pre.find("\\\\p{N}") != std::string::npos ? 1
                                                                 : 3;
  if (j.contains("post_processor")) FindBos(j["post_processor"], &tok->bos_ids_);
  return std::unique_ptr<Tokenizer>(std::move(tok));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::LoadFromDir(const std::string& dir) {
  const std::string path = dir + "/tokenizer.json";
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::ifstream sp(dir + "/tokenizer.model", std::ios::binary);
    if (sp) {
      std::ostringstream bytes;
      bytes << sp.rdbuf();
      auto tok = FromSentencePiece(bytes.str());
      if (!tok.ok()) {
        return absl::Status(tok.status().code(),
                            absl::StrCat(dir, "/tokenizer.model: ", tok.status().message()));
      }
      return tok;
    }
    return absl::NotFoundError(
        absl::StrCat(dir, ": no tokenizer.json or tokenizer.model (use --prompt-ids)"));
  }
  std::ostringstream text;
  text << in.rdbuf();
  auto tok = FromJson(text.str());
  if (!tok.ok()) return absl::Status(tok.status().code(), absl::StrCat(path, ": ", tok.status().message()));
  return tok;
}

void BpeTokenizer::PreTokenize(std::string_view s, std::vector<std::string_view>* pieces) const {
  size_t i = 0;
  const size_t n = s.size();
  auto cls = [&](size_t k) { return Classify(s, k); };
  while (i < n) {
    const size_t start = i;
    // 1. Contractions (case-insensitive): 's 't 're 've 'm 'll 'd.
    if (s[i] == '\'' && i + 1 < n) {
      auto lower = [&](size_t k) { return k < n ? static_cast<char>(s[k] | 0x20) : '\0'; };
      const char a = lower(i + 1), b = lower(i + 2);
      size_t len = 0;
      if ((a == 's' || a == 't' || a == 'm' || a == 'd')) len = 2;
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) len = 3;
      if (len > 0) {
        pieces->push_back(s.substr(start, len));
        i += len;
        continue;
      }
    }
    const CharClass c0 = cls(i);
    // 2. [^\r\n\p{L}\p{N}]?\p{L}+
    {
      size_t j = i;
      if (c0 != CharClass::kLetter && c0 != CharClass::kDigit && c0 != CharClass::kNewline) {
        j += Utf8Len(s, j);
      }
      if (j < n && cls(j) == CharClass::kLetter) {
        while (j < n && cls(j) == CharClass::kLetter) j += Utf8Len(s, j);
        pieces->push_back(s.substr(start, j - start));
        i = j;
        continue;
      }
    }
    // 3. \p{N}{1,max_digits}
    if (c0 == CharClass::kDigit) {
      size_t j = i;
      while (j < n && j - i < static_cast<size_t>(max_digits_) && cls(j) == CharClass::kDigit) ++j;
      pieces->push_back(s.substr(start, j - start));
      i = j;
      continue;
    }
    // 4. " ?[^\s\p{L}\p{N}]+[\r\n]*"
    {
      size_t j = i;
      if (s[j] == ' ') ++j;
      size_t k = j;
      while (k < n && cls(k) == CharClass::kOther) k += Utf8Len(s, k);
      if (k > j) {
        while (k < n && cls(k) == CharClass::kNewline) ++k;
        pieces->push_back(s.substr(start, k - start));
        i = k;
        continue;
      }
    }
    // Whitespace: 5. \s*[\r\n]+  6. \s+(?!\S)  7. \s+
    size_t end = i;
    while (end < n && IsSpaceClass(cls(end))) ++end;
    size_t last_newline = std::string_view::npos;
    for (size_t k = i; k < end; ++k) {
      if (cls(k) == CharClass::kNewline) last_newline = k;
    }
    if (last_newline != std::string_view::npos) {
      // \s*[\r\n]+ is greedy but must end in newlines: it stops after the last newline run.
      pieces->push_back(s.substr(start, last_newline + 1 - start));
      i = last_newline + 1;
      continue;
    }
    if (end < n && end - i > 1) {
      // \s+(?!\S): leave the last space to prefix the next word.
      pieces->push_back(s.substr(start, end - 1 - start));
      i = end - 1;
      continue;
    }
    if (end == i) end = i + Utf8Len(s, i);  // cannot happen for valid classes; stay safe
    pieces->push_back(s.substr(start, end - start));
    i = end;
  }
}

absl::Status BpeTokenizer::EncodePiece(std::string_view piece, std::vector<int32_t>* out) const {
  std::vector<std::string> symbols;
  std::string whole;
  for (unsigned char b : piece) {
    symbols.push_back(byte_to_symbol_[b]);
    whole += byte_to_symbol_[b];
  }
  if (ignore_merges_) {
    auto it = vocab_.find(whole);
    if (it != vocab_.end()) {
      out->push_back(it->second);
      return absl::OkStatus();
    }
  }
  // Merge the lowest-ranked adjacent pair until none is mergeable. Quadratic per piece, which
  // is fine for pieces of words.
  while (symbols.size() > 1) {
    int32_t best_rank = INT32_MAX;
    size_t best = 0;
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      auto it = merge_ranks_.find(symbols[i] + " " + symbols[i + 1]);
      if (it != merge_ranks_.end() && it->second < best_rank) {
        best_rank = it->second;
        best = i;
      }
    }
    if (best_rank == INT32_MAX) break;
    symbols[best] += symbols[best + 1];
    symbols.erase(symbols.begin() + static_cast<std::ptrdiff_t>(best) + 1);
  }
  for (const std::string& sym : symbols) {
    auto it = vocab_.find(sym);
    if (it == vocab_.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tokenizer: symbol \"", sym, "\" is not in the vocabulary"));
    }
    out->push_back(it->second);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> BpeTokenizer::Encode(std::string_view text, bool add_bos) const {
  std::vector<int32_t> ids;
  if (add_bos) ids = bos_ids_;
  std::vector<std::string_view> pieces;
  size_t i = 0, segment = 0;
  auto flush = [&](size_t end) -> absl::Status {
    pieces.clear();
    PreTokenize(text.substr(segment, end - segment), &pieces);
    for (std::string_view piece : pieces) FERRY_RETURN_IF_ERROR(EncodePiece(piece, &ids));
    return absl::OkStatus();
  };
  while (i < text.size()) {
    bool matched = false;
    for (const auto& [content, id] : added_) {
      if (text.compare(i, content.size(), content) == 0) {
        FERRY_RETURN_IF_ERROR(flush(i));
        ids.push_back(id);
        i += content.size();
        segment = i;
        matched = true;
        break;
      }
    }
    if (!matched) ++i;
  }
  FERRY_RETURN_IF_ERROR(flush(text.size()));
  return ids;
}

std::string BpeTokenizer::Decode(std::span<const int32_t> ids) const {
  std::string out;
  for (int32_t id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size()) continue;
    const std::string& token = id_to_token_[id];
    if (id_is_added_[id]) {
      out += token;
      continue;
    }
    for (size_t i = 0; i < token.size();) {
      const size_t len = Utf8Len(token, i);
      auto it = symbol_to_byte_.find(token.substr(i, len));
      if (it != symbol_to_byte_.end()) {
        out.push_back(static_cast<char>(it->second));
      } else {
        out.append(token, i, len);
      }
      i += len;
    }
  }
  return out;
}

}  // namespace ferry::model
