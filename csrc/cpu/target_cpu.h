// CPU entry points of the one-component-per-point path (target_cpu.cpp): log N(x_n; μ_t, Σ_t)
// (or −½q_t with `normalize`) and its backward, used by the fused NGMG (log_prob_cpu.cpp) when
// K is large.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <tuple>

namespace fastgmmdiff {
namespace cpu {

// ValueError unless every entry of the contiguous int64 target lies in [0, K).
void check_target_range(const at::Tensor& target, int64_t K);

at::Tensor log_prob_target_cpu(const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec,
                               const at::Tensor& target, c10::string_view covariance_type, bool normalize);

std::tuple<at::Tensor, at::Tensor, at::Tensor> log_prob_target_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& means, const at::Tensor& prec,
    const at::Tensor& target, const at::Tensor& logp, c10::string_view covariance_type);

}  // namespace cpu
}  // namespace fastgmmdiff
