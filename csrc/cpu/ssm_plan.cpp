// ssm_plan: the structure-phase merge plan in one op, from the window scores and destination positions
// (the same plan as sdtm.core.plans.ssm_plan). Per sample: the n_win best windows (stable order on ties) merge
// whole; unmerged tokens take rows 0..U-1 in token order, selected window g (in window order) takes row
// U + g, its destination first among its members, then its sources in position order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <tuple>
#include <vector>

#include "window_grid.h"

namespace sdtm {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ssm_plan_cpu(
    const at::Tensor& scores_in, const at::Tensor& dst_in, int64_t grid_h, int64_t grid_w, int64_t sy, int64_t sx,
    int64_t n_win, bool pseudo_merge, int64_t frames, int64_t st) {
  TORCH_CHECK(scores_in.dim() == 2 && scores_in.device().is_cpu(), "window_scores must be a [B, W] CPU tensor, got ",
              scores_in.sizes());
  const WindowGrid grid = checked_grid(grid_h, grid_w, sy, sx, frames, st);
  const int64_t batch = scores_in.size(0), windows = grid.windows();
  TORCH_CHECK(scores_in.size(1) == windows, "window_scores must be [B, W=", windows, "], got ", scores_in.sizes());
  TORCH_CHECK(dst_in.sizes() == scores_in.sizes() && dst_in.scalar_type() == at::kLong,
              "dst_position must be int64 [B, W] like window_scores, got ", dst_in.sizes());
  TORCH_CHECK(n_win >= 0 && n_win <= windows, "n_win must lie in [0, W=", windows, "], got ", n_win);
  const int64_t k = grid.window_size(), tokens = grid.tokens(), unmerged_rows = tokens - n_win * k;
  const at::Tensor scores = scores_in.to(at::kFloat).contiguous();
  const at::Tensor dst = dst_in.contiguous();
  auto long_options = dst.options().dtype(at::kLong);
  at::Tensor slot = at::empty({batch, tokens}, long_options);
  at::Tensor members = at::empty({batch, tokens}, long_options);
  at::Tensor offsets = at::empty({batch, unmerged_rows + n_win + 1}, long_options);
  at::Tensor blend = at::empty({batch, tokens}, long_options.dtype(at::kBool));
  at::Tensor independent = at::empty({batch, tokens}, long_options.dtype(at::kBool));
  const float* score = scores.data_ptr<float>();
  const int64_t* position_of_dst = dst.data_ptr<int64_t>();
  int64_t* slot_out = slot.data_ptr<int64_t>();
  int64_t* member_out = members.data_ptr<int64_t>();
  int64_t* offset_out = offsets.data_ptr<int64_t>();
  bool* blend_out = blend.data_ptr<bool>();
  bool* independent_out = independent.data_ptr<bool>();

  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order(windows), group(windows);
    for (int64_t b = begin; b < end; ++b) {
      const float* s = score + b * windows;
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [s](int64_t i, int64_t j) { return s[i] > s[j]; });
      std::fill(group.begin(), group.end(), -1);
      for (int64_t i = 0; i < n_win; ++i) group[order[i]] = 0;
      for (int64_t w = 0, g = 0; w < windows; ++w) {
        if (group[w] >= 0) group[w] = g++;
      }
      int64_t next_unmerged = 0;
      for (int64_t n = 0; n < tokens; ++n) {
        int64_t position = 0;
        const int64_t w = grid.window_of(n, &position);
        const int64_t g = w >= 0 ? group[w] : -1;
        const int64_t out = b * tokens + n;
        if (g < 0) {
          slot_out[out] = next_unmerged;
          member_out[b * tokens + next_unmerged] = n;
          blend_out[out] = false;
          independent_out[out] = true;
          ++next_unmerged;
          continue;
        }
        const int64_t dst_position = position_of_dst[b * windows + w];
        const bool is_dst = position == dst_position;
        const int64_t place = is_dst ? 0 : position + (position < dst_position ? 1 : 0);
        slot_out[out] = unmerged_rows + g;
        member_out[b * tokens + unmerged_rows + k * g + place] = n;
        blend_out[out] = true;
        independent_out[out] = pseudo_merge && is_dst;
      }
      int64_t* offset = offset_out + b * (unmerged_rows + n_win + 1);
      for (int64_t m = 0; m < unmerged_rows; ++m) offset[m] = m;
      for (int64_t g = 0; g <= n_win; ++g) offset[unmerged_rows + g] = unmerged_rows + k * g;
    }
  });
  return {slot, blend, members, offsets, independent};
}

}  // namespace

TORCH_LIBRARY_IMPL(sdtm, CPU, m) { m.impl("ssm_plan", &ssm_plan_cpu); }

}  // namespace sdtm
