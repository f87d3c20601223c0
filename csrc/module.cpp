// Python module entry for aapo_megatron._C.
// Ops themselves register with the dispatcher (TORCH_LIBRARY_FRAGMENT(aapo, ...))
// in their own translation units and are called as torch.ops.aapo.<name>.
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// Build facts, so tests and bug reports can tell which variant is loaded.
pybind11::dict build_info() {
  pybind11::dict info;
#ifdef AAPO_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
  info["omp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["omp_max_threads"] = 1;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "aapo-megatron compiled ops (registered under torch.ops.aapo)";
  m.def("build_info", &build_info, "Which variant was built: {'cuda', 'openmp', 'omp_max_threads'}");
}
