// CPU kernels through raw pointers, against the scalar reference codec.
#include <catch2/catch.hpp>

#include <random>
#include <vector>

#include "kv_cpu.h"

using namespace pagedkv;

namespace {
struct Pages {
  std::vector<std::vector<uint8_t>> chunks;
  std::vector<uint8_t*> ptrs;
  PagedView view;
  Pages(const PageLayout& L, int num_chunks, int bpc) {
    for (int c = 0; c < num_chunks; ++c) chunks.emplace_back(static_cast<size_t>(bpc) * L.block_bytes, 0xff);
    for (auto& c : chunks) ptrs.push_back(c.data());
    view.layout = L;
    view.chunks = ptrs.data();
    view.num_chunks = num_chunks;
    view.blocks_per_chunk = bpc;
  }
};
}  // namespace

TEST_CASE("append then gather reproduces the reference codec for every format") {
  const int H = 2, D = 32, B = 16;
  const Format fmts[] = {Format::kFP32, Format::kBF16, Format::kFP16, Format::kFP8E4M3,
                         Format::kInt8, Format::kInt4,  Format::kInt2, Format::kNF4};
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  for (Format f : fmts) {
    for (Role role : {Role::kKey, Role::kValue}) {
      const int group = is_grouped(f) ? 16 : 1;
      const PageLayout L = make_page_layout(f, role, H, D, B, group);
      Pages pages(L, 2, 3);
      const int T = 32;
      std::vector<float> x(T * H * D);
      for (auto& v : x) v = nd(rng);
      // Tokens go to blocks 4 and 1 (scattered), in order.
      std::vector<int64_t> slots(T);
      for (int t = 0; t < T; ++t) slots[t] = (t < 16 ? 4 : 1) * B + t % 16;
      AppendParams ap;
      ap.src = x.data();
      ap.num_tokens = T;
      ap.token_stride = H * D;
      ap.head_stride = D;
      ap.slot_mapping = slots.data();
      ap.dst = pages.view;
      append_validate(ap);
      append_cpu(ap, 0, append_work_items(ap));

      const int32_t table[2] = {4, 1};
      const int32_t lens[1] = {T - 3};
      const int32_t skip[1] = {3};
      std::vector<float> out(H * (T + 2) * D, -7.0f);
      GatherParams gp;
      gp.src = pages.view;
      gp.block_table = table;
      gp.max_blocks_per_seq = 2;
      gp.seq_lens = lens;
      gp.skip = skip;
      gp.num_seqs = 1;
      gp.out_len = T + 2;
      gp.out = out.data();
      gather_validate(gp);
      gather_cpu(gp, 0, H);

      // Expected: the scalar codec on a private page.
      std::vector<uint8_t> ref(L.block_bytes * 2, 0);
      for (int h = 0; h < H; ++h) {
        for (int b = 0; b < 2; ++b) {
          uint8_t* head = ref.data() + b * L.block_bytes + h * L.head_bytes;
          if (is_grouped(f) && role == Role::kKey) {
            encode_key_group(L, head, 0, &x[(b * 16) * H * D + h * D], H * D);
          } else {
            for (int o = 0; o < 16; ++o) encode_token(L, head, o, &x[((b * 16) + o) * H * D + h * D]);
          }
        }
        for (int t = 0; t < T + 2; ++t) {
          float e[D];
          if (t < T - 3) {
            const int pos = t + 3;
            decode_token(L, ref.data() + (pos / 16) * L.block_bytes + h * L.head_bytes, pos % 16, e);
          } else {
            for (float& v : e) v = 0.0f;
          }
          for (int d = 0; d < D; ++d) REQUIRE(out[(h * (T + 2) + t) * D + d] == e[d]);
        }
      }
    }
  }
}

TEST_CASE("append validation rejects bad slots before writing") {
  const PageLayout L = make_page_layout(Format::kInt4, Role::kKey, 1, 16, 16, 16);
  Pages pages(L, 1, 2);
  std::vector<float> x(16 * 16, 1.0f);
  std::vector<int64_t> slots(16);
  for (int t = 0; t < 16; ++t) slots[t] = 16 + t;
  slots[5] = 30;  // in range, but breaks the group
  AppendParams ap;
  ap.src = x.data();
  ap.num_tokens = 16;
  ap.token_stride = 16;
  ap.head_stride = 16;
  ap.slot_mapping = slots.data();
  ap.dst = pages.view;
  CHECK_THROWS_WITH(append_validate(ap), Catch::Contains("breaks the key group"));
  slots[5] = 21;
  slots[0] = 1000;
  CHECK_THROWS_WITH(append_validate(ap), Catch::Contains("out of range"));
  ap.num_tokens = 8;
  slots[0] = 16;
  CHECK_THROWS_WITH(append_validate(ap), Catch::Contains("whole groups"));
  for (uint8_t v : pages.chunks[0]) REQUIRE(v == 0xff);
}
