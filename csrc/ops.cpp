// The `proper` operator library: schemas, argument checks and registration.
//
// Loading the compiled module (`import proper_kernels._C`, after `import torch`)
// runs the static registrations below, so the ops appear under torch.ops.proper.
// The module itself defines no Python functions. Every op has a CUDA kernel, a CPU
// registration that says plainly it needs CUDA tensors, and a Meta kernel (the same
// checks, then output shapes) for fake tensors and torch.compile.
#include <Python.h>

#include <ATen/ATen.h>
#ifndef PROPER_EMU
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif
#include <cuda_runtime_api.h>  // CUDART_VERSION
#include <torch/library.h>
#include <torch/version.h>  // TORCH_VERSION

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>

#include "ops.h"

// PROPER_EMU builds these ops for the CPU SIMT emulator (csrc/emu/): the same checks and
// launchers, registered as torch.ops.proper_emu for CPU tensors.
#ifdef PROPER_EMU
#define PROPER_NS proper_emu
#define PROPER_DEVICE_GUARD(t) ((void)(t))
#else
#define PROPER_NS proper
#define PROPER_DEVICE_GUARD(t) const c10::cuda::CUDAGuard guard((t).device())
#endif
#define PROPER_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define PROPER_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

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

#ifdef PROPER_EMU
void check_cuda(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.is_cpu(), "proper_emu::", op, ": argument '", name, "' must be a CPU tensor (the emulator's memory), got ",
              t.device());
}
#else
void check_cuda(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "proper::", op, ": argument '", name, "' must be a CUDA tensor, got ", t.device(),
              " (the proper CUDA ops have no CPU implementation)");
}
#endif

template <typename F>
void dispatch_tag(const Tensor& t, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: f(F32{}); break;
    case at::kHalf: f(F16{}); break;
    case at::kBFloat16: f(BF16{}); break;
    default: TORCH_CHECK(false, "proper: unsupported dtype ", t.scalar_type());
  }
}

#ifdef PROPER_EMU
cudaStream_t stream_of(const Tensor&) { return nullptr; }
int64_t sm_count() { return kEmulatedSms; }
#else
cudaStream_t stream_of(const Tensor& t) { return at::cuda::getCurrentCUDAStream(t.device().index()); }
int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
#endif

// -- fill_ (the toolchain check) --------------------------------------------------------------

void check_fill_layout(const Tensor& out) {
  TORCH_CHECK(out.is_contiguous(), "proper::fill_: argument 'out' must be contiguous, got strides ", out.strides(),
              " for shape ", out.sizes());
  check_float("fill_", "out", out);
}

