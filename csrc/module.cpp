// The Python module mage_fast._C. Loading it runs the static torch.library registrations of the
// other translation units; the module itself only reports what was built, so that
// mage_fast/_ext.py can detect a stale or partial build.
#include <pybind11/pybind11.h>

#include "cpu/kernels.h"

#ifndef MAGE_FAST_ABI_VERSION
#define MAGE_FAST_ABI_VERSION 1  // bump when a schema in ops.cpp changes; mirrored in mage_fast/_ext.py
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "mage_fast compiled ops (registered in torch.ops.mage_fast)";
  m.attr("abi_version") = MAGE_FAST_ABI_VERSION;
#ifdef MAGE_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  // codebook_nn introspection (tests/benchmarks): 0 = auto path, 1 = fp32 path only
  m.def("_codebook_nn_set_mode", [](int mode) { mage_fast::cpu::codebook_nn_set_mode(mode); });
  m.def("_codebook_nn_last_stats", []() {
    const auto s = mage_fast::cpu::codebook_nn_last_stats();
    pybind11::dict d;
    d["path"] = s.path == 1 ? "int16" : "fp32";
    d["fallback_rows"] = s.fallback_rows;
    d["scored"] = s.scored;
    return d;
  });
#ifdef _OPENMP
  m.attr("openmp") = _OPENMP;
#else
  m.attr("openmp") = 0;
#endif
}
