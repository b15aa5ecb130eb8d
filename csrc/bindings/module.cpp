// PYBIND11_MODULE(_C): the host objects (budget, pool, block tables) and format descriptors.
// Importing pagedkv._C loads the one shared library, which also runs the TORCH_LIBRARY initializers
// of csrc/torch. No math here: these are thin wrappers over the torch-free core.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "pagedkv/block_tables.h"
#include "pagedkv/formats.h"
#include "pagedkv/prefix_index.h"
#include "pagedkv/token_decoder.h"

namespace py = pybind11;
using namespace pagedkv;

namespace {

std::vector<int64_t> to_ids(const py::object& seqs) {
  return py::cast<std::vector<int64_t>>(seqs);
}

using TokenArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

const int32_t* token_data(const TokenArray& tokens) {
  PKV_CHECK(tokens.ndim() == 1, "token ids must be 1-D, got ", tokens.ndim(), " dimensions");
  return tokens.data();
}

py::dict layout_dict(const PageLayout& l) {
  py::dict d;
  d["format"] = format_name(l.format);
  d["role"] = l.role == Role::kKey ? "key" : "value";
  d["num_kv_heads"] = l.num_kv_heads;
  d["head_dim"] = l.head_dim;
  d["block_size"] = l.block_size;
  d["group"] = l.group;
  d["code_bytes_per_token"] = l.code_bytes_per_token;
  d["meta_bytes"] = l.meta_bytes;
  d["head_bytes"] = l.head_bytes;
  d["block_bytes"] = l.block_bytes;
  d["bits_per_element"] = l.bits_per_element();
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pagedkv C++ core: block pool, block tables, page layouts (the tensor ops live in torch.ops.pagedkv)";

  // One translator, BudgetError first: it derives from Error, which maps to ValueError.
  PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<py::object> budget_exc;
  budget_exc.call_once_and_store_result(
      [&]() { return py::exception<BudgetError>(m, "BudgetExhaustedError", PyExc_MemoryError); });
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const BudgetError& e) {
      py::set_error(budget_exc.get_stored(), e.what());
    } catch (const Error& e) {
      py::set_error(PyExc_ValueError, e.what());
    }
  });

  m.def("format_id", [](const std::string& name) { return static_cast<int>(format_from_name(name)); },
        py::arg("name"));
  m.def("format_name", [](int f) { return std::string(format_name(static_cast<Format>(f))); }, py::arg("format"));
  m.def(
      "page_layout",
      [](int format, int role, int num_kv_heads, int head_dim, int block_size, int group) {
        PKV_CHECK(role == 0 || role == 1, "role must be 0 (key) or 1 (value), got ", role);
        return layout_dict(make_page_layout(static_cast<Format>(format), static_cast<Role>(role), num_kv_heads,
                                            head_dim, block_size, group));
      },
      py::arg("format"), py::arg("role"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("block_size"),
      py::arg("group"));

  py::class_<MemoryBudget, std::shared_ptr<MemoryBudget>>(m, "MemoryBudget")
      .def(py::init<int64_t>(), py::arg("limit_bytes") = -1)
      .def_property("limit_bytes", &MemoryBudget::limit_bytes, &MemoryBudget::set_limit_bytes)
      .def_property_readonly("reserved_bytes", &MemoryBudget::reserved_bytes)
      .def_property_readonly("available_bytes", &MemoryBudget::available_bytes);

  py::class_<BlockPool, std::shared_ptr<BlockPool>>(m, "BlockPool")
      .def(py::init<int64_t, int32_t, int64_t, std::shared_ptr<MemoryBudget>>(), py::arg("bytes_per_block"),
           py::arg("blocks_per_chunk"), py::arg("max_blocks") = -1, py::arg("budget") = nullptr)
      .def("allocate", &BlockPool::allocate, py::arg("n"))
      .def("can_allocate", &BlockPool::can_allocate, py::arg("n"))
      .def("incref", &BlockPool::incref, py::arg("block"))
      .def("decref", &BlockPool::decref, py::arg("block"))
      .def("refcount", &BlockPool::refcount, py::arg("block"))
      .def("chunk_blocks", &BlockPool::chunk_blocks, py::arg("chunk"))
      .def("check_invariants", &BlockPool::check_invariants)
      .def_property_readonly("capacity", &BlockPool::capacity)
      .def_property_readonly("num_free", &BlockPool::num_free)
      .def_property_readonly("num_used", &BlockPool::num_used)
      .def_property_readonly("num_chunks", &BlockPool::num_chunks)
      .def_property_readonly("id_space", &BlockPool::id_space)
      .def_property_readonly("blocks_per_chunk", &BlockPool::blocks_per_chunk)
      .def_property_readonly("bytes_per_block", &BlockPool::bytes_per_block)
      .def_property_readonly("reserved_bytes", &BlockPool::reserved_bytes)
      .def_property("max_blocks", &BlockPool::max_blocks, &BlockPool::set_max_blocks);

  py::class_<BlockTables, std::shared_ptr<BlockTables>>(m, "BlockTables")
      .def(py::init<std::shared_ptr<BlockPool>, int32_t>(), py::arg("pool"), py::arg("block_size"))
      .def("add_sequence", &BlockTables::add_sequence)
      .def("add_sequences", [](BlockTables& t, int64_t n) {
        std::vector<int64_t> ids(n);
        for (auto& id : ids) id = t.add_sequence();
        return ids;
      }, py::arg("n"))
      .def("free_sequence", &BlockTables::free_sequence, py::arg("seq"))
      .def("free_sequences", [](BlockTables& t, const py::object& seqs) {
        for (int64_t s : to_ids(seqs)) t.free_sequence(s);
      }, py::arg("seqs"))
      .def("fork", &BlockTables::fork, py::arg("seq"))
      .def("add_sequence_with_blocks", &BlockTables::add_sequence_with_blocks, py::arg("blocks"),
           py::arg("num_tokens"))
      .def("fork_many", [](BlockTables& t, const py::object& seqs) {
        const auto ids = to_ids(seqs);
        for (int64_t s : ids) PKV_CHECK(t.has_sequence(s), "unknown sequence id ", s);
        std::vector<int64_t> out;
        out.reserve(ids.size());
        for (int64_t s : ids) out.push_back(t.fork(s));
        return out;
      }, py::arg("seqs"))
      .def("has_sequence", &BlockTables::has_sequence, py::arg("seq"))
      .def_property_readonly("num_sequences", &BlockTables::num_sequences)
      .def("num_tokens", &BlockTables::num_tokens, py::arg("seq"))
      .def("start", &BlockTables::start, py::arg("seq"))
      .def("blocks", &BlockTables::blocks, py::arg("seq"))
      .def("dropped_blocks", &BlockTables::dropped_blocks, py::arg("seq"))
      .def("blocks_needed", [](const BlockTables& t, const py::object& seqs, int64_t n) {
        return t.blocks_needed(to_ids(seqs), n);
      }, py::arg("seqs"), py::arg("n"))
      .def("append", [](BlockTables& t, const py::object& seqs, int64_t n) {
        const auto ids = to_ids(seqs);
        AppendPlan plan;
        {
          py::gil_scoped_release nogil;
          plan = t.append(ids, n);
        }
        py::array_t<int64_t> slots(static_cast<py::ssize_t>(plan.slots.size()));
        std::copy(plan.slots.begin(), plan.slots.end(), slots.mutable_data());
        py::array_t<int64_t> copies({static_cast<py::ssize_t>(plan.copies.size()), py::ssize_t{2}});
        auto c = copies.mutable_unchecked<2>();
        for (size_t i = 0; i < plan.copies.size(); ++i) {
          c(i, 0) = plan.copies[i].first;
          c(i, 1) = plan.copies[i].second;
        }
        return py::make_tuple(slots, copies);
      }, py::arg("seqs"), py::arg("n"),
      "Reserve the next n positions of every sequence. Returns (slots int64 [len(seqs) * n], "
      "copy-on-write pairs int64 [num_copies, 2]). All-or-nothing.")
      .def("truncate", &BlockTables::truncate, py::arg("seq"), py::arg("new_len"))
      .def("drop_front", &BlockTables::drop_front, py::arg("seq"), py::arg("new_start"))
      .def("skip_to", &BlockTables::skip_to, py::arg("seq"), py::arg("new_start"))
      .def("block_table", [](const BlockTables& t, const py::object& seqs, int64_t min_cols) {
        const auto ids = to_ids(seqs);
        const int64_t cols = std::max<int64_t>(t.max_kept_blocks(ids), min_cols);
        py::array_t<int32_t> out({static_cast<py::ssize_t>(ids.size()), static_cast<py::ssize_t>(cols)});
        t.fill_block_table(ids, out.mutable_data(), cols);
        return out;
      }, py::arg("seqs"), py::arg("min_cols") = 0,
      "Kept blocks of each sequence as int32 [len(seqs), max_blocks], padded with -1.")
      .def_property_readonly("block_size", &BlockTables::block_size);

  py::class_<PrefixIndex, std::shared_ptr<PrefixIndex>>(
      m, "PrefixIndex", "Cached full blocks by chained hash of their token prefix, with eviction (see prefix_index.h).")
      .def(py::init([](std::shared_ptr<BlockPool> pool, int32_t block_size, const std::string& policy, double ttl) {
             return std::make_shared<PrefixIndex>(std::move(pool), block_size, eviction_policy_from_name(policy), ttl);
           }),
           py::arg("pool"), py::arg("block_size"), py::arg("policy") = "lru", py::arg("ttl_seconds") = -1.0)
      .def("match", [](PrefixIndex& i, const TokenArray& tokens, uint64_t salt, double now, int64_t max_blocks,
                       bool count) {
             return i.match(token_data(tokens), tokens.size(), salt, now, max_blocks, count);
           }, py::arg("tokens"), py::arg("salt"), py::arg("now"), py::arg("max_blocks") = -1, py::arg("count") = true)
      .def("insert", [](PrefixIndex& i, const TokenArray& tokens, const std::vector<int32_t>& blocks, uint64_t salt,
                        double now, int32_t priority, bool pinned) {
             return i.insert(token_data(tokens), tokens.size(), blocks, salt, now, priority, pinned);
           }, py::arg("tokens"), py::arg("blocks"), py::arg("salt"), py::arg("now"), py::arg("priority") = 0,
           py::arg("pinned") = false)
      .def("unpin", [](PrefixIndex& i, const TokenArray& tokens, uint64_t salt) {
             return i.unpin(token_data(tokens), tokens.size(), salt);
           }, py::arg("tokens"), py::arg("salt"))
      .def("expire", &PrefixIndex::expire, py::arg("now"))
      .def("evict", &PrefixIndex::evict, py::arg("n"), py::arg("now"))
      .def("clear", &PrefixIndex::clear)
      .def("set_now", &PrefixIndex::set_now, py::arg("now"))
      .def("contains_block", &PrefixIndex::contains_block, py::arg("block"))
      .def("check_invariants", &PrefixIndex::check_invariants)
      .def("reset_stats", &PrefixIndex::reset_stats)
      .def_property_readonly("reclaimable", &PrefixIndex::reclaimable)
      .def_property_readonly("size", &PrefixIndex::size)
      .def_property_readonly("block_size", &PrefixIndex::block_size)
      .def_property("policy", [](const PrefixIndex& i) { return std::string(eviction_policy_name(i.policy())); },
                    [](PrefixIndex& i, const std::string& p) { i.set_policy(eviction_policy_from_name(p)); })
      .def_property("ttl_seconds", &PrefixIndex::ttl_seconds, &PrefixIndex::set_ttl_seconds)
      .def_property_readonly("stats", [](const PrefixIndex& i) {
        const PrefixStats& s = i.stats();
        py::dict d;
        d["queries"] = s.queries;
        d["hit_blocks"] = s.hit_blocks;
        d["miss_blocks"] = s.miss_blocks;
        d["inserted"] = s.inserted;
        d["evicted"] = s.evicted;
        d["expired"] = s.expired;
        return d;
      });

  py::class_<TokenPieceTable>(m, "TokenPieceTable",
                              "Token id -> decoded bytes from the tokenizer's vocabulary, with a bounded LRU cache.")
      .def(py::init([](std::vector<std::string> vocab, int rule, const std::vector<int32_t>& special_ids,
                       size_t capacity) {
             return std::make_unique<TokenPieceTable>(std::move(vocab), static_cast<PieceRule>(rule), special_ids,
                                                      capacity);
           }),
           py::arg("vocab"), py::arg("rule"), py::arg("special_ids"), py::arg("capacity") = 0,
           "rule: 0 byte-level BPE, 1 SentencePiece; capacity 0 keeps every resolved piece.")
      .def("piece", [](TokenPieceTable& t, int32_t id) {
             std::string s;
             t.append_piece(id, s);
             return py::bytes(s);
           }, py::arg("id"))
      .def("is_special", &TokenPieceTable::is_special, py::arg("id"))
      .def_static("resolve", [](const std::string& token, int rule) {
             return py::bytes(TokenPieceTable::resolve(token, static_cast<PieceRule>(rule)));
           }, py::arg("token"), py::arg("rule"))
      .def_property_readonly("vocab_size", &TokenPieceTable::vocab_size)
      .def_property_readonly("capacity", &TokenPieceTable::capacity)
      .def_property_readonly("size", &TokenPieceTable::size)
      .def_property_readonly("hits", &TokenPieceTable::hits)
      .def_property_readonly("misses", &TokenPieceTable::misses);

  py::class_<IncrementalDecoder>(m, "IncrementalDecoder", "Streams ids to exact text for a batch of sequences.")
      .def(py::init([](TokenPieceTable* table, size_t num_seqs, bool skip_special, bool strip_first_space,
                       bool cleanup, std::string sentence_ends) {
             DecoderOptions o;
             o.skip_special = skip_special;
             o.strip_first_space = strip_first_space;
             o.cleanup = cleanup;
             o.sentence_ends = std::move(sentence_ends);
             return std::make_unique<IncrementalDecoder>(table, o, num_seqs);
           }),
           py::arg("table"), py::arg("num_seqs") = 1, py::arg("skip_special") = true,
           py::arg("strip_first_space") = false, py::arg("cleanup") = false, py::arg("sentence_ends") = "",
           py::keep_alive<1, 2>())
      .def("push", [](IncrementalDecoder& d, const std::vector<std::vector<int32_t>>& ids) {
             std::vector<std::string> out;
             {
               py::gil_scoped_release release;  // batch pushes run without the GIL
               out = d.push(ids);
             }
             return out;
           }, py::arg("ids"), "New text of each sequence after appending ids[s] to sequence s.")
      .def("flush", &IncrementalDecoder::flush, "Everything held back; the streams start over.")
      .def("reset", &IncrementalDecoder::reset, py::arg("num_seqs"))
      .def_property_readonly("num_seqs", &IncrementalDecoder::num_seqs);
}