Tensor& fill_cuda(Tensor& out, double value) {
  check_cuda("fill_", "out", out);
  check_fill_layout(out);
  PROPER_DEVICE_GUARD(out);
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
  PROPER_DEVICE_GUARD(logits);
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
  PROPER_DEVICE_GUARD(logits);
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
  PROPER_DEVICE_GUARD(x);
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
  PROPER_DEVICE_GUARD(h);
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
  PROPER_DEVICE_GUARD(x);
  // Splits of the features: about two CTAs per SM over the tokens, at least 256 features each.
  const int64_t sms = sm_count();
  const int64_t T = std::max<int64_t>(a.n_tokens, 1);
  a.splits = static_cast<int>(std::clamp<int64_t>((2 * sms + T - 1) / T, 1, std::max<int64_t>(1, a.in / 256)));
  const int64_t vec_elems = 16 / static_cast<int64_t>(x.element_size());
  auto aligned = [](const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  a.vec = a.in % vec_elems == 0 && aligned(a.x) && aligned(a.lora_A) && aligned(a.router_x) && aligned(a.user_A);
  a.vec_r = a.r % vec_elems == 0 && aligned(a.lora_B);
  a.vec_ru = a.r_u % vec_elems == 0 && aligned(a.user_B);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor part1 = at::empty({a.splits, x.size(0), a.E + a.r_u}, f32);
  Tensor part2 = at::empty({a.splits, x.size(0), a.k * a.r}, f32);
  a.part1 = part1.data_ptr<float>();
  a.part2 = part2.data_ptr<float>();
  dispatch_tag(x, [&](auto tag) { launch_proper_decode<decltype(tag)>(a, stream_of(x)); });
  return outs;
}

// -- prefill_* (the tensor-core prefill and training kernels) ----------------------------------

const void* opt_ptr(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// plan: the batch plan [6, T] (proper_kernels/plan.py) of the T tokens of `ref`.
void check_plan(const char* op, const Tensor& plan, const Tensor& ref, int64_t T) {
  check_layout(op, "plan", plan, 2);
  check_index(op, "plan", plan, ref);
  TORCH_CHECK(plan.size(0) == 6 && plan.size(1) == T, "proper::", op, ": argument 'plan' must have shape [6, ", T,
              "] (a batch plan of the tokens), got ", plan.sizes());
}

void check_opt(const char* op, const char* name, const OptTensor& t, const Tensor& ref, int64_t dim) {
  if (!t.has_value()) return;
  check_layout(op, name, *t, dim);
  check_same(op, name, *t, "x", ref);
}

void check_dims(const char* op, const char* name, const Tensor& t, std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.sizes().equals(shape), "proper::", op, ": argument '", name, "' must have shape ",
              c10::IntArrayRef(shape), ", got ", t.sizes());
}

void check_columns(const char* op, int64_t E, int64_t r, bool router, int64_t r_u) {
  TORCH_CHECK(E <= kPrefillMaxExperts, "proper::", op, ": the prefill kernels hold at most ", kPrefillMaxExperts,
              " experts, got ", E);
  auto pad = [](int64_t v) { return (v + 7) / 8 * 8; };
  const int64_t cols = pad(E * r) + (router ? pad(E) : 0) + pad(r_u);
  TORCH_CHECK(cols <= kPrefillMaxColumns, "proper::", op, ": the columns E*r + E + r_u (each padded to 8) are ", cols,
              ", more than the ", kPrefillMaxColumns, " the prefill kernels hold (E=", E, ", r=", r, ", r_u=", r_u,
              ")");
}

using ShrinkOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

ShrinkOut prefill_shrink_meta(const Tensor& x, const Tensor& x_lora, const Tensor& plan, const Tensor& lora_A,
                              const OptTensor& router_x, const OptTensor& router_user, const OptTensor& router_h,
                              const OptTensor& user_A, int64_t top_k, double temperature) {
  const char* op = "prefill_shrink";
  check_layout(op, "x", x, 2);
  check_float(op, "x", x);
  const int64_t T = x.size(0), in = x.size(1);
  check_layout(op, "x_lora", x_lora, 2);
  check_same(op, "x_lora", x_lora, "x", x);
  check_dims(op, "x_lora", x_lora, {T, in});
  check_plan(op, plan, x, T);
  check_layout(op, "lora_A", lora_A, 3);
  check_same(op, "lora_A", lora_A, "x", x);
  check_size(op, "lora_A", lora_A, 2, in, "the features of x");
  const int64_t E = lora_A.size(0), r = lora_A.size(1);
  TORCH_CHECK(top_k >= 1 && top_k <= E, "proper::", op, ": argument 'top_k' must be in [1, ", E, "], got ", top_k);
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "proper::", op,
              ": argument 'temperature' must be positive and finite, got ", temperature);
  check_opt(op, "router_x", router_x, x, 2);
  if (router_x.has_value()) check_dims(op, "router_x", *router_x, {E, in});
  check_opt(op, "user_A", user_A, x, 3);
  const int64_t r_u = user_A.has_value() ? user_A->size(1) : 0;
  if (user_A.has_value()) check_size(op, "user_A", *user_A, 2, in, "the features of x");
  check_opt(op, "router_user", router_user, x, 2);
  if (router_user.has_value()) {
    check_size(op, "router_user", *router_user, 1, E, "experts");
    if (user_A.has_value()) check_size(op, "router_user", *router_user, 0, user_A->size(0) + 1, "num_users + 1");
  }
  check_opt(op, "router_h", router_h, x, 2);
  if (router_h.has_value()) {
    TORCH_CHECK(user_A.has_value(), "proper::", op, ": argument 'router_h' needs the user bank 'user_A'");
    check_dims(op, "router_h", *router_h, {E, r_u});
  }
  check_columns(op, E, r, router_x.has_value(), r_u);
  const auto f32 = x.options().dtype(at::kFloat);
  return {at::empty({T, E * r}, f32),  at::empty({T, E * r}, x.options()), at::empty({T, r_u}, f32),
          at::empty({T, E}, f32),      at::empty({T, top_k}, f32),         at::empty({T, top_k}, x.options().dtype(at::kLong))};
}

