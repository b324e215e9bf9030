#include "kvstream/layout.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace dejavu {

namespace {
void require_positive(const char* name, int64_t v) {
  if (v <= 0) throw std::invalid_argument(std::string("KVLayout.") + name + " must be > 0, got " + std::to_string(v));
}
void check_index(const char* what, int64_t v, int64_t limit) {
  if (v < 0 || v >= limit)
    throw std::out_of_range(std::string(what) + " " + std::to_string(v) + " out of range [0, " +
                            std::to_string(limit) + ")");
}
}  // namespace

void KVLayout::validate() const {
  require_positive("num_layers", num_layers);
  require_positive("num_blocks", num_blocks);
  require_positive("block_size", block_size);
  require_positive("num_kv_heads", num_kv_heads);
  require_positive("head_dim", head_dim);
  if (elem_size != 1 && elem_size != 2 && elem_size != 4 && elem_size != 8)
    throw std::invalid_argument("KVLayout.elem_size must be 1, 2, 4 or 8, got " + std::to_string(elem_size));
}

std::vector<Span> merge_adjacent(const std::vector<Span>& spans) {
  std::vector<Span> out;
  out.reserve(spans.size());
  for (const Span& s : spans) {
    if (!out.empty() && out.back().offset + out.back().bytes == s.offset) {
      out.back().bytes += s.bytes;
    } else {
      out.push_back(s);
    }
  }
  return out;
}

std::vector<Span> chunk_spans(const KVLayout& layout, const std::vector<int64_t>& layers,
                              const std::vector<int64_t>& blocks) {
  layout.validate();
  std::vector<Span> spans;
  spans.reserve(layers.size() * blocks.size());
  for (int64_t l : layers) {
    check_index("layer", l, layout.num_layers);
    for (int64_t b : blocks) {
      check_index("block", b, layout.num_blocks);
      spans.push_back({layout.chunk_offset(l, b), layout.chunk_bytes()});
    }
  }
  return merge_adjacent(spans);
}

std::vector<Span> token_spans(const KVLayout& layout, const std::vector<int64_t>& layers,
                              const std::vector<int64_t>& blocks, const std::vector<int64_t>& slots) {
  layout.validate();
  if (blocks.size() != slots.size())
    throw std::invalid_argument("token_spans: " + std::to_string(blocks.size()) + " blocks but " +
                                std::to_string(slots.size()) + " slots");
  std::vector<Span> spans;
  spans.reserve(layers.size() * blocks.size() * 2);
  for (int64_t l : layers) {
    check_index("layer", l, layout.num_layers);
    for (size_t i = 0; i < blocks.size(); ++i) {
      check_index("block", blocks[i], layout.num_blocks);
      check_index("slot", slots[i], layout.block_size);
      for (int64_t kv = 0; kv < 2; ++kv)
        spans.push_back({layout.token_offset(l, blocks[i], slots[i], kv), layout.token_bytes()});
    }
  }
  return merge_adjacent(spans);
}

std::vector<BlockRun> block_runs(const std::vector<int64_t>& src, const std::vector<int64_t>& dst) {
  if (src.size() != dst.size())
    throw std::invalid_argument("block_runs: " + std::to_string(src.size()) + " source blocks but " +
                                std::to_string(dst.size()) + " destination blocks");
  std::vector<BlockRun> runs;
  for (size_t i = 0; i < src.size(); ++i) {
    if (src[i] < 0 || dst[i] < 0)
      throw std::invalid_argument("block_runs: negative block id at position " + std::to_string(i));
    if (!runs.empty() && runs.back().src + runs.back().count == src[i] && runs.back().dst + runs.back().count == dst[i])
      ++runs.back().count;
    else
      runs.push_back({src[i], dst[i], 1});
  }
  return runs;
}

int64_t total_bytes(const std::vector<Span>& spans) {
  int64_t n = 0;
  for (const Span& s : spans) n += s.bytes;
  return n;
}

int64_t copy_desc_rows_bound(const std::vector<Span>& spans, int64_t piece_bytes) {
  const int64_t n = static_cast<int64_t>(spans.size());
  return piece_bytes > 0 ? n + total_bytes(spans) / piece_bytes + 1 : n;
}

CopyDesc fill_copy_desc(const std::vector<Span>& spans, bool out, int64_t piece_bytes, int64_t* desc, int64_t cap) {
  CopyDesc d;
  int64_t in_piece = 0;
  d.piece_rows.push_back(0);
  auto emit = [&](int64_t cache_off, int64_t packed_off, int64_t n) {
    if (d.rows >= cap) throw std::length_error("copy descriptor buffer too small");
    int64_t* r = desc + 3 * d.rows++;
    r[0] = out ? cache_off : packed_off;
    r[1] = out ? packed_off : cache_off;
    r[2] = n;
  };
  for (const Span& s : spans) {
    int64_t off = s.offset, n = s.bytes;
    while (n > 0) {
      const int64_t take = piece_bytes > 0 ? std::min(n, piece_bytes - in_piece) : n;
      emit(off, piece_bytes > 0 ? in_piece : d.bytes, take);
      off += take;
      n -= take;
      d.bytes += take;
      in_piece += take;
      if (piece_bytes > 0 && in_piece == piece_bytes) {
        d.piece_rows.push_back(d.rows);
        d.piece_bytes.push_back(in_piece);
        in_piece = 0;
      }
    }
  }
  if (piece_bytes <= 0 || in_piece > 0) {
    d.piece_rows.push_back(d.rows);
    d.piece_bytes.push_back(piece_bytes > 0 ? in_piece : d.bytes);
  }
  return d;
}

}  // namespace dejavu
