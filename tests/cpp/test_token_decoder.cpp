// Token-piece table, LRU cache and incremental decoder (torch-free core).
#include <catch2/catch.hpp>

#include <random>

#include "pagedkv/common.h"
#include "pagedkv/token_decoder.h"

using namespace pagedkv;

namespace {
std::string stream(IncrementalDecoder& d, const std::vector<int32_t>& ids, size_t chunk) {
  std::string out;
  for (size_t i = 0; i < ids.size(); i += chunk) {
    std::vector<int32_t> part(ids.begin() + i, ids.begin() + std::min(ids.size(), i + chunk));
    out += d.push({part})[0];
  }
  return out + d.flush()[0];
}
}  // namespace

TEST_CASE("UTF-8 hold-back emits a character only once it is complete") {
  // "€" is E2 82 AC, split over three byte-fallback tokens.
  TokenPieceTable t({"a", "<0xE2>", "<0x82>", "<0xAC>", "<0xFF>"}, PieceRule::kSentencePiece, {}, 0);
  IncrementalDecoder d(&t, DecoderOptions{}, 1);
  CHECK(d.push({{0, 1}})[0] == "a");
  CHECK(d.push({{2}})[0].empty());
  CHECK(d.push({{3}})[0] == "\xE2\x82\xAC");
  // An invalid byte and an incomplete tail become U+FFFD (at flush for the tail).
  CHECK(d.push({{4, 1}})[0] == "\xEF\xBF\xBD");
  CHECK(d.flush()[0] == "\xEF\xBF\xBD");

  size_t used = 0;
  CHECK(utf8_take("ab\xF0\x9F\x98", false, used) == "ab");
  CHECK(used == 2);
  CHECK(utf8_take("\xF0\x9F\x98\x80", false, used) == "\xF0\x9F\x98\x80");
  CHECK(utf8_take("\xE2\x82" "x", false, used) == "\xEF\xBF\xBDx");  // maximal subpart, then 'x'
  CHECK(utf8_take("\xED\xA0\x80", true, used) == "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate: 3 subparts
}

TEST_CASE("LRU cache keeps at most `capacity` pieces and counts hits and misses") {
  TokenPieceTable t({"a", "b", "c", "d"}, PieceRule::kByteLevel, {}, 2);
  std::string s;
  t.append_piece(0, s);
  t.append_piece(1, s);
  t.append_piece(0, s);  // hit; 1 is now least recent
  t.append_piece(2, s);  // evicts 1
  CHECK(t.size() == 2);
  CHECK(t.hits() == 1);
  CHECK(t.misses() == 3);
  t.append_piece(1, s);  // miss again (was evicted)
  CHECK(t.misses() == 4);
  t.append_piece(2, s);  // still cached
  CHECK(t.hits() == 2);
  CHECK(s == "abacbc");
  CHECK_THROWS_AS(t.append_piece(4, s), Error);
  CHECK_THROWS_AS(t.append_piece(-1, s), Error);
}

TEST_CASE("SentencePiece: U+2581 is a space, byte fallback, first space of the stream stripped once") {
  const std::string sp = "\xE2\x96\x81";
  TokenPieceTable t({"<s>", sp + "Hello", sp + "world", "<0x20>", "!"}, PieceRule::kSentencePiece, {0}, 0);
  DecoderOptions o;
  o.strip_first_space = true;
  IncrementalDecoder d(&t, o, 1);
  CHECK(stream(d, {0, 1, 2, 4}, 1) == "Hello world!");
  CHECK(stream(d, {3, 1}, 2) == " Hello");  // the byte-fallback space is the stripped one
  o.skip_special = false;
  IncrementalDecoder keep(&t, o, 1);
  CHECK(stream(keep, {0, 1, 2}, 1) == "<s> Hello world");  // "<s>" comes first: nothing stripped
  CHECK(TokenPieceTable::resolve("<0x0A>", PieceRule::kSentencePiece) == "\n");
}

TEST_CASE("Byte-level BPE maps GPT-2's byte alphabet back to bytes") {
  // U+0120 stands for the space byte, U+010A for newline; printable ASCII is itself.
  CHECK(TokenPieceTable::resolve("\xC4\xA0world", PieceRule::kByteLevel) == " world");
  CHECK(TokenPieceTable::resolve("\xC4\x8A", PieceRule::kByteLevel) == "\n");
  // "é" is bytes C3 A9, spelled as the characters U+00C3 U+00A9 in byte-level vocabularies.
  CHECK(TokenPieceTable::resolve("\xC3\x83\xC2\xA9", PieceRule::kByteLevel) == "\xC3\xA9");
}

TEST_CASE("Clean-up rules streamed through any cut equal the rules on the whole text") {
  CHECK(cleanup_tokenization("a , b . it 's I 'm we 've they 're don n't ' x") ==
        "a, b. it's I'm we've they're donn't'x");  // as transformers' chained str.replace
  std::mt19937 rng(7);
  const std::string alphabet = " .,?!'nmsvtrex";
  std::vector<std::string> vocab;
  for (char c : alphabet) vocab.emplace_back(1, c);
  TokenPieceTable t(vocab, PieceRule::kByteLevel, {}, 0);
  DecoderOptions o;
  o.cleanup = true;
  IncrementalDecoder d(&t, o, 1);
  for (int trial = 0; trial < 2000; ++trial) {
    std::vector<int32_t> ids(1 + rng() % 30);
    std::string whole;
    for (auto& id : ids) {
      id = static_cast<int32_t>(rng() % vocab.size());
      whole += vocab[id];
    }
    REQUIRE(stream(d, ids, 1 + rng() % 4) == cleanup_tokenization(whole));
  }
}

TEST_CASE("Sentence mode emits through the last sentence end") {
  TokenPieceTable t({"Hi", ".", " there", "!", " more"}, PieceRule::kByteLevel, {}, 0);
  DecoderOptions o;
  o.sentence_ends = ".!?\n";
  IncrementalDecoder d(&t, o, 2);
  auto out = d.push({{0}, {0, 1}});
  CHECK(out[0].empty());
  CHECK(out[1] == "Hi.");
  out = d.push({{1, 2, 3, 4}, {2}});
  CHECK(out[0] == "Hi. there!");
  CHECK(out[1].empty());
  out = d.flush();
  CHECK(out[0] == " more");
  CHECK(out[1] == " there");
  CHECK_THROWS_AS(d.push({{0}}), Error);  // one row for two sequences
}
