#include "kernels/pdl.cuh"

#include <atomic>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "kernels/env.h"

namespace dejavu {
namespace {

std::atomic<int> g_mode{-1};  // -1: not read from the environment yet

std::mutex g_mu;
std::map<std::tuple<int, const void*, size_t>, int64_t> g_facts;  // (device, kernel, key) -> value

}  // namespace

void set_programmatic_launch(int mode) { g_mode.store(mode < 0 ? -1 : (mode ? 1 : 0)); }

bool programmatic_launch() {
  int m = g_mode.load();
  if (m < 0) {
    const std::string v = env::str("DEJAVU_PDL");
    m = v == "0" || v == "off" ? 0 : 1;
    int unset = -1;
    g_mode.compare_exchange_strong(unset, m);
    m = g_mode.load();
  }
  return m == 1;
}

namespace pdl {

int64_t kernel_fact(const void* kernel, size_t key, int64_t (*compute)(int, const void*, size_t), int64_t fallback) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return fallback;
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_facts.find({dev, kernel, key});
  if (it == g_facts.end()) it = g_facts.emplace(std::make_tuple(dev, kernel, key), compute(dev, kernel, key)).first;
  return it->second;
}

bool enabled_for(const void* kernel) {
  if (!programmatic_launch()) return false;
  return kernel_fact(kernel, 0, [](int dev, const void* k, size_t) -> int64_t {
    cudaFuncAttributes a{};
    // ptxVersion: the architecture the running code was compiled from (80 for the generic PTX
    // JIT-compiled on a newer card, which has no waits); PDL itself needs a 9.0+ device.
    int major = 0;
    return cudaFuncGetAttributes(&a, k) == cudaSuccess &&
           cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
           a.ptxVersion >= 90 && major >= 9;
  }, 0) != 0;
}

}  // namespace pdl

namespace {
// Compiled like every kernel of the build, so the device runs the same architecture's code.
__global__ void pdl_probe_kernel() {}
}  // namespace

bool programmatic_launch_active() { return pdl::enabled_for(reinterpret_cast<const void*>(pdl_probe_kernel)); }

}  // namespace dejavu
