#include "kvstream/cuda_copy.h"

#ifndef DEJAVU_WITH_CUDA
namespace dejavu {
bool cuda_compiled() { return false; }
int cuda_device_count() { return 0; }
std::string cuda_copy_spans(const void*, void*, const int64_t*, int64_t, void*, int64_t) {
  return "dejavu was built without CUDA (DEJAVU_CUDA=off or no nvcc at build time)";
}
std::string cuda_staged_copy(void*, void*, const int64_t*, const std::vector<int64_t>&, const std::vector<int64_t>&,
                             void*, void*, void*, void*, bool) {
  return "dejavu was built without CUDA (DEJAVU_CUDA=off or no nvcc at build time)";
}
}  // namespace dejavu
#endif
