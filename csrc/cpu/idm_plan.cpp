// The detail-phase ("IDM") plan in two ops, each the same result as its torch twin in sdtm.core.plans:
//
// idm_candidates: the destination of every complete window (the token of largest merge age, the first
//   on ties, as torch.argmax; or the given positions while there is no merge age) and the source
//   candidates: dst_idx [B, W] token indices and src_idx [B, W * (K - 1)], window after window, each
//   window's sources in position order (sdtm.core.plans.idm_destinations followed by idm_candidates).
// idm_plan: from bipartite_match's (score, best), the r best-scoring sources (stable descending order:
//   on equal scores the earlier source wins) join the group of their best destination; destination j
//   is group j. Rows: the unmerged tokens first, in token order, then one row per group, its
//   destination first and then its sources in token order (sdtm.core.plans.idm_plan and _assemble).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <tuple>
#include <vector>

#include "checks.h"
#include "window_grid.h"

namespace sdtm {
namespace {

// a ranks above b in a descending torch.sort: NaN above every number, as torch orders it.
template <typename scalar_t>
inline bool ranks_above(scalar_t a, scalar_t b) {
  const bool a_nan = at::_isnan(a), b_nan = at::_isnan(b);
  if (a_nan || b_nan) return a_nan && !b_nan;
  return a > b;
}

// Index of the first largest of the k values v(0..k-1) (NaN counts as the largest, as in torch.argmax).
template <typename scalar_t, typename Value>
inline int64_t first_argmax(int64_t k, Value v) {
  int64_t arg = 0;
  scalar_t top = v(0);
  for (int64_t p = 1; p < k; ++p) {
    const scalar_t value = v(p);
    if (ranks_above(value, top)) {
      top = value;
      arg = p;
    }
  }
  return arg;
}

std::tuple<at::Tensor, at::Tensor> idm_candidates_cpu(const c10::optional<at::Tensor>& merge_age,
                                                      const c10::optional<at::Tensor>& dst_position, int64_t grid_h,
                                                      int64_t grid_w, int64_t sy, int64_t sx, int64_t frames,
                                                      int64_t st) {
  const WindowGrid grid = checked_grid(grid_h, grid_w, sy, sx, frames, st);
  TORCH_CHECK(merge_age.has_value() || dst_position.has_value(),
              "idm_candidates needs a merge age or the destination positions");
  const int64_t windows = grid.windows(), k = grid.window_size(), tokens = grid.tokens();
  const bool by_age = merge_age.has_value();
  at::Tensor age, given;
  int64_t batch;
  if (by_age) {
    const at::Tensor& t = *merge_age;
    TORCH_CHECK(t.dim() == 2 && t.size(1) == tokens && t.device().is_cpu(), "merge_age must be a [B, N=", tokens,
                "] CPU tensor, got ", t.sizes(), " on ", t.device());
    batch = t.size(0);
    age = t.contiguous();
  } else {
    const at::Tensor& t = *dst_position;
    TORCH_CHECK(t.dim() == 2 && t.size(1) == windows, "dst_position must be [B, W=", windows, "], got ", t.sizes());
    check_index(t, "dst_position", t.size(0));
    batch = t.size(0);
    given = t.contiguous();
  }
  auto long_options = at::TensorOptions().dtype(at::kLong).device(at::kCPU);
  at::Tensor src_idx = at::empty({batch, windows * (k - 1)}, long_options);
  at::Tensor dst_idx = at::empty({batch, windows}, long_options);
  if (batch == 0 || windows == 0) return {src_idx, dst_idx};
  int64_t* src_out = src_idx.data_ptr<int64_t>();
  int64_t* dst_out = dst_idx.data_ptr<int64_t>();

  // destination(b, w, token): window w's destination position in sample b (token(p) is the token at
  // position p of the window), by merge age or as given.
  auto for_each_window = [&](auto destination) {
    at::parallel_for(0, batch * windows, 256, [&](int64_t begin, int64_t end) {
      for (int64_t bw = begin; bw < end; ++bw) {
        const int64_t b = bw / windows, w = bw % windows;
        auto token = [&](int64_t p) { return grid.token(w, p); };
        const int64_t d = destination(b, w, token);
        TORCH_CHECK(d >= 0 && d < k, "dst_position must lie in [0, K=", k, "), got ", d);
        dst_out[bw] = token(d);
        int64_t* src = src_out + bw * (k - 1);
        for (int64_t p = 0; p < k; ++p) {
          if (p != d) *src++ = token(p);
        }
      }
    });
  };
  if (by_age) {
    AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, age.scalar_type(), "idm_candidates", [&] {
      const scalar_t* a = age.data_ptr<scalar_t>();
      for_each_window([&](int64_t b, int64_t, const auto& token) {
        const scalar_t* row = a + b * tokens;
        return first_argmax<scalar_t>(k, [&](int64_t p) { return row[token(p)]; });
      });
    });
  } else {
    const int64_t* position = given.data_ptr<int64_t>();
    for_each_window([&](int64_t b, int64_t w, const auto&) { return position[b * windows + w]; });
  }
  return {src_idx, dst_idx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> idm_plan_cpu(
    const at::Tensor& score_in, const at::Tensor& best_in, const at::Tensor& src_in, const at::Tensor& dst_in,
    int64_t tokens, int64_t r, bool pseudo_merge) {
  TORCH_CHECK(score_in.dim() == 2 && score_in.device().is_cpu(), "score must be a [B, A] CPU tensor, got ",
              score_in.sizes());
  TORCH_CHECK(at::isFloatingType(score_in.scalar_type()), "score must be a floating tensor, got ",
              score_in.scalar_type());
  const int64_t batch = score_in.size(0), num_src = score_in.size(1);
  check_index(best_in, "best", batch);
  check_index(src_in, "src_idx", batch);
  check_index(dst_in, "dst_idx", batch);
  TORCH_CHECK(best_in.size(1) == num_src && src_in.size(1) == num_src, "score, best and src_idx must all be [B, A=",
              num_src, "], got ", score_in.sizes(), ", ", best_in.sizes(), " and ", src_in.sizes());
  const int64_t num_dst = dst_in.size(1);
  TORCH_CHECK(r >= 0 && r <= num_src, "r must lie in [0, A=", num_src, "], got ", r);
  TORCH_CHECK(tokens >= num_dst + r, "num_tokens=", tokens, " cannot hold ", num_dst, " destinations and ", r,
              " sources");
  const int64_t unmerged_rows = tokens - num_dst - r, rows = unmerged_rows + num_dst;
  const at::Tensor score = score_in.contiguous(), best = best_in.contiguous();
  const at::Tensor srcs = src_in.contiguous(), dsts = dst_in.contiguous();
  auto long_options = at::TensorOptions().dtype(at::kLong).device(at::kCPU);
  at::Tensor slot = at::empty({batch, tokens}, long_options);
  at::Tensor members = at::empty({batch, tokens}, long_options);
  at::Tensor offsets = at::empty({batch, rows + 1}, long_options);
  at::Tensor blend = at::empty({batch, tokens}, long_options.dtype(at::kBool));
  at::Tensor independent = at::empty({batch, tokens}, long_options.dtype(at::kBool));
  if (batch == 0) return {slot, blend, members, offsets, independent};
  const int64_t* best_of = best.data_ptr<int64_t>();
  const int64_t* src_token = srcs.data_ptr<int64_t>();
  const int64_t* dst_token = dsts.data_ptr<int64_t>();
  int64_t* slot_out = slot.data_ptr<int64_t>();
  int64_t* member_out = members.data_ptr<int64_t>();
  int64_t* offset_out = offsets.data_ptr<int64_t>();
  bool* blend_out = blend.data_ptr<bool>();
  bool* independent_out = independent.data_ptr<bool>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, score.scalar_type(), "idm_plan", [&] {
    const scalar_t* score_of = score.data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> order(num_src), code(tokens), next(num_dst);
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* s = score_of + b * num_src;
        const int64_t* src = src_token + b * num_src;
        const int64_t* dst = dst_token + b * num_dst;
        const int64_t* group_of_src = best_of + b * num_src;
        // The first r of a stable descending sort are the r first in (score descending, index ascending):
        // a strict total order, so selecting them needs no full sort.
        std::iota(order.begin(), order.end(), 0);
        if (r > 0 && r < num_src) {
          std::nth_element(order.begin(), order.begin() + (r - 1), order.end(), [s](int64_t i, int64_t j) {
            return ranks_above(s[i], s[j]) || (!ranks_above(s[j], s[i]) && i < j);
          });
        }
        // Each token's code: -1 unmerged, 2 * group for a destination, 2 * group + 1 for a chosen source.
        std::fill(code.begin(), code.end(), -1);
        for (int64_t j = 0; j < num_dst; ++j) {
          TORCH_CHECK(dst[j] >= 0 && dst[j] < tokens, "dst_idx must lie in [0, ", tokens, "), got ", dst[j]);
          TORCH_CHECK(code[dst[j]] < 0, "dst_idx holds token ", dst[j], " twice in sample ", b);
          code[dst[j]] = 2 * j;
        }
        // Group rows: the destination, then the sources; next[j] is where group j's next member goes.
        std::fill(next.begin(), next.end(), 1);
        for (int64_t i = 0; i < r; ++i) {
          const int64_t a = order[i], n = src[a], group = group_of_src[a];
          TORCH_CHECK(n >= 0 && n < tokens, "src_idx must lie in [0, ", tokens, "), got ", n);
          TORCH_CHECK(group >= 0 && group < num_dst, "best must lie in [0, ", num_dst, "), got ", group);
          TORCH_CHECK(code[n] < 0, "source token ", n, " of sample ", b, " is also a destination or chosen twice");
          code[n] = 2 * group + 1;
          ++next[group];
        }
        int64_t* offset = offset_out + b * (rows + 1);
        for (int64_t m = 0; m <= unmerged_rows; ++m) offset[m] = m;
        for (int64_t j = 0, at_row = unmerged_rows; j < num_dst; ++j) {
          const int64_t size = next[j];
          offset[unmerged_rows + j + 1] = at_row += size;
          next[j] = offset[unmerged_rows + j] + 1;  // the first source's place
        }
        // Tokens in order: unmerged ones take the next unmerged row, merged ones their group's next place.
        int64_t* member = member_out + b * tokens;
        for (int64_t n = 0, next_unmerged = 0; n < tokens; ++n) {
          const int64_t c = code[n], out = b * tokens + n;
          if (c < 0) {
            slot_out[out] = next_unmerged;
            member[next_unmerged++] = n;
            blend_out[out] = false;
            independent_out[out] = true;
            continue;
          }
          const int64_t group = c >> 1;
          const bool is_dst = (c & 1) == 0;
          slot_out[out] = unmerged_rows + group;
          member[is_dst ? offset[unmerged_rows + group] : next[group]++] = n;
          blend_out[out] = true;
          independent_out[out] = pseudo_merge && is_dst;
        }
      }
    });
  });
  return {slot, blend, members, offsets, independent};
}

}  // namespace

TORCH_LIBRARY_IMPL(sdtm, CPU, m) {
  m.impl("idm_candidates", &idm_candidates_cpu);
  m.impl("idm_plan", &idm_plan_cpu);
}

}  // namespace sdtm
