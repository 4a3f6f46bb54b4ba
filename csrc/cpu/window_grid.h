// The token grid and its windows, shared by the kernels that find tokens by window (window_scores,
// ssm_plan, idm_candidates); the same layout as sdtm.core.reference.window_tokens.
//
// `frames` frames of grid_h x grid_w tokens, frame-major: token n = (frame * grid_h + row) * grid_w + col.
// A window is st frames x sy rows x sx columns; windows are numbered by frame block, then row-major inside
// a frame; a window's positions by frame, then row-major. Rows, columns and frames past the last whole
// window of a frame (or of the clip) belong to no window. Images have frames = st = 1.
#pragma once
#include <ATen/ATen.h>

namespace sdtm {

struct WindowGrid {
  int64_t frames, grid_h, grid_w, st, sy, sx;

  int64_t window_size() const { return st * sy * sx; }
  int64_t frame_tokens() const { return grid_h * grid_w; }
  int64_t tokens() const { return frames * frame_tokens(); }
  int64_t windows_x() const { return grid_w / sx; }
  int64_t windows_per_block() const { return (grid_h / sy) * windows_x(); }
  int64_t windows() const { return (frames / st) * windows_per_block(); }

  // Token at position p (0 <= p < K) of window w (0 <= w < W).
  int64_t token(int64_t w, int64_t p) const {
    const int64_t block = w / windows_per_block(), in_frame = w % windows_per_block();
    const int64_t wy = in_frame / windows_x(), wx = in_frame % windows_x();
    const int64_t dt = p / (sy * sx), dy = (p % (sy * sx)) / sx, dx = p % sx;
    return ((block * st + dt) * grid_h + wy * sy + dy) * grid_w + wx * sx + dx;
  }

  // Window of token n (-1 when no complete window holds it); its position there goes to *position.
  int64_t window_of(int64_t n, int64_t* position) const {
    const int64_t frame = n / frame_tokens(), row = (n % frame_tokens()) / grid_w, col = n % grid_w;
    if (frame >= frames / st * st || row >= grid_h / sy * sy || col >= windows_x() * sx) return -1;
    *position = (frame % st) * sy * sx + (row % sy) * sx + col % sx;
    return (frame / st) * windows_per_block() + (row / sy) * windows_x() + col / sx;
  }
};

inline WindowGrid checked_grid(int64_t grid_h, int64_t grid_w, int64_t sy, int64_t sx, int64_t frames, int64_t st) {
  TORCH_CHECK(sy >= 1 && sx >= 1 && st >= 1, "window sizes must be positive, got st=", st, " sy=", sy, " sx=", sx);
  TORCH_CHECK(grid_h >= 0 && grid_w >= 0 && frames >= 1, "grid sizes must be non-negative (frames >= 1), got ",
              frames, "x", grid_h, "x", grid_w);
  return WindowGrid{frames, grid_h, grid_w, st, sy, sx};
}

}  // namespace sdtm