ShrinkOut prefill_shrink_cuda(const Tensor& x, const Tensor& x_lora, const Tensor& plan, const Tensor& lora_A,
                              const OptTensor& router_x, const OptTensor& router_user, const OptTensor& router_h,
                              const OptTensor& user_A, int64_t top_k, double temperature) {
  check_cuda("prefill_shrink", "x", x);
  ShrinkOut outs = prefill_shrink_meta(x, x_lora, plan, lora_A, router_x, router_user, router_h, user_A, top_k,
                                       temperature);
  auto& [h, hg, hu, logits, gates, indices] = outs;
  ShrinkLaunch a{};
  a.x = x.data_ptr();
  a.xl = x_lora.data_ptr();
  a.A = lora_A.data_ptr();
  a.Wx = opt_ptr(router_x);
  a.R = opt_ptr(router_user);
  a.Wh = opt_ptr(router_h);
  a.UA = opt_ptr(user_A);
  a.plan = plan.data_ptr<int64_t>();
  a.h = h.data_ptr<float>();
  a.hg = hg.data_ptr();
  a.hu = hu.data_ptr<float>();
  a.logits = logits.data_ptr<float>();
  a.gates = gates.data_ptr<float>();
  a.indices = indices.data_ptr<int64_t>();
  a.T = x.size(0);
  a.in = static_cast<int>(x.size(1));
  a.E = static_cast<int>(lora_A.size(0));
  a.r = static_cast<int>(lora_A.size(1));
  a.k = static_cast<int>(top_k);
  a.r_u = static_cast<int>(hu.size(1));
  a.r_rows = router_user.has_value() ? static_cast<int>(router_user->size(0)) : 0;
  a.num_users = user_A.has_value() ? static_cast<int>(user_A->size(0)) : std::max(a.r_rows - 1, 0);
  a.inv_temperature = static_cast<float>(1.0 / temperature);
  PROPER_DEVICE_GUARD(x);
  dispatch_tag(x, [&](auto tag) { launch_prefill_shrink<decltype(tag)>(a, stream_of(x)); });
  return outs;
}

// The checks of prefill_expand / prefill_expand_; returns out.
int64_t check_expand_pf(const char* op, const Tensor& base, const Tensor& hg, const Tensor& hu, const Tensor& plan,
                        const Tensor& lora_B, const OptTensor& user_B) {
  check_layout(op, "hg", hg, 2);
  check_float(op, "hg", hg);
  const int64_t T = hg.size(0);
  check_layout(op, "base", base, 2);
  check_same(op, "base", base, "hg", hg);
  check_size(op, "base", base, 0, T, "tokens of hg");
  const int64_t out = base.size(1);
  check_layout(op, "lora_B", lora_B, 3);
  check_same(op, "lora_B", lora_B, "hg", hg);
  const int64_t E = lora_B.size(0), r = lora_B.size(2);
  check_dims(op, "lora_B", lora_B, {E, out, r});
  check_dims(op, "hg", hg, {T, E * r});
  check_plan(op, plan, hg, T);
  check_layout(op, "hu", hu, 2);
  TORCH_CHECK(hu.scalar_type() == at::kFloat && hu.device() == hg.device(), "proper::", op,
              ": argument 'hu' must be float32 on ", hg.device(), ", got ", hu.scalar_type(), " on ", hu.device());
  if (user_B.has_value()) {
    check_layout(op, "user_B", *user_B, 3);
    check_same(op, "user_B", *user_B, "hg", hg);
    check_dims(op, "user_B", *user_B, {user_B->size(0), out, hu.size(1)});
    check_dims(op, "hu", hu, {T, user_B->size(2)});
  }
  return out;
}

