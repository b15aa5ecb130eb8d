// Bit-exact reference vectors for the scalar quantizers and the page layouts.
#include <catch2/catch.hpp>

#include <vector>

#include "pagedkv/formats.h"
#include "pagedkv/page_codec.h"
#include "pagedkv/quant_ref.h"

using namespace pagedkv;

TEST_CASE("fp16 conversion rounds to nearest even and handles the edges") {
  CHECK(fp16_from_float(1.0f) == 0x3c00);
  CHECK(fp16_from_float(-2.0f) == 0xc000);
  CHECK(fp16_from_float(65504.0f) == 0x7bff);
  CHECK(fp16_from_float(65519.0f) == 0x7bff);
  CHECK(fp16_from_float(65520.0f) == 0x7c00);  // halfway to 2^16 rounds to inf
  CHECK(fp16_from_float(5.9604644775390625e-08f) == 0x0001);  // smallest subnormal
  CHECK(fp16_from_float(2.98e-08f) == 0x0000);
  CHECK(fp16_from_float(1.0f + 1.0f / 2048) == 0x3c00);  // tie, even mantissa stays
  CHECK(fp16_from_float(1.0f + 3.0f / 2048) == 0x3c02);  // tie, odd mantissa rounds up
  CHECK(fp16_to_float(0x3555) == Approx(0.33325195f).epsilon(0));
  for (uint32_t h = 0; h < 0x7c00; ++h) {  // every finite positive half round-trips
    REQUIRE(fp16_from_float(fp16_to_float(static_cast<uint16_t>(h))) == h);
  }
}

TEST_CASE("bf16 conversion matches round-to-nearest-even") {
  CHECK(bf16_from_float(1.0f) == 0x3f80);
  CHECK(bf16_from_float(bits_float(0x3f808000u)) == 0x3f80);  // tie to even
  CHECK(bf16_from_float(bits_float(0x3f818000u)) == 0x3f82);
  CHECK(bf16_to_float(0xc040) == -3.0f);
}

TEST_CASE("fp8 e4m3 conversion saturates and rounds to nearest even") {
  CHECK(fp8e4m3_from_float(1.0f) == 0x38);
  CHECK(fp8e4m3_from_float(-1.0f) == 0xb8);
  CHECK(fp8e4m3_from_float(448.0f) == 0x7e);
  CHECK(fp8e4m3_from_float(1000.0f) == 0x7e);
  CHECK(fp8e4m3_from_float(0.001953125f) == 0x01);   // 2^-9, smallest subnormal
  CHECK(fp8e4m3_from_float(1.0625f) == 0x38);        // tie between 1 and 1.125 -> even
  CHECK(fp8e4m3_from_float(1.1875f) == 0x3a);        // tie between 1.125 and 1.25 -> even
  for (int c = 0; c < 0x7f; ++c) {
    REQUIRE(fp8e4m3_from_float(fp8e4m3_to_float(static_cast<uint8_t>(c))) == c);
  }
  CHECK(std::isnan(fp8e4m3_to_float(0x7f)));
}

TEST_CASE("int8 codes are symmetric with round-half-even") {
  const float scale = int8_scale(127.0f);
  CHECK(scale == 1.0f);
  CHECK(int8_code(127.0f, scale) == 127);
  CHECK(int8_code(-63.5f, scale) == -64);
  CHECK(int8_code(62.5f, scale) == 62);
  CHECK(int8_code(3.0f, 0.0f) == 0);
}

TEST_CASE("int4 value group: exact codes, packing and metadata") {
  const PageLayout L = make_page_layout(Format::kInt4, Role::kValue, 1, 16, 16, 16);
  std::vector<uint8_t> page(L.block_bytes, 0xff);
  float x[16];
  for (int i = 0; i < 16; ++i) x[i] = static_cast<float>(i);
  encode_token(L, page.data(), 3, x);
  const uint8_t* row = page.data() + 3 * L.code_bytes_per_token;
  for (int i = 0; i < 8; ++i) CHECK(row[i] == static_cast<uint8_t>((2 * i) | ((2 * i + 1) << 4)));
  const ScaleZeroF16* sz = reinterpret_cast<const ScaleZeroF16*>(page.data() + L.code_bytes) + 3;
  CHECK(sz->scale == 0x3c00);  // 1.0
  CHECK(sz->zero == 0x0000);
  float out[16];
  decode_token(L, page.data(), 3, out);
  for (int i = 0; i < 16; ++i) CHECK(out[i] == x[i]);
}

TEST_CASE("int2 key group: per-channel over tokens") {
  const PageLayout L = make_page_layout(Format::kInt2, Role::kKey, 1, 4, 16, 16);
  std::vector<uint8_t> page(L.block_bytes, 0);
  std::vector<float> x(16 * 4);
  for (int t = 0; t < 16; ++t)
    for (int d = 0; d < 4; ++d) x[t * 4 + d] = static_cast<float>((t % 4) * (d + 1));  // channel d: 0..3*(d+1)
  encode_key_group(L, page.data(), 0, x.data(), 4);
  for (int t = 0; t < 16; ++t) {
    CHECK(page[t] == static_cast<uint8_t>((t % 4) * 0x55));  // code t%4 in all four channels
    float out[4];
    decode_token(L, page.data(), t, out);
    for (int d = 0; d < 4; ++d) CHECK(out[d] == x[t * 4 + d]);
  }
}

