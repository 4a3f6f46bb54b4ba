"""Load the CMake-built ops library in a fresh process and run each op once on hand-checked inputs.

    python tests/cmake_smoke.py BUILD_DIR

Does not import the sdtm package (that would register the ops a second time).
"""

import glob
import os
import sys

import torch


def main(build_dir: str) -> None:
    found = sorted(glob.glob(os.path.join(build_dir, "libsdtm_C*.so")))
    if not found:
        sys.exit(f"no libsdtm_C*.so in {build_dir!r}; build it with `make cmake-build`")
    torch.ops.load_library(found[0])
    ops = torch.ops.sdtm

    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]])
    slot = torch.tensor([[0, 0, 1, 2]])
    members = torch.tensor([[0, 1, 2, 3]])
    offsets = torch.tensor([[0, 2, 3, 4]])
    merged = ops.merge(x, slot, members, offsets, False)
    assert merged.tolist() == [[[2.0, 3.0], [5.0, 6.0], [7.0, 8.0]]], merged

    out, cache = ops.unmerge(merged, slot, torch.zeros(1, 4, dtype=torch.bool), None, None, None, 0.1, False)
    assert out.tolist() == [[[2.0, 3.0], [2.0, 3.0], [5.0, 6.0], [7.0, 8.0]]] and cache.numel() == 0, out

    residual = torch.ones(1, 4, 2)
    ops.unmerge_into(merged, slot, torch.zeros(1, 4, dtype=torch.bool), None, None, residual, 0.1, residual, None)
    assert residual.tolist() == [[[3.0, 4.0], [3.0, 4.0], [6.0, 7.0], [8.0, 9.0]]], residual

    pairs = torch.tensor([[[1.0, 3.0], [5.0, 9.0]]])
    normed = ops.norm_modulate(pairs, torch.zeros(1, 2), torch.zeros(1, 2), 1e-6)
    assert torch.allclose(normed, torch.tensor([[[-1.0, 1.0], [-1.0, 1.0]]]), atol=1e-5), normed

    same = torch.ones(1, 4, 3)
    scores = ops.window_scores(same, None, 2, 2, 2, 2, 0.0)
    assert torch.allclose(scores, torch.ones(1, 1)), scores

    tokens = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [3.0, 0.0]]])
    score, best = ops.bipartite_match(tokens, torch.tensor([[0, 1]]), torch.tensor([[2, 3]]), None, 0.0)
    assert best.tolist() == [[1, 0]] and torch.allclose(score, torch.ones(1, 2)), (score, best)
    print(f"cmake build OK: {found[0]}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/cmake_smoke.py BUILD_DIR")
    main(sys.argv[1])
