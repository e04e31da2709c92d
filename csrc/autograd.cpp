// Autograd of fastgmmdiff::log_prob, log_prob_scale and ngmg, in C++ (the Autograd dispatch key,
// for every device the ops serve), and log_prob_scale's pair itself (through log_prob's).
//
// Why C++: in the latency regime (PERF.md `small`, `paper`, `mdn`) a Python autograd wrapper
// (torch.library.register_autograd) costs more than the kernels: it runs Python on every
// forward, even without gradients, and again in backward.  Here the forward node saves the
// inputs and log p (N floats per mixture) and its backward calls the registered backward op,
// which recomputes the responsibilities from log p (SPEC §1).  The fake (meta) kernels of all
// four ops are registered from Python (fastgmmdiff/_autograd.py), so torch.compile traces
// through this node with fake tensors as it does through any ATen op.
//
// The backward ops are differentiable only in name: a second derivative raises a clear error.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>

#include "ops.h"

namespace fastgmmdiff {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;

using FwdSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, c10::string_view);
using BwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                          const Tensor&, const Tensor&, const Tensor&,
                                                          c10::string_view);

using NgmgSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                           const c10::optional<Tensor>&, c10::string_view, bool);
using NgmgBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                              const Tensor&, const Tensor&,
                                                              const c10::optional<Tensor>&, const Tensor&,
                                                              const Tensor&, c10::string_view, bool);

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The backward ops under autograd (reached only with create_graph=True): they compute the
// first derivatives; differentiating them again is an error, never a silent zero.
class BackwardFunction : public torch::autograd::Function<BackwardFunction> {
 public:
  template <typename Op, typename... Args>
  static variable_list forward(AutogradContext* ctx, const Op* op, const Args&... args) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto r = op->call(args...);
    return std::apply([](auto&... t) { return variable_list{t...}; }, r);
  }
  static variable_list backward(AutogradContext*, variable_list) {
    FGD_CHECK(false, "second derivatives of the log-density are not implemented (the backward "
                     "of fastgmmdiff's log-density ops is not differentiable)");
    return {};
  }
};

// The op pairs with log_prob's signatures: (forward, backward) names.
struct LogProbOps {
  static constexpr const char* fwd = "fastgmmdiff::log_prob";
  static constexpr const char* bwd = "fastgmmdiff::log_prob_backward";
};
struct LogProbScaleOps {
  static constexpr const char* fwd = "fastgmmdiff::log_prob_scale";
  static constexpr const char* bwd = "fastgmmdiff::log_prob_scale_backward";
};

// log_prob (or log_prob_scale): saves the inputs and log p; its backward calls the backward op.
template <typename Ops>
class LogProbFunction : public torch::autograd::Function<LogProbFunction<Ops>> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& means, const Tensor& prec,
                        const Tensor& logits, c10::string_view cov) {
    static auto op = handle<FwdSig>(Ops::fwd);
    Tensor out;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      out = op.call(x, means, prec, logits, cov);
    }
    ctx->save_for_backward({x, means, prec, logits, out});
    ctx->saved_data["cov"] = std::string(cov);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    static auto op = handle<BwdSig>(Ops::bwd);
    const auto s = ctx->get_saved_variables();
    const std::string cov = ctx->saved_data["cov"].toStringRef();
    Tensor g = grad_out[0].defined() ? grad_out[0].contiguous() : at::zeros_like(s[4]);
    auto r = op.call(g, s[0], s[1], s[2], s[3], s[4], cov);
    variable_list grads = std::apply([](auto&... t) { return variable_list{t...}; }, r);
    grads.resize(5);  // none for covariance_type
    return grads;
  }
};

