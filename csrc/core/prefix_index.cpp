#include "pagedkv/prefix_index.h"

#include <algorithm>
#include <queue>
#include <tuple>

namespace pagedkv {

namespace {

// 64-bit finalizer (splitmix64's): every input bit affects every output bit.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

}  // namespace

EvictionPolicy eviction_policy_from_name(const std::string& name) {
  if (name == "lru") return EvictionPolicy::kLRU;
  if (name == "lfu") return EvictionPolicy::kLFU;
  if (name == "priority") return EvictionPolicy::kPriority;
  throw Error(detail::concat("eviction policy must be 'lru', 'lfu' or 'priority', got '", name, "'"));
}

const char* eviction_policy_name(EvictionPolicy p) {
  switch (p) {
    case EvictionPolicy::kLRU: return "lru";
    case EvictionPolicy::kLFU: return "lfu";
    case EvictionPolicy::kPriority: return "priority";
  }
  return "?";
}

PrefixIndex::PrefixIndex(std::shared_ptr<BlockPool> pool, int32_t block_size, EvictionPolicy policy,
                         double ttl_seconds)
    : pool_(std::move(pool)), block_size_(block_size), policy_(policy), ttl_(ttl_seconds) {
  PKV_CHECK(pool_ != nullptr, "pool must not be null");
  PKV_CHECK(block_size > 0, "block_size must be positive, got ", block_size);
  PKV_CHECK(pool_->reclaimer() == nullptr, "the pool already has a prefix index");
  pool_->set_reclaimer(this);
}

PrefixIndex::~PrefixIndex() {
  pool_->set_reclaimer(nullptr);
  for (auto& kv : entries_) pool_->decref(kv.second.block);
}

uint64_t PrefixIndex::root_hash(uint64_t salt) { return mix64(salt ^ 0x5851f42d4c957f2dULL); }

uint64_t PrefixIndex::chain_hash(uint64_t parent, const int32_t* tokens, int32_t n) {
  uint64_t h = mix64(parent + 0x9e3779b97f4a7c15ULL * static_cast<uint64_t>(n + 1));
  for (int32_t i = 0; i < n; ++i) {
    h = mix64(h ^ (static_cast<uint64_t>(static_cast<uint32_t>(tokens[i])) + 0x632be59bd9b4e019ULL));
  }
  return h;
}

void PrefixIndex::set_now(double now) { now_ = std::max(now_, now); }

bool PrefixIndex::evictable(const Entry& e) const {
  return !e.pinned && e.children == 0 && pool_->refcount(e.block) == 1;
}

bool PrefixIndex::expired(const Entry& e, double now) const { return ttl_ >= 0 && now - e.last_time > ttl_; }

std::vector<int32_t> PrefixIndex::match(const int32_t* tokens, int64_t n, uint64_t salt, double now,
                                        int64_t max_blocks, bool count) {
  PKV_CHECK(n >= 0, "number of tokens must be >= 0, got ", n);
  set_now(now);
  std::vector<int32_t> out;
  int64_t full = n / block_size_;
  if (max_blocks >= 0) full = std::min(full, max_blocks);
  uint64_t h = root_hash(salt);
  const int64_t tick = ++tick_;
  for (int64_t i = 0; i < full; ++i) {
    const int32_t* blk = tokens + i * block_size_;
    const uint64_t next = chain_hash(h, blk, block_size_);
    auto it = entries_.find(next);
    if (it == entries_.end()) break;
    Entry& e = it->second;
    if (e.parent != h || !std::equal(e.tokens.begin(), e.tokens.end(), blk)) break;  // a hash collision
    if (expired(e, now) && pool_->refcount(e.block) == 1) break;  // stale: expire() will drop it
    out.push_back(e.block);
    if (count) {
      e.last_tick = tick;
      e.last_time = now;
      ++e.hits;
    }
    h = next;
  }
  if (count) {
    ++stats_.queries;
    stats_.hit_blocks += static_cast<int64_t>(out.size());
    stats_.miss_blocks += full - static_cast<int64_t>(out.size());
  }
  return out;
}

int64_t PrefixIndex::insert(const int32_t* tokens, int64_t n, const std::vector<int32_t>& blocks, uint64_t salt,
                            double now, int32_t priority, bool pinned) {
  PKV_CHECK(n >= 0, "number of tokens must be >= 0, got ", n);
  set_now(now);
  const int64_t full = std::min<int64_t>(n / block_size_, static_cast<int64_t>(blocks.size()));
  for (int64_t i = 0; i < full; ++i) {
    PKV_CHECK(pool_->refcount(blocks[i]) > 0, "block ", blocks[i], " (position ", i * block_size_,
              ") is not allocated; only blocks a sequence holds can be cached");
  }
  uint64_t h = root_hash(salt);
  const int64_t tick = ++tick_;
  int64_t added = 0;
  for (int64_t i = 0; i < full; ++i) {
    const int32_t* blk = tokens + i * block_size_;
    const uint64_t next = chain_hash(h, blk, block_size_);
    auto it = entries_.find(next);
    if (it != entries_.end()) {
      Entry& e = it->second;
      if (e.parent != h || !std::equal(e.tokens.begin(), e.tokens.end(), blk)) break;  // collision: stop
      e.last_tick = tick;
      e.last_time = now;
      e.priority = std::max(e.priority, priority);
      e.pinned = e.pinned || pinned;
      h = next;
      continue;
    }
    if (by_block_.count(blocks[i])) break;  // this block is cached under another prefix: never alias
    Entry e;
    e.block = blocks[i];
    e.parent = h;
    e.tokens.assign(blk, blk + block_size_);
    e.last_tick = tick;
    e.last_time = now;
    e.priority = priority;
    e.pinned = pinned;
    pool_->incref(e.block);
    if (i > 0) ++entries_.at(h).children;
    by_block_.emplace(e.block, next);
    entries_.emplace(next, std::move(e));
    ++added;
    h = next;
  }
  stats_.inserted += added;
  return added;
}

int64_t PrefixIndex::unpin(const int32_t* tokens, int64_t n, uint64_t salt) {
  uint64_t h = root_hash(salt);
  int64_t count = 0;
  for (int64_t i = 0; i < n / block_size_; ++i) {
    const int32_t* blk = tokens + i * block_size_;
    const uint64_t next = chain_hash(h, blk, block_size_);
    auto it = entries_.find(next);
    if (it == entries_.end() || it->second.parent != h ||
        !std::equal(it->second.tokens.begin(), it->second.tokens.end(), blk)) {
      break;
    }
    count += it->second.pinned ? 1 : 0;
    it->second.pinned = false;
    h = next;
  }
  return count;
}

void PrefixIndex::erase(uint64_t hash) {
  auto it = entries_.find(hash);
  const Entry& e = it->second;
  auto parent = entries_.find(e.parent);
  if (parent != entries_.end()) --parent->second.children;
  by_block_.erase(e.block);
  pool_->decref(e.block);
  entries_.erase(it);
}

int64_t PrefixIndex::evict_impl(int64_t n, double now, bool only_expired) {
  // Order key: expired first, then the policy's key; smaller evicts first.
  using Key = std::tuple<int, int64_t, int64_t, int64_t>;  // (not expired, policy major, last tick, -hash tiebreak)
  auto key_of = [&](const Entry& e, uint64_t hash) -> Key {
    const int fresh = expired(e, now) ? 0 : 1;
    int64_t major = 0;
    if (policy_ == EvictionPolicy::kLFU) major = e.hits;
    if (policy_ == EvictionPolicy::kPriority) major = e.priority;
    return Key{fresh, major, e.last_tick, static_cast<int64_t>(hash >> 1)};
  };
  using Item = std::pair<Key, uint64_t>;
  std::priority_queue<Item, std::vector<Item>, std::greater<Item>> heap;
  for (const auto& kv : entries_) {
    if (evictable(kv.second)) heap.emplace(key_of(kv.second, kv.first), kv.first);
  }
  int64_t done = 0;
  while (done < n && !heap.empty()) {
    const auto [key, hash] = heap.top();
    heap.pop();
    if (only_expired && std::get<0>(key) != 0) break;
    const uint64_t parent = entries_.at(hash).parent;
    erase(hash);
    ++done;
    if (only_expired) {
      ++stats_.expired;
    } else {
      ++stats_.evicted;
    }
    auto p = entries_.find(parent);
    if (p != entries_.end() && evictable(p->second)) heap.emplace(key_of(p->second, parent), parent);
  }
  return done;
}

int64_t PrefixIndex::expire(double now) {
  set_now(now);
  if (ttl_ < 0) return 0;
  return evict_impl(INT64_MAX, now, true);
}

int64_t PrefixIndex::evict(int64_t n, double now) {
  PKV_CHECK(n >= 0, "number of blocks to evict must be >= 0, got ", n);
  set_now(now);
  return evict_impl(n, now, false);
}

int64_t PrefixIndex::clear() {
  int64_t done = 0;
  // Leaves first, repeatedly, so children counts stay exact.
  for (bool progress = true; progress;) {
    progress = false;
    std::vector<uint64_t> leaves;
    for (const auto& kv : entries_) {
      if (kv.second.children == 0 && !kv.second.pinned && pool_->refcount(kv.second.block) == 1) {
        leaves.push_back(kv.first);
      }
    }
    for (uint64_t h : leaves) erase(h);
    done += static_cast<int64_t>(leaves.size());
    progress = !leaves.empty();
  }
  return done;
}

int64_t PrefixIndex::reclaimable() const {
  // Every unreferenced, unpinned entry whose descendants are all unreferenced and unpinned can go
  // (leaves first). Count entries that are not ancestors of a kept entry.
  std::unordered_map<uint64_t, char> kept_ancestor;
  int64_t count = 0;
  for (const auto& kv : entries_) {
    const Entry& e = kv.second;
    if (!e.pinned && pool_->refcount(e.block) == 1) continue;
    // Mark the ancestors of a kept entry as kept.
    for (uint64_t p = e.parent; kept_ancestor.emplace(p, 1).second;) {
      auto it = entries_.find(p);
      if (it == entries_.end()) break;
      p = it->second.parent;
    }
  }
  for (const auto& kv : entries_) {
    const Entry& e = kv.second;
    if (!e.pinned && pool_->refcount(e.block) == 1 && !kept_ancestor.count(kv.first)) ++count;
  }
  return count;
}

int64_t PrefixIndex::reclaim(int64_t n) { return evict_impl(n, now_, false); }

void PrefixIndex::check_invariants() const {
  std::unordered_map<uint64_t, int32_t> children;
  for (const auto& kv : entries_) {
    const Entry& e = kv.second;
    PKV_CHECK(pool_->refcount(e.block) >= 1, "cached block ", e.block, " has no reference");
    auto b = by_block_.find(e.block);
    PKV_CHECK(b != by_block_.end() && b->second == kv.first, "block map out of sync for block ", e.block);
    PKV_CHECK(static_cast<int32_t>(e.tokens.size()) == block_size_, "entry of block ", e.block, " holds ",
              e.tokens.size(), " tokens");
    if (entries_.count(e.parent)) ++children[e.parent];
  }
  PKV_CHECK(by_block_.size() == entries_.size(), "block map has ", by_block_.size(), " entries, index ",
            entries_.size());
  for (const auto& kv : entries_) {
    const int32_t want = children.count(kv.first) ? children.at(kv.first) : 0;
    PKV_CHECK(kv.second.children == want, "entry of block ", kv.second.block, " counts ", kv.second.children,
              " children, has ", want);
  }
}

}  // namespace pagedkv
