// bipartite_match: for every source token its best destination by cosine similarity, and that
// similarity (+ a_d * priority of the source), without the |A| x |D| similarity matrix. Per sample, the
// destinations are gathered and scaled to unit length once; then sources are taken kSrcTile at a time
// (gathered and scaled in one pass into a reused buffer), and each source tile meets the destinations
// kDstTile at a time: one GEMM per tile pair into a [kSrcTile, kDstTile] buffer, folded into a running
// (max, argmax). Extra memory: the unit destinations of one sample and two fixed-size buffers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "checks.h"

namespace sdtm {
namespace {

// 512 sources x 256 destinations per GEMM: large enough to run near peak, small enough that the
// buffers (3 MB of sources at C = 1536, 0.5 MB of similarities) stay in cache and are never page-faulted
// afresh the way [B, A, C] gathers are.
constexpr int64_t kSrcTile = 512;
constexpr int64_t kDstTile = 256;
constexpr float kCosineEps = 1e-8f;
constexpr int kLanes = 16;  // independent partial sums of the squared norm: vector adds

// out[i] = x[b, idx[i]] / max(||x[b, idx[i]]||, eps) in fp32, for the `count` indices at idx.
template <typename scalar_t>
void gather_unit_rows(const scalar_t* x_b, const int64_t* idx, int64_t count, int64_t channels, float* out) {
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* row = x_b + idx[i] * channels;
      float* dst = out + i * channels;
      float part[kLanes] = {};
      int64_t c = 0;
      for (; c + kLanes <= channels; c += kLanes) {
        for (int j = 0; j < kLanes; ++j) {
          const float v = static_cast<float>(row[c + j]);
          dst[c + j] = v;
          part[j] += v * v;
        }
      }
      float squares = 0.0f;
      for (int j = 0; j < kLanes; ++j) squares += part[j];
      for (; c < channels; ++c) {
        const float v = static_cast<float>(row[c]);
        dst[c] = v;
        squares += v * v;
      }
      const float norm = std::max(std::sqrt(squares), kCosineEps);
      for (c = 0; c < channels; ++c) dst[c] /= norm;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> bipartite_match_cpu(const at::Tensor& x, const at::Tensor& src_idx,
                                                       const at::Tensor& dst_idx,
                                                       const c10::optional<at::Tensor>& priority, double a_d) {
  check_tokens(x, "x");
  const int64_t batch = x.size(0), tokens = x.size(1);
  check_index(src_idx, "src_idx", batch);
  check_index(dst_idx, "dst_idx", batch);
  check_range(src_idx, "src_idx", tokens);
  check_range(dst_idx, "dst_idx", tokens);
  check_priority(priority, batch, tokens);
  const int64_t num_src = src_idx.size(1), num_dst = dst_idx.size(1);
  TORCH_CHECK(num_dst > 0 || num_src == 0, "bipartite_match needs at least one destination token");

  at::Tensor score = at::full({batch, num_src}, -std::numeric_limits<float>::infinity(), x.options().dtype(at::kFloat));
  at::Tensor best = at::zeros({batch, num_src}, src_idx.options());
  if (num_src == 0) return {score, best};

  const at::Tensor xc = x.contiguous();
  const at::Tensor srcs = src_idx.contiguous(), dsts = dst_idx.contiguous();
  const int64_t channels = x.size(2);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor dst_unit = at::empty({num_dst, channels}, f32);
  at::Tensor src_unit = at::empty({std::min(kSrcTile, num_src), channels}, f32);
  at::Tensor tile_sims = at::empty({std::min(kSrcTile, num_src), std::min(kDstTile, num_dst)}, f32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bipartite_match", [&] {
    for (int64_t b = 0; b < batch; ++b) {
      const scalar_t* x_b = xc.data_ptr<scalar_t>() + b * tokens * channels;
      gather_unit_rows(x_b, dsts.data_ptr<int64_t>() + b * num_dst, num_dst, channels, dst_unit.data_ptr<float>());
      for (int64_t a0 = 0; a0 < num_src; a0 += kSrcTile) {
        const int64_t height = std::min(kSrcTile, num_src - a0);
        gather_unit_rows(x_b, srcs.data_ptr<int64_t>() + b * num_src + a0, height, channels,
                         src_unit.data_ptr<float>());
        const at::Tensor src_rows = src_unit.narrow(0, 0, height);
        float* run_max = score.data_ptr<float>() + b * num_src + a0;
        int64_t* run_arg = best.data_ptr<int64_t>() + b * num_src + a0;
        for (int64_t d0 = 0; d0 < num_dst; d0 += kDstTile) {
          const int64_t width = std::min(kDstTile, num_dst - d0);
          at::Tensor sims = tile_sims.narrow(0, 0, height).narrow(1, 0, width);
          at::mm_out(sims, src_rows, dst_unit.narrow(0, d0, width).t());
          const float* s = sims.data_ptr<float>();
          const int64_t stride = sims.stride(0);
          at::parallel_for(0, height, 64, [&](int64_t begin, int64_t end) {
            for (int64_t a = begin; a < end; ++a) {
              const float* row = s + a * stride;
              float m = run_max[a];
              int64_t arg = run_arg[a];
              for (int64_t j = 0; j < width; ++j) {
                if (row[j] > m) {  // strict: the first maximum wins, as in torch.argmax
                  m = row[j];
                  arg = d0 + j;
                }
              }
              run_max[a] = m;
              run_arg[a] = arg;
            }
          });
        }
      }
    }
  });
  if (priority.has_value()) score.add_(priority->to(at::kFloat).gather(1, src_idx), a_d);
  return {score, best};
}

}  // namespace

TORCH_LIBRARY_IMPL(sdtm, CPU, m) { m.impl("bipartite_match", &bipartite_match_cpu); }

}  // namespace sdtm
