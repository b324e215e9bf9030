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
namespace {
const char* kNoCuda = "dejavu was built without CUDA (DEJAVU_CUDA=off or no nvcc at build time)";
}
std::string cuda_set_device(int) { return kNoCuda; }
std::string cuda_stream_new(void**) { return kNoCuda; }
void cuda_stream_free(void*) {}
std::string cuda_event_new(void**, bool) { return kNoCuda; }
void cuda_event_free(void*) {}
std::string cuda_event_record(void*, void*) { return kNoCuda; }
std::string cuda_stream_wait_event(void*, void*) { return kNoCuda; }
std::string cuda_event_wait(void*) { return kNoCuda; }
std::string cuda_host_alloc(size_t, void**, void**) { return kNoCuda; }
std::string cuda_dma_gather_slots(const void*, void*, const int64_t*, const int64_t*, int64_t, int64_t, int64_t, int64_t,
                                  int64_t, void*) {
  return kNoCuda;
}
std::string cuda_dma_gather_blocks(const void*, void*, const int64_t*, int64_t, int64_t, int64_t, int64_t, void*) {
  return kNoCuda;
}
std::string cuda_dma_copy_blocks(const void*, void*, const std::vector<BlockRun>&, int64_t, int64_t, int64_t, int64_t,
                                 void*) {
  return kNoCuda;
}
void cuda_host_free(void*) {}
}  // namespace dejavu
#endif
