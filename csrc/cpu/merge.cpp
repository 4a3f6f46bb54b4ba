// merge: gather + group mean in one pass. Each merged row m of sample b is the fp32 mean of the rows
// members[b, offsets[b, m] : offsets[b, m + 1]] of x (or its first member with pseudo_merge), written
// straight into the [B, M, C] output.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"

namespace sdtm {
namespace {

template <typename scalar_t>
void merge_kernel(const at::Tensor& x, const at::Tensor& members, const at::Tensor& offsets, bool pseudo_merge,
                  at::Tensor& out) {
  const int64_t batch = x.size(0), tokens = x.size(1), channels = x.size(2), rows = out.size(1);
  const scalar_t* in = x.data_ptr<scalar_t>();
  scalar_t* result = out.data_ptr<scalar_t>();
  const int64_t* member = members.data_ptr<int64_t>();
  const int64_t* offset = offsets.data_ptr<int64_t>();

  at::parallel_for(0, batch * rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(channels);
    for (int64_t bm = begin; bm < end; ++bm) {
      const int64_t b = bm / rows, m = bm % rows;
      const int64_t first = offset[b * (rows + 1) + m], last = offset[b * (rows + 1) + m + 1];
      scalar_t* dst = result + bm * channels;
      const scalar_t* head = in + (b * tokens + member[b * tokens + first]) * channels;
      if (pseudo_merge || last - first == 1) {
        for (int64_t c = 0; c < channels; ++c) dst[c] = head[c];
        continue;
      }
      for (int64_t c = 0; c < channels; ++c) sum[c] = static_cast<float>(head[c]);
      for (int64_t i = first + 1; i < last; ++i) {
        const scalar_t* row = in + (b * tokens + member[b * tokens + i]) * channels;
        for (int64_t c = 0; c < channels; ++c) sum[c] += static_cast<float>(row[c]);
      }
      const float count = static_cast<float>(last - first);
      for (int64_t c = 0; c < channels; ++c) dst[c] = static_cast<scalar_t>(sum[c] / count);
    }
  });
}

at::Tensor merge_cpu(const at::Tensor& x_in, const at::Tensor& slot, const at::Tensor& members_in,
                     const at::Tensor& offsets_in, bool pseudo_merge) {
  check_tokens(x_in, "x");
  const int64_t batch = x_in.size(0);
  const int64_t rows = check_plan(slot, members_in, offsets_in, batch, x_in.size(1));
  const at::Tensor offsets = offsets_in.contiguous();
  const at::Tensor x = x_in.contiguous();
  const at::Tensor members = members_in.contiguous();
  at::Tensor out = at::empty({batch, rows, x.size(2)}, x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "merge", [&] {
    merge_kernel<scalar_t>(x, members, offsets, pseudo_merge, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sdtm, CPU, m) { m.impl("merge", &merge_cpu); }

}  // namespace sdtm
