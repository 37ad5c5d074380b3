// The Python module bn_ext._C: importing it loads this library, which registers the ops.
// Plain CPython API (no pybind11) keeps this file quick to compile; CMake builds skip it.
#include <Python.h>

#include <string>

#ifdef BN_EXT_WITH_CUDA
#include <cuda.h>
#endif

namespace bn_ext {
namespace cpu {
const char* cpu_kernels_name();                        // batch_norm_kernel.cpp
int parallel_threads_used();                           // batch_norm_kernel.cpp
const char* use_cpu_kernels(const std::string& name);  // batch_norm_kernel.cpp
extern const bool kPrefetchStreams;                    // batch_norm_kernel.cpp
}  // namespace cpu
}  // namespace bn_ext

namespace {

PyObject* build_flags(PyObject*, PyObject*) {
  const char* isa = bn_ext::cpu::cpu_kernels_name();
  PyObject* prefetch = bn_ext::cpu::kPrefetchStreams ? Py_True : Py_False;
#ifdef BN_EXT_WITH_CUDA
  return Py_BuildValue("{s:O,s:i,s:s,s:O}", "cuda", Py_True, "cuda_version", CUDA_VERSION, "cpu_kernels", isa,
                       "cpu_prefetch", prefetch);
#else
  return Py_BuildValue("{s:O,s:O,s:s,s:O}", "cuda", Py_False, "cuda_version", Py_None, "cpu_kernels", isa,
                       "cpu_prefetch", prefetch);
#endif
}

PyObject* parallel_threads_used(PyObject*, PyObject*) { return PyLong_FromLong(bn_ext::cpu::parallel_threads_used()); }

PyObject* use_cpu_kernels(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  const char* before = bn_ext::cpu::use_cpu_kernels(name);
  if (before == nullptr) {
    PyErr_Format(PyExc_ValueError,
                 "cpu kernels: expected 'default', 'avx2', 'avx512bf16' or 'native' that this CPU can run, got '%s'",
                 name);
    return nullptr;
  }
  return PyUnicode_FromString(before);
}

PyMethodDef methods[] = {
    {"_use_cpu_kernels", use_cpu_kernels, METH_O, "Switch the CPU kernel build; returns the one in use before."},
    {"_parallel_threads_used", parallel_threads_used, METH_NOARGS, "Threads at::parallel_for used in bn_ext."},
    {"_build_flags", build_flags, METH_NOARGS, "What this library was compiled with."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
