// window_scores: mean cosine similarity over all K*K ordered token pairs of each complete window
// (+ a_s * window mean of the merge-age priority), one pass over the window's K rows.
//
// sum_{i,j} cos(x_i, x_j) = sum_{i,j} G_ij / (|x_i| |x_j|) with G the window's Gram matrix, so only the
// K(K+1)/2 dot products are needed; the K rows (K * C floats) stay in L1/L2 while they are formed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "checks.h"
#include "window_grid.h"

namespace sdtm {
namespace {

constexpr double kCosineEps = 1e-8;  // torch.nn.functional.cosine_similarity's eps

template <typename scalar_t>
void window_scores_kernel(const at::Tensor& x, const float* priority, const WindowGrid& grid, double a_s,
                          at::Tensor& out) {
  const int64_t batch = x.size(0), tokens = x.size(1), channels = x.size(2);
  const int64_t windows = out.size(1), k = grid.window_size();
  const scalar_t* data = x.data_ptr<scalar_t>();
  float* result = out.data_ptr<float>();

  at::parallel_for(0, batch * windows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> rows(k * channels);
    std::vector<double> gram(k * k);
    std::vector<int64_t> token(k);
    for (int64_t bw = begin; bw < end; ++bw) {
      const int64_t b = bw / windows, w = bw % windows;
      for (int64_t p = 0; p < k; ++p) token[p] = grid.token(w, p);
      for (int64_t i = 0; i < k; ++i) {
        const scalar_t* src = data + (b * tokens + token[i]) * channels;
        float* dst = rows.data() + i * channels;
        for (int64_t c = 0; c < channels; ++c) dst[c] = static_cast<float>(src[c]);
      }
      for (int64_t i = 0; i < k; ++i) {
        const float* xi = rows.data() + i * channels;
        for (int64_t j = i; j < k; ++j) {
          const float* xj = rows.data() + j * channels;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t c = 0; c < channels; ++c) dot += xi[c] * xj[c];
          gram[i * k + j] = dot;
        }
      }
      double total = 0.0;
      for (int64_t i = 0; i < k; ++i) {
        for (int64_t j = i; j < k; ++j) {
          // cosine_similarity: dot / sqrt(max(|x_i|^2 |x_j|^2, eps^2))
          const double denominator = std::sqrt(std::max(gram[i * k + i] * gram[j * k + j], kCosineEps * kCosineEps));
          total += (i == j ? 1.0 : 2.0) * gram[i * k + j] / denominator;
        }
      }
      double score = total / static_cast<double>(k * k);
      if (priority != nullptr) {
        double mean = 0.0;
        for (int64_t i = 0; i < k; ++i) mean += priority[b * tokens + token[i]];
        score += a_s * (mean / static_cast<double>(k));
      }
      result[bw] = static_cast<float>(score);
    }
  });
}

at::Tensor window_scores_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& priority_in, int64_t grid_h,
                             int64_t grid_w, int64_t sy, int64_t sx, double a_s, int64_t frames, int64_t st) {
  check_tokens(x_in, "x");
  const WindowGrid grid = checked_grid(grid_h, grid_w, sy, sx, frames, st);
  TORCH_CHECK(grid.window_size() >= 2, "window must hold at least 2 tokens, got st=", st, " sy=", sy, " sx=", sx);
  TORCH_CHECK(grid.tokens() == x_in.size(1), "grid ", frames, "x", grid_h, "x", grid_w, " does not match N=",
              x_in.size(1));
  check_priority(priority_in, x_in.size(0), x_in.size(1));
  const at::Tensor x = x_in.contiguous();
  at::Tensor priority;
  if (priority_in.has_value()) priority = priority_in->to(at::kFloat).contiguous();
  const int64_t windows = grid.windows();
  at::Tensor out = at::empty({x.size(0), windows}, x.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  const float* p = priority.defined() ? priority.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "window_scores", [&] {
    window_scores_kernel<scalar_t>(x, p, grid, a_s, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sdtm, CPU, m) { m.impl("window_scores", &window_scores_cpu); }

}  // namespace sdtm
