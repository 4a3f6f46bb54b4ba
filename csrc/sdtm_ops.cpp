// Schemas of the SDTM ops and the Python module sdtm._C that loads them.
// Backends register implementations with TORCH_LIBRARY_IMPL(sdtm, <Key>, m) in their own files;
// fake (meta) implementations live in sdtm/core/cpp_ops.py.
#include <Python.h>
#include <torch/library.h>

// Importing sdtm._C runs the static registrations below; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

// Ops that find tokens by window take the grid as frames x grid_h x grid_w and windows st x sy x sx
// (csrc/cpu/window_grid.h); images have frames = st = 1.
TORCH_LIBRARY(sdtm, m) {
  m.def("window_scores(Tensor x, Tensor? priority, int grid_h, int grid_w, int sy, int sx, float a_s, int frames=1, "
      "int st=1) -> Tensor");
  m.def("bipartite_match(Tensor x, Tensor src_idx, Tensor dst_idx, Tensor? priority, float a_d) -> (Tensor, Tensor)");
  m.def("merge(Tensor x, Tensor slot, Tensor members, Tensor offsets, bool pseudo_merge) -> Tensor");
  m.def(
      "unmerge(Tensor y, Tensor slot, Tensor blend, Tensor? cache, Tensor? gate, Tensor? residual, float mcw, "
      "bool store_cache) -> (Tensor, Tensor)");
  // unmerge writing into out (which may be residual itself) and cache_out (which may be cache itself).
  m.def(
      "unmerge_into(Tensor y, Tensor slot, Tensor blend, Tensor? cache, Tensor? gate, Tensor? residual, "
      "float mcw, Tensor(a!) out, Tensor(b!)? cache_out) -> ()");
  // LayerNorm (no affine weights) then x * (1 + scale) + shift; alone, or fused with merge.
  m.def("norm_modulate(Tensor x, Tensor shift, Tensor scale, float eps) -> Tensor");
  m.def(
      "norm_modulate_merge(Tensor x, Tensor shift, Tensor scale, float eps, Tensor slot, Tensor members, "
      "Tensor offsets, bool pseudo_merge) -> Tensor");
  // The structure-phase plan (sdtm.core.plans.ssm_plan): (slot, blend, members, offsets, independent).
  m.def(
      "ssm_plan(Tensor window_scores, Tensor dst_position, int grid_h, int grid_w, int sy, int sx, int n_win, "
      "bool pseudo_merge, int frames=1, int st=1) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The detail phase's candidates (sdtm.core.plans.idm_destinations then idm_candidates): (src_idx, dst_idx),
  // destinations by merge age when given, else at dst_position.
  m.def(
      "idm_candidates(Tensor? merge_age, Tensor? dst_position, int grid_h, int grid_w, int sy, int sx, "
      "int frames=1, int st=1) -> (Tensor, Tensor)");
  // The detail-phase plan (sdtm.core.plans.idm_plan, r sources merged): (slot, blend, members, offsets, independent).
  m.def(
      "idm_plan(Tensor score, Tensor best, Tensor src_idx, Tensor dst_idx, int num_tokens, SymInt r, "
      "bool pseudo_merge) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
