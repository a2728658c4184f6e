// The `proper` operator library: schemas, argument checks and registration.
//
// Loading the compiled module (`import proper_kernels._C`, after `import torch`)
// runs the static registrations below, so the ops appear under torch.ops.proper.
// The module itself defines no Python functions. Every op has a CUDA kernel, a CPU
// registration that says plainly it needs CUDA tensors, and a Meta kernel (the same
// checks, then output shapes) for fake tensors and torch.compile.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>  // CUDART_VERSION
#include <torch/library.h>
#include <torch/version.h>  // TORCH_VERSION

#include <optional>
#include <string>
#include <tuple>

#include "ops.h"

namespace proper {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

std::string cuda_build_info() {
  return "cuda " + std::to_string(CUDART_VERSION / 1000) + "." +
         std::to_string(CUDART_VERSION % 1000 / 10) + " torch " + TORCH_VERSION;
}

// -- checks that name the argument ----------------------------------------------------------

void check_float(const char* op, const char* name, const Tensor& t) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16, "proper::", op, ": argument '", name,
              "' must have dtype float32, float16 or bfloat16, got ", d);
}

void check_layout(const char* op, const char* name, const Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "proper::", op, ": argument '", name, "' must have ", dim, " dimensions, got shape ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), "proper::", op, ": argument '", name, "' must be contiguous, got strides ",
              t.strides(), " for shape ", t.sizes());
}

void check_size(const char* op, const char* name, const Tensor& t, int64_t d, int64_t expected, const char* what) {
  TORCH_CHECK(t.size(d) == expected, "proper::", op, ": argument '", name, "' must have size ", expected, " (", what,
              ") in dimension ", d, ", got shape ", t.sizes());
}

void check_same(const char* op, const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "proper::", op, ": argument '", name, "' is on ", t.device(), " but '",
              ref_name, "' is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "proper::", op, ": argument '", name, "' has dtype ",
              t.scalar_type(), " but '", ref_name, "' has ", ref.scalar_type());
}

void check_index(const char* op, const char* name, const Tensor& t, const Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == at::kLong, "proper::", op, ": argument '", name, "' must be int64, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "proper::", op, ": argument '", name, "' is on ", t.device(),
              " but the data is on ", ref.device());
}

// One host sync: ids must lie in [-1, rows) (-1: no row).
void check_index_range(const char* op, const char* name, const Tensor& ids, int64_t rows) {
  if (ids.numel() == 0 || ids.device().is_meta()) return;
  const Tensor bad = at::logical_or(ids.lt(-1), ids.ge(rows));
  if (bad.any().item<bool>()) {
    const int64_t first = ids.masked_select(bad).flatten()[0].item<int64_t>();
    TORCH_CHECK(false, "proper::", op, ": argument '", name, "' contains ", first, ", outside [-1, ", rows, ")");
  }
}

void check_cuda(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "proper::", op, ": argument '", name, "' must be a CUDA tensor, got ", t.device(),
              " (the proper CUDA ops have no CPU implementation)");
}

template <typename F>
void dispatch_tag(const Tensor& t, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: f(F32{}); break;
    case at::kHalf: f(F16{}); break;
    case at::kBFloat16: f(BF16{}); break;
    default: TORCH_CHECK(false, "proper: unsupported dtype ", t.scalar_type());
  }
}

cudaStream_t stream_of(const Tensor& t) { return at::cuda::getCurrentCUDAStream(t.device().index()); }

// -- fill_ (the toolchain check) --------------------------------------------------------------

void check_fill_layout(const Tensor& out) {
  TORCH_CHECK(out.is_contiguous(), "proper::fill_: argument 'out' must be contiguous, got strides ", out.strides(),
              " for shape ", out.sizes());
  check_float("fill_", "out", out);
}

Tensor& fill_cuda(Tensor& out, double value) {
  check_cuda("fill_", "out", out);
  check_fill_layout(out);
  const c10::cuda::CUDAGuard guard(out.device());
  launch_fill_(out, value);
  return out;
}

Tensor& fill_cpu(Tensor& out, double /*value*/) {
  check_cuda("fill_", "out", out);
  return out;
}

Tensor& fill_meta(Tensor& out, double /*value*/) {
  check_fill_layout(out);
  return out;
}

// -- router_topk --------------------------------------------------------------------------------

