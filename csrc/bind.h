// Shared by the binding units of dejavu._C (bind_module.cpp assembles them): pointers cross the
// boundary as integers (tensor.data_ptr()), so the extension links against no torch.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

namespace dejavu::bind {

template <typename T>
T* as_ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

void bind_kvstream(pybind11::module_& m);  // DéjàVuLib: layouts, copies, pools, stores, replicas
void bind_kernels(pybind11::module_& m);   // the GPU fast path's kernels (csrc/kernels)

}  // namespace dejavu::bind
