// CPU implementation of masked_conv2d and its backward (schemas in csrc/ops.cpp), groups = 1.
//
// NOTE: the convolution is an implicit-im2col SpMM on the same kernels as masked_linear. The batch
// runs in passes of one SpMM register block of images (batch_ld); each pass's padded input is
// transposed once to position-major, batch-minor xt[hp, wp, ci, n], so a kept weight w[co, ci, kh, kw]
// at output position (oh, ow) reads the contiguous vector xt[oh*sh + kh*dh, ow*sw + kw*dw, ci, :]: an
// element offset eoff[j] for the weight plus poff[p] for the position. Every stride, padding and
// dilation is the same kernel, the batch (not the often tiny output width) fills the vectors, and no
// im2col matrix is built. A task is up to kSpmmRowBlock positions of one output channel; consecutive
// tasks take the next channels at the same positions, so they read the same neighbourhood of xt
// from cache (dispatch.cpp, spmm); where that neighbourhood outgrows L2, in blocks of input channels
// (block_channels). The output is written NCHW.
//   forward: output row (p, co) = SpMM over W's CSR row co.
//   dx:      the transposed convolution, an SpMM over W^T's CSR rows grouped by ci, reading grad
//            scattered (stride) into a zero-bordered buffer gq[hq, wq, co, n] (in blocks of co
//            likewise).
//   dw:      per kept entry, the sum over positions p of dot(gt[p, co, :], xt at eoff[j] + poff[p]);
//            positions are split between threads.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "csr_ops.h"