void check_topk(const char* op, const Tensor& logits, int64_t top_k, double temperature) {
  check_layout(op, "logits", logits, 2);
  check_float(op, "logits", logits);
  const int64_t E = logits.size(1);
  TORCH_CHECK(E >= 1 && E <= kMaxExperts, "proper::", op, ": argument 'logits' must have between 1 and ",
              kMaxExperts, " experts (columns), got ", E);
  TORCH_CHECK(top_k >= 1 && top_k <= E, "proper::", op, ": argument 'top_k' must be in [1, ", E, "], got ", top_k);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "proper::", op,
              ": argument 'temperature' must be positive and finite, got ", temperature);
}

std::tuple<Tensor, Tensor> router_topk_meta(const Tensor& logits, int64_t top_k, double temperature) {
  check_topk("router_topk", logits, top_k, temperature);
  const int64_t T = logits.size(0);
  return {at::empty({T, top_k}, logits.options()), at::empty({T, top_k}, logits.options().dtype(at::kLong))};
}

std::tuple<Tensor, Tensor> router_topk_cuda(const Tensor& logits, int64_t top_k, double temperature) {
  check_cuda("router_topk", "logits", logits);
  auto [gates, indices] = router_topk_meta(logits, top_k, temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  dispatch_tag(logits, [&](auto tag) {
    launch_router_topk_fwd<decltype(tag)>(logits.data_ptr(), gates.data_ptr(), indices.data_ptr<int64_t>(),
                                          logits.size(0), logits.size(1), top_k, 1.f / temperature,
                                          stream_of(logits));
  });
  return {gates, indices};
}

Tensor router_topk_backward_meta(const Tensor& logits, const Tensor& indices, const Tensor& dgates,
                                 double temperature) {
  const char* op = "router_topk_backward";
  check_topk(op, logits, indices.dim() == 2 ? indices.size(1) : 1, temperature);
  check_layout(op, "indices", indices, 2);
  check_index(op, "indices", indices, logits);
  check_size(op, "indices", indices, 0, logits.size(0), "tokens of logits");
  check_layout(op, "dgates", dgates, 2);
  check_same(op, "dgates", dgates, "logits", logits);
  TORCH_CHECK(dgates.sizes() == indices.sizes(), "proper::", op, ": argument 'dgates' must have the shape of 'indices' ",
              indices.sizes(), ", got ", dgates.sizes());
  return at::empty_like(logits);
}

Tensor router_topk_backward_cuda(const Tensor& logits, const Tensor& indices, const Tensor& dgates,
                                 double temperature) {
  check_cuda("router_topk_backward", "logits", logits);
  Tensor dlogits = router_topk_backward_meta(logits, indices, dgates, temperature);
  const c10::cuda::CUDAGuard guard(logits.device());
  dispatch_tag(logits, [&](auto tag) {
    launch_router_topk_bwd<decltype(tag)>(logits.data_ptr(), indices.data_ptr<int64_t>(), dgates.data_ptr(),
                                          dlogits.data_ptr(), logits.size(0), logits.size(1), indices.size(1),
                                          1.f / temperature, stream_of(logits));
  });
  return dlogits;
}

// -- bgmv_shrink / bgmv_expand -----------------------------------------------------------------

// weight [rows, M, K] (transpose: [rows, K, M]); returns M.
int64_t check_shrink(const Tensor& x, const Tensor& weight, const Tensor& indices, bool transpose,
                     bool check_indices) {
  const char* op = "bgmv_shrink";
  check_layout(op, "x", x, 2);
  check_float(op, "x", x);
  check_layout(op, "weight", weight, 3);
  check_same(op, "weight", weight, "x", x);
  check_size(op, "weight", weight, transpose ? 1 : 2, x.size(1), "the features of x");
  check_layout(op, "indices", indices, 2);
  check_index(op, "indices", indices, x);
  check_size(op, "indices", indices, 0, x.size(0), "tokens of x");
  const int64_t M = transpose ? weight.size(2) : weight.size(1);
  TORCH_CHECK(!transpose || M <= 256, "proper::", op, ": argument 'weight' may have at most 256 outputs (rank) ",
              "when transposed, got ", M);
  if (check_indices) check_index_range(op, "indices", indices, weight.size(0));
  return M;
}

Tensor bgmv_shrink_meta(const Tensor& x, const Tensor& weight, const Tensor& indices, bool transpose,
                        bool check_indices) {
  const int64_t M = check_shrink(x, weight, indices, transpose, false);
  return at::empty({x.size(0), indices.size(1), M}, x.options().dtype(at::kFloat));
}

Tensor bgmv_shrink_cuda(const Tensor& x, const Tensor& weight, const Tensor& indices, bool transpose,
                        bool check_indices) {
  check_cuda("bgmv_shrink", "x", x);
  const int64_t M = check_shrink(x, weight, indices, transpose, check_indices);
  Tensor out = at::empty({x.size(0), indices.size(1), M}, x.options().dtype(at::kFloat));
  const c10::cuda::CUDAGuard guard(x.device());
  dispatch_tag(x, [&](auto tag) {
    launch_bgmv_shrink<decltype(tag)>(x.data_ptr(), weight.data_ptr(), indices.data_ptr<int64_t>(),
                                      out.data_ptr<float>(), x.size(0), indices.size(1), x.size(1), M,
                                      weight.size(0), transpose, stream_of(x));
  });
  return out;
}

// weight [rows, N, M] (transpose: [rows, M, N]); returns N.
int64_t check_expand(const Tensor& h, const Tensor& weight, const Tensor& indices, const OptTensor& scale,
                     const OptTensor& base, bool transpose, bool check_indices) {
  const char* op = "bgmv_expand";
  check_layout(op, "h", h, 3);
  TORCH_CHECK(h.scalar_type() == at::kFloat, "proper::", op, ": argument 'h' must be float32, got ", h.scalar_type());
  check_layout(op, "weight", weight, 3);
  check_float(op, "weight", weight);
  TORCH_CHECK(weight.device() == h.device(), "proper::", op, ": argument 'weight' is on ", weight.device(),
              " but 'h' is on ", h.device());
  check_size(op, "weight", weight, transpose ? 1 : 2, h.size(2), "the rank of h");
  check_layout(op, "indices", indices, 2);
  check_index(op, "indices", indices, h);
  TORCH_CHECK(indices.size(0) == h.size(0) && indices.size(1) == h.size(1), "proper::", op,
              ": argument 'indices' must have shape [", h.size(0), ", ", h.size(1), "] (the slots of h), got ",
              indices.sizes());
  const int64_t N = transpose ? weight.size(2) : weight.size(1);
  if (scale.has_value()) {
    check_layout(op, "scale", *scale, 2);
    check_same(op, "scale", *scale, "h", h);
    TORCH_CHECK(scale->sizes() == indices.sizes(), "proper::", op, ": argument 'scale' must have shape ",
                indices.sizes(), ", got ", scale->sizes());
  }
  if (base.has_value()) {
    check_layout(op, "base", *base, 2);
    TORCH_CHECK(base->scalar_type() == at::kFloat || base->scalar_type() == weight.scalar_type(), "proper::", op,
                ": argument 'base' must be float32 or the dtype of 'weight' (", weight.scalar_type(), "), got ",
                base->scalar_type());
    TORCH_CHECK(base->device() == h.device(), "proper::", op, ": argument 'base' is on ", base->device(),
                " but 'h' is on ", h.device());
    TORCH_CHECK(base->size(0) == h.size(0) && base->size(1) == N, "proper::", op,
                ": argument 'base' must have shape [", h.size(0), ", ", N, "], got ", base->sizes());
  }
  if (check_indices) check_index_range(op, "indices", indices, weight.size(0));
  return N;
}

Tensor bgmv_expand_meta(const Tensor& h, const Tensor& weight, const Tensor& indices, const OptTensor& scale,
                        const OptTensor& base, bool transpose, bool check_indices) {
  const int64_t N = check_expand(h, weight, indices, scale, base, transpose, false);
  return at::empty({h.size(0), N}, h.options().dtype(base.has_value() ? base->scalar_type() : at::kFloat));
}

Tensor bgmv_expand_cuda(const Tensor& h, const Tensor& weight, const Tensor& indices, const OptTensor& scale,
                        const OptTensor& base, bool transpose, bool check_indices) {
  check_cuda("bgmv_expand", "h", h);
  const int64_t N = check_expand(h, weight, indices, scale, base, transpose, check_indices);
  const auto out_dtype = base.has_value() ? base->scalar_type() : at::kFloat;
  Tensor out = at::empty({h.size(0), N}, h.options().dtype(out_dtype));
  const c10::cuda::CUDAGuard guard(h.device());
  dispatch_tag(weight, [&](auto tag) {
    launch_bgmv_expand<decltype(tag)>(h.data_ptr<float>(), weight.data_ptr(), indices.data_ptr<int64_t>(),
                                      scale.has_value() ? scale->data_ptr<float>() : nullptr,
                                      base.has_value() ? base->data_ptr() : nullptr, out.data_ptr(),
                                      out_dtype == at::kFloat, h.size(0), h.size(1), h.size(2), N,
                                      weight.size(0), transpose, stream_of(h));
  });
  return out;
}

// -- proper_decode -------------------------------------------------------------------------------

using DecodeOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

DecodeOut decode_outputs(const Tensor& x, const Tensor& base, const Tensor& lora_A, const OptTensor& user_A,
                         int64_t top_k) {
  const int64_t T = x.size(0), E = lora_A.size(0), r = lora_A.size(1);
  const int64_t r_u = user_A.has_value() ? user_A->size(1) : 0;
  const auto f32 = x.options().dtype(at::kFloat);
  return {at::empty_like(base), at::empty({T, E}, f32), at::empty({T, top_k}, f32),
          at::empty({T, top_k}, x.options().dtype(at::kLong)), at::empty({T, top_k, r}, f32),
          at::empty({T, r_u}, f32)};
}

void check_decode(const Tensor& x, const Tensor& base, const Tensor& lora_A, const Tensor& lora_B,
                  const OptTensor& router_x, const OptTensor& router_user, const OptTensor& router_h,
                  const OptTensor& user_A, const OptTensor& user_B, const Tensor& user_ids, int64_t top_k,
                  double temperature, bool check_indices) {
  const char* op = "proper_decode";
  check_layout(op, "x", x, 2);
  check_float(op, "x", x);
  const int64_t T = x.size(0), in = x.size(1);
  check_layout(op, "base", base, 2);
  check_same(op, "base", base, "x", x);
  check_size(op, "base", base, 0, T, "tokens of x");
  const int64_t out = base.size(1);
  check_layout(op, "lora_A", lora_A, 3);
  check_same(op, "lora_A", lora_A, "x", x);
  check_size(op, "lora_A", lora_A, 2, in, "the features of x");
  const int64_t E = lora_A.size(0), r = lora_A.size(1);
  TORCH_CHECK(E >= 1 && E <= kMaxExperts, "proper::", op, ": argument 'lora_A' must hold between 1 and ",
              kMaxExperts, " experts, got ", E);
  TORCH_CHECK(top_k >= 1 && top_k <= E, "proper::", op, ": argument 'top_k' must be in [1, ", E, "], got ", top_k);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "proper::", op,
              ": argument 'temperature' must be positive and finite, got ", temperature);
  check_layout(op, "lora_B", lora_B, 3);
  check_same(op, "lora_B", lora_B, "x", x);
  TORCH_CHECK(lora_B.size(0) == E && lora_B.size(1) == out && lora_B.size(2) == r, "proper::", op,
              ": argument 'lora_B' must have shape [", E, ", ", out, ", ", r, "], got ", lora_B.sizes());
  if (router_x.has_value()) {
    check_layout(op, "router_x", *router_x, 2);
    check_same(op, "router_x", *router_x, "x", x);
    TORCH_CHECK(router_x->size(0) == E && router_x->size(1) == in, "proper::", op,
                ": argument 'router_x' must have shape [", E, ", ", in, "], got ", router_x->sizes());
  }
  TORCH_CHECK(user_A.has_value() == user_B.has_value(), "proper::", op,
              ": arguments 'user_A' and 'user_B' must be given together");
  int64_t n_users = -1;
  if (user_A.has_value()) {
    check_layout(op, "user_A", *user_A, 3);
    check_same(op, "user_A", *user_A, "x", x);
    check_size(op, "user_A", *user_A, 2, in, "the features of x");
    n_users = user_A->size(0);
    const int64_t r_u = user_A->size(1);
    check_layout(op, "user_B", *user_B, 3);
    check_same(op, "user_B", *user_B, "x", x);
    TORCH_CHECK(user_B->size(0) == n_users && user_B->size(1) == out && user_B->size(2) == r_u, "proper::", op,
                ": argument 'user_B' must have shape [", n_users, ", ", out, ", ", r_u, "], got ", user_B->sizes());
  }
  if (router_user.has_value()) {
    check_layout(op, "router_user", *router_user, 2);
    check_same(op, "router_user", *router_user, "x", x);
    check_size(op, "router_user", *router_user, 1, E, "experts");
    if (n_users >= 0) check_size(op, "router_user", *router_user, 0, n_users + 1, "num_users + 1");
    n_users = router_user->size(0) - 1;
  }
  if (router_h.has_value()) {
    TORCH_CHECK(user_A.has_value(), "proper::", op, ": argument 'router_h' needs the user bank 'user_A'/'user_B'");
    check_layout(op, "router_h", *router_h, 2);
    check_same(op, "router_h", *router_h, "x", x);
    TORCH_CHECK(router_h->size(0) == E && router_h->size(1) == user_A->size(1), "proper::", op,
                ": argument 'router_h' must have shape [", E, ", ", user_A->size(1), "], got ", router_h->sizes());
  }
  check_layout(op, "user_ids", user_ids, 1);
  check_index(op, "user_ids", user_ids, x);
  check_size(op, "user_ids", user_ids, 0, T, "one id per token of x");
  if (check_indices) check_index_range(op, "user_ids", user_ids, std::max<int64_t>(n_users, 0));
}

