#include "pagedkv/block_tables.h"

#include <algorithm>
#include <unordered_map>

namespace pagedkv {

BlockTables::BlockTables(std::shared_ptr<BlockPool> pool, int32_t block_size)
    : pool_(std::move(pool)), block_size_(block_size) {
  PKV_CHECK(pool_ != nullptr, "pool must not be null");
  PKV_CHECK(block_size > 0, "block_size must be positive, got ", block_size);
}

BlockTables::~BlockTables() {
  for (auto& kv : seqs_) {
    for (int32_t b : kv.second.blocks) pool_->decref(b);
  }
}

BlockTables::Seq& BlockTables::get(int64_t seq) {
  auto it = seqs_.find(seq);
  PKV_CHECK(it != seqs_.end(), "unknown sequence id ", seq);
  return it->second;
}
const BlockTables::Seq& BlockTables::get(int64_t seq) const {
  auto it = seqs_.find(seq);
  PKV_CHECK(it != seqs_.end(), "unknown sequence id ", seq);
  return it->second;
}

int64_t BlockTables::add_sequence() {
  seqs_.emplace(next_id_, Seq{});
  return next_id_++;
}

void BlockTables::free_sequence(int64_t seq) {
  Seq& s = get(seq);
  for (int32_t b : s.blocks) pool_->decref(b);
  seqs_.erase(seq);
}

int64_t BlockTables::fork(int64_t seq) {
  Seq copy = get(seq);
  for (int32_t b : copy.blocks) pool_->incref(b);
  seqs_.emplace(next_id_, std::move(copy));
  return next_id_++;
}

int64_t BlockTables::add_sequence_with_blocks(const std::vector<int32_t>& blocks, int64_t num_tokens) {
  const int64_t n = static_cast<int64_t>(blocks.size());
  PKV_CHECK(num_tokens >= 0 && (num_tokens + block_size_ - 1) / block_size_ == n, "num_tokens=", num_tokens,
            " does not fill ", n, " blocks of ", block_size_, " tokens");
  for (int32_t b : blocks) {
    PKV_CHECK(pool_->refcount(b) > 0, "block ", b, " is not allocated; only held blocks can be attached");
  }
  for (int32_t b : blocks) pool_->incref(b);
  Seq s;
  s.blocks = blocks;
  s.num_tokens = num_tokens;
  seqs_.emplace(next_id_, std::move(s));
  return next_id_++;
}

int64_t BlockTables::num_tokens(int64_t seq) const { return get(seq).num_tokens; }
int64_t BlockTables::start(int64_t seq) const { return get(seq).start; }
const std::vector<int32_t>& BlockTables::blocks(int64_t seq) const { return get(seq).blocks; }
int64_t BlockTables::dropped_blocks(int64_t seq) const { return get(seq).dropped_blocks; }

int64_t BlockTables::blocks_needed(const std::vector<int64_t>& seqs, int64_t n) const {
  PKV_CHECK(n >= 0, "number of tokens to append must be >= 0, got ", n);
  if (n == 0) return 0;
  // Simulate reference drops so two forks sharing one tail block need one copy, not two.
  std::unordered_map<int32_t, int32_t> refs;
  int64_t need = 0;
  for (int64_t id : seqs) {
    const Seq& s = get(id);
    const int64_t have = s.dropped_blocks + static_cast<int64_t>(s.blocks.size());
    const int64_t want = (s.num_tokens + n + block_size_ - 1) / block_size_;
    need += std::max<int64_t>(want - have, 0);
    if (s.num_tokens % block_size_ != 0) {
      const int32_t tail = s.blocks.back();
      auto it = refs.find(tail);
      if (it == refs.end()) it = refs.emplace(tail, pool_->refcount(tail)).first;
      if (it->second > 1) {
        ++need;
        --it->second;
      }
    }
  }
  return need;
}

AppendPlan BlockTables::append(const std::vector<int64_t>& seqs, int64_t n) {
  for (size_t i = 0; i < seqs.size(); ++i) {
    get(seqs[i]);  // validates every id before anything changes
    for (size_t j = 0; j < i; ++j) {
      PKV_CHECK(seqs[i] != seqs[j], "sequence id ", seqs[i], " appears twice in one append");
    }
  }
  const int64_t need = blocks_needed(seqs, n);
  std::vector<int32_t> fresh = pool_->allocate(need);  // throws BudgetError, nothing changed
  size_t next = 0;
  AppendPlan plan;
  plan.slots.resize(seqs.size() * static_cast<size_t>(n));
  for (size_t i = 0; i < seqs.size(); ++i) {
    Seq& s = get(seqs[i]);
    if (n > 0 && s.num_tokens % block_size_ != 0 && pool_->refcount(s.blocks.back()) > 1) {
      const int32_t dst = fresh[next++];
      plan.copies.emplace_back(s.blocks.back(), dst);
      pool_->decref(s.blocks.back());
      s.blocks.back() = dst;
    }
    const int64_t want = (s.num_tokens + n + block_size_ - 1) / block_size_;
    while (s.dropped_blocks + static_cast<int64_t>(s.blocks.size()) < want) {
      s.blocks.push_back(fresh[next++]);
    }
    for (int64_t t = 0; t < n; ++t) {
      const int64_t pos = s.num_tokens + t;
      const int32_t block = s.blocks[pos / block_size_ - s.dropped_blocks];
      plan.slots[i * n + t] = static_cast<int64_t>(block) * block_size_ + pos % block_size_;
    }
    s.num_tokens += n;
  }
  PKV_CHECK(next == fresh.size(), "internal: allocated ", fresh.size(), " blocks, used ", next);
  return plan;
}

void BlockTables::truncate(int64_t seq, int64_t new_len) {
  Seq& s = get(seq);
  // Positions dropped from the front but still inside a kept block remain readable, so a truncate
  // may go back to the first kept block's start.
  const int64_t first_kept = s.dropped_blocks * block_size_;
  PKV_CHECK(new_len >= first_kept && new_len <= s.num_tokens, "cannot truncate sequence ", seq,
            " to ", new_len, " tokens: its kept blocks hold positions [", first_kept, ", ", s.num_tokens, ")");
  s.start = std::min(s.start, new_len);
  const int64_t keep = (new_len + block_size_ - 1) / block_size_ - s.dropped_blocks;
  while (static_cast<int64_t>(s.blocks.size()) > std::max<int64_t>(keep, 0)) {
    pool_->decref(s.blocks.back());
    s.blocks.pop_back();
  }
  s.num_tokens = new_len;
}

void BlockTables::drop_front(int64_t seq, int64_t new_start) {
  Seq& s = get(seq);
  PKV_CHECK(new_start >= s.start && new_start <= s.num_tokens, "cannot drop sequence ", seq,
            " to start at ", new_start, ": it stores positions [", s.start, ", ", s.num_tokens, ")");
  const int64_t drop = new_start / block_size_ - s.dropped_blocks;
  for (int64_t i = 0; i < drop; ++i) pool_->decref(s.blocks[i]);
  s.blocks.erase(s.blocks.begin(), s.blocks.begin() + drop);
  s.dropped_blocks += drop;
  s.start = new_start;
}

void BlockTables::skip_to(int64_t seq, int64_t new_start) {
  Seq& s = get(seq);
  PKV_CHECK(new_start >= s.num_tokens && new_start % block_size_ == 0, "cannot skip sequence ", seq,
            " to position ", new_start, ": it must be a multiple of the block size ", block_size_,
            " at or past the stored end ", s.num_tokens);
  for (int32_t b : s.blocks) pool_->decref(b);
  s.blocks.clear();
  s.dropped_blocks = new_start / block_size_;
  s.start = s.num_tokens = new_start;
}

int64_t BlockTables::max_kept_blocks(const std::vector<int64_t>& seqs) const {
  int64_t m = 0;
  for (int64_t id : seqs) m = std::max<int64_t>(m, static_cast<int64_t>(get(id).blocks.size()));
  return m;
}

void BlockTables::fill_block_table(const std::vector<int64_t>& seqs, int32_t* out,
                                   int64_t max_blocks) const {
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Seq& s = get(seqs[i]);
    PKV_CHECK(static_cast<int64_t>(s.blocks.size()) <= max_blocks, "sequence ", seqs[i], " has ",
              s.blocks.size(), " blocks, more than max_blocks=", max_blocks);
    int32_t* row = out + i * max_blocks;
    std::fill(row, row + max_blocks, -1);
    std::copy(s.blocks.begin(), s.blocks.end(), row);
  }
}

}  // namespace pagedkv