namespace sparseops {
namespace {

// Scratch slots (csr_ops.h): the transposed input, the transposed grad, the scattered grad of dx.
constexpr int kInput = 0, kGrad = 1, kScatter = 2;

// Images per pass over the batch: one SpMM register block (64 floats with AVX-512, 32 with AVX2).
// Every output channel's tiles read the pass's transposed input at the taps' offsets; with more
// images per pass each (position, channel) row holds several blocks side by side and the kernel
// ran 1.3-1.6x slower (256->256 @8x8, 512->512 @4x4, 128->128 @16x16, batch 128, 2-5% kept).
int64_t batch_ld(at::ScalarType st) {
  return st == at::kDouble ? cpu::spmm_m_block<double>() : cpu::spmm_m_block<float>();
}

// The row of the transposed buffer (below) that each column (c, h, w) of a [N, C, H, W] tensor lands in:
// ((h + ph) * (W + 2pw) + w + pw) * C + c. The same for every pass of the batch: made once per call.
at::Tensor nhwc_rowmap(int64_t C, int64_t H, int64_t W, int64_t ph, int64_t pw) {
  auto opts = at::TensorOptions().dtype(at::kLong);
  auto c = at::arange(C, opts).view({C, 1, 1});
  auto h = at::arange(H, opts).view({1, H, 1}), w = at::arange(W, opts).view({1, 1, W});
  return (((h + ph) * (W + 2 * pw) + (w + pw)) * C + c).reshape({-1}).contiguous();
}

// The geometry whose zero border a scratch slot holds (the transpose writes only the inside): the
// next pass of the batch, and the next call of a layer of the same shape, need not zero it again.
struct Border {
  uint64_t generation = 0;  // of the slot's buffer (scratch_generation)
  int64_t Hp = 0, Wp = 0, C = 0, ld = 0, ph = 0, pw = 0;
  bool operator==(const Border&) const = default;
};
thread_local std::array<Border, 4> zeroed_border;

// [N, C, H, W] -> [(H + 2ph) * (W + 2pw) * C, ld] batch-minor with rows (h, w, c) and a zero
// border, in one pass: the transpose writes each column (c, h, w) of t straight to its row
// (rowmap: nhwc_rowmap(C, H, W, ph, pw)). With sums ([C * H * W], t's dtype): each (c, h, w)'s
// sum over the batch, from the registers the transpose loads.
at::Tensor nhwc_transpose(const at::Tensor& t, int64_t ph, int64_t pw, int64_t ld, int slot,
                          const at::Tensor& rowmap, const at::Tensor& sums = at::Tensor()) {
  const int64_t N = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3);
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw;
  auto out = scratch(slot, Hp * Wp * C * ld, t.options()).view({Hp * Wp * C, ld});
  const Border border{scratch_generation(slot), Hp, Wp, C, ld, ph, pw};
  auto& known = zeroed_border.at(slot);
  if (!(known == border)) {
    known = Border{};  // (this transpose writes rows that were another geometry's border)
    if (ph || pw) {  // the positions outside the input: runs of whole rows
      auto grid = out.view({Hp, Wp * C * ld});
      grid.slice(0, 0, ph).zero_();
      grid.slice(0, ph + H, Hp).zero_();
      auto sides = grid.slice(0, ph, ph + H).view({H, Wp, C * ld});
      sides.slice(1, 0, pw).zero_();
      sides.slice(1, pw + W, Wp).zero_();
      known = border;
    }
  }
  transpose_slab(t.contiguous().view({N, C * H * W}), 0, N, out, rowmap, sums);
  return out;
}

// Offsets (elements) of positions (i * step_h, j * step_w) in a [rows_total, row_len, unit] grid.
at::Tensor position_offsets(int64_t rows, int64_t cols, int64_t step_h, int64_t step_w, int64_t row_len,
                            int64_t unit) {
  auto opts = at::TensorOptions().dtype(at::kLong);
  auto i = at::arange(rows, opts).view({rows, 1}), j = at::arange(cols, opts).view({1, cols});
  return ((i * (step_h * row_len)) + j * step_w).mul_(unit).reshape({-1}).contiguous();
}

// Channels per block of a convolution's SpMM, 0 for one block: a tile (kSpmmRowBlock positions of
// a plane Ho x Wo, `step` apart in the buffer it reads, whose rows are Wrow positions of `channels`
// rows of ld) reads the buffer's rows around its positions, and with many channels that window
// outgrows L2 (3.8 MB at 256 channels @8x8 for 64 images), so it came from L3 for every output
// channel: the forward ran 2x slower than with the same entries over 64 input channels. Blocks of
// channels whose window fills half of L2 stay there (spmm_conv_blocked).
int64_t block_channels(int64_t Ho, int64_t Wo, int64_t step, int64_t KH, int64_t dh, int64_t Hrows, int64_t Wrow,
                       int64_t channels, int64_t ld, int64_t elem) {
  const int64_t tile = std::min<int64_t>(Ho * Wo, cpu::kSpmmRowBlock);
  const int64_t out_rows = std::min<int64_t>(Ho, (tile + Wo - 1) / Wo + 1);
  const int64_t in_rows = std::min<int64_t>(Hrows, (out_rows - 1) * step + (KH - 1) * dh + 1);
  const int64_t per_channel = in_rows * Wrow * ld * elem;
  const int64_t fit = std::max<int64_t>(1, cpu::l2_cache_bytes() / 2 / per_channel);
  return fit >= channels ? 0 : fit;
}

// Where each CSR row's entries of each block of col_block columns (of cols) start, once per call
// for every pass of the batch (cpu::column_block_starts); undefined for one block, or if a row's
// columns are unsorted (the one-pass tiles then run).
at::Tensor block_starts(const at::Tensor& row_ptr, const at::Tensor& col, int64_t col_block, int64_t cols) {
  const int64_t rows = row_ptr.numel() - 1, blocks = col_block > 0 ? (cols + col_block - 1) / col_block : 1;
  if (blocks <= 1) return at::Tensor();
  auto starts = at::empty({rows * (blocks + 1)}, at::TensorOptions().dtype(at::kLong));
  bool sorted = false;
  AT_DISPATCH_INDEX_TYPES(row_ptr.scalar_type(), "block_starts", [&] {
    sorted = cpu::column_block_starts(row_ptr.data_ptr<index_t>(), col.data_ptr<index_t>(), rows, col_block, blocks,
                                      starts.data_ptr<int64_t>());
  });
  return sorted ? starts : at::Tensor();
}

// Element offset in xt of the tap (ci, kh, kw) = col[j] of each kept entry of W's CSR.
at::Tensor forward_entry_offsets(const at::Tensor& col, const ConvGeom& g, int64_t ld) {
  auto k = col.to(at::kLong);
  auto ci = k.div(g.KH * g.KW, "floor"), r = k.remainder(g.KH * g.KW);
  auto kh = r.div(g.KW, "floor"), kw = r.remainder(g.KW);
  return ((kh * g.dh * g.Wp + kw * g.dw) * g.Cin + ci).mul_(ld).contiguous();
}

// Calls f(T(), I()) for t's floating type T and index's integer type I.
template <class F>
void dispatch(const at::Tensor& t, const at::Tensor& index, const F& f) {
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "masked_conv2d", [&] {
    using T = scalar_t;
    AT_DISPATCH_INDEX_TYPES(index.scalar_type(), "masked_conv2d", [&] { f(T(), index_t()); });
  });
}

