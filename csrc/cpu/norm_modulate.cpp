// norm_modulate and norm_modulate_merge: the adaptive LayerNorm of an SD3 block (LayerNorm without
// affine weights, then x * (1 + scale[b]) + shift[b]), alone or fused with merge.
//   norm_modulate(x)        [B, N, C] -> [B, N, C]
//   norm_modulate_merge(x)  [B, N, C] -> [B, M, C]: each merged row is the fp32 mean of its members'
//                           modulated rows (or its first member's with pseudo_merge), so the N-token
//                           normalised tensor is never written: one read of x, one write of M rows.
// Row statistics are fp32 (mean, then mean squared deviation over a row that sits in L1). Each
// normalised value, product and sum is rounded to the tensor dtype where torch's op sequence rounds it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "checks.h"

namespace sdtm {
namespace {

constexpr int kLanes = 16;  // independent partial sums: the compiler turns them into vector adds

// Sum over a row of f(x[c]) with kLanes partial sums.
template <typename scalar_t, typename F>
float row_sum(const scalar_t* x, int64_t channels, F f) {
  float part[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= channels; c += kLanes)
    for (int j = 0; j < kLanes; ++j) part[j] += f(static_cast<float>(x[c + j]));
  float total = 0.0f;
  for (int j = 0; j < kLanes; ++j) total += part[j];
  for (; c < channels; ++c) total += f(static_cast<float>(x[c]));
  return total;
}

// out[c] = ((x[c] - mean) * rstd) * one_plus_scale[c] + shift[c], rounded as torch rounds each step.
template <typename scalar_t>
void modulated_row(const scalar_t* x, int64_t channels, double eps, const scalar_t* one_plus_scale,
                   const scalar_t* shift, scalar_t* out) {
  const float count = static_cast<float>(channels);
  const float mean = row_sum(x, channels, [](float v) { return v; }) / count;
  const float variance = row_sum(x, channels, [mean](float v) { return (v - mean) * (v - mean); }) / count;
  const float rstd = 1.0f / std::sqrt(variance + static_cast<float>(eps));
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t normed = static_cast<scalar_t>((static_cast<float>(x[c]) - mean) * rstd);
    const scalar_t scaled = static_cast<scalar_t>(normed * one_plus_scale[c]);
    out[c] = static_cast<scalar_t>(scaled + shift[c]);
  }
}

// [B, C] modulation rows: (1 + scale) rounded to the dtype (torch forms it as a tensor first) and shift.
struct Modulation {
  at::Tensor one_plus_scale, shift;
};

Modulation check_modulation(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps) {
  check_tokens(x, "x");
  const int64_t batch = x.size(0), channels = x.size(2);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{shift, "shift"}, {scale, "scale"}}) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == batch && t.size(1) == channels, name, " must be [B=", batch,
                ", C=", channels, "], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device().is_cpu(), name, " must be a CPU ", x.scalar_type(),
                " tensor, got ", t.scalar_type(), " on ", t.device());
  }
  TORCH_CHECK(eps > 0.0, "eps must be positive, got ", eps);
  return {(scale + 1).contiguous(), shift.contiguous()};
}

at::Tensor norm_modulate_cpu(const at::Tensor& x_in, const at::Tensor& shift_in, const at::Tensor& scale_in,
                             double eps) {
  const Modulation mod = check_modulation(x_in, shift_in, scale_in, eps);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  if (out.numel() == 0) return out;
  const int64_t tokens = x.size(1), channels = x.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_modulate", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    const scalar_t* scales = mod.one_plus_scale.data_ptr<scalar_t>();
    const scalar_t* shifts = mod.shift.data_ptr<scalar_t>();
    scalar_t* result = out.data_ptr<scalar_t>();
    at::parallel_for(0, x.size(0) * tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t bn = begin; bn < end; ++bn) {
        const int64_t b = bn / tokens;
        modulated_row(in + bn * channels, channels, eps, scales + b * channels, shifts + b * channels,
                      result + bn * channels);
      }
    });
  });
  return out;
}

at::Tensor norm_modulate_merge_cpu(const at::Tensor& x_in, const at::Tensor& shift_in, const at::Tensor& scale_in,
                                   double eps, const at::Tensor& slot, const at::Tensor& members_in,
                                   const at::Tensor& offsets_in, bool pseudo_merge) {
  const Modulation mod = check_modulation(x_in, shift_in, scale_in, eps);
  const int64_t batch = x_in.size(0), tokens = x_in.size(1), channels = x_in.size(2);
  const int64_t rows = check_plan(slot, members_in, offsets_in, batch, tokens);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor members = members_in.contiguous();
  const at::Tensor offsets = offsets_in.contiguous();
  at::Tensor out = at::empty({batch, rows, channels}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_modulate_merge", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    const scalar_t* scales = mod.one_plus_scale.data_ptr<scalar_t>();
    const scalar_t* shifts = mod.shift.data_ptr<scalar_t>();
    const int64_t* member = members.data_ptr<int64_t>();
    const int64_t* offset = offsets.data_ptr<int64_t>();
    scalar_t* result = out.data_ptr<scalar_t>();
    at::parallel_for(0, batch * rows, 16, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> row(channels);
      std::vector<float> sum(channels);
      for (int64_t bm = begin; bm < end; ++bm) {
        const int64_t b = bm / rows, m = bm % rows;
        const int64_t first = offset[b * (rows + 1) + m], last = offset[b * (rows + 1) + m + 1];
        const scalar_t* one_plus = scales + b * channels;
        const scalar_t* shift = shifts + b * channels;
        scalar_t* dst = result + bm * channels;
        const auto token_row = [&](int64_t i) { return in + (b * tokens + member[b * tokens + i]) * channels; };
        if (pseudo_merge || last - first == 1) {
          modulated_row(token_row(first), channels, eps, one_plus, shift, dst);
          continue;
        }
        modulated_row(token_row(first), channels, eps, one_plus, shift, row.data());
        for (int64_t c = 0; c < channels; ++c) sum[c] = static_cast<float>(row[c]);
        for (int64_t i = first + 1; i < last; ++i) {
          modulated_row(token_row(i), channels, eps, one_plus, shift, row.data());
          for (int64_t c = 0; c < channels; ++c) sum[c] += static_cast<float>(row[c]);
        }
        const float count = static_cast<float>(last - first);
        for (int64_t c = 0; c < channels; ++c) dst[c] = static_cast<scalar_t>(sum[c] / count);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sdtm, CPU, m) {
  m.impl("norm_modulate", &norm_modulate_cpu);
  m.impl("norm_modulate_merge", &norm_modulate_merge_cpu);
}

}  // namespace sdtm
