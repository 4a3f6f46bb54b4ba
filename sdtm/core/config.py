"""Typed settings of SDTM, validated once when they are made."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

BACKENDS = ("auto", "torch", "cpp", "triton")
DEFAULT_SWITCH_STEP = 20  # the reference implementation's, for SD3


@dataclass(frozen=True)
class SDTMConfig:
    """Every knob of SDTM, with the defaults of the reference sample script.

    Attributes:
        ratio: mean share of image tokens removed per merging block, in [0, 1]. 0.3.
        deviation: half-range of the cosine ratio schedule: step 0 removes ``ratio + deviation``,
            the last step ``ratio - deviation``. Must satisfy 0 <= ratio - deviation and
            ratio + deviation <= 1. 0.2.
        switch_step: steps ``s <= switch_step`` are the structure phase (SSM: merge before attention and
            MLP); later steps are the detail phase (IDM: merge before the MLP only). 20. None: the model
            family's default, decided when the step count is known (``ModelAdapter.resolve_config``):
            the reference's 20, or the family's share of the steps (``ModelAdapter.structure_share``).
        use_rand: pick the destination token of SSM windows (and of IDM windows before any merge age
            exists) at random, per sample; forced off for odd batch sizes. True.
        seed: seed of SDTM's own generator of those random destinations, reseeded at the start of every
            generation, so the same inputs give the same image whatever torch's global RNG did (the
            reference forks the global RNG instead). 0.
        sx, sy: window width and height in tokens (K = st * sx * sy >= 2 tokens per window). 2, 2.
        st: window depth in frames, for video (frames x height x width token grids); 1 keeps every
            window inside one frame, the only value images have. 1.
        a_s: weight of the merge-age priority in the SSM window score. 0.05.
        a_d: weight of the merge-age priority in the IDM source score. 0.05.
        a_p: accepted for compatibility with the reference implementation, unused (as there). 2.
        pseudo_merge: a merged group takes its destination token's value instead of the group mean. False.
        mcw: weight of the fresh output when blending merged tokens with the cached output of the same
            sub-layer: ``mcw * y + (1 - mcw) * cache``, in [0, 1]. 0.1.
        protect_steps_frequency: steps with ``s % f == 0`` run unmerged and refresh the caches;
            ``None`` or ``<= 0`` switches step protection off. 3.
        protect_layers_frequency: layers with ``l % f == 0`` and the last layer never merge;
            ``None`` or ``<= 0`` switches layer protection off. -1.
        merge_attn: allow merging before attention (structure phase only). True.
        merge_mlp: allow merging before the feed-forward. True.
        cache_each_step: refresh the output caches at every merging step, not only at protected steps.
            The caches hold 2 (3 with dual attention) x layers x B x N x C values. True.
        backend: "torch" (pure-torch reference ops), "cpp" (compiled CPU ops), "triton" (GPU ops), or
            "auto" (the fastest one built for the tensors' device). "auto".
        cuda_graphs: replay the transformer's calls as CUDA graphs, one per distinct step (sdtm/core/graphs.py);
            needs the model on a CUDA device. Changes no output. False.
    """

    ratio: float = 0.3
    deviation: float = 0.2
    switch_step: int | None = 20
    use_rand: bool = True
    seed: int = 0
    sx: int = 2
    sy: int = 2
    st: int = 1
    a_s: float = 0.05
    a_d: float = 0.05
    a_p: float = 2
    pseudo_merge: bool = False
    mcw: float = 0.1
    protect_steps_frequency: int | None = 3
    protect_layers_frequency: int | None = -1
    merge_attn: bool = True
    merge_mlp: bool = True
    cache_each_step: bool = True
    backend: str = "auto"
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        _check_real("ratio", self.ratio, 0.0, 1.0)
        _check_real("deviation", self.deviation, 0.0, math.inf)
        if self.ratio - self.deviation < 0 or self.ratio + self.deviation > 1:
            raise ValueError(
                f"ratio - deviation and ratio + deviation must lie in [0, 1] (the schedule's range), "
                f"got ratio={self.ratio} and deviation={self.deviation}; lower deviation."
            )
        _check_real("mcw", self.mcw, 0.0, 1.0)
        _check_real("a_s", self.a_s, -math.inf, math.inf)
        _check_real("a_d", self.a_d, -math.inf, math.inf)
        _check_real("a_p", self.a_p, -math.inf, math.inf)
        if self.switch_step is not None:
            _check_int("switch_step", self.switch_step, minimum=None)
        _check_int("seed", self.seed, minimum=0)
        _check_int("sx", self.sx, minimum=1)
        _check_int("sy", self.sy, minimum=1)
        _check_int("st", self.st, minimum=1)
        if self.st * self.sx * self.sy < 2:
            raise ValueError(
                f"a window must hold at least 2 tokens, got st={self.st}, sx={self.sx} and sy={self.sy}; "
                "use e.g. sx=2, sy=2."
            )
        for name in ("protect_steps_frequency", "protect_layers_frequency"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, minimum=None)
        for name in ("use_rand", "pseudo_merge", "merge_attn", "merge_mlp", "cache_each_step", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}.")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}.")

    @property
    def window_size(self) -> int:
        """K, the number of tokens in a complete window."""
        return self.st * self.sx * self.sy

    def resolved(self, num_steps: int, structure_share: float | None = None) -> "SDTMConfig":
        """A ``switch_step`` of None replaced for ``num_steps`` steps: the last step of the first
        ``structure_share`` of the steps, or ``DEFAULT_SWITCH_STEP`` when no share is given."""
        if self.switch_step is not None:
            return self
        if structure_share is None:
            return self.replace(switch_step=DEFAULT_SWITCH_STEP)
        return self.replace(switch_step=max(0, round(structure_share * num_steps) - 1))

    def replace(self, **changes) -> "SDTMConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _check_real(name: str, value, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}.")
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}.")


def _check_int(name: str, value, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