ExpandLaunch expand_launch(const Tensor& base, void* y, const Tensor& hg, const Tensor& hu, const Tensor& plan,
                           const Tensor& lora_B, const OptTensor& user_B, double scaling, double user_scaling) {
  ExpandLaunch a{};
  a.hg = hg.data_ptr();
  a.B = lora_B.data_ptr();
  a.UB = opt_ptr(user_B);
  a.base = base.data_ptr();
  a.hu = hu.data_ptr<float>();
  a.plan = plan.data_ptr<int64_t>();
  a.y = y;
  a.T = hg.size(0);
  a.out = static_cast<int>(base.size(1));
  a.E = static_cast<int>(lora_B.size(0));
  a.r = static_cast<int>(lora_B.size(2));
  a.r_u = user_B.has_value() ? static_cast<int>(user_B->size(2)) : 0;
  a.num_users = user_B.has_value() ? static_cast<int>(user_B->size(0)) : 0;
  a.scaling = static_cast<float>(scaling);
  a.user_scaling = static_cast<float>(user_scaling);
  return a;
}

Tensor prefill_expand_meta(const Tensor& hg, const Tensor& hu, const Tensor& plan, const Tensor& lora_B,
                           const OptTensor& user_B, const Tensor& base, double, double) {
  check_expand_pf("prefill_expand", base, hg, hu, plan, lora_B, user_B);
  return at::empty_like(base);
}

Tensor prefill_expand_cuda(const Tensor& hg, const Tensor& hu, const Tensor& plan, const Tensor& lora_B,
                           const OptTensor& user_B, const Tensor& base, double scaling, double user_scaling) {
  check_cuda("prefill_expand", "hg", hg);
  Tensor y = prefill_expand_meta(hg, hu, plan, lora_B, user_B, base, scaling, user_scaling);
  const ExpandLaunch a = expand_launch(base, y.data_ptr(), hg, hu, plan, lora_B, user_B, scaling, user_scaling);
  PROPER_DEVICE_GUARD(hg);
  dispatch_tag(hg, [&](auto tag) { launch_prefill_expand<decltype(tag)>(a, stream_of(hg)); });
  return y;
}

void prefill_expand__meta(Tensor& base, const Tensor& hg, const Tensor& hu, const Tensor& plan, const Tensor& lora_B,
                          const OptTensor& user_B, double, double) {
  check_expand_pf("prefill_expand_", base, hg, hu, plan, lora_B, user_B);
}

void prefill_expand__cuda(Tensor& base, const Tensor& hg, const Tensor& hu, const Tensor& plan, const Tensor& lora_B,
                          const OptTensor& user_B, double scaling, double user_scaling) {
  check_cuda("prefill_expand_", "hg", hg);
  check_expand_pf("prefill_expand_", base, hg, hu, plan, lora_B, user_B);
  const ExpandLaunch a = expand_launch(base, base.data_ptr(), hg, hu, plan, lora_B, user_B, scaling, user_scaling);
  PROPER_DEVICE_GUARD(hg);
  dispatch_tag(hg, [&](auto tag) { launch_prefill_expand<decltype(tag)>(a, stream_of(hg)); });
}

using DhOut = std::tuple<Tensor, Tensor, Tensor>;

DhOut prefill_bwd_dh_meta(const Tensor& dy, const Tensor& plan, const Tensor& lora_B, const OptTensor& user_B,
                          const OptTensor& router_h, const Tensor& h, const Tensor& logits, const Tensor& gates,
                          const Tensor& indices, const OptTensor& dgates, const OptTensor& dlogits, double,
                          double, double temperature) {
  const char* op = "prefill_bwd_dh";
  check_layout(op, "dy", dy, 2);
  check_float(op, "dy", dy);
  const int64_t T = dy.size(0), out = dy.size(1);
  check_plan(op, plan, dy, T);
  check_layout(op, "lora_B", lora_B, 3);
  check_same(op, "lora_B", lora_B, "dy", dy);
  const int64_t E = lora_B.size(0), r = lora_B.size(2);
  check_dims(op, "lora_B", lora_B, {E, out, r});
  int64_t r_u = 0;
  if (user_B.has_value()) {
    check_layout(op, "user_B", *user_B, 3);
    check_same(op, "user_B", *user_B, "dy", dy);
    check_size(op, "user_B", *user_B, 1, out, "the outputs of dy");
    r_u = user_B->size(2);
  }
  if (router_h.has_value()) {
    check_layout(op, "router_h", *router_h, 2);
    check_same(op, "router_h", *router_h, "dy", dy);
    check_dims(op, "router_h", *router_h, {E, r_u});
  }
  auto f32 = [&](const char* name, const Tensor& t, std::initializer_list<int64_t> shape) {
    check_layout(op, name, t, static_cast<int64_t>(shape.size()));
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.device() == dy.device(), "proper::", op, ": argument '", name,
                "' must be float32 on ", dy.device(), ", got ", t.scalar_type(), " on ", t.device());
    check_dims(op, name, t, shape);
  };
  f32("h", h, {T, E * r});
  f32("logits", logits, {T, E});
  const int64_t k = gates.dim() == 2 ? gates.size(1) : 0;
  TORCH_CHECK(k >= 1 && k <= E, "proper::", op, ": argument 'gates' must be [T, k] with k in [1, ", E, "], got ",
              gates.sizes());
  f32("gates", gates, {T, k});
  check_layout(op, "indices", indices, 2);
  check_index(op, "indices", indices, dy);
  check_dims(op, "indices", indices, {T, k});
  if (dgates.has_value()) f32("dgates", *dgates, {T, k});
  if (dlogits.has_value()) f32("dlogits", *dlogits, {T, E});
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "proper::", op,
              ": argument 'temperature' must be positive and finite, got ", temperature);
  check_columns(op, E, r, false, r_u);
  const auto fo = dy.options().dtype(at::kFloat);
  return {at::empty({T, E * r}, dy.options()), at::empty({T, E}, fo), at::empty({T, r_u}, fo)};
}