// The fused NGMG: outputs (loss, logp); logp is saved for the backward and not differentiable.
class NgmgFunction : public torch::autograd::Function<NgmgFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& means, const Tensor& prec,
                               const Tensor& logits, const c10::optional<Tensor>& target, c10::string_view cov,
                               bool normalize) {
    static auto op = handle<NgmgSig>("fastgmmdiff::ngmg");
    std::tuple<Tensor, Tensor> r;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      r = op.call(x, means, prec, logits, target, cov, normalize);
    }
    const Tensor t = target.has_value() ? *target : Tensor();
    ctx->save_for_backward({x, means, prec, logits, t, std::get<0>(r), std::get<1>(r)});
    ctx->saved_data["cov"] = std::string(cov);
    ctx->saved_data["normalize"] = normalize;
    ctx->mark_non_differentiable({std::get<1>(r)});
    return {std::get<0>(r), std::get<1>(r)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    static auto op = handle<NgmgBwdSig>("fastgmmdiff::ngmg_backward");
    const auto s = ctx->get_saved_variables();
    const std::string cov = ctx->saved_data["cov"].toStringRef();
    Tensor g = grad_out[0].defined() ? grad_out[0].contiguous() : at::zeros_like(s[5]);
    const c10::optional<Tensor> t = s[4].defined() ? c10::optional<Tensor>(s[4]) : c10::nullopt;
    auto r = op.call(g, s[0], s[1], s[2], s[3], t, s[5], s[6], cov, ctx->saved_data["normalize"].toBool());
    // With a target the weights do not enter the loss: no gradient (None), as in the torch backend.
    return {std::get<0>(r), std::get<1>(r), std::get<2>(r), t.has_value() ? Tensor() : std::get<3>(r),
            Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> ngmg_autograd(const Tensor& x, const Tensor& means, const Tensor& prec,
                                         const Tensor& logits, const c10::optional<Tensor>& target,
                                         c10::string_view cov, bool normalize) {
  auto r = NgmgFunction::apply(x, means, prec, logits, target, cov, normalize);
  return {r[0], r[1]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> ngmg_backward_autograd(
    const Tensor& grad, const Tensor& x, const Tensor& means, const Tensor& prec, const Tensor& logits,
    const c10::optional<Tensor>& target, const Tensor& loss, const Tensor& logp, c10::string_view cov,
    bool normalize) {
  static auto op = handle<NgmgBwdSig>("fastgmmdiff::ngmg_backward");
  auto r = BackwardFunction::apply(&op, grad, x, means, prec, logits, target, loss, logp, cov, normalize);
  return {r[0], r[1], r[2], r[3]};
}

template <typename Ops>
Tensor log_prob_autograd(const Tensor& x, const Tensor& means, const Tensor& prec, const Tensor& logits,
                         c10::string_view cov) {
  return LogProbFunction<Ops>::apply(x, means, prec, logits, cov);
}

template <typename Ops>
std::tuple<Tensor, Tensor, Tensor, Tensor> log_prob_backward_autograd(
    const Tensor& grad, const Tensor& x, const Tensor& means, const Tensor& prec, const Tensor& logits,
    const Tensor& logp, c10::string_view cov) {
  static auto op = handle<BwdSig>(Ops::bwd);
  auto r = BackwardFunction::apply(&op, grad, x, means, prec, logits, logp, cov);
  return {r[0], r[1], r[2], r[3]};
}

}  // namespace

// log_prob_scale and its backward on any device (ops.h; the CPU ops call them for the layouts
// their one-point kernels do not take): U = 1/σ through log_prob's pair, and
// ∂σ = −∂U·U² (σ's dtype, like ∂U).
Tensor log_prob_scale_composite(const Tensor& x, const Tensor& means, const Tensor& scale, const Tensor& logits,
                                c10::string_view cov) {
  check_scale_cov(cov);
  static auto op = handle<FwdSig>("fastgmmdiff::log_prob");
  return op.call(x, means, at::reciprocal(scale), logits, cov);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> log_prob_scale_backward_composite(
    const Tensor& grad, const Tensor& x, const Tensor& means, const Tensor& scale, const Tensor& logits,
    const Tensor& logp, c10::string_view cov) {
  check_scale_cov(cov);
  static auto op = handle<BwdSig>("fastgmmdiff::log_prob_backward");
  const Tensor u = at::reciprocal(scale);
  auto r = op.call(grad, x, means, u, logits, logp, cov);
  Tensor gs = std::get<2>(r);
  gs.mul_(u).mul_(u).neg_();
  return {std::get<0>(r), std::get<1>(r), gs, std::get<3>(r)};
}

}  // namespace fastgmmdiff

TORCH_LIBRARY_IMPL(fastgmmdiff, Autograd, m) {
  m.impl("log_prob", &fastgmmdiff::log_prob_autograd<fastgmmdiff::LogProbOps>);
  m.impl("log_prob_backward", &fastgmmdiff::log_prob_backward_autograd<fastgmmdiff::LogProbOps>);
  m.impl("log_prob_scale", &fastgmmdiff::log_prob_autograd<fastgmmdiff::LogProbScaleOps>);
  m.impl("log_prob_scale_backward", &fastgmmdiff::log_prob_backward_autograd<fastgmmdiff::LogProbScaleOps>);
  m.impl("ngmg", &fastgmmdiff::ngmg_autograd);
  m.impl("ngmg_backward", &fastgmmdiff::ngmg_backward_autograd);
}

TORCH_LIBRARY_IMPL(fastgmmdiff, CompositeExplicitAutograd, m) {
  m.impl("log_prob_scale", &fastgmmdiff::log_prob_scale_composite);
  m.impl("log_prob_scale_backward", &fastgmmdiff::log_prob_scale_backward_composite);
}
