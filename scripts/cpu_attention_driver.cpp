// Standalone timing driver of the CPU attention kernel (torch-free), for perf / perf annotate and
// for comparing builds (-march=native, haswell, x86-64). Build and run with
// scripts/cpu_attention_driver.sh. Prints the mean time of one attention_cpu call over all work
// items, 1 thread, and the first output element (equal across builds of the same code).
//   usage: cpu_attention_driver FORMAT [ITERS]; env H (KV heads, 3), G (query heads per KV head, 3),
//   D (head_dim, 64), T (tokens, 2048). Defaults: the SmolLM2 shape at a 2k context.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "attention_cpu.h"

using namespace pagedkv;

static int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : fallback;
}

int main(int argc, char** argv) {
  const Format f = format_from_name(argc > 1 ? argv[1] : "int4");
  const int iters = argc > 2 ? std::atoi(argv[2]) : 500;
  const int H = env_int("H", 3), G = env_int("G", 3), D = env_int("D", 64), T = env_int("T", 2048);
  // The cache's defaults: 64-token blocks and key groups for grouped formats (32 for int2 keys),
  // 64-channel value groups, 16-token blocks otherwise.
  const int BS = is_grouped(f) ? 64 : 16;
  const int kgroup = is_grouped(f) ? (f == Format::kInt2 ? 32 : 64) : 1, vgroup = is_grouped(f) ? 64 : 1;
  const PageLayout KL = make_page_layout(f, Role::kKey, H, D, BS, kgroup);
  const PageLayout VL = make_page_layout(f, Role::kValue, H, D, BS, vgroup);
  const int NB = T / BS;
  std::vector<uint8_t> kb(static_cast<size_t>(NB) * KL.block_bytes), vb(static_cast<size_t>(NB) * VL.block_bytes);
  uint8_t* kc[1] = {kb.data()};
  uint8_t* vc[1] = {vb.data()};
  PagedView kv, vv;
  kv.layout = KL;
  kv.chunks = kc;
  kv.num_chunks = 1;
  kv.blocks_per_chunk = NB;
  vv.layout = VL;
  vv.chunks = vc;
  vv.num_chunks = 1;
  vv.blocks_per_chunk = NB;
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  std::vector<float> x(static_cast<size_t>(T) * H * D);
  std::vector<int64_t> slots(T);
  std::vector<int32_t> table(NB);
  for (int b = 0; b < NB; ++b) table[b] = (b * 37) % NB;  // scattered blocks
  for (int t = 0; t < T; ++t) slots[t] = static_cast<int64_t>(table[t / BS]) * BS + t % BS;
  for (PagedView* pv : {&kv, &vv}) {
    for (auto& e : x) e = nd(rng);
    AppendParams ap;
    ap.src = x.data();
    ap.num_tokens = T;
    ap.token_stride = H * D;
    ap.head_stride = D;
    ap.slot_mapping = slots.data();
    ap.dst = *pv;
    append_validate(ap);
    append_cpu(ap, 0, append_work_items(ap));
  }
  std::vector<float> q(H * G * D), out(H * G * D);
  for (auto& e : q) e = nd(rng);
  AttentionParams p;
  p.k = kv;
  p.v = vv;
  p.block_table = table.data();
  p.max_blocks_per_seq = NB;
  const int32_t lens[1] = {T};
  p.seq_lens = lens;
  p.query = q.data();
  p.q_stride[0] = H * G * D;
  p.q_stride[1] = D;
  p.q_stride[2] = D;
  p.out = out.data();
  p.num_seqs = 1;
  p.num_q_heads = H * G;
  p.q_len = 1;
  p.scale = 1.0f / std::sqrt(static_cast<float>(D));
  attention_validate(p);
  attention_plan(p, T, 1, 256);
  for (int i = 0; i < 20; ++i) attention_cpu(p, 0, attention_work_items(p));
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) attention_cpu(p, 0, attention_work_items(p));
  const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / iters;
  std::printf("%s H=%d G=%d D=%d T=%d: %.1f us  out[0]=%.6f\n", argc > 1 ? argv[1] : "int4", H, G, D, T, us, out[0]);
}
