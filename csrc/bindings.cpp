// pybind11 binding of hrfast's fusion kernels: argument checks, output allocation, the per-channel
// reductions, and dispatch on the tensors' device (CPU: the kernels through the host build's emulation of
// the CUDA grid, fuse_cpu.cpp, a test vehicle; CUDA: the kernels on the GPU, fuse_cuda.cu, present only in
// the build compiled with -DHRFAST_WITH_CUDA).
//
// Terms are the plan's descriptors (hrfast/plan.py `TermPlan` tuples, one per term) beside xs, scales and
// shifts (None where the descriptor has none). Per-channel scales/shifts may have another floating dtype
// than x (fp32 BN parameters with bf16 activations); the math runs in float32 (float64 for float64 inputs).
#include <torch/extension.h>

#include <array>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "fuse_launch.h"

namespace hrfast {
namespace {

using OptTensor = c10::optional<at::Tensor>;

constexpr int64_t kMaxGridZ = 65535;  // one grid z-slice per image in the CUDA kernels

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

bool is_channels_last_like(const at::Tensor& t) { return t.dim() == 4 && t.stride(1) == 1 && t.size(1) > 1; }

at::Tensor poisoned(at::Tensor t, bool poison) {
  if (poison && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// A gradient buffer in x's layout; x may be a stride-0 stand-in (x not saved for backward), then in
// layout_hint's (as kernels/fuse.py `_empty_grad`).
at::Tensor empty_grad(const at::Tensor& x, const at::Tensor& layout_hint, bool poison) {
  bool has_zero_stride = false;
  for (int64_t d = 0; d < x.dim(); ++d) has_zero_stride |= x.stride(d) == 0;
  if (!has_zero_stride || x.numel() <= 1) return poisoned(at::empty_like(x), poison);
  const auto fmt = is_channels_last_like(layout_hint) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  return poisoned(at::empty(x.sizes(), x.options().memory_format(fmt)), poison);
}

std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

// A TermPlan as pybind11's own casters convert it (a NamedTuple is a tuple): mode, align_corners,
// (h num, den), (w num, den), has_scale, has_shift. Stock casters rather than a bound TermDesc class: the
// launcher passes plan.terms as they are, no Python object is built per term, and no custom caster code.
using TermPlanTuple =
    std::tuple<int64_t, bool, std::pair<int64_t, int64_t>, std::pair<int64_t, int64_t>, bool, bool>;

// The one place a term's descriptor is decoded and checked (against its input x and the output size H x W).
// A SAME term keeps the default ratios and align_corners (not read).
TermDesc decode_term(size_t k, const TermPlanTuple& plan, const at::Tensor& x, int64_t H, int64_t W) {
  const auto& [mode, align, rh, rw, has_scale, has_shift] = plan;
  TORCH_CHECK(mode == SAME || mode == NEAREST || mode == BILINEAR, "hrfast fuse: terms[", k, "] has mode ", mode,
              "; expected 0 (same size), 1 (nearest) or 2 (bilinear)");
  TermDesc d;
  d.mode = mode;
  d.has_scale = has_scale;
  d.has_shift = has_shift;
  if (mode == SAME) {
    TORCH_CHECK(x.size(2) == H && x.size(3) == W, "hrfast fuse: xs[", k, "] has mode 0 (same size) but is ",
                x.size(2), "x", x.size(3), ", the output is ", H, "x", W);
    return d;
  }
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1 && x.size(2) <= H && x.size(3) <= W, "hrfast fuse: xs[", k, "] is ",
              x.size(2), "x", x.size(3), "; an upsampled term must be non-empty and at most the output ", H, "x", W);
  const auto [hn, hd] = rh;
  const auto [wn, wd] = rw;
  for (int64_t v : {hn, hd, wn, wd}) {
    TORCH_CHECK(v >= 0 && v < (int64_t(1) << 53), "hrfast fuse: ratios of term ", k, " must be non-negative "
                "integers below 2**53, got ", hn, "/", hd, ", ", wn, "/", wd);
  }
  TORCH_CHECK(hd >= 1 && wd >= 1 && hn <= hd && wn <= wd, "hrfast fuse: ratios of term ", k,
              " must be fractions num/den in [0, 1] (the op only upsamples), got ", hn, "/", hd, ", ", wn, "/", wd);
  TORCH_CHECK(mode == BILINEAR || !align, "hrfast fuse: terms[", k, "] sets align_corners for a nearest term");
  d.align_corners = align;
  d.ratio_h = {hn, hd};
  d.ratio_w = {wn, wd};
  return d;
}

// Checks every argument and returns the terms: descriptors decoded, scale/shift converted to dense
// accumulation-dtype vectors. `H`, `W`: the output size (forward: `size`; backward: grad_y's).
std::vector<TermSpec> check_terms(const std::vector<TermPlanTuple>& term_plans, const std::vector<at::Tensor>& xs,
                                  const std::vector<OptTensor>& scales, const std::vector<OptTensor>& shifts,
                                  int64_t H, int64_t W) {
  const size_t K = xs.size();
  TORCH_CHECK(K >= 1, "hrfast fuse: xs must hold at least one tensor");
  TORCH_CHECK(term_plans.size() == K, "hrfast fuse: terms has ", term_plans.size(), " entries but there are ", K,
              " terms");
  TORCH_CHECK(scales.size() == K, "hrfast fuse: scales has ", scales.size(), " entries but there are ", K, " terms");
  TORCH_CHECK(shifts.size() == K, "hrfast fuse: shifts has ", shifts.size(), " entries but there are ", K, " terms");
  TORCH_CHECK(H >= 1 && W >= 1, "hrfast fuse: the output size must be positive, got ", H, "x", W);
  TORCH_CHECK(H * W < (int64_t(1) << 31), "hrfast fuse: output size ", H, "x", W,
              " has 2**31 or more pixels per channel; not supported");
  const at::Tensor& x0 = xs[0];
  TORCH_CHECK(x0.defined(), "hrfast fuse: xs[0] is undefined");
  TORCH_CHECK(x0.device().is_cpu() || x0.device().is_cuda(), "hrfast fuse: tensors must be on CPU or CUDA, got ",
              x0.device());
  std::vector<TermSpec> terms(K);
  for (size_t k = 0; k < K; ++k) {
    const at::Tensor& x = xs[k];
    TORCH_CHECK(x.defined(), "hrfast fuse: xs[", k, "] is undefined");
    TORCH_CHECK(x.dim() == 4, "hrfast fuse: xs[", k, "] must be 4-D [N, C, H, W], got shape ", shape_str(x));
    TORCH_CHECK(is_kernel_dtype(x.scalar_type()), "hrfast fuse: xs[", k, "] has dtype ", x.scalar_type(),
                "; expected float16, bfloat16, float32 or float64");
    TORCH_CHECK(x.scalar_type() == x0.scalar_type(), "hrfast fuse: xs[", k, "] has dtype ", x.scalar_type(),
                " but xs[0] has ", x0.scalar_type());
    TORCH_CHECK(x.device() == x0.device(), "hrfast fuse: xs[", k, "] is on ", x.device(), " but xs[0] is on ",
                x0.device());
    TORCH_CHECK(x.size(0) == x0.size(0) && x.size(1) == x0.size(1), "hrfast fuse: xs[", k, "] has shape ",
                shape_str(x), " but xs[0] has ", shape_str(x0), "; batch and channels must match");
    TermSpec& t = terms[k];
    t.desc = decode_term(k, term_plans[k], x, H, W);
    t.x = x;
    const char* names[2] = {"scales", "shifts"};
    const char* flags[2] = {"has_scale", "has_shift"};
    const bool declared[2] = {t.desc.has_scale, t.desc.has_shift};
    const OptTensor* params[2] = {&scales[k], &shifts[k]};
    for (int i = 0; i < 2; ++i) {
      const OptTensor& p = *params[i];
      if (!p.has_value() || !p->defined()) {
        TORCH_CHECK(!declared[i], "hrfast fuse: ", names[i], "[", k, "] is None but terms[", k, "].", flags[i],
                    " is true");
        continue;
      }
      TORCH_CHECK(p->is_floating_point(), "hrfast fuse: ", names[i], "[", k, "] has dtype ", p->scalar_type(),
                  "; expected a floating dtype");
      TORCH_CHECK(p->dim() == 1 && p->size(0) == x0.size(1), "hrfast fuse: ", names[i], "[", k,
                  "] must have shape [", x0.size(1), "] (one value per channel), got ", shape_str(*p));
      TORCH_CHECK(p->device() == x0.device(), "hrfast fuse: ", names[i], "[", k, "] is on ", p->device(),
                  " but the inputs are on ", x0.device());
      TORCH_CHECK(declared[i], "hrfast fuse: ", names[i], "[", k, "] is a tensor but terms[", k, "].", flags[i],
                  " is false");
      at::Tensor v = p->to(acc_type(x0.scalar_type())).contiguous();
      (i == 0 ? t.scale : t.shift) = v;
    }
  }
  if (x0.device().is_cuda()) {
    TORCH_CHECK(x0.size(0) <= kMaxGridZ, "hrfast fuse: batch ", x0.size(0), " exceeds ", kMaxGridZ,
                " images per call (CUDA grid z)");
  }
  return terms;
}

// The launchers of the tensors' device (checked by check_terms: CPU or CUDA).
const Launchers& launchers_for(const at::Device& device) {
  if (device.is_cpu()) return host_launchers();
#ifdef HRFAST_WITH_CUDA
  return cuda_launchers();
#else
  TORCH_CHECK(false, "hrfast fuse: CUDA tensors need the CUDA build of the extension; this one was built without "
              "CUDA (CPU tensors only, through its emulation of the CUDA grid)");
#endif
}

}  // namespace

// y = ReLU(sum_k Up_k(xs[k]) * scales[k] + shifts[k]) of shape [N, C, size[0], size[1]] in xs' dtype,
// channels_last when asked. `poison`: the output starts as NaN (tests: an unwritten element fails).
at::Tensor fuse_forward(const std::vector<TermPlanTuple>& term_plans, const std::vector<at::Tensor>& xs,
                        const std::vector<OptTensor>& scales, const std::vector<OptTensor>& shifts,
                        const std::vector<int64_t>& size, bool relu, bool channels_last, bool poison) {
  TORCH_CHECK(size.size() == 2, "hrfast fuse: size must be [H, W], got ", size.size(), " values");
  const auto terms = check_terms(term_plans, xs, scales, shifts, size[0], size[1]);
  const at::Tensor& x0 = xs[0];
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = poisoned(at::empty({x0.size(0), x0.size(1), size[0], size[1]}, x0.options().memory_format(fmt)),
                            poison);
  if (out.numel() > 0) launchers_for(out.device()).forward(out, terms, relu);
  return out;
}

// The name of the forward kernel fuse_forward runs for these arguments (fuse_launchers.h forward_kernel_name):
// "PhaseKernel", "ForwardVecKernel", "ForwardTileKernel" or "ForwardKernel" (the generic one).
std::string forward_kernel(const std::vector<TermPlanTuple>& term_plans, const std::vector<at::Tensor>& xs,
                           const std::vector<OptTensor>& scales, const std::vector<OptTensor>& shifts,
                           const std::vector<int64_t>& size, bool channels_last) {
  TORCH_CHECK(size.size() == 2, "hrfast fuse: size must be [H, W], got ", size.size(), " values");
  const auto terms = check_terms(term_plans, xs, scales, shifts, size[0], size[1]);
  const at::Tensor& x0 = xs[0];
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor out = at::empty({x0.size(0), x0.size(1), size[0], size[1]}, x0.options().memory_format(fmt));
  return launchers_for(out.device()).forward_kernel(out, terms);
}

using TermGrads = std::tuple<OptTensor, OptTensor, OptTensor>;  // (dx, dscale, dshift)

// Per term (dx, dscale, dshift), each None where needs[k] does not ask for it or the term has no such
// parameter. `y` (the forward output, its sign is the ReLU mask) is required when relu is true. xs may be
// stride-0 stand-ins of the right shape when their dscale is not needed.
std::vector<TermGrads> fuse_backward(const std::vector<TermPlanTuple>& term_plans, const at::Tensor& grad_y,
                                     const OptTensor& y, const std::vector<at::Tensor>& xs,
                                     const std::vector<OptTensor>& scales, const std::vector<OptTensor>& shifts,
                                     const std::vector<std::array<bool, 3>>& needs, bool relu, bool poison,
                                     bool phase, bool row) {
  TORCH_CHECK(grad_y.defined() && grad_y.dim() == 4, "hrfast fuse: grad_y must be a 4-D tensor");
  const auto terms = check_terms(term_plans, xs, scales, shifts, grad_y.size(2), grad_y.size(3));
  const size_t K = terms.size();
  const at::Tensor& x0 = xs[0];
  TORCH_CHECK(needs.size() == K, "hrfast fuse: needs has ", needs.size(), " entries (dx, dscale, dshift) but there "
              "are ", K, " terms");
  TORCH_CHECK(grad_y.size(0) == x0.size(0) && grad_y.size(1) == x0.size(1), "hrfast fuse: grad_y has shape ",
              shape_str(grad_y), " but the terms have batch ", x0.size(0), " and ", x0.size(1), " channels");
  TORCH_CHECK(grad_y.scalar_type() == x0.scalar_type(), "hrfast fuse: grad_y has dtype ", grad_y.scalar_type(),
              " but xs have ", x0.scalar_type());
  TORCH_CHECK(grad_y.device() == x0.device(), "hrfast fuse: grad_y is on ", grad_y.device(), " but xs are on ",
              x0.device());
  at::Tensor y_t;
  if (relu) {
    TORCH_CHECK(y.has_value() && y->defined(), "hrfast fuse: y (the forward output) is required when relu is true");
    y_t = *y;
    TORCH_CHECK(y_t.sizes() == grad_y.sizes(), "hrfast fuse: y has shape ", shape_str(y_t), " but grad_y has ",
                shape_str(grad_y));
    TORCH_CHECK(y_t.scalar_type() == grad_y.scalar_type(), "hrfast fuse: y has dtype ", y_t.scalar_type(),
                " but grad_y has ", grad_y.scalar_type());
    TORCH_CHECK(y_t.device() == grad_y.device(), "hrfast fuse: y is on ", y_t.device(), " but grad_y is on ",
                grad_y.device());
  }

  const Launchers& launch = launchers_for(grad_y.device());
  std::vector<TermGrads> result(K);
  // output-size terms share launches (gathered here, run after the loop); upsampled terms too (gathered
  // here): those adjoint_row_group takes in one RowAdjointKernel launch, each other one its own
  std::vector<TermSpec> same_terms;
  std::vector<at::Tensor> same_dx;
  std::vector<bool> same_dscale;
  std::vector<size_t> same_index;
  std::vector<TermSpec> up_terms;
  std::vector<at::Tensor> up_dx;
  std::vector<bool> up_dscale, up_dshift;
  std::vector<size_t> up_index;
  bool need_sum_g = false, same_busy = false;
  for (size_t k = 0; k < K; ++k) {
    const TermSpec& t = terms[k];
    auto& [dx_k, dscale_k, dshift_k] = result[k];
    const bool need_dx = needs[k][0];
    const bool need_dscale = needs[k][1] && t.desc.has_scale;
    const bool need_dshift = needs[k][2] && t.desc.has_shift;
    at::Tensor dx = need_dx ? empty_grad(t.x, grad_y, poison) : at::Tensor();
    if (need_dx) dx_k = dx;
    if (t.desc.mode == SAME) {
      need_sum_g |= need_dshift;
      same_busy |= need_dx || need_dscale || need_dshift;
      same_terms.push_back(t);
      same_dx.push_back(dx);
      same_dscale.push_back(need_dscale);
      same_index.push_back(k);
      continue;
    }
    if (!(need_dx || need_dscale || need_dshift)) continue;
    up_terms.push_back(t);
    up_dx.push_back(dx);
    up_dscale.push_back(need_dscale);
    up_dshift.push_back(need_dshift);
    up_index.push_back(k);
  }
  std::vector<at::Tensor> up_parts(up_terms.size());
  if (phase && row) {
    const std::vector<int64_t> group = launch.adjoint_row_group(grad_y, y_t, relu, up_terms, up_dx);
    if (!group.empty()) {
      std::vector<TermSpec> terms_g;
      std::vector<at::Tensor> dx_g;
      std::vector<bool> dscale_g, dshift_g;
      for (int64_t i : group) {
        terms_g.push_back(up_terms[i]);
        dx_g.push_back(up_dx[i]);
        dscale_g.push_back(up_dscale[i]);
        dshift_g.push_back(up_dshift[i]);
      }
      const std::vector<at::Tensor> parts = launch.backward_adjoint_row(grad_y, y_t, relu, terms_g, dx_g, dscale_g,
                                                                        dshift_g);
      for (size_t j = 0; j < group.size(); ++j) up_parts[group[j]] = parts[j];
    }
  }
  for (size_t i = 0; i < up_terms.size(); ++i) {
    if (!up_parts[i].defined()) {
      up_parts[i] = launch.backward_adjoint(grad_y, y_t, relu, up_terms[i], up_dx[i], up_dscale[i], up_dshift[i],
                                            phase);
    }
    if (!(up_dscale[i] || up_dshift[i])) continue;
    // per-tile partial sums, reduced over the tiles here: a fixed-order reduction (deterministic)
    const size_t k = up_index[i];
    auto& [dx_k, dscale_k, dshift_k] = result[k];
    const at::Tensor totals = up_parts[i].sum(1);
    if (up_dscale[i]) dscale_k = totals[0].to(scales[k]->scalar_type());
    if (up_dshift[i]) dshift_k = totals[1].to(shifts[k]->scalar_type());
  }
  if (same_busy) {
    const at::Tensor totals =
        launch.backward_same(grad_y, y_t, relu, same_terms, same_dx, same_dscale, need_sum_g).sum(1);
    const int64_t S = static_cast<int64_t>(same_terms.size());
    for (int64_t i = 0; i < S; ++i) {
      const size_t k = same_index[i];
      auto& [dx_k, dscale_k, dshift_k] = result[k];
      if (same_dscale[i]) dscale_k = totals[i].to(scales[k]->scalar_type());
      if (needs[k][2] && terms[k].desc.has_shift) dshift_k = totals[S].to(shifts[k]->scalar_type());
    }
  }
  return result;
}

// Per term, the adjoint kernel fuse_backward runs for it when its dx is needed ("RowAdjointKernel<f0,...>" for
// the terms of one row launch, fuse_launchers.h adjoint_row_name; else fuse_launchers.h
// adjoint_kernel_name: "AdjointKernel<KMAX,MODE>"), "" for an output-size term. Tests and the model.
std::vector<std::string> adjoint_kernels(const std::vector<TermPlanTuple>& term_plans, const at::Tensor& grad_y,
                                         const OptTensor& y, const std::vector<at::Tensor>& xs,
                                         const std::vector<OptTensor>& scales, const std::vector<OptTensor>& shifts,
                                         bool relu, bool phase, bool row) {
  TORCH_CHECK(grad_y.defined() && grad_y.dim() == 4, "hrfast fuse: grad_y must be a 4-D tensor");
  const auto terms = check_terms(term_plans, xs, scales, shifts, grad_y.size(2), grad_y.size(3));
  TORCH_CHECK(!relu || (y.has_value() && y->defined()), "hrfast fuse: y is required when relu is true");
  const at::Tensor y_t = relu ? *y : at::Tensor();
  const Launchers& launch = launchers_for(grad_y.device());
  std::vector<std::string> names;
  std::vector<TermSpec> up_terms;
  std::vector<at::Tensor> up_dx;
  std::vector<size_t> up_index;
  for (size_t k = 0; k < terms.size(); ++k) {
    const TermSpec& t = terms[k];
    const at::Tensor dx = t.desc.mode == SAME ? at::Tensor() : empty_grad(t.x, grad_y, false);
    names.push_back(t.desc.mode == SAME ? std::string() : launch.adjoint_kernel(grad_y, y_t, relu, t, dx, phase));
    if (t.desc.mode == SAME) continue;
    up_terms.push_back(t);
    up_dx.push_back(dx);
    up_index.push_back(k);
  }
  const std::vector<int64_t> group =
      phase && row ? launch.adjoint_row_group(grad_y, y_t, relu, up_terms, up_dx) : std::vector<int64_t>();
  if (!group.empty()) {
    std::vector<TermSpec> terms_g;
    for (int64_t i : group) terms_g.push_back(up_terms[i]);
    const std::string name = launch.adjoint_row_kernel(grad_y, terms_g);
    for (int64_t i : group) names[up_index[i]] = name;
  }
  return names;
}

// (K, step, offset) of the adjoint gather along one axis, for tests against kernels/fuse.py `window`.
std::tuple<int64_t, int64_t, int64_t> adjoint_window(int64_t num, int64_t den, int64_t mode, bool align_corners,
                                                     int64_t n_out) {
  TORCH_CHECK(den >= 1 && num >= 0, "hrfast fuse: adjoint_window needs num >= 0, den >= 1");
  int32_t K, step, offset;
  window({num, den}, mode, align_corners, n_out, K, step, offset);
  return {K, step, offset};
}

}  // namespace hrfast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "hrfast's fusion kernels: y = ReLU(sum_k Up_k(x_k) * scale_k + shift_k), forward and backward";
  m.def("fuse_forward", &hrfast::fuse_forward, "Fused forward of the HRNet fusion step", py::arg("terms"),
        py::arg("xs"), py::arg("scales"), py::arg("shifts"), py::arg("size"), py::arg("relu"),
        py::arg("channels_last"), py::arg("poison") = false);
  m.def("fuse_backward", &hrfast::fuse_backward,
        "Per term (dx, dscale, dshift) of the fused fusion step (deterministic, no atomics)", py::arg("terms"),
        py::arg("grad_y"), py::arg("y"), py::arg("xs"), py::arg("scales"), py::arg("shifts"), py::arg("needs"),
        py::arg("relu"), py::arg("poison") = false, py::arg("phase") = true, py::arg("row") = true);
  m.def("adjoint_kernels", &hrfast::adjoint_kernels, "Per term, the adjoint kernel fuse_backward runs for it",
        py::arg("terms"), py::arg("grad_y"), py::arg("y"), py::arg("xs"), py::arg("scales"), py::arg("shifts"),
        py::arg("relu"), py::arg("phase") = true, py::arg("row") = true);
  m.def("forward_kernel", &hrfast::forward_kernel, "The forward kernel fuse_forward runs for these arguments",
        py::arg("terms"), py::arg("xs"), py::arg("scales"), py::arg("shifts"), py::arg("size"),
        py::arg("channels_last"));
  m.def("adjoint_window", &hrfast::adjoint_window, "(K, step, offset) of the adjoint gather along one axis",
        py::arg("num"), py::arg("den"), py::arg("mode"), py::arg("align_corners"), py::arg("n_out"));
#ifdef HRFAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
