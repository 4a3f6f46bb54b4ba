// Argument checks shared by the CPU kernels: every failure names the argument and what was expected.
#pragma once
#include <ATen/ATen.h>

namespace sdtm {

inline void check_tokens(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3, name, " must be [B, N, C], got ", x.dim(), " dims");
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              name, " must be float32, float16 or bfloat16, got ", x.scalar_type());
}

inline void check_index(const at::Tensor& idx, const char* name, int64_t batch) {
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == batch, name, " must be [B=", batch, ", *], got ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kLong, name, " must be int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.device().is_cpu(), name, " must be a CPU tensor, got ", idx.device());
}

// All values of idx lie in [0, limit).
inline void check_range(const at::Tensor& idx, const char* name, int64_t limit) {
  if (idx.numel() == 0) return;
  const int64_t low = idx.min().item<int64_t>();
  const int64_t high = idx.max().item<int64_t>();
  TORCH_CHECK(low >= 0 && high < limit, name, " must lie in [0, ", limit, "), got values in [", low, ", ", high, "]");
}

inline void check_priority(const c10::optional<at::Tensor>& priority, int64_t batch, int64_t tokens) {
  if (!priority.has_value()) return;
  const at::Tensor& p = *priority;
  TORCH_CHECK(p.dim() == 2 && p.size(0) == batch && p.size(1) == tokens, "priority must be [B=", batch,
              ", N=", tokens, "], got ", p.sizes());
  TORCH_CHECK(p.device().is_cpu(), "priority must be a CPU tensor, got ", p.device());
}

}  // namespace sdtm