DecodeOut proper_decode_meta(const Tensor& x, const Tensor& base, const Tensor& lora_A, const Tensor& lora_B,
                             const OptTensor& router_x, const OptTensor& router_user, const OptTensor& router_h,
                             const OptTensor& user_A, const OptTensor& user_B, const Tensor& user_ids,
                             double scaling, int64_t top_k, double temperature, double user_scaling,
                             bool check_indices) {
  check_decode(x, base, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B, user_ids, top_k,
               temperature, false);
  return decode_outputs(x, base, lora_A, user_A, top_k);
}

DecodeOut proper_decode_cuda(const Tensor& x, const Tensor& base, const Tensor& lora_A, const Tensor& lora_B,
                             const OptTensor& router_x, const OptTensor& router_user, const OptTensor& router_h,
                             const OptTensor& user_A, const OptTensor& user_B, const Tensor& user_ids,
                             double scaling, int64_t top_k, double temperature, double user_scaling,
                             bool check_indices) {
  check_cuda("proper_decode", "x", x);
  check_decode(x, base, lora_A, lora_B, router_x, router_user, router_h, user_A, user_B, user_ids, top_k,
               temperature, check_indices);
  DecodeOut outs = decode_outputs(x, base, lora_A, user_A, top_k);
  auto& [y, logits, gates, indices, h, hu] = outs;
  auto ptr = [](const OptTensor& t) -> const void* { return t.has_value() ? t->data_ptr() : nullptr; };
  DecodeLaunch a{};
  a.x = x.data_ptr();
  a.base = base.data_ptr();
  a.lora_A = lora_A.data_ptr();
  a.lora_B = lora_B.data_ptr();
  a.router_x = ptr(router_x);
  a.router_user = ptr(router_user);
  a.router_h = ptr(router_h);
  a.user_A = ptr(user_A);
  a.user_B = ptr(user_B);
  a.uid = user_ids.data_ptr<int64_t>();
  a.y = y.data_ptr();
  a.logits = logits.data_ptr<float>();
  a.gates = gates.data_ptr<float>();
  a.indices = indices.data_ptr<int64_t>();
  a.h = h.data_ptr<float>();
  a.hu = hu.data_ptr<float>();
  a.n_tokens = x.size(0);
  a.in = static_cast<int>(x.size(1));
  a.out = static_cast<int>(base.size(1));
  a.E = static_cast<int>(lora_A.size(0));
  a.r = static_cast<int>(lora_A.size(1));
  a.k = static_cast<int>(top_k);
  a.r_u = user_A.has_value() ? static_cast<int>(user_A->size(1)) : 0;
  a.num_users = static_cast<int>(router_user.has_value() ? router_user->size(0) - 1
                                 : user_A.has_value()   ? user_A->size(0)
                                                        : 0);
  a.scaling = static_cast<float>(scaling);
  a.user_scaling = static_cast<float>(user_scaling);
  a.inv_temperature = static_cast<float>(1.0 / temperature);
  const c10::cuda::CUDAGuard guard(x.device());
  dispatch_tag(x, [&](auto tag) { launch_proper_decode<decltype(tag)>(a, stream_of(x)); });
  return outs;
}

