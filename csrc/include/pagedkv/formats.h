// pagedkv/formats.h: storage formats and the exact byte layout of one block.
//
// A layer stores keys and values in separate page arrays; each array has its own format. One block
// holds `block_size` consecutive token positions of one sequence, heads-major:
//
//   block = [head 0 region][head 1 region]...[head H-1 region]
//   head region = [codes: block_size x code_bytes_per_token][metadata][pad to 16 bytes]
//
// so one head's tokens are contiguous for SIMD loops and coalesced warp loads.
//
// Quantization units (all metadata is counted in bits_per_element()):
//   fp32/bf16/fp16  passthrough, no metadata.
//   fp8_e4m3, int8  one fp32 scale per (token, head): symmetric absmax.
//   int4, int2      asymmetric, fp16 scale + fp16 zero (the group minimum) per unit:
//                     keys:   per channel over `group` consecutive tokens (KIVI); group | block_size
//                     values: per token over `group` consecutive channels;     group | head_dim
//   nf4             NF4 codebook of absmax-normalized values, same units as int4. The absmax of each
//                   unit is double-quantized: a uint8 code against one fp16 super-scale per
//                   (token, head) for values and per (token group, head) for keys.
#pragma once

#include <cstddef>
#include <cstdint>

#include "pagedkv/common.h"

namespace pagedkv {

enum class Format : int32_t {
  kFP32 = 0,
  kBF16 = 1,
  kFP16 = 2,
  kFP8E4M3 = 3,
  kInt8 = 4,
  kInt4 = 5,
  kInt2 = 6,
  kNF4 = 7,
};
constexpr int kNumFormats = 8;

enum class Role : int32_t { kKey = 0, kValue = 1 };

// Bits of one code in the packed code array.
constexpr int code_bits(Format f) {
  switch (f) {
    case Format::kFP32: return 32;
    case Format::kBF16:
    case Format::kFP16: return 16;
    case Format::kFP8E4M3:
    case Format::kInt8: return 8;
    case Format::kInt4:
    case Format::kNF4: return 4;
    case Format::kInt2: return 2;
  }
  return 0;
}

constexpr bool is_passthrough(Format f) {
  return f == Format::kFP32 || f == Format::kBF16 || f == Format::kFP16;
}
constexpr bool is_per_token_scaled(Format f) {
  return f == Format::kFP8E4M3 || f == Format::kInt8;
}
// int4, int2, nf4: grouped formats. Keys of these formats are quantized per channel over token
// groups, so they are only ever appended in whole, aligned groups of tokens.
constexpr bool is_grouped(Format f) {
  return f == Format::kInt4 || f == Format::kInt2 || f == Format::kNF4;
}

const char* format_name(Format f);
Format format_from_name(const std::string& name);  // throws Error on an unknown name

// Packed metadata records. Their sizes are part of the on-page format.
struct ScaleZeroF16 {  // int4/int2 unit: dequant(q) = q * scale + zero
  uint16_t scale;
  uint16_t zero;
};
static_assert(sizeof(ScaleZeroF16) == 4, "int4/int2 metadata is two fp16 per unit");
static_assert(sizeof(float) == 4, "fp8/int8 scales are fp32");

constexpr int64_t kHeadAlign = 16;  // every head region starts on a 16-byte boundary

// The layout of keys or values of one layer, in one block.
struct PageLayout {
  Format format = Format::kBF16;
  Role role = Role::kKey;
  int32_t num_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t block_size = 0;
  int32_t group = 1;  // tokens per unit (grouped keys), channels per unit (grouped values), else 1

  int64_t code_bytes_per_token = 0;  // one head
  int64_t code_bytes = 0;            // one head, whole block
  int64_t meta_bytes = 0;            // one head, whole block
  int64_t head_bytes = 0;            // code + meta, padded to kHeadAlign
  int64_t block_bytes = 0;           // all heads

  // Units of quantization per head per block, and how many metadata records each unit has.
  int64_t units_per_block() const;
  // Exact storage bits per cached element (codes + metadata + padding) for this block size.
  double bits_per_element() const;
};

// Validates the combination and computes all derived sizes. Throws Error naming the bad field.
PageLayout make_page_layout(Format format, Role role, int32_t num_kv_heads, int32_t head_dim,
                            int32_t block_size, int32_t group);

}  // namespace pagedkv
