// CPU append: quantize new tokens and scatter them into their slots.
#include <vector>

#include "kv_cpu.h"

namespace pagedkv {

namespace {

inline void load_row(const void* src, DType dt, int64_t offset, int n, float* out) {
  switch (dt) {
    case DType::kF32: {
      const float* s = static_cast<const float*>(src) + offset;
      for (int i = 0; i < n; ++i) out[i] = s[i];
      return;
    }
    case DType::kBF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
      for (int i = 0; i < n; ++i) out[i] = bf16_to_float(s[i]);
      return;
    }
    case DType::kF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
      for (int i = 0; i < n; ++i) out[i] = fp16_to_float(s[i]);
      return;
    }
  }
}

bool grouped_key(const PageLayout& L) { return is_grouped(L.format) && L.role == Role::kKey; }

}  // namespace

int64_t append_work_items(const AppendParams& p) {
  const PageLayout& L = p.dst.layout;
  const int64_t rows = grouped_key(L) ? p.num_tokens / L.group : p.num_tokens;
  return rows * L.num_kv_heads;
}

void append_validate(const AppendParams& p) {
  const PageLayout& L = p.dst.layout;
  const int64_t num_slots = p.dst.id_space() * L.block_size;
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const int64_t s = p.slot_mapping[t];
    PKV_CHECK(s >= -1 && s < num_slots && (s == -1 || p.dst.has_block(s / L.block_size)),
              "slot_mapping[", t, "]=", s, " is out of range [-1, ", num_slots, ") or in a block the pages do not hold (",
              p.dst.id_space(), " block ids of ", L.block_size, " tokens)");
  }
  if (!grouped_key(L)) return;
  const int G = L.group;
  PKV_CHECK(p.num_tokens % G == 0, "keys in format ", format_name(L.format),
            " are appended in whole groups of ", G, " tokens, got num_tokens=", p.num_tokens);
  for (int64_t t0 = 0; t0 < p.num_tokens; t0 += G) {
    const int64_t s0 = p.slot_mapping[t0];
    for (int64_t j = 1; j < G; ++j) {
      const int64_t s = p.slot_mapping[t0 + j];
      PKV_CHECK(s0 == -1 ? s == -1 : s == s0 + j, "slot_mapping[", t0 + j, "]=", s,
                " breaks the key group starting at token ", t0, " (slot ", s0,
                "): a group's slots must be consecutive in one block, or all -1");
    }
    PKV_CHECK(s0 == -1 || s0 % G == 0, "slot_mapping[", t0, "]=", s0,
              " does not start a key group: it must be a multiple of ", G);
  }
}

void append_cpu(const AppendParams& p, int64_t begin, int64_t end) {
  const PageLayout& L = p.dst.layout;
  const int H = L.num_kv_heads;
  const int D = L.head_dim;
  if (grouped_key(L)) {
    const int G = L.group;
    std::vector<float> buf(static_cast<size_t>(G) * D);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t t0 = (w / H) * G;
      const int64_t h = w % H;
      const int64_t slot = p.slot_mapping[t0];
      if (slot < 0) continue;
      for (int t = 0; t < G; ++t)
        load_row(p.src, p.src_dtype, (t0 + t) * p.token_stride + h * p.head_stride, D, &buf[t * D]);
      encode_key_group(L, p.dst.head_ptr(slot / L.block_size, h), slot % L.block_size, buf.data(), D);
    }
    return;
  }
  std::vector<float> buf(D);
  for (int64_t w = begin; w < end; ++w) {
    const int64_t t = w / H;
    const int64_t h = w % H;
    const int64_t slot = p.slot_mapping[t];
    if (slot < 0) continue;
    load_row(p.src, p.src_dtype, t * p.token_stride + h * p.head_stride, D, buf.data());
    encode_token(L, p.dst.head_ptr(slot / L.block_size, h), slot % L.block_size, buf.data());
  }
}

void copy_blocks_cpu(const PagedView& pages, const int64_t* pairs, int64_t num_pairs) {
  const int64_t n = pages.id_space();
  for (int64_t i = 0; i < num_pairs; ++i) {
    PKV_CHECK(pages.has_block(pairs[2 * i]) && pages.has_block(pairs[2 * i + 1]),
              "block pair ", i, " = (", pairs[2 * i], ", ", pairs[2 * i + 1], ") out of range [0, ", n, ")");
  }
  for (int64_t i = 0; i < num_pairs; ++i) {
    memcpy(pages.head_ptr(pairs[2 * i + 1], 0), pages.head_ptr(pairs[2 * i], 0), pages.layout.block_bytes);
  }
}

}  // namespace pagedkv
