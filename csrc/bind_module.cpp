// dejavu._C: the Python face of the C++ core, one module assembled from two binding units.
#include "bind.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "DéjàVu C++ core: KV layouts, span arithmetic, host and device gather/scatter";
  dejavu::bind::bind_kvstream(m);
  dejavu::bind::bind_kernels(m);
}
