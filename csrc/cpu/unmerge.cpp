// unmerge: scatter a merged sub-layer output back to every token, blend group members with the cached
// output, add the residual and write the new cache, in one pass over [B, N, C]:
//   u[b, n]   = gate[b] * y[b, slot[b, n]]                       (gate optional)
//   u[b, n]   = mcw * u + (1 - mcw) * cache[b, n]   where blend[b, n] and a cache exists
//   out[b, n] = residual[b, n] + u                               (residual optional, else u)
//   new_cache = u                                                (when stored)
// Two entry points share the kernel: the functional `unmerge` allocates out and the new cache;
// `unmerge_into` writes into given tensors, where out may be the residual itself and cache_out the cache
// itself (each element is read before it is written, by the same thread), so a block can update its
// residual stream and its cache in place instead of allocating (and page-faulting) fresh [B, N, C] buffers.
// Each product and sum is rounded to the tensor dtype as torch's op sequence does (and the build uses
// -ffp-contract=off), so float32 results equal the torch twin bit for bit.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"

namespace sdtm {
namespace {

template <typename scalar_t>
void unmerge_kernel(const at::Tensor& y, const at::Tensor& slot, const at::Tensor& blend, const at::Tensor& cache,
                    const at::Tensor& gate, const at::Tensor& residual, double mcw, const at::Tensor& out,
                    const at::Tensor& new_cache) {
  const int64_t batch = slot.size(0), tokens = slot.size(1), channels = y.size(2), rows = y.size(1);
  const scalar_t* in = y.data_ptr<scalar_t>();
  const int64_t* slots = slot.data_ptr<int64_t>();
  const bool* blends = blend.data_ptr<bool>();
  const scalar_t* cached = cache.defined() ? cache.data_ptr<scalar_t>() : nullptr;
  const scalar_t* gates = gate.defined() ? gate.data_ptr<scalar_t>() : nullptr;
  const scalar_t* res = residual.defined() ? residual.data_ptr<scalar_t>() : nullptr;
  scalar_t* result = out.data_ptr<scalar_t>();
  scalar_t* stored = new_cache.defined() ? new_cache.data_ptr<scalar_t>() : nullptr;
  // torch multiplies a float32 tensor by a Python float in float32; (1 - mcw) is formed in double first.
  const float keep = static_cast<float>(mcw);
  const float refresh = static_cast<float>(1.0 - mcw);

  at::parallel_for(0, batch * tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t bn = begin; bn < end; ++bn) {
      const int64_t b = bn / tokens;
      const scalar_t* row = in + (b * rows + slots[bn]) * channels;
      const scalar_t* g = gates != nullptr ? gates + b * channels : nullptr;
      const scalar_t* c_row = (cached != nullptr && blends[bn]) ? cached + bn * channels : nullptr;
      const scalar_t* r_row = res != nullptr ? res + bn * channels : nullptr;
      scalar_t* o_row = result + bn * channels;
      scalar_t* s_row = stored != nullptr ? stored + bn * channels : nullptr;
      for (int64_t c = 0; c < channels; ++c) {
        scalar_t u = g != nullptr ? static_cast<scalar_t>(g[c] * row[c]) : row[c];
        if (c_row != nullptr) {
          const scalar_t fresh = static_cast<scalar_t>(keep * static_cast<float>(u));
          const scalar_t old = static_cast<scalar_t>(refresh * static_cast<float>(c_row[c]));
          u = static_cast<scalar_t>(fresh + old);
        }
        const scalar_t total = r_row != nullptr ? static_cast<scalar_t>(r_row[c] + u) : u;
        if (s_row != nullptr) s_row[c] = u;
        o_row[c] = total;
      }
    }
  });
}

// Checked, contiguous inputs of one unmerge call.
struct UnmergeInputs {
  at::Tensor y, slot, blend, cache, gate, residual;
};

