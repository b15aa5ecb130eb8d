// pagedkv/prefix_index.h: prefix caching over one BlockPool: chained block hashes, eviction (torch-free).
//
// A full block holding tokens [i * block_size, (i + 1) * block_size) of a sequence is identified by
//   hash_i = chain(hash_{i-1}, tokens of block i, salt),  hash_{-1} = a fixed root.
// Equal hashes mean equal token prefixes (the entry also keeps its tokens and parent hash, and a
// lookup compares them, so a 64-bit collision can never share the wrong block).
//
// The index holds one pool reference on every cached block. A block whose only reference is the
// index is "unreferenced": it stays cached until the pool needs room, then the eviction policy picks
// it. Blocks referenced by a sequence are never evicted. Eviction takes leaves first (a block no other
// cached block continues), so every cached chain stays reachable from its root.
//
// Time: LRU and LFU order by a logical access counter (exact, no clock ties). TTL compares the
// caller's clock (seconds, any epoch) passed to every call that can expire entries, so tests inject
// a clock. The index registers itself as the pool's reclaimer: BlockPool::allocate evicts through it
// only when it cannot grow, and an allocation that eviction cannot satisfy evicts nothing.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "pagedkv/block_pool.h"

namespace pagedkv {

enum class EvictionPolicy : int32_t {
  kLRU = 0,       // least recently used first
  kLFU = 1,       // fewest hits first, then least recently used
  kPriority = 2,  // lowest priority first (pinned > recent > old), then least recently used
};
EvictionPolicy eviction_policy_from_name(const std::string& name);
const char* eviction_policy_name(EvictionPolicy p);

struct PrefixStats {
  int64_t queries = 0;      // match() calls that counted
  int64_t hit_blocks = 0;   // full blocks found cached
  int64_t miss_blocks = 0;  // full blocks looked up and not found
  int64_t inserted = 0;     // blocks registered
  int64_t evicted = 0;      // blocks evicted to make room (policy)
  int64_t expired = 0;      // blocks dropped by TTL
};

class PrefixIndex : public BlockReclaimer {
 public:
  // ttl_seconds < 0: entries never expire.
  PrefixIndex(std::shared_ptr<BlockPool> pool, int32_t block_size, EvictionPolicy policy = EvictionPolicy::kLRU,
              double ttl_seconds = -1.0);
  ~PrefixIndex() override;
  PrefixIndex(const PrefixIndex&) = delete;
  PrefixIndex& operator=(const PrefixIndex&) = delete;

  static uint64_t root_hash(uint64_t salt);
  static uint64_t chain_hash(uint64_t parent, const int32_t* tokens, int32_t n);

  // Blocks of the longest cached prefix of tokens[0, n), whole blocks only, at most max_blocks
  // (-1: no cap). Matched entries count as accessed at `now`; no references are taken.
  std::vector<int32_t> match(const int32_t* tokens, int64_t n, uint64_t salt, double now, int64_t max_blocks = -1,
                             bool count = true);
  // Registers blocks[i] as holding tokens [i * block_size, (i + 1) * block_size) for every full
  // block i < min(n / block_size, blocks.size()). A prefix already cached keeps its block (the
  // caller's duplicate is not registered) and the chain continues from it. Returns the number of
  // newly registered blocks. priority is used by the priority policy; pinned blocks are never evicted.
  int64_t insert(const int32_t* tokens, int64_t n, const std::vector<int32_t>& blocks, uint64_t salt, double now,
                 int32_t priority = 0, bool pinned = false);
  // Unpins the cached blocks of a prefix; returns how many were pinned.
  int64_t unpin(const int32_t* tokens, int64_t n, uint64_t salt);

  // Drops expired unreferenced entries (TTL); returns how many.
  int64_t expire(double now);
  // Evicts up to n unreferenced blocks by policy (expired ones first); returns how many.
  int64_t evict(int64_t n, double now);
  // Drops every unreferenced, unpinned entry (referenced ones stay); returns how many.
  int64_t clear();

  // BlockReclaimer (called by the pool when it cannot grow): evicts by policy at the last known time.
  int64_t reclaimable() const override;
  int64_t reclaim(int64_t n) override;

  int64_t size() const { return static_cast<int64_t>(entries_.size()); }
  bool contains_block(int32_t block) const { return by_block_.count(block) != 0; }
  const PrefixStats& stats() const { return stats_; }
  void reset_stats() { stats_ = PrefixStats{}; }
  EvictionPolicy policy() const { return policy_; }
  void set_policy(EvictionPolicy p) { policy_ = p; }
  double ttl_seconds() const { return ttl_; }
  void set_ttl_seconds(double ttl) { ttl_ = ttl; }
  int32_t block_size() const { return block_size_; }
  // Latest time seen by any call (used by reclaim()).
  double now() const { return now_; }
  void set_now(double now);

  // Invariant check for tests: children counts, references, block map. Throws Error on a violation.
  void check_invariants() const;

 private:
  struct Entry {
    int32_t block;
    uint64_t parent;
    std::vector<int32_t> tokens;
    int32_t children = 0;   // cached entries whose parent is this one
    int64_t last_tick = 0;  // logical access time
    int64_t hits = 0;
    double last_time = 0;   // caller's clock at the last access
    int32_t priority = 0;
    bool pinned = false;
  };
  bool evictable(const Entry& e) const;
  bool expired(const Entry& e, double now) const;
  void erase(uint64_t hash);
  int64_t evict_impl(int64_t n, double now, bool only_expired);

  std::shared_ptr<BlockPool> pool_;
  int32_t block_size_;
  EvictionPolicy policy_;
  double ttl_;
  double now_ = 0;
  int64_t tick_ = 0;
  std::unordered_map<uint64_t, Entry> entries_;
  std::unordered_map<int32_t, uint64_t> by_block_;
  PrefixStats stats_;
};

}  // namespace pagedkv
