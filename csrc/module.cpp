// The Python module mage_fast._C. Loading it runs the static torch.library registrations of the
// other translation units; the module itself only reports what was built, so that
// mage_fast/_ext.py can detect a stale or partial build.
#include <pybind11/pybind11.h>

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
#ifdef _OPENMP
  m.attr("openmp") = _OPENMP;
#else
  m.attr("openmp") = 0;
#endif
}