// out [N, rows, plane] (NCHW) = the implicit-im2col SpMM: CSR row r at every position p reads bt at
// eoff[j] + poff[p] for its kept entries j (kernels.h, SpmmArgs), plus bias[r] if given (added as
// the tiles are written: a separate add is one more pass over the output).
// With starts (block_starts), the entries run in column blocks (kernels_impl.h, spmm_conv_blocked).
void conv_spmm(at::Tensor& out, const at::Tensor& row_ptr, const at::Tensor& col, const at::Tensor& vals,
               const at::Tensor& bt, int64_t N, int64_t ld, int64_t plane, const at::Tensor& eoff,
               const at::Tensor& poff, const at::Tensor& bias = at::Tensor(),
               const at::Tensor& starts = at::Tensor()) {
  const int64_t rows = (row_ptr.numel() - 1) * plane;
  dispatch(out, row_ptr, [&](auto t, auto i) {
    using T = decltype(t);
    using I = decltype(i);
    cpu::SpmmArgs<T, I> a{rows, N, ld, rows, row_ptr.data_ptr<I>(), col.data_ptr<I>(), vals.data_ptr<T>(),
                          bt.data_ptr<T>(), bias.defined() ? bias.data_ptr<T>() : nullptr, out.data_ptr<T>(),
                          plane, eoff.data_ptr<int64_t>(),
                          poff.data_ptr<int64_t>()};
    if (starts.defined()) {
      a.block_starts = starts.data_ptr<int64_t>();
      a.col_blocks = starts.numel() / (row_ptr.numel() - 1) - 1;
    }
    cpu::spmm(a);
  });
}