DhOut prefill_bwd_dh_cuda(const Tensor& dy, const Tensor& plan, const Tensor& lora_B, const OptTensor& user_B,
                          const OptTensor& router_h, const Tensor& h, const Tensor& logits, const Tensor& gates,
                          const Tensor& indices, const OptTensor& dgates, const OptTensor& dlogits, double scaling,
                          double user_scaling, double temperature) {
  check_cuda("prefill_bwd_dh", "dy", dy);
  DhOut outs = prefill_bwd_dh_meta(dy, plan, lora_B, user_B, router_h, h, logits, gates, indices, dgates, dlogits,
                                   scaling, user_scaling, temperature);
  auto& [dh, dl, dhu] = outs;
  BwdDhLaunch a{};
  a.dy = dy.data_ptr();
  a.B = lora_B.data_ptr();
  a.UB = opt_ptr(user_B);
  a.Wh = opt_ptr(router_h);
  a.plan = plan.data_ptr<int64_t>();
  a.h = h.data_ptr<float>();
  a.logits = logits.data_ptr<float>();
  a.gates = gates.data_ptr<float>();
  a.dgates_ext = dgates.has_value() ? dgates->data_ptr<float>() : nullptr;
  a.dlogits_ext = dlogits.has_value() ? dlogits->data_ptr<float>() : nullptr;
  a.indices = indices.data_ptr<int64_t>();
  a.dh = dh.data_ptr();
  a.dlogits = dl.data_ptr<float>();
  a.dhu = dhu.data_ptr<float>();
  a.T = dy.size(0);
  a.out = static_cast<int>(dy.size(1));
  a.E = static_cast<int>(lora_B.size(0));
  a.r = static_cast<int>(lora_B.size(2));
  a.k = static_cast<int>(gates.size(1));
  a.r_u = static_cast<int>(dhu.size(1));
  a.num_users = user_B.has_value() ? static_cast<int>(user_B->size(0)) : 0;
  a.scaling = static_cast<float>(scaling);
  a.user_scaling = static_cast<float>(user_scaling);
  a.inv_temperature = static_cast<float>(1.0 / temperature);
  PROPER_DEVICE_GUARD(dy);
  dispatch_tag(dy, [&](auto tag) { launch_prefill_bwd_dh<decltype(tag)>(a, stream_of(dy)); });
  return outs;
}

