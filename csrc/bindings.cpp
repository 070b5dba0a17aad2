// The extension's op declarations: fused_margin_C::margin_lse_fwd / margin_lse_bwd /
// margin_lse_bwd_update.
//
// Declared once here; csrc/cpu/margin_lse_cpu.cpp and csrc/cuda/margin_lse_cuda.cpp each
// register one implementation (TORCH_LIBRARY_IMPL), so the dispatcher picks the device.
// These ops are the kernels behind the 'cpu' and 'cuda' backends (fused_margin/backends);
// the public op, its autograd and its fake kernel are fused_margin::margin_lse in
// fused_margin/ops.py. See fused_margin/kernel_params.py for the contract.
#include <Python.h>
#include <torch/library.h>

// Importing fused_margin._C loads this library, whose static initializers register the
// ops; the Python module itself is empty (no pybind11: it keeps the build short).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "fused_margin's C++/CUDA kernels, registered as torch.ops.fused_margin_C",
      -1,       // m_size
      nullptr,  // m_methods
      nullptr,  // m_slots
      nullptr,  // m_traverse
      nullptr,  // m_clear
      nullptr,  // m_free
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fused_margin_C, m) {
  // chunk_size: classes per chunk; 0 lets the kernel choose (from the cache size and B on
  // the CPU, from B and a workspace budget on the GPU).
  m.def(
      "margin_lse_fwd(Tensor x, Tensor weight, Tensor labels, Tensor? bias, Tensor? class_index, "
      "Tensor? row_threshold, bool normalize_x, bool normalize_w, float scale, int kind, float alpha, "
      "float delta, float margin, int num_subcenters, int chunk_size=0) "
      "-> (Tensor lse_neg, Tensor target_u, Tensor sum_neg, Tensor argmax, Tensor row_scale, Tensor col_scale)");
  // grad_bias is an empty tensor when bias is None.
  m.def(
      "margin_lse_bwd(Tensor grad_lse, Tensor grad_target_u, Tensor grad_sum, Tensor x, Tensor weight, "
      "Tensor labels, Tensor? bias, Tensor? class_index, Tensor? row_threshold, Tensor lse_neg, "
      "Tensor row_scale, Tensor col_scale, bool normalize_x, bool normalize_w, float scale, int kind, "
      "float alpha, float delta, float margin, int num_subcenters, int chunk_size=0) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  // The backward with a fused optimizer step (fused_margin/optim/update.py): the weight rows
  // in use and their `state` (WeightUpdate.state: tensors of weight's shape and dtype) are
  // updated in place, chunk by chunk as each chunk's weight gradient is formed, by the rule
  // whose scalars `update` lists (WeightUpdate.scalars()); no weight gradient is formed or
  // returned. class_index must not repeat a class. grad_bias is an empty tensor when bias
  // is None. `guard` (int32 (2,), on weight's device; see optim_update.h): a chunk whose
  // gradient is not finite is not applied and stops every later write (guard[0]); guard[1]
  // records whether any row was written.
  m.def(
      "margin_lse_bwd_update(Tensor grad_lse, Tensor grad_target_u, Tensor grad_sum, Tensor x, Tensor(a!) weight, "
      "Tensor labels, Tensor? bias, Tensor? class_index, Tensor? row_threshold, Tensor lse_neg, "
      "Tensor row_scale, Tensor col_scale, bool normalize_x, bool normalize_w, float scale, int kind, "
      "float alpha, float delta, float margin, int num_subcenters, Tensor(b!)[] state, float[] update, "
      "Tensor(c!) guard, int chunk_size=0) -> (Tensor grad_x, Tensor grad_bias)");
}