UnmergeInputs check_inputs(const at::Tensor& y_in, const at::Tensor& slot_in, const at::Tensor& blend_in,
                           const c10::optional<at::Tensor>& cache_in, const c10::optional<at::Tensor>& gate_in,
                           const c10::optional<at::Tensor>& residual_in, double mcw) {
  check_tokens(y_in, "y");
  const int64_t batch = y_in.size(0), channels = y_in.size(2);
  check_index(slot_in, "slot", batch);
  const int64_t tokens = slot_in.size(1);
  TORCH_CHECK(blend_in.sizes() == slot_in.sizes() && blend_in.scalar_type() == at::kBool,
              "blend must be a bool tensor shaped like slot ", slot_in.sizes(), ", got ", blend_in.scalar_type(), " ",
              blend_in.sizes());
  check_range(slot_in, "slot", y_in.size(1));
  TORCH_CHECK(mcw >= 0.0 && mcw <= 1.0, "mcw must lie in [0, 1], got ", mcw);
  const auto full = [&](const c10::optional<at::Tensor>& t, const char* name) {
    if (!t.has_value()) return at::Tensor();
    check_full(*t, name, batch, tokens, channels, y_in.scalar_type());
    return t->contiguous();
  };
  UnmergeInputs inputs{y_in.contiguous(), slot_in.contiguous(), blend_in.contiguous(), full(cache_in, "cache"),
                       at::Tensor(), full(residual_in, "residual")};
  if (gate_in.has_value()) {
    TORCH_CHECK(gate_in->dim() == 2 && gate_in->size(0) == batch && gate_in->size(1) == channels,
                "gate must be [B=", batch, ", C=", channels, "], got ", gate_in->sizes());
    TORCH_CHECK(gate_in->scalar_type() == y_in.scalar_type() && gate_in->device().is_cpu(), "gate must be a CPU ",
                y_in.scalar_type(), " tensor");
    inputs.gate = gate_in->contiguous();
  }
  return inputs;
}

void run(const UnmergeInputs& in, double mcw, const at::Tensor& out, const at::Tensor& new_cache) {
  if (out.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.y.scalar_type(), "unmerge", [&] {
    unmerge_kernel<scalar_t>(in.y, in.slot, in.blend, in.cache, in.gate, in.residual, mcw, out, new_cache);
  });
}

std::tuple<at::Tensor, at::Tensor> unmerge_cpu(const at::Tensor& y, const at::Tensor& slot, const at::Tensor& blend,
                                               const c10::optional<at::Tensor>& cache,
                                               const c10::optional<at::Tensor>& gate,
                                               const c10::optional<at::Tensor>& residual, double mcw,
                                               bool store_cache) {
  const UnmergeInputs in = check_inputs(y, slot, blend, cache, gate, residual, mcw);
  const std::vector<int64_t> full{slot.size(0), slot.size(1), y.size(2)};
  at::Tensor out = at::empty(full, y.options());
  at::Tensor new_cache = at::empty(store_cache ? full : std::vector<int64_t>{0}, y.options());
  run(in, mcw, out, store_cache ? new_cache : at::Tensor());
  return {out, new_cache};
}

// `what` may share memory with `other` only by being the very same elements (allowed_full) or not at all.
void check_no_partial_overlap(const at::Tensor& what, const char* what_name, const at::Tensor& other,
                              const char* other_name, bool allowed_full) {
  if (!other.defined()) return;
  const at::MemOverlapStatus status = at::get_overlap_status(what, other);
  const bool ok = status == at::MemOverlapStatus::No || (allowed_full && status == at::MemOverlapStatus::Full);
  TORCH_CHECK(ok, what_name, " shares memory with ", other_name,
              allowed_full ? "; it may only be that very tensor or not overlap it" : "; pass a separate tensor");
}

void unmerge_into_cpu(const at::Tensor& y, const at::Tensor& slot, const at::Tensor& blend,
                      const c10::optional<at::Tensor>& cache, const c10::optional<at::Tensor>& gate,
                      const c10::optional<at::Tensor>& residual, double mcw, const at::Tensor& out,
                      const c10::optional<at::Tensor>& cache_out) {
  const UnmergeInputs in = check_inputs(y, slot, blend, cache, gate, residual, mcw);
  const int64_t batch = slot.size(0), tokens = slot.size(1), channels = y.size(2);
  const auto writable = [&](const at::Tensor& t, const char* name) {
    check_full(t, name, batch, tokens, channels, y.scalar_type());
    TORCH_CHECK(t.is_contiguous(), name, " must be contiguous: it is written in place");
  };
  writable(out, "out");
  check_no_partial_overlap(out, "out", in.y, "y", false);
  check_no_partial_overlap(out, "out", in.gate, "gate", false);
  check_no_partial_overlap(out, "out", in.cache, "cache", false);
  check_no_partial_overlap(out, "out", in.residual, "residual", true);
  at::Tensor stored;
  if (cache_out.has_value()) {
    stored = *cache_out;
    writable(stored, "cache_out");
    check_no_partial_overlap(stored, "cache_out", out, "out", false);
    check_no_partial_overlap(stored, "cache_out", in.y, "y", false);
    check_no_partial_overlap(stored, "cache_out", in.gate, "gate", false);
    check_no_partial_overlap(stored, "cache_out", in.residual, "residual", false);
    check_no_partial_overlap(stored, "cache_out", in.cache, "cache", true);
  }
  run(in, mcw, out, stored);
}

}  // namespace

TORCH_LIBRARY_IMPL(sdtm, CPU, m) {
  m.impl("unmerge", &unmerge_cpu);
  m.impl("unmerge_into", &unmerge_into_cpu);
}

}  // namespace sdtm
