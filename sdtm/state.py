"""Per-generation state of a patched transformer: the current step, merge age T, output caches, RNG.

The step is derived from the timestep the transformer is called with: its position in the scheduler's
``timesteps``. A new generation starts when the scheduler's timesteps were set anew (every pipeline call
does that) or when the step goes backwards; then merge age, caches and the random generator are reset.
Calling the transformer twice at one step (classifier-free guidance in two calls, skip-layer guidance)
keeps the step; each call of a step (its position among the calls of that step) keeps its own merge
age and caches, so a skip-layer-guidance call never blends with the guided call's outputs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from .config import SDTMConfig
from .plans import Grid

TIMESTEP_RTOL = 1e-3  # a timestep cast to fp16 (spacing 0.5 near 1000) still finds its step


@dataclass
class StepRecord:
    """Token counts of one block call, for reports: tokens seen by attention and by the MLP."""

    step: int
    layer: int
    mode: str
    phase: str
    attn_tokens: int
    mlp_tokens: int


@dataclass
class CallStream:
    """What one sequence of calls (the k-th call of every step) carries from step to step."""

    merge_age: torch.Tensor | None = None  # T, [B, N] int32
    caches: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)


@dataclass
class SDTMState:
    """Everything SDTM keeps between block calls of one transformer.

    ``timesteps_source`` returns the scheduler's current ``timesteps`` tensor (or None when no schedule is
    known); the patch sets it from the pipeline's scheduler or the ``scheduler`` given to apply.
    """

    config: SDTMConfig
    num_layers: int
    timesteps_source: Callable[[], torch.Tensor | None] | None = None
    # Current step, set by the transformer's pre-forward hook.
    step: int = -1
    num_steps: int = 0
    grid: Grid | None = None
    generation: int = 0
    call_in_step: int = 0
    # Per generation.
    streams: dict[int, CallStream] = field(default_factory=dict)
    generator: torch.Generator | None = None
    records: list[StepRecord] = field(default_factory=list)
    record_tokens: bool = False
    _timesteps: torch.Tensor | None = None
    _timestep_values: list[float] = field(default_factory=list)

    def reset(self) -> None:
        """Forget everything of the current generation (merge age, caches, generator, step)."""
        self.step = -1
        self.call_in_step = 0
        self.streams.clear()
        self.generator = None
        self.records.clear()

    def begin_call(self, timestep: torch.Tensor | float, latent_height: int, latent_width: int, patch: int):
        """Locate the step of a transformer call and start a new generation when needed."""
        if self.timesteps_source is None:
            raise RuntimeError(
                "SDTM needs the denoising schedule to know the current step: apply it to the pipeline "
                "(apply_SDTM(pipe)) or pass the scheduler that drives the transformer "
                "(apply_SDTM(transformer, scheduler=scheduler))."
            )
        timesteps = self.timesteps_source()
        if timesteps is None or len(timesteps) == 0:
            raise RuntimeError("the scheduler has no timesteps; call scheduler.set_timesteps(...) first.")
        new_schedule = timesteps is not self._timesteps
        if new_schedule:
            self._timesteps = timesteps
            self._timestep_values = [float(t) for t in timesteps.detach().cpu().flatten()]
        step = self._locate(timestep)
        if new_schedule or step < self.step:
            self.reset()
            self.generation += 1
        self.call_in_step = self.call_in_step + 1 if step == self.step else 0
        self.step = step
        self.num_steps = len(self._timestep_values)
        grid = Grid(latent_height // patch, latent_width // patch, self.config.sy, self.config.sx)
        if grid.num_windows == 0 and grid != self.grid:
            warnings.warn(
                f"SDTM: no {grid.sy}x{grid.sx} window (sy x sx) fits the {grid.height}x{grid.width} token grid, "
                "so no token can be merged and the model runs unmerged; use a smaller sx / sy.",
                stacklevel=4,
            )
        self.grid = grid

    def _locate(self, timestep: torch.Tensor | float) -> int:
        step = self._locate_view(timestep)
        if step is not None:
            return step
        if isinstance(timestep, torch.Tensor):
            values = timestep.detach().float().flatten().cpu()
            if values.numel() == 0:
                raise ValueError("the transformer was called with an empty timestep tensor.")
            if bool((values != values[0]).any()):
                raise ValueError(
                    "SDTM needs one timestep per call; got different timesteps in one batch: "
                    f"{values.tolist()}."
                )
            t = float(values[0])
        else:
            t = float(timestep)
        distances = [abs(v - t) for v in self._timestep_values]
        step = min(range(len(distances)), key=distances.__getitem__)
        if distances[step] > TIMESTEP_RTOL * max(1.0, abs(t)):
            raise ValueError(
                f"timestep {t} is not one of the scheduler's timesteps; SDTM derives the step from it. "
                "Pass the scheduler that produced the timesteps."
            )
        return step

    def _locate_view(self, timestep) -> int | None:
        """The step without reading the value: pipelines pass ``t.expand(B)`` for ``t`` in the scheduler's
        timesteps, a view into that tensor's memory, so its address gives the position (and no GPU
        synchronisation is needed). None when ``timestep`` is not such a view."""
        timesteps = self._timesteps
        if not isinstance(timestep, torch.Tensor) or timestep.dtype != timesteps.dtype:
            return None
        if timestep.device != timesteps.device or timesteps.dim() != 1 or timestep.numel() == 0:
            return None
        if any(stride != 0 for stride in timestep.stride()) and timestep.numel() > 1:
            return None
        offset = timestep.data_ptr() - timesteps.data_ptr()
        size, stride = timesteps.element_size(), timesteps.stride(0) or 1
        if timestep.untyped_storage().data_ptr() != timesteps.untyped_storage().data_ptr():
            return None
        if offset < 0 or offset % (size * stride):
            return None
        step = offset // (size * stride)
        return step if step < len(self._timestep_values) else None

    @property
    def stream(self) -> CallStream:
        """Merge age and caches of the current call's stream."""
        return self.streams.setdefault(self.call_in_step, CallStream())

    def random_generator(self, device: torch.device) -> torch.Generator:
        """A generator forked (not advanced) from torch's RNG at the first use of a generation, so the
        same seed gives the same choices in every generation. CUDA draws on the device; any other device
        draws on the CPU."""
        wanted = device if device.type == "cuda" else torch.device("cpu")
        if self.generator is None or self.generator.device != wanted:
            generator = torch.Generator(device=wanted)
            if wanted.type == "cuda":
                generator.set_state(torch.cuda.get_rng_state(wanted))
            else:
                generator.set_state(torch.get_rng_state())
            self.generator = generator
        return self.generator

    def cache(self, sublayer: str, layer: int, like: torch.Tensor) -> torch.Tensor | None:
        """The cached full output of ``sublayer`` at ``layer``, or None; raises if its shape differs."""
        cached = self.stream.caches.get((sublayer, layer))
        if cached is not None and cached.shape != like.shape:
            raise ValueError(
                f"the cached {sublayer} output of layer {layer} has shape {tuple(cached.shape)} but this "
                f"call produces {tuple(like.shape)}; batch size and image size must stay fixed within a "
                "generation (set the scheduler's timesteps again to start a new one)."
            )
        return cached

    def store_cache(self, sublayer: str, layer: int, value: torch.Tensor) -> None:
        self.stream.caches[(sublayer, layer)] = value.detach()

    def cache_bytes(self) -> int:
        """Bytes held by the output caches of all streams."""
        return sum(t.numel() * t.element_size() for s in self.streams.values() for t in s.caches.values())