// -- CPU: a clear error instead of the dispatcher's generic one --------------------------------

std::tuple<Tensor, Tensor> router_topk_cpu(const Tensor& logits, int64_t, double) {
  check_cuda("router_topk", "logits", logits);
  return {};
}
Tensor router_topk_backward_cpu(const Tensor& logits, const Tensor&, const Tensor&, double) {
  check_cuda("router_topk_backward", "logits", logits);
  return {};
}
Tensor bgmv_shrink_cpu(const Tensor& x, const Tensor&, const Tensor&, bool, bool) {
  check_cuda("bgmv_shrink", "x", x);
  return {};
}
Tensor bgmv_expand_cpu(const Tensor& h, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, bool, bool) {
  check_cuda("bgmv_expand", "h", h);
  return {};
}
DecodeOut proper_decode_cpu(const Tensor& x, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                            const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&,
                            double, int64_t, double, double, bool) {
  check_cuda("proper_decode", "x", x);
  return {};
}

}  // namespace
}  // namespace proper

TORCH_LIBRARY(proper, m) {
  m.def("cuda_build_info() -> str", &proper::cuda_build_info);
  m.def("fill_(Tensor(a!) out, float value) -> Tensor(a!)");
  m.def("router_topk(Tensor logits, int top_k, float temperature) -> (Tensor gates, Tensor indices)");
  m.def("router_topk_backward(Tensor logits, Tensor indices, Tensor dgates, float temperature) -> Tensor");
  m.def("bgmv_shrink(Tensor x, Tensor weight, Tensor indices, bool transpose=False, bool check_indices=True) -> Tensor");
  m.def(
      "bgmv_expand(Tensor h, Tensor weight, Tensor indices, Tensor? scale=None, Tensor? base=None, "
      "bool transpose=False, bool check_indices=True) -> Tensor");
  m.def(
      "proper_decode(Tensor x, Tensor base, Tensor lora_A, Tensor lora_B, Tensor? router_x, Tensor? router_user, "
      "Tensor? router_h, Tensor? user_A, Tensor? user_B, Tensor user_ids, float scaling, int top_k, "
      "float temperature, float user_scaling, bool check_indices=True) -> "
      "(Tensor y, Tensor logits, Tensor gates, Tensor indices, Tensor h, Tensor hu)");
}

