// Settings read from the environment by the kernels' host code: switches for benchmarks and
// bisecting (DEJAVU_ATTENTION_KERNEL, DEJAVU_LINEAR_SPLIT, DEJAVU_PDL, ...). Callers read each
// once (a function-local static) and document its values where they use it.
#pragma once
#include <cstdlib>
#include <string>

namespace dejavu {
namespace env {

// The variable's value, or "" when it is unset.
inline std::string str(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? std::string() : std::string(v);
}

// The variable as an integer (leading digits, as atoll reads them), or `dflt` when unset or empty.
inline long long integer(const char* name, long long dflt) {
  const char* v = std::getenv(name);
  return v == nullptr || *v == '\0' ? dflt : std::atoll(v);
}

}  // namespace env
}  // namespace dejavu
