// Exact incremental ids-to-text decoding; see pagedkv/token_decoder.h.
#include "pagedkv/token_decoder.h"

#include <array>

#include "pagedkv/common.h"

namespace pagedkv {
namespace {

// GPT-2's bytes_to_unicode, inverted: code point -> byte (-1: not a byte-level character).
const std::array<int, 512>& byte_level_inverse() {
  static const std::array<int, 512> table = [] {
    std::array<int, 512> t{};
    t.fill(-1);
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool self = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      t[self ? b : 256 + n++] = b;
    }
    return t;
  }();
  return table;
}

// Next code point of a UTF-8 string (the vocabulary is valid UTF-8); advances i.
uint32_t next_code_point(const std::string& s, size_t& i) {
  const auto c = static_cast<unsigned char>(s[i]);
  int len = c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
  if (i + len > s.size()) len = 1;
  uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1Fu) : len == 3 ? (c & 0x0Fu) : (c & 0x07u);
  for (int k = 1; k < len; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3Fu);
  i += len;
  return cp;
}

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

const char kReplacement[] = "\xEF\xBF\xBD";  // U+FFFD

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  std::string out;
  size_t pos = 0;
  for (size_t hit; (hit = s.find(from, pos)) != std::string::npos; pos = hit + from.size()) {
    out.append(s, pos, hit - pos);
    out += to;
  }
  if (pos == 0) return;
  out.append(s, pos, std::string::npos);
  s.swap(out);
}

bool ends_with(const std::string& s, size_t end, const char* suffix, size_t n) {
  return end >= n && s.compare(end - n, n, suffix) == 0;
}

}  // namespace

std::string TokenPieceTable::resolve(const std::string& token, PieceRule rule) {
  std::string out;
  if (rule == PieceRule::kByteLevel) {
    const auto& inv = byte_level_inverse();
    for (size_t i = 0; i < token.size();) {
      const size_t start = i;
      const uint32_t cp = next_code_point(token, i);
      if (cp < inv.size() && inv[cp] >= 0) {
        out.push_back(static_cast<char>(inv[cp]));
      } else {
        out.append(token, start, i - start);  // not a byte-level character: its own UTF-8
      }
    }
    return out;
  }
  if (token.size() == 6 && token[0] == '<' && token[1] == '0' && token[2] == 'x' && token[5] == '>') {
    const int hi = hex_digit(token[3]), lo = hex_digit(token[4]);
    if (hi >= 0 && lo >= 0) return std::string(1, static_cast<char>(hi * 16 + lo));  // byte fallback
  }
  out = token;
  replace_all(out, "\xE2\x96\x81", " ");  // U+2581 -> space
  return out;
}

TokenPieceTable::TokenPieceTable(std::vector<std::string> vocab, PieceRule rule,
                                 const std::vector<int32_t>& special_ids, size_t capacity)
    : vocab_(std::move(vocab)), rule_(rule), special_(special_ids.begin(), special_ids.end()), capacity_(capacity) {
  PKV_CHECK(!vocab_.empty(), "the vocabulary is empty");
  PKV_CHECK(rule == PieceRule::kByteLevel || rule == PieceRule::kSentencePiece, "unknown piece rule ",
            static_cast<int>(rule));
  for (int32_t id : special_ids) {
    PKV_CHECK(id >= 0 && static_cast<size_t>(id) < vocab_.size(), "special id ", id, " is outside the vocabulary of ",
              vocab_.size());
  }
}

void TokenPieceTable::append_piece(int32_t id, std::string& out) {
  PKV_CHECK(id >= 0 && static_cast<size_t>(id) < vocab_.size(), "token id ", id, " is outside the vocabulary [0, ",
            vocab_.size(), ")");
  const auto it = index_.find(id);
  if (it != index_.end()) {
    ++hits_;
    lru_.splice(lru_.begin(), lru_, it->second);
    out += it->second->second;
    return;
  }
  ++misses_;
  if (capacity_ > 0 && lru_.size() >= capacity_) {
    index_.erase(lru_.back().first);
    lru_.pop_back();
  }
  lru_.emplace_front(id, resolve(vocab_[id], rule_));
  index_[id] = lru_.begin();
  out += lru_.front().second;
}

