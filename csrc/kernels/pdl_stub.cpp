#include "kernels/pdl.h"

#ifndef DEJAVU_WITH_CUDA
namespace dejavu {
void set_programmatic_launch(int) {}
bool programmatic_launch() { return false; }
bool programmatic_launch_active() { return false; }
}  // namespace dejavu
#endif
