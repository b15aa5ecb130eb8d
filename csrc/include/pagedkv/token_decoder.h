// pagedkv/token_decoder.h: exact, incremental ids-to-text decoding (torch-free).
//
// TokenPieceTable holds the tokenizer's own vocabulary (token strings as the tokenizer spells them)
// and resolves a token id to the bytes it contributes to decoded text, by the tokenizer family's rule:
//   kByteLevel      GPT-2 / SmolLM2 byte-level BPE: each character stands for one byte
//   kSentencePiece  Llama-style: U+2581 is a space, "<0xNN>" is the byte NN (byte fallback)
// Resolved pieces live in an LRU cache of bounded capacity with hit / miss counters.
//
// IncrementalDecoder turns pushed ids into new text for a batch of sequences: it holds back an
// incomplete UTF-8 sequence at the end, applies SentencePiece's first-space strip to the start of
// the stream, transformers' clean_up_tokenization rules (holding back the few characters a rule
// could still change), and optionally emits whole sentences only. Each push costs O(new tokens).
#pragma once

#include <cstdint>
#include <list>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace pagedkv {

enum class PieceRule : int32_t { kByteLevel = 0, kSentencePiece = 1 };

class TokenPieceTable {
 public:
  // vocab[id] is the token string; special ids are skipped when decoding with skip_special.
  // capacity: resolved pieces kept (0: the whole vocabulary).
  TokenPieceTable(std::vector<std::string> vocab, PieceRule rule, const std::vector<int32_t>& special_ids,
                  size_t capacity);

  // Appends the bytes of token `id` to out; throws Error for an id outside the vocabulary.
  void append_piece(int32_t id, std::string& out);
  bool is_special(int32_t id) const { return special_.count(id) != 0; }
  size_t vocab_size() const { return vocab_.size(); }
  PieceRule rule() const { return rule_; }

  size_t capacity() const { return capacity_; }
  size_t size() const { return lru_.size(); }
  uint64_t hits() const { return hits_; }
  uint64_t misses() const { return misses_; }

  // The resolution rule alone (no cache), for one token string.
  static std::string resolve(const std::string& token, PieceRule rule);

 private:
  std::vector<std::string> vocab_;
  PieceRule rule_;
  std::unordered_set<int32_t> special_;
  size_t capacity_;
  std::list<std::pair<int32_t, std::string>> lru_;  // front: most recent
  std::unordered_map<int32_t, std::list<std::pair<int32_t, std::string>>::iterator> index_;
  uint64_t hits_ = 0, misses_ = 0;
};

struct DecoderOptions {
  bool skip_special = true;
  bool strip_first_space = false;  // SentencePiece's Strip(" ", 1, 0) on the decoded stream
  bool cleanup = false;            // transformers' clean_up_tokenization
  std::string sentence_ends;       // non-empty: emit only through the last of these characters
};

class IncrementalDecoder {
 public:
  IncrementalDecoder(TokenPieceTable* table, DecoderOptions options, size_t num_seqs);

  // New text of every sequence after appending ids[s] to sequence s (ids.size() == num_seqs).
  std::vector<std::string> push(const std::vector<std::vector<int32_t>>& ids);
  // Everything still held back (incomplete UTF-8 becomes U+FFFD); the streams start over.
  std::vector<std::string> flush();
  void reset(size_t num_seqs);
  size_t num_seqs() const { return seqs_.size(); }

 private:
  struct Seq {
    std::string bytes;   // decoded bytes not yet emitted as text (incomplete UTF-8 tail)
    std::string raw;     // text held back for the clean-up rules
    std::string held;    // text held back for sentence mode
    bool started = false;
  };
  std::string advance(Seq& q, bool final);

  TokenPieceTable* table_;
  DecoderOptions opt_;
  std::vector<Seq> seqs_;
};

// UTF-8 helpers (exposed for tests).
// Decodes the longest prefix of `bytes` that is complete (all of it when final), replacing invalid
// sequences by U+FFFD as Python's and Rust's lossy decoders do (one per maximal invalid subpart).
// Returns the text; `consumed` receives the bytes used.
std::string utf8_take(const std::string& bytes, bool final, size_t& consumed);
// transformers' clean_up_tokenization on a whole string.
std::string cleanup_tokenization(const std::string& text);
// Largest cut p <= text.size() such that no clean-up rule can match across p, whatever follows.
size_t cleanup_safe_cut(const std::string& text);

}  // namespace pagedkv