std::string utf8_take(const std::string& b, bool final, size_t& consumed) {
  std::string out;
  size_t i = 0;
  const size_t n = b.size();
  while (i < n) {
    const auto c = static_cast<unsigned char>(b[i]);
    if (c < 0x80) {
      out.push_back(static_cast<char>(c));
      ++i;
      continue;
    }
    int len = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // valid range of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    }
    if (len == 0) {  // a byte that cannot start a sequence
      out += kReplacement;
      ++i;
      continue;
    }
    int k = 1;
    for (; k < len; ++k) {
      if (i + k >= n) break;
      const auto d = static_cast<unsigned char>(b[i + k]);
      const bool ok = k == 1 ? (d >= lo && d <= hi) : (d >= 0x80 && d <= 0xBF);
      if (!ok) break;
    }
    if (k == len) {
      out.append(b, i, len);
      i += len;
    } else if (i + k >= n && !final) {
      break;  // incomplete so far: hold back
    } else {
      out += kReplacement;  // the maximal invalid subpart
      i += k;
    }
  }
  consumed = i;
  return out;
}

std::string cleanup_tokenization(const std::string& text) {
  std::string s = text;
  static const char* const kRules[][2] = {{" .", "."},     {" ?", "?"},     {" !", "!"},     {" ,", ","},
                                          {" ' ", "'"},    {" n't", "n't"}, {" 'm", "'m"},   {" 's", "'s"},
                                          {" 've", "'ve"}, {" 're", "'re"}};
  for (const auto& r : kRules) replace_all(s, r[0], r[1]);
  return s;
}

size_t cleanup_safe_cut(const std::string& s) {
  size_t p = s.size();
  // Unsafe ends: a proper prefix of a rule's pattern (every pattern starts with a space).
  while (p > 0 && (s[p - 1] == ' ' || ends_with(s, p, " '", 2) || ends_with(s, p, " n", 2) ||
                   ends_with(s, p, " n'", 3) || ends_with(s, p, " 'v", 3) || ends_with(s, p, " 'r", 3))) {
    --p;
  }
  return p;
}

IncrementalDecoder::IncrementalDecoder(TokenPieceTable* table, DecoderOptions options, size_t num_seqs)
    : table_(table), opt_(std::move(options)), seqs_(num_seqs) {
  PKV_CHECK(table_ != nullptr, "IncrementalDecoder needs a TokenPieceTable");
  PKV_CHECK(num_seqs > 0, "num_seqs must be positive, got ", num_seqs);
}

void IncrementalDecoder::reset(size_t num_seqs) {
  PKV_CHECK(num_seqs > 0, "num_seqs must be positive, got ", num_seqs);
  seqs_.assign(num_seqs, Seq{});
}

std::string IncrementalDecoder::advance(Seq& q, bool final) {
  size_t used = 0;
  std::string text = utf8_take(q.bytes, final, used);
  q.bytes.erase(0, used);
  if (opt_.cleanup) {
    q.raw += text;
    const size_t cut = final ? q.raw.size() : cleanup_safe_cut(q.raw);
    text = cleanup_tokenization(q.raw.substr(0, cut));
    q.raw.erase(0, cut);
  }
  if (!opt_.sentence_ends.empty()) {
    q.held += text;
    const size_t last = final ? std::string::npos : q.held.find_last_of(opt_.sentence_ends);
    if (final) {
      text.swap(q.held);
      q.held.clear();
    } else if (last == std::string::npos) {
      text.clear();
    } else {
      text = q.held.substr(0, last + 1);
      q.held.erase(0, last + 1);
    }
  }
  return text;
}

std::vector<std::string> IncrementalDecoder::push(const std::vector<std::vector<int32_t>>& ids) {
  PKV_CHECK(ids.size() == seqs_.size(), "push got ids for ", ids.size(), " sequences but the decoder streams ",
            seqs_.size());
  // Validate every id first, so a bad call changes no stream.
  for (size_t s = 0; s < ids.size(); ++s) {
    for (int32_t id : ids[s]) {
      PKV_CHECK(id >= 0 && static_cast<size_t>(id) < table_->vocab_size(), "ids[", s, "] holds token id ", id,
                ", outside the vocabulary [0, ", table_->vocab_size(), ")");
    }
  }
  std::vector<std::string> out(seqs_.size());
  std::string piece;
  for (size_t s = 0; s < ids.size(); ++s) {
    Seq& q = seqs_[s];
    for (int32_t id : ids[s]) {
      if (opt_.skip_special && table_->is_special(id)) continue;
      piece.clear();
      table_->append_piece(id, piece);
      if (!q.started && !piece.empty()) {
        if (opt_.strip_first_space && piece[0] == ' ') piece.erase(0, 1);
        q.started = true;
      }
      q.bytes += piece;
    }
    out[s] = advance(q, false);
  }
  return out;
}

std::vector<std::string> IncrementalDecoder::flush() {
  std::vector<std::string> out(seqs_.size());
  for (size_t s = 0; s < seqs_.size(); ++s) {
    out[s] = advance(seqs_[s], true);
    seqs_[s] = Seq{};
  }
  return out;
}

}  // namespace pagedkv
