#include "kernels/attention.h"

#ifndef DEJAVU_WITH_CUDA
namespace dejavu {
namespace {
const char* kNoCuda = "dejavu was built without CUDA (DEJAVU_CUDA=off or no nvcc at build time)";
}
bool decode_attention_supports(int64_t) { return false; }
int64_t decode_attention_workspace(int64_t, int64_t, int64_t, int64_t) { return 0; }
std::string write_kv_cache(void*, const void*, const void*, const int64_t*, const int64_t*, int64_t, int64_t,
                           int64_t, int64_t, int64_t, int64_t, DType, void*, void*, const int64_t*) {
  return kNoCuda;
}
std::string paged_decode_attention(void*, const void*, const void*, const int64_t*, const int64_t*, const float*,
                                   float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                                   int64_t, float, DType, void*, const DecodeFusion&) {
  return kNoCuda;
}
}  // namespace dejavu
#endif