TEST_CASE("asym_fit: never worse than min/max, exact on the grid, trims a rare extreme") {
  // On the grid: the min/max fit is exact and stays.
  float grid[8] = {0, 1, 2, 3, 3, 2, 1, 0};
  const AsymParams g = asym_fit(grid, 1, 8, 2);
  CHECK(g.scale == 1.0f);
  CHECK(g.zero == 0.0f);
  CHECK(asym_sse(grid, 1, 8, g, 2) == 0.0f);
  // One channel of 32 tokens near 0 plus one extreme: min/max wastes the grid; the fit is better.
  float x[32];
  for (int t = 0; t < 32; ++t) x[t] = 0.1f * static_cast<float>((t * 7) % 11) - 0.5f;
  x[5] = 6.0f;
  const AsymParams mm = asym_params(-0.5f, 6.0f, 2);
  const AsymParams f = asym_fit(x, 1, 32, 2);
  CHECK(asym_sse(x, 1, 32, f, 2) < 0.5f * asym_sse(x, 1, 32, mm, 2));
  // Strided input, constant group (nothing to fit), and 4 bits: never worse than min/max.
  float y[64];
  for (int t = 0; t < 64; ++t) y[t] = (t % 2) ? 1.5f : static_cast<float>(t % 9) * 0.37f - 1.0f;
  for (int bits : {2, 4}) {
    float mn = y[0], mx = y[0];
    for (int t = 0; t < 32; ++t) {
      mn = fminf(mn, y[2 * t]);
      mx = fmaxf(mx, y[2 * t]);
    }
    CHECK(asym_sse(y, 2, 32, asym_fit(y, 2, 32, bits), bits) <= asym_sse(y, 2, 32, asym_params(mn, mx, bits), bits));
    const AsymParams c = asym_fit(y + 1, 2, 32, bits);
    CHECK(asym_sse(y + 1, 2, 32, c, bits) == 0.0f);
  }
}

TEST_CASE("nf4 double-quantized absmax: reference vector") {
  const PageLayout L = make_page_layout(Format::kNF4, Role::kValue, 1, 4, 16, 4);
  std::vector<uint8_t> page(L.block_bytes, 0);
  const float x[4] = {1.0f, -1.0f, 0.0f, 0.5f};
  encode_token(L, page.data(), 0, x);
  CHECK(page[0] == (15 | (0 << 4)));
  CHECK(page[1] == (7 | (12 << 4)));
  const NF4Super s = nf4_super(1.0f);
  CHECK(s.s2_h == fp16_from_float(1.0f / 255.0f));
  CHECK(nf4_absmax_code(1.0f, s.s2) == 255);
  float out[4];
  decode_token(L, page.data(), 0, out);
  CHECK(out[0] == 255.0f * s.s2);
  CHECK(out[2] == 0.0f);
  CHECK(out[3] == nf4_value(12) * (255.0f * s.s2));
}

TEST_CASE("page layouts: exact sizes and validation") {
  const PageLayout bf = make_page_layout(Format::kBF16, Role::kKey, 8, 128, 16, 1);
  CHECK(bf.block_bytes == 8 * 16 * 128 * 2);
  CHECK(bf.bits_per_element() == 16.0);
  const PageLayout i8 = make_page_layout(Format::kInt8, Role::kValue, 8, 128, 16, 1);
  CHECK(i8.head_bytes == 16 * 128 + 16 * 4);
  const PageLayout i4k = make_page_layout(Format::kInt4, Role::kKey, 8, 128, 64, 64);
  CHECK(i4k.bits_per_element() == 4.5);
  const PageLayout i2v = make_page_layout(Format::kInt2, Role::kValue, 8, 128, 64, 32);
  CHECK(i2v.bits_per_element() == 3.0);
  CHECK(make_page_layout(Format::kInt4, Role::kKey, 1, 8, 64, 64).head_bytes % kHeadAlign == 0);
  CHECK_THROWS_AS(make_page_layout(Format::kInt4, Role::kKey, 8, 128, 64, 48), Error);
  CHECK_THROWS_AS(make_page_layout(Format::kInt4, Role::kValue, 8, 100, 64, 64), Error);
  CHECK_THROWS_AS(make_page_layout(Format::kBF16, Role::kKey, 8, 128, 24, 1), Error);
  CHECK_THROWS_WITH(format_from_name("int3"), Catch::Contains("unknown kv format 'int3'"));
  CHECK(std::string(format_name(format_from_name("nf4"))) == "nf4");
}

TEST_CASE("error messages format numbers without std::ostream, as an ostream did") {
  CHECK(detail::concat("n=", 42, ", m=", int64_t{-7}, ", u=", 3u) == "n=42, m=-7, u=3");
  CHECK(detail::concat(0.5f, " ", 1e-7, " ", 123456789.0) == "0.5 1e-07 1.23457e+08");
  CHECK(detail::concat(Format::kInt4, '/', std::string("s"), true) == std::to_string(static_cast<int>(Format::kInt4)) + "/s1");
  bool thrown = false;
  try {
    PKV_CHECK(1 + 1 == 3, "bad value ", 2.25, " at ", 9);
  } catch (const Error& e) {
    thrown = true;
    CHECK(std::string(e.what()).rfind("bad value 2.25 at 9 [", 0) == 0);
  }
  CHECK(thrown);
}
