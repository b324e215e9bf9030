// A minimal test harness: CHECK records failures and main() returns non-zero if any occurred.
#pragma once
#include <cstdio>
#include <cstdlib>

inline int& dejavu_test_failures() {
  static int n = 0;
  return n;
}

#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++dejavu_test_failures();                                              \
    }                                                                        \
  } while (0)

#define CHECK_THROWS(expr)                \
  do {                                    \
    bool threw_ = false;                  \
    try {                                 \
      (void)(expr);                       \
    } catch (...) {                       \
      threw_ = true;                      \
    }                                     \
    CHECK(threw_ && "expected: " #expr);  \
  } while (0)

#define TEST_MAIN_END()                                                         \
  if (dejavu_test_failures()) {                                                 \
    std::fprintf(stderr, "%d check(s) failed\n", dejavu_test_failures());      \
    return 1;                                                                   \
  }                                                                             \
  std::printf("all checks passed\n");                                           \
  return 0;
