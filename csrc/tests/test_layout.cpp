// Layout and span arithmetic of the paged KV cache.
#include "kvstream/layout.h"
#include "tests/check.h"

using namespace dejavu;

int main() {
  // 3 layers, 5 blocks, 4 tokens per block, 2 heads of 8, fp16.
  KVLayout l{3, 5, 4, 2, 8, 2};
  l.validate();
  CHECK(l.token_bytes() == 2 * 8 * 2);
  CHECK(l.chunk_bytes() == 2 * 4 * 32);
  CHECK(l.total_bytes() == 3 * 5 * 256);
  CHECK(l.chunk_offset(0, 0) == 0);
  CHECK(l.chunk_offset(1, 2) == (5 + 2) * 256);
  CHECK(l.token_offset(2, 1, 3, 1) == (2 * 5 + 1) * 256 + 128 + 3 * 32);

  // Bad layouts name the field.
  KVLayout bad{3, 0, 4, 2, 8, 2};
  CHECK_THROWS(bad.validate());
  KVLayout bad_elem{3, 5, 4, 2, 8, 3};
  CHECK_THROWS(bad_elem.validate());

  // Chunk spans: blocks 1,2,3 of layer 0 are adjacent -> one span; layer 2 block 0 separate.
  auto s = chunk_spans(l, {0}, {1, 2, 3});
  CHECK(s.size() == 1);
  CHECK(s[0].offset == 256 && s[0].bytes == 3 * 256);
  s = chunk_spans(l, {0, 2}, {4, 0});
  CHECK(s.size() == 4);
  CHECK(total_bytes(s) == 4 * 256);
  // Block 4 of layer 0 and block 0 of layer 1 are adjacent in memory.
  s = chunk_spans(l, {0, 1}, {4});
  CHECK(s.size() == 2);  // layer 0 block 4 and layer 1 block 4: not adjacent
  s = chunk_spans(l, {0, 1, 2}, {0, 1, 2, 3, 4});
  CHECK(s.size() == 1 && s[0].bytes == l.total_bytes());
  CHECK_THROWS(chunk_spans(l, {3}, {0}));
  CHECK_THROWS(chunk_spans(l, {0}, {5}));
  CHECK_THROWS(chunk_spans(l, {-1}, {0}));

  // Token spans: K and V rows of slot 3 of block 1 in layer 0 and 1; never merged across K/V.
  auto t = token_spans(l, {0, 1}, {1}, {3});
  CHECK(t.size() == 4);
  CHECK(t[0].offset == l.token_offset(0, 1, 3, 0) && t[0].bytes == 32);
  CHECK(t[1].offset == l.token_offset(0, 1, 3, 1));
  CHECK(t[3].offset == l.token_offset(1, 1, 3, 1));
  // Consecutive slots of one block merge within K and within V.
  t = token_spans(l, {0}, {1, 1}, {1, 2});
  CHECK(t.size() == 4);  // order is K1 V1 K2 V2: nothing adjacent
  CHECK(total_bytes(t) == 4 * 32);
  CHECK_THROWS(token_spans(l, {0}, {1}, {4}));
  CHECK_THROWS(token_spans(l, {0}, {1, 2}, {0}));

  auto m = merge_adjacent({{0, 10}, {10, 5}, {20, 1}, {21, 1}, {0, 1}});
  CHECK(m.size() == 3);
  CHECK(m[0].bytes == 15 && m[1].offset == 20 && m[1].bytes == 2 && m[2].offset == 0);
  // Copy descriptors: packing three spans of 100 bytes into pieces of 128 bytes.
  {
    std::vector<Span> sp{{1000, 100}, {5000, 100}, {9000, 100}};
    std::vector<int64_t> d(3 * copy_desc_rows_bound(sp, 128));
    CopyDesc cd = fill_copy_desc(sp, true, 128, d.data(), static_cast<int64_t>(d.size() / 3));
    CHECK(cd.bytes == 300);
    CHECK(cd.rows == 5);  // 100 | 28+72 | 56+44 -> rows: 100, 28, 72, 56, 44
    CHECK(cd.piece_rows.size() == 4 && cd.piece_rows[1] == 2 && cd.piece_rows[2] == 4 && cd.piece_rows[3] == 5);
    CHECK(cd.piece_bytes.size() == 3 && cd.piece_bytes[0] == 128 && cd.piece_bytes[2] == 44);
    CHECK(d[0] == 1000 && d[1] == 0 && d[2] == 100);
    CHECK(d[3] == 5000 && d[4] == 100 && d[5] == 28);    // fills piece 0 up to 128
    CHECK(d[6] == 5028 && d[7] == 0 && d[8] == 72);      // piece 1 starts at packed 0
    // Unpacking swaps the columns; no pieces means global packed offsets.
    CopyDesc un = fill_copy_desc(sp, false, 0, d.data(), 3);
    CHECK(un.rows == 3 && d[6] == 200 && d[7] == 9000 && un.piece_rows.size() == 2);
    CHECK_THROWS(fill_copy_desc(sp, false, 0, d.data(), 2));
  }
  // Block runs: consecutive on both sides merge, a break on either side starts a new run.
  {
    auto r = block_runs({4, 5, 6, 9, 10, 2}, {0, 1, 2, 3, 5, 6});
    CHECK(r.size() == 4);
    CHECK(r[0].src == 4 && r[0].dst == 0 && r[0].count == 3);
    CHECK(r[1].src == 9 && r[1].dst == 3 && r[1].count == 1);  // dst 3 -> 5 breaks it
    CHECK(r[2].src == 10 && r[2].dst == 5 && r[2].count == 1);
    CHECK(r[3].src == 2 && r[3].dst == 6 && r[3].count == 1);   // src goes back
    CHECK(block_runs({}, {}).empty());
    CHECK(block_runs({7, 6}, {1, 0}).size() == 2);              // descending is not a run
    CHECK_THROWS(block_runs({1, 2}, {1}));
    CHECK_THROWS(block_runs({-1}, {0}));
  }
  TEST_MAIN_END();
}
