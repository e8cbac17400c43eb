// Every sparseops op schema, in one place. Kernels live in csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu
// (and sparseops/triton/<op>.py); fakes and autograd formulas in sparseops/ops/<op>.py.
#include <Python.h>
#include <torch/library.h>

#include "cpu/dispatch.h"
#include "cpu/kernels.h"

#include <string>
#include <vector>

extern "C" {
// `import sparseops._C` loads this library, whose static initialisers register the ops below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(sparseops, m) {
  // Continuous Sparsification soft mask: out = w * scale * sigmoid(beta * s).
  m.def("soft_mask(Tensor w, Tensor s, float beta, float scale) -> Tensor");
  // One pass: dw = g * scale * m, ds = g * w * scale * beta * m * (1 - m).
  m.def("soft_mask_backward(Tensor grad, Tensor w, Tensor s, float beta, float scale) -> (Tensor, Tensor)");
  // CS penalty: scale * sum(sigmoid(beta * s)), a 0-dim tensor in s's dtype.
  m.def("soft_mask_l1(Tensor s, float beta, float scale) -> Tensor");
  // ds = grad * scale * beta * m * (1 - m), grad a 0-dim tensor.
  m.def("soft_mask_l1_backward(Tensor grad, Tensor s, float beta, float scale) -> Tensor");
  // Both in one pass: (soft_mask(w, s, beta, scale), soft_mask_l1(s, beta, scale)); its backward
  // takes both incoming gradients (grad_l1 0-dim) in one pass:
  // dw = g * scale * m, ds = (g * w + grad_l1) * scale * beta * m * (1 - m).
  m.def("soft_mask_with_l1(Tensor w, Tensor s, float beta, float scale) -> (Tensor, Tensor)");
  m.def("soft_mask_with_l1_backward(Tensor grad, Tensor grad_l1, Tensor w, Tensor s, float beta, float scale) "
        "-> (Tensor, Tensor)");

  // y = x @ (w * mask)^T + bias with the mask given as CSR of W (row_ptr, col_idx) and of W^T
  // (t_row_ptr, t_col_idx); weight values are read from the dense w through the indices.
  m.def("masked_linear(Tensor x, Tensor w, Tensor row_ptr, Tensor col_idx, Tensor t_row_ptr, "
        "Tensor t_col_idx, Tensor? bias) -> Tensor");
  // Backward of masked_linear in one op (grad is transposed once for both products):
  // dx = grad @ (w * mask) as an SpMM with the transposed layout, dw = grad^T @ x at kept entries
  // only (SDDMM; zero elsewhere), dbias = grad summed over rows. Outputs not asked for in
  // output_mask come back as empty tensors.
  m.def("masked_linear_backward(Tensor grad, Tensor x, Tensor w, Tensor row_ptr, Tensor col_idx, "
        "Tensor t_row_ptr, Tensor t_col_idx, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // The dense fallback: the same math through dense GEMMs, used where the mask is too dense for
  // the sparse kernels to win. Saves nothing but its inputs (no masked copy of w is kept).
  m.def("masked_linear_dense(Tensor x, Tensor w, Tensor mask, Tensor? bias) -> Tensor");

  // y = conv2d(x, w * mask, bias, stride, padding, dilation), groups = 1; the mask is the CSR of W
  // viewed as [C_out, C_in*kh*kw] (and of its transpose), weight values read from the dense w.
  m.def("masked_conv2d(Tensor x, Tensor w, Tensor row_ptr, Tensor col_idx, Tensor t_row_ptr, "
        "Tensor t_col_idx, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  // Backward in one op: dx (transposed convolution through W^T's layout), dw at kept entries only
  // (zero elsewhere), dbias; outputs not asked for in output_mask come back as empty tensors.
  m.def("masked_conv2d_backward(Tensor grad, Tensor x, Tensor w, Tensor row_ptr, Tensor col_idx, "
        "Tensor t_row_ptr, Tensor t_col_idx, int[2] stride, int[2] padding, int[2] dilation, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");

  // masked_linear over a block layout: the mask cut into `block` x `block` tiles, CSR over the tile
  // grid of W (row_ptr, col_idx) and of W^T; tiles with no kept entry are skipped, kept tiles are
  // multiplied with the mask applied inside the tile (exact for partly kept tiles).
  m.def("masked_linear_block(Tensor x, Tensor w, Tensor mask, Tensor row_ptr, Tensor col_idx, Tensor t_row_ptr, "
        "Tensor t_col_idx, int block, Tensor? bias) -> Tensor");
  // Its backward: dx over W^T's kept tiles, dw on kept tiles only (zero elsewhere), dbias.
  m.def("masked_linear_block_backward(Tensor grad, Tensor x, Tensor w, Tensor mask, Tensor row_ptr, "
        "Tensor col_idx, Tensor t_row_ptr, Tensor t_col_idx, int block, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");

  // masked_conv2d over a block layout of the conv mask tiled as [C_out, kh*kw*C_in] (tap-major, so a
  // tile is one tap and `block` input channels; C_in a multiple of block), groups = 1.
  m.def("masked_conv2d_block(Tensor x, Tensor w, Tensor mask, Tensor row_ptr, Tensor col_idx, Tensor t_row_ptr, "
        "Tensor t_col_idx, int block, Tensor? bias, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def("masked_conv2d_block_backward(Tensor grad, Tensor x, Tensor w, Tensor mask, Tensor row_ptr, "
        "Tensor col_idx, Tensor t_row_ptr, Tensor t_col_idx, int block, int[2] stride, int[2] padding, "
        "int[2] dilation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // Linear layer with the CS soft mask fused into the GEMM: y = x @ (w * scale * sigmoid(beta*s))^T
  // + bias, the masked weight never materialised; tiles whose mask is exactly 0 are skipped.
  m.def("soft_masked_linear(Tensor x, Tensor w, Tensor s, float beta, float scale, Tensor? bias) -> Tensor");
  // Backward: dx = grad @ masked w; dw and ds from one grad^T @ x GEMM (ds in its epilogue); dbias.
  m.def("soft_masked_linear_backward(Tensor grad, Tensor x, Tensor w, Tensor s, float beta, float scale, "
        "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");

  // The same for conv2d (groups = 1): implicit GEMMs tap by tap with the mask applied to each weight tile.
  m.def("soft_masked_conv2d(Tensor x, Tensor w, Tensor s, float beta, float scale, Tensor? bias, int[2] stride, "
        "int[2] padding, int[2] dilation) -> Tensor");
  m.def("soft_masked_conv2d_backward(Tensor grad, Tensor x, Tensor w, Tensor s, float beta, float scale, "
        "int[2] stride, int[2] padding, int[2] dilation, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");

  // What a compiled or exported graph holds: the mask itself, a graph input read when the graph runs.
  // Their kernels (sparseops/ops/<op>.py) find or build the mask's layout and run what
  // backend.choose names for it then; nothing of the mask is baked into the graph.
  m.def("masked_linear_runtime(Tensor x, Tensor w, Tensor mask, Tensor? bias) -> Tensor");
  m.def("masked_linear_runtime_backward(Tensor grad, Tensor x, Tensor w, Tensor mask, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("masked_conv2d_runtime(Tensor x, Tensor w, Tensor mask, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups) -> Tensor");
  m.def("masked_conv2d_runtime_backward(Tensor grad, Tensor x, Tensor w, Tensor mask, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // A mask that keeps whole channels: y[..., out_idx] = x[..., in_idx] @ w[out_idx][:, in_idx]^T + bias[out_idx],
  // y = bias (or 0) at the other outputs. out_idx / in_idx: sorted distinct int64 indices of the kept
  // output / input channels (all of them: no gather). One dense GEMM of the kept size.
  m.def("channel_masked_linear(Tensor x, Tensor w, Tensor out_idx, Tensor in_idx, Tensor? bias) -> Tensor");
  // Backward: dx (zero at pruned input channels), dw only at kept rows x kept columns (zero elsewhere),
  // dbias = grad summed over rows (every output gets the bias); empties where not asked for.
  m.def("channel_masked_linear_backward(Tensor grad, Tensor x, Tensor w, Tensor out_idx, Tensor in_idx, "
        "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Their CPU helpers (csrc/cpu/channels.cpp), one pass over the full-size tensor each: `src` of the
  // kept channels idx written into `size` channels along `dim`, fill[c] (or 0) along every other
  // channel c; and (grad.index_select(dim, idx), grad summed over every dim but `dim`).
  m.def("_scatter_channels(Tensor src, Tensor idx, Tensor? fill, int size, int dim) -> Tensor");
  m.def("_gather_channels_sum(Tensor grad, Tensor idx, int dim) -> (Tensor, Tensor)");
  // The same for conv2d (groups = 1) with kept output channels out_idx and input channels in_idx:
  // one dense convolution of the kept size, the pruned output channels get bias (or 0).
  m.def("channel_masked_conv2d(Tensor x, Tensor w, Tensor out_idx, Tensor in_idx, Tensor? bias, int[2] stride, "
        "int[2] padding, int[2] dilation) -> Tensor");
  m.def("channel_masked_conv2d_backward(Tensor grad, Tensor x, Tensor w, Tensor out_idx, Tensor in_idx, "
        "int[2] stride, int[2] padding, int[2] dilation, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // where(mask, w, 0) in one pass (the dense paths' masked weight and masked gradient on the CPU;
  // csrc/cpu/where_mask.cpp), out of place and in place.
  m.def("where_mask(Tensor w, Tensor mask) -> Tensor");
  m.def("where_mask_(Tensor(a!) w, Tensor mask) -> ()");

  // A 2-D bool mask's CSR and its transpose's, (row_ptr, col_idx, t_row_ptr, t_col_idx), int32 or
  // int64 (sparseops/layout.py on CPU masks; csrc/cpu/csr_from_mask.cpp).
  m.def("_csr_from_mask(Tensor mask, bool int64) -> (Tensor, Tensor, Tensor, Tensor)");
  // The one-bit-per-entry copy of a contiguous CPU bool mask (uint8 [ceil(numel/8)]) and whether the
  // mask still equals it, byte for byte (layout.refresh's check for writes the version counter
  // misses; csrc/cpu/mask_snapshot.cpp).
  m.def("_pack_mask(Tensor mask) -> Tensor");
  m.def("_same_as_packed(Tensor mask, Tensor packed) -> bool");

  // Introspection for `python -m sparseops info` and tests of every ISA variant.
  m.def("_cpu_isa() -> str", [] { return sparseops::cpu::isa_name(sparseops::cpu::active_isa()); });
  m.def("_cpu_isa_supported() -> str[]", [] {
    std::vector<std::string> out;
    for (auto isa : sparseops::cpu::supported_isas()) out.push_back(sparseops::cpu::isa_name(isa));
    return out;
  });
  m.def("_cpu_l2_bytes() -> int", [] { return sparseops::cpu::l2_cache_bytes(); });
  m.def("_set_cpu_isa(str isa) -> str", [](const std::string& name) {
    auto previous = sparseops::cpu::isa_name(sparseops::cpu::active_isa());
    sparseops::cpu::set_active_isa(name);
    return previous;
  });
}
