#include "kernels/pdl.cuh"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

namespace dejavu {
namespace {

std::atomic<int> g_mode{-1};  // -1: not read from the environment yet

std::mutex g_mu;
std::map<std::pair<int, const void*>, bool> g_capable;  // (device, kernel) -> compiled for sm_90+

}  // namespace

void set_programmatic_launch(int mode) { g_mode.store(mode < 0 ? -1 : (mode ? 1 : 0)); }

bool programmatic_launch() {
  int m = g_mode.load();
  if (m < 0) {
    const char* v = std::getenv("DEJAVU_PDL");
    m = (v != nullptr && (std::strcmp(v, "0") == 0 || std::strcmp(v, "off") == 0)) ? 0 : 1;
    int unset = -1;
    g_mode.compare_exchange_strong(unset, m);
    m = g_mode.load();
  }
  return m == 1;
}

namespace pdl {

bool enabled_for(const void* kernel) {
  if (!programmatic_launch()) return false;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_capable.find({dev, kernel});
  if (it == g_capable.end()) {
    cudaFuncAttributes a{};
    // ptxVersion: the architecture the running code was compiled from (80 for the generic PTX
    // JIT-compiled on a newer card, which has no waits); PDL itself needs a 9.0+ device.
    int major = 0;
    const bool ok = cudaFuncGetAttributes(&a, kernel) == cudaSuccess &&
                    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess;
    it = g_capable.emplace(std::make_pair(dev, kernel), ok && a.ptxVersion >= 90 && major >= 9).first;
  }
  return it->second;
}

}  // namespace pdl
}  // namespace dejavu
