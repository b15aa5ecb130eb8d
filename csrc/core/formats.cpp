// Format names and page-layout arithmetic (torch-free).
#include "pagedkv/formats.h"

#include <string>

namespace pagedkv {

namespace {
constexpr const char* kNames[kNumFormats] = {"fp32", "bf16", "fp16", "fp8_e4m3",
                                             "int8", "int4", "int2", "nf4"};
int64_t round_up(int64_t x, int64_t a) { return (x + a - 1) / a * a; }
}  // namespace

const char* format_name(Format f) {
  const int i = static_cast<int>(f);
  PKV_CHECK(i >= 0 && i < kNumFormats, "format must be in [0, ", kNumFormats, "), got ", i);
  return kNames[i];
}

Format format_from_name(const std::string& name) {
  for (int i = 0; i < kNumFormats; ++i) {
    if (name == kNames[i]) return static_cast<Format>(i);
  }
  PKV_CHECK(false, "unknown kv format '", name,
            "'; expected one of fp32, bf16, fp16, fp8_e4m3, int8, int4, int2, nf4");
  return Format::kBF16;
}

int64_t PageLayout::units_per_block() const {
  if (is_passthrough(format)) return 0;
  if (is_per_token_scaled(format)) return block_size;
  if (role == Role::kKey) return static_cast<int64_t>(block_size / group) * head_dim;
  return static_cast<int64_t>(block_size) * (head_dim / group);
}

double PageLayout::bits_per_element() const {
  return 8.0 * static_cast<double>(block_bytes) /
         (static_cast<double>(block_size) * num_kv_heads * head_dim);
}

PageLayout make_page_layout(Format format, Role role, int32_t num_kv_heads, int32_t head_dim,
                            int32_t block_size, int32_t group) {
  const int fi = static_cast<int>(format);
  PKV_CHECK(fi >= 0 && fi < kNumFormats, "format must be in [0, ", kNumFormats, "), got ", fi);
  PKV_CHECK(num_kv_heads > 0, "num_kv_heads must be positive, got ", num_kv_heads);
  PKV_CHECK(head_dim > 0, "head_dim must be positive, got ", head_dim);
  PKV_CHECK(block_size > 0 && block_size % 16 == 0,
            "block_size must be a positive multiple of 16, got ", block_size);

  PageLayout l;
  l.format = format;
  l.role = role;
  l.num_kv_heads = num_kv_heads;
  l.head_dim = head_dim;
  l.block_size = block_size;
  l.group = is_grouped(format) ? group : 1;

  const int bits = code_bits(format);
  PKV_CHECK((static_cast<int64_t>(head_dim) * bits) % 8 == 0, "head_dim=", head_dim,
            " does not pack into whole bytes for format ", format_name(format));
  l.code_bytes_per_token = static_cast<int64_t>(head_dim) * bits / 8;
  l.code_bytes = l.code_bytes_per_token * block_size;

  if (is_grouped(format)) {
    PKV_CHECK(group > 0, "group size must be positive for format ", format_name(format),
              ", got ", group);
    if (role == Role::kKey) {
      PKV_CHECK(block_size % group == 0, "key group size (tokens) must divide block_size: group=",
                group, " block_size=", block_size);
    } else {
      PKV_CHECK(head_dim % group == 0, "value group size (channels) must divide head_dim: group=",
                group, " head_dim=", head_dim);
    }
  }

  const int64_t units = l.units_per_block();
  if (is_passthrough(format)) {
    l.meta_bytes = 0;
  } else if (is_per_token_scaled(format)) {
    l.meta_bytes = units * static_cast<int64_t>(sizeof(float));
  } else if (format == Format::kNF4) {
    // fp16 super-scale per super-unit (token for values, token group for keys) + uint8 absmax codes.
    const int64_t supers = role == Role::kKey ? block_size / group : block_size;
    l.meta_bytes = supers * 2 + units;
  } else {
    l.meta_bytes = units * static_cast<int64_t>(sizeof(ScaleZeroF16));
  }
  l.head_bytes = round_up(l.code_bytes + l.meta_bytes, kHeadAlign);
  l.block_bytes = l.head_bytes * num_kv_heads;
  return l;
}

}  // namespace pagedkv