TORCH_LIBRARY_IMPL(proper, CUDA, m) {
  m.impl("fill_", &proper::fill_cuda);
  m.impl("router_topk", &proper::router_topk_cuda);
  m.impl("router_topk_backward", &proper::router_topk_backward_cuda);
  m.impl("bgmv_shrink", &proper::bgmv_shrink_cuda);
  m.impl("bgmv_expand", &proper::bgmv_expand_cuda);
  m.impl("proper_decode", &proper::proper_decode_cuda);
}
TORCH_LIBRARY_IMPL(proper, CPU, m) {
  m.impl("fill_", &proper::fill_cpu);
  m.impl("router_topk", &proper::router_topk_cpu);
  m.impl("router_topk_backward", &proper::router_topk_backward_cpu);
  m.impl("bgmv_shrink", &proper::bgmv_shrink_cpu);
  m.impl("bgmv_expand", &proper::bgmv_expand_cpu);
  m.impl("proper_decode", &proper::proper_decode_cpu);
}
TORCH_LIBRARY_IMPL(proper, Meta, m) {
  m.impl("fill_", &proper::fill_meta);
  m.impl("router_topk", &proper::router_topk_meta);
  m.impl("router_topk_backward", &proper::router_topk_backward_meta);
  m.impl("bgmv_shrink", &proper::bgmv_shrink_meta);
  m.impl("bgmv_expand", &proper::bgmv_expand_meta);
  m.impl("proper_decode", &proper::proper_decode_meta);
}

// An empty Python module, so that `import proper_kernels._C` loads this library
// (and with it the registrations above). No pybind11 needed.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // must match the last component of the extension name in setup.py
      "Compiled CUDA ops of proper; they register under torch.ops.proper.",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