std::tuple<Tensor, Tensor> prefill_bwd_dx_meta(const Tensor& dh, const Tensor& dlogits, const Tensor& dhu,
                                               const Tensor& plan, const Tensor& lora_A, const OptTensor& router_x,
                                               const OptTensor& user_A, bool split_router) {
  const char* op = "prefill_bwd_dx";
  check_layout(op, "dh", dh, 2);
  check_float(op, "dh", dh);
  const int64_t T = dh.size(0);
  check_plan(op, plan, dh, T);
  check_layout(op, "lora_A", lora_A, 3);
  check_same(op, "lora_A", lora_A, "dh", dh);
  const int64_t E = lora_A.size(0), r = lora_A.size(1), in = lora_A.size(2);
  check_dims(op, "dh", dh, {T, E * r});
  check_layout(op, "dlogits", dlogits, 2);
  check_layout(op, "dhu", dhu, 2);
  TORCH_CHECK(dlogits.scalar_type() == at::kFloat && dhu.scalar_type() == at::kFloat &&
                  dlogits.device() == dh.device() && dhu.device() == dh.device(),
              "proper::", op, ": arguments 'dlogits' and 'dhu' must be float32 on ", dh.device());
  check_dims(op, "dlogits", dlogits, {T, E});
  if (router_x.has_value()) {
    check_layout(op, "router_x", *router_x, 2);
    check_same(op, "router_x", *router_x, "dh", dh);
    check_dims(op, "router_x", *router_x, {E, in});
  }
  if (user_A.has_value()) {
    check_layout(op, "user_A", *user_A, 3);
    check_same(op, "user_A", *user_A, "dh", dh);
    check_size(op, "user_A", *user_A, 2, in, "the features of lora_A");
    check_dims(op, "dhu", dhu, {T, user_A->size(1)});
  }
  const bool split = split_router && router_x.has_value();
  return {at::empty({T, in}, dh.options()), at::empty({split ? T : 0, in}, dh.options())};
}

std::tuple<Tensor, Tensor> prefill_bwd_dx_cuda(const Tensor& dh, const Tensor& dlogits, const Tensor& dhu,
                                               const Tensor& plan, const Tensor& lora_A, const OptTensor& router_x,
                                               const OptTensor& user_A, bool split_router) {
  check_cuda("prefill_bwd_dx", "dh", dh);
  auto outs = prefill_bwd_dx_meta(dh, dlogits, dhu, plan, lora_A, router_x, user_A, split_router);
  auto& [dxl, dxr] = outs;
  BwdDxLaunch a{};
  a.dh = dh.data_ptr();
  a.A = lora_A.data_ptr();
  a.Wx = opt_ptr(router_x);
  a.UA = opt_ptr(user_A);
  a.dlogits = dlogits.data_ptr<float>();
  a.dhu = dhu.data_ptr<float>();
  a.plan = plan.data_ptr<int64_t>();
  a.dx_lora = dxl.data_ptr();
  a.dx_router = dxr.size(0) ? dxr.data_ptr() : nullptr;
  a.T = dh.size(0);
  a.in = static_cast<int>(lora_A.size(2));
  a.E = static_cast<int>(lora_A.size(0));
  a.r = static_cast<int>(lora_A.size(1));
  a.r_u = user_A.has_value() ? static_cast<int>(user_A->size(1)) : 0;
  a.num_users = user_A.has_value() ? static_cast<int>(user_A->size(0)) : 0;
  PROPER_DEVICE_GUARD(dh);
  dispatch_tag(dh, [&](auto tag) { launch_prefill_bwd_dx<decltype(tag)>(a, stream_of(dh)); });
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

ShrinkOut prefill_shrink_cpu(const Tensor& x, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                             const OptTensor&, const OptTensor&, const OptTensor&, int64_t, double) {
  check_cuda("prefill_shrink", "x", x);
  return {};
}
Tensor prefill_expand_cpu(const Tensor& hg, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                          const Tensor&, double, double) {
  check_cuda("prefill_expand", "hg", hg);
  return {};
}
void prefill_expand__cpu(Tensor&, const Tensor& hg, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                         double, double) {
  check_cuda("prefill_expand_", "hg", hg);
}
DhOut prefill_bwd_dh_cpu(const Tensor& dy, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                         const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
                         const OptTensor&, double, double, double) {
  check_cuda("prefill_bwd_dh", "dy", dy);
  return {};
}
std::tuple<Tensor, Tensor> prefill_bwd_dx_cpu(const Tensor& dh, const Tensor&, const Tensor&, const Tensor&,
                                              const Tensor&, const OptTensor&, const OptTensor&, bool) {
  check_cuda("prefill_bwd_dx", "dh", dh);
  return {};
}

}  // namespace
}  // namespace proper

