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

// t is a [B, N, C] CPU tensor of dtype.
inline void check_full(const at::Tensor& t, const char* name, int64_t batch, int64_t tokens, int64_t channels,
                       at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 3 && t.size(0) == batch && t.size(1) == tokens && t.size(2) == channels, name,
              " must be [B=", batch, ", N=", tokens, ", C=", channels, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype && t.device().is_cpu(), name, " must be a CPU ", dtype, " tensor, got ",
              t.scalar_type(), " on ", t.device());
}

inline void check_priority(const c10::optional<at::Tensor>& priority, int64_t batch, int64_t tokens) {
  if (!priority.has_value()) return;
  const at::Tensor& p = *priority;
  TORCH_CHECK(p.dim() == 2 && p.size(0) == batch && p.size(1) == tokens, "priority must be [B=", batch,
              ", N=", tokens, "], got ", p.sizes());
  TORCH_CHECK(p.device().is_cpu(), "priority must be a CPU tensor, got ", p.device());
}

// A merge plan (slot [B, N], members [B, N], offsets [B, M + 1]) over N tokens; returns M.
inline int64_t check_plan(const at::Tensor& slot, const at::Tensor& members, const at::Tensor& offsets_in,
                          int64_t batch, int64_t tokens) {
  check_index(slot, "slot", batch);
  check_index(members, "members", batch);
  check_index(offsets_in, "offsets", batch);
  TORCH_CHECK(slot.size(1) == tokens && members.size(1) == tokens, "slot and members must be [B, N=", tokens,
              "], got ", slot.sizes(), " and ", members.sizes());
  TORCH_CHECK(offsets_in.size(1) >= 1, "offsets must be [B, M + 1]");
  const int64_t rows = offsets_in.size(1) - 1;
  check_range(members, "members", tokens);
  const at::Tensor offsets = offsets_in.contiguous();
  const at::Tensor steps = offsets.narrow(1, 1, rows) - offsets.narrow(1, 0, rows);
  TORCH_CHECK(rows == 0 || steps.min().item<int64_t>() >= 1,
              "offsets must grow by at least 1 per row (no empty group)");
  TORCH_CHECK((offsets.select(1, 0) == 0).all().item<bool>() && (offsets.select(1, rows) == tokens).all().item<bool>(),
              "offsets must start at 0 and end at N=", tokens);
  return rows;
}

}  // namespace sdtm