at::Tensor masked_conv2d_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_ptr,
                             const at::Tensor& col_idx, const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx,
                             const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation) {
  const char* op = "masked_conv2d";
  auto g = check_conv(op, x, w, stride, padding, dilation);
  auto w2 = w.reshape({g.Cout, g.K}).contiguous();
  check_layout(op, w2, row_ptr, col_idx, t_row_ptr, t_col_idx);
  check_bias(op, w2, bias);
  check_csr(op, row_ptr, col_idx, g.Cout, g.K, "row");
  const int64_t plane = g.Ho * g.Wo;
  auto y = at::empty({g.N, g.Cout, g.Ho, g.Wo}, x.options());
  if (y.numel() > 0 && col_idx.numel() > 0) {
    const int64_t ld = batch_ld(x.scalar_type());
    auto rp = row_ptr.contiguous(), ci = col_idx.contiguous();
    auto eoff = forward_entry_offsets(ci, g, ld);
    auto poff = position_offsets(g.Ho, g.Wo, g.sh, g.sw, g.Wp, g.Cin * ld);
    auto vals = gather_values(w2, rp, ci, g.K, 1);
    const auto b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
    const auto rowmap = nhwc_rowmap(g.Cin, g.H, g.W, g.ph, g.pw);
    // (W's columns are (ci, kh, kw): a block of input channels is a range of them)
    const auto starts = block_starts(
        rp, ci, block_channels(g.Ho, g.Wo, g.sh, g.KH, g.dh, g.Hp, g.Wp, g.Cin, ld, x.element_size()) * g.KH * g.KW,
        g.K);
    for (int64_t n0 = 0; n0 < g.N; n0 += ld) {  // passes of ld images
      const int64_t nb = std::min(ld, g.N - n0);
      auto xt = nhwc_transpose(x.narrow(0, n0, nb), g.ph, g.pw, ld, kInput, rowmap);
      auto yb = y.narrow(0, n0, nb);
      conv_spmm(yb, rp, ci, vals, xt, nb, ld, plane, eoff, poff, b, starts);
    }
  } else if (bias.has_value() && bias->defined()) {  // nothing kept: every output is the bias
    y.copy_(bias->view({1, g.Cout, 1, 1}).expand_as(y));
  } else {
    y.zero_();
  }
  return y.contiguous(format_of(x));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_ptr,
    const at::Tensor& col_idx, const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 3> output_mask) {
  const char* op = "masked_conv2d_backward";
  auto g = check_conv(op, x, w, stride, padding, dilation);
  check_floating(op, grad, "grad", false);
  check_same_dtype(op, w, "w", grad, "grad");
  check_same_device(op, w, "w", grad, "grad");
  TORCH_CHECK_VALUE(grad.dim() == 4 && grad.size(0) == g.N && grad.size(1) == g.Cout && grad.size(2) == g.Ho &&
                        grad.size(3) == g.Wo,
                    "sparseops.", op, ": grad has shape ", grad.sizes(), ", expected [", g.N, ", ", g.Cout, ", ", g.Ho,
                    ", ", g.Wo, "]");
  auto w2 = w.reshape({g.Cout, g.K}).contiguous();
  check_layout(op, w2, row_ptr, col_idx, t_row_ptr, t_col_idx);
  const auto [need_dx, need_dw, need_db] = output_mask;
  const int64_t nnz = col_idx.numel(), plane = g.Ho * g.Wo;
  const bool work = g.N > 0 && g.Cout > 0 && nnz > 0 && plane > 0;
  const int64_t ld = batch_ld(x.scalar_type());
  at::Tensor dx, dw, db;
  // Per pass of ld images: the grad, batch-minor [hq, wq, co, n] inside a border of (k - 1) * d zeros
  // (what dx reads), at its stride positions. With stride 1 that is one transpose with a border, and
  // dw reads the same buffer (a_off); otherwise dw reads a plain transpose gt and dx a copy scattered
  // to the stride positions.
  const int64_t bh = (g.KH - 1) * g.dh, bw = (g.KW - 1) * g.dw;
  const int64_t Hq = g.Hp + bh, Wq = g.Wp + bw;
  const bool unit_stride = g.sh == 1 && g.sw == 1;
  const bool dx_work = need_dx && work && g.Cin > 0;
  if (need_dx) {
    check_csr(op, t_row_ptr, t_col_idx, g.K, g.Cout, "transposed");
    dx = dx_work ? at::empty({g.N, g.Cin, g.H, g.W}, x.options()) : at::zeros_like(x, at::MemoryFormat::Preserve);
  }
  if (need_dw) {
    check_csr(op, row_ptr, col_idx, g.Cout, g.K, "row");
    dw = at::zeros(w.sizes(), w.options());  // fresh, in w's shape (an op returns no views)
  }
  const bool dw_work = need_dw && work;
  at::Tensor t_rp, t_ci, t_vals, group_ptr, dx_eoff, dx_poff, dx_starts;  // dx: the transposed convolution
  if (dx_work) {
    t_rp = t_row_ptr.contiguous();
    t_ci = t_col_idx.contiguous();
    t_vals = gather_values(w2, t_rp, t_ci, 1, g.K);
    // W^T's rows k = (ci, kh, kw) are consecutive per ci: one grouped row per input channel.
    auto long_opts = at::TensorOptions().dtype(at::kLong);
    group_ptr = t_rp.index_select(0, at::arange(0, g.K + 1, g.KH * g.KW, long_opts)).contiguous();
    auto k = at::repeat_interleave(at::arange(g.K, long_opts), t_rp.diff().to(at::kLong), 0, nnz);
    auto r = k.remainder(g.KH * g.KW);
    auto kh = r.div(g.KW, "floor"), kw = r.remainder(g.KW);
    dx_eoff = (((g.KH - 1 - kh) * g.dh * Wq + (g.KW - 1 - kw) * g.dw) * g.Cout + t_ci.to(at::kLong))
                  .mul_(ld)
                  .contiguous();
    // dx's own positions (h, w) sit at (h + ph, w + pw) of the padded input: only those are computed.
    dx_poff = position_offsets(g.H, g.W, 1, 1, Wq, g.Cout * ld).add_((g.ph * Wq + g.pw) * g.Cout * ld);
    // In blocks of output channels where the grad's window outgrows L2 (as the forward): a grouped
    // row lists its entries tap by tap, so they are reordered by block (stably), and the blocks'
    // starts are found from each entry's block start.
    const int64_t dx_block = block_channels(g.H, g.W, 1, g.KH, g.dh, Hq, Wq, g.Cout, ld, x.element_size());
    if (dx_block > 0) {
      auto co_block = t_ci.to(at::kLong).div(dx_block, "floor");
      auto group = k.div(g.KH * g.KW, "floor");  // each entry's grouped row: its input channel
      const auto order = std::get<1>(group.mul_(g.Cout).add_(co_block).sort(/*stable=*/std::optional<bool>(true), 0));
      t_vals = t_vals.index_select(0, order);
      dx_eoff = dx_eoff.index_select(0, order);
      const auto dx_col = co_block.index_select(0, order).mul_(dx_block).to(t_ci.scalar_type());
      dx_starts = block_starts(group_ptr, dx_col, dx_block, g.Cout);
    }
  }
  at::Tensor rp, ci, eoff, poff, a_off, vals, x_rowmap;  // dw: the SDDMM per kept entry
  if (dw_work) {
    x_rowmap = nhwc_rowmap(g.Cin, g.H, g.W, g.ph, g.pw);
    rp = row_ptr.contiguous();
    ci = col_idx.contiguous();
    eoff = forward_entry_offsets(ci, g, ld);
    poff = position_offsets(g.Ho, g.Wo, g.sh, g.sw, g.Wp, g.Cin * ld);
    a_off = unit_stride ? position_offsets(g.Ho, g.Wo, 1, 1, Wq, g.Cout * ld).add_((bh * Wq + bw) * g.Cout * ld)
                        : at::Tensor();
    vals = at::empty({nnz}, w.options());
  }
  // db from the grad's transposes (which read it anyway), not another pass over grad in memory.
  const auto grad_sums = need_db ? at::empty({g.Cout * plane}, grad.options()) : at::Tensor();
  const auto g_rowmap = dx_work || dw_work ? unit_stride ? nhwc_rowmap(g.Cout, g.Ho, g.Wo, bh, bw)
                                                         : nhwc_rowmap(g.Cout, g.Ho, g.Wo, 0, 0)
                                           : at::Tensor();
  for (int64_t n0 = 0; n0 < g.N && (dx_work || dw_work); n0 += ld) {
    const int64_t nb = std::min(ld, g.N - n0);
    const auto gb = grad.narrow(0, n0, nb);
    at::Tensor gt, gq;
    if (unit_stride) {
      gq = nhwc_transpose(gb, bh, bw, ld, kScatter, g_rowmap, grad_sums);  // Hq = Ho + 2 bh, Wq = Wo + 2 bw
      gt = gq;
    } else {
      gt = nhwc_transpose(gb, 0, 0, ld, kGrad, g_rowmap, grad_sums);  // rows (oh, ow, co)
      if (dx_work) {
        gq = scratch(kScatter, Hq * Wq * g.Cout * ld, x.options()).view({Hq * Wq * g.Cout, ld}).zero_();
        zeroed_border.at(kScatter) = Border{};  // (now a strided layout: no transpose's border)
        gq.view({Hq, Wq, g.Cout, ld})
            .slice(0, bh, bh + (g.Ho - 1) * g.sh + 1, g.sh)
            .slice(1, bw, bw + (g.Wo - 1) * g.sw + 1, g.sw)
            .copy_(gt.view({g.Ho, g.Wo, g.Cout, ld}));
      }
    }
    if (need_db) {
      auto pass_db = grad_sums.view({g.Cout, plane}).sum(1);
      db = n0 == 0 ? pass_db : db.add_(pass_db);
    }
    if (dx_work) {
      auto dxb = dx.narrow(0, n0, nb);
      conv_spmm(dxb, group_ptr, t_ci, t_vals, gq, nb, ld, g.H * g.W, dx_eoff, dx_poff, at::Tensor(), dx_starts);
    }
    if (dw_work) {
      auto xt = nhwc_transpose(x.narrow(0, n0, nb), g.ph, g.pw, ld, kInput, x_rowmap);
      dispatch(w, rp, [&](auto t, auto i) {
        using T = decltype(t);
        using I = decltype(i);
        cpu::SddmmArgs<T, I> a{g.Cout, g.K, ld, rp.data_ptr<I>(), ci.data_ptr<I>(), gt.data_ptr<T>(),
                               xt.data_ptr<T>(), nullptr, nullptr, false, false, plane, eoff.data_ptr<int64_t>(),
                               poff.data_ptr<int64_t>(), a_off.defined() ? a_off.data_ptr<int64_t>() : nullptr};
        cpu::conv_dw(a, nnz, vals.data_ptr<T>(), /*accumulate=*/n0 > 0);
      });
    }
  }
  if (dx_work) dx = dx.contiguous(format_of(x));
  if (dw_work) {
    auto rows = at::repeat_interleave(at::arange(g.Cout, rp.options().dtype(at::kLong)), rp.diff().to(at::kLong), 0,
                                      nnz);
    dw.view({g.Cout, g.K}).index_put_({rows, ci.to(at::kLong)}, vals);
  }
  if (need_db) db = db.defined() ? db : grad.sum({0, 2, 3});
  auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, w.options()); };
  return {or_empty(dx), or_empty(dw), or_empty(db)};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparseops, CPU, m) {
  m.impl("masked_conv2d", &masked_conv2d_cpu);
  m.impl("masked_conv2d_backward", &masked_conv2d_backward_cpu);
}

}  // namespace sparseops