PROPER_LIBRARY(PROPER_NS, m) {
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
  m.def(
      "prefill_shrink(Tensor x, Tensor x_lora, Tensor plan, Tensor lora_A, Tensor? router_x, Tensor? router_user, "
      "Tensor? router_h, Tensor? user_A, int top_k, float temperature) -> "
      "(Tensor h, Tensor hg, Tensor hu, Tensor logits, Tensor gates, Tensor indices)");
  m.def(
      "prefill_expand(Tensor hg, Tensor hu, Tensor plan, Tensor lora_B, Tensor? user_B, Tensor base, "
      "float scaling, float user_scaling) -> Tensor");
  m.def(
      "prefill_expand_(Tensor(a!) base, Tensor hg, Tensor hu, Tensor plan, Tensor lora_B, Tensor? user_B, "
      "float scaling, float user_scaling) -> ()");
  m.def(
      "prefill_bwd_dh(Tensor dy, Tensor plan, Tensor lora_B, Tensor? user_B, Tensor? router_h, Tensor h, "
      "Tensor logits, Tensor gates, Tensor indices, Tensor? dgates, Tensor? dlogits, float scaling, "
      "float user_scaling, float temperature) -> (Tensor dh, Tensor dlogits, Tensor dhu)");
  m.def(
      "prefill_bwd_dx(Tensor dh, Tensor dlogits, Tensor dhu, Tensor plan, Tensor lora_A, Tensor? router_x, "
      "Tensor? user_A, bool split_router) -> (Tensor dx_lora, Tensor dx_router)");
}

#ifdef PROPER_EMU
PROPER_LIBRARY_IMPL(PROPER_NS, CPU, m) {
#else
PROPER_LIBRARY_IMPL(PROPER_NS, CUDA, m) {
#endif
  m.impl("fill_", &proper::fill_cuda);
  m.impl("router_topk", &proper::router_topk_cuda);
  m.impl("router_topk_backward", &proper::router_topk_backward_cuda);
  m.impl("bgmv_shrink", &proper::bgmv_shrink_cuda);
  m.impl("bgmv_expand", &proper::bgmv_expand_cuda);
  m.impl("proper_decode", &proper::proper_decode_cuda);
  m.impl("prefill_shrink", &proper::prefill_shrink_cuda);
  m.impl("prefill_expand", &proper::prefill_expand_cuda);
  m.impl("prefill_expand_", &proper::prefill_expand__cuda);
  m.impl("prefill_bwd_dh", &proper::prefill_bwd_dh_cuda);
  m.impl("prefill_bwd_dx", &proper::prefill_bwd_dx_cuda);
}
#ifndef PROPER_EMU
PROPER_LIBRARY_IMPL(PROPER_NS, CPU, m) {
  m.impl("fill_", &proper::fill_cpu);
  m.impl("router_topk", &proper::router_topk_cpu);
  m.impl("router_topk_backward", &proper::router_topk_backward_cpu);
  m.impl("bgmv_shrink", &proper::bgmv_shrink_cpu);
  m.impl("bgmv_expand", &proper::bgmv_expand_cpu);
  m.impl("proper_decode", &proper::proper_decode_cpu);
  m.impl("prefill_shrink", &proper::prefill_shrink_cpu);
  m.impl("prefill_expand", &proper::prefill_expand_cpu);
  m.impl("prefill_expand_", &proper::prefill_expand__cpu);
  m.impl("prefill_bwd_dh", &proper::prefill_bwd_dh_cpu);
  m.impl("prefill_bwd_dx", &proper::prefill_bwd_dx_cpu);
}
#endif
PROPER_LIBRARY_IMPL(PROPER_NS, Meta, m) {
  m.impl("fill_", &proper::fill_meta);
  m.impl("router_topk", &proper::router_topk_meta);
  m.impl("router_topk_backward", &proper::router_topk_backward_meta);
  m.impl("bgmv_shrink", &proper::bgmv_shrink_meta);
  m.impl("bgmv_expand", &proper::bgmv_expand_meta);
  m.impl("proper_decode", &proper::proper_decode_meta);
  m.impl("prefill_shrink", &proper::prefill_shrink_meta);
  m.impl("prefill_expand", &proper::prefill_expand_meta);
  m.impl("prefill_expand_", &proper::prefill_expand__meta);
  m.impl("prefill_bwd_dh", &proper::prefill_bwd_dh_meta);
  m.impl("prefill_bwd_dx", &proper::prefill_bwd_dx_meta);
}

#ifndef PROPER_EMU
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
#endif
