"""Per-generation state of a patched transformer: the current step, merge age T, output caches, RNG.

The step is derived from the timestep the transformer is called with: its position in the scheduler's
``timesteps``. A new generation starts when the scheduler's timesteps were set anew (every pipeline call
does that) or when the step goes backwards; then merge age, caches and the random generator are reset.
Calling the transformer twice at one step (classifier-free guidance in two calls, skip-layer guidance)
keeps the step; each call of a step (its position among the calls of that step) keeps its own merge
age and caches, so a skip-layer-guidance call never blends with the guided call's outputs.

Everything that depends on the step is decided here, on the host, once per transformer call
(``begin_call`` then ``prepare_blocks``): each block gets its action, the count of tokens to remove (as
the length of a tensor, a dynamic size for ``torch.compile``), its random destinations and the cache
buffers it reads and writes. The blocks' tensor work then reads no step or layer number. Merge age and
caches live in tensors allocated once per stream and updated in place.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .config import SDTMConfig
from . import hooks
from .ops import TORCH_OPS, OpSet, ops_for
from .plans import Grid
from .schedule import BlockAction, BlockMode, Phase, action_for_sublayers, merged_tokens, step_program

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
    """What one sequence of calls (the k-th call of every step) carries from step to step.

    ``merge_age`` (T, [B, N] int32) and the caches ([B, N, C] per (sub-layer, layer)) are allocated once
    and updated in place; ``valid`` names the caches that hold an output of the current generation and
    ``age_exists`` says whether T exists yet (a merge happened since the generation start or the last
    protected layer). Both are host-side facts derived from the schedule.
    """

    merge_age: torch.Tensor | None = None
    caches: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    valid: set[tuple[str, int]] = field(default_factory=set)
    age_exists: bool = False

    def restart(self) -> None:
        """Start a generation: no valid cache, no merge age (T is zeroed, buffers are kept)."""
        self.valid.clear()
        self.age_exists = False
        if self.merge_age is not None:
            self.merge_age.zero_()


@dataclass(eq=False)
class BlockLink:
    """What a patched block reads during a transformer call; set by ``SDTMState.prepare_blocks``.

    ``remove`` is a tensor whose length is the number of tokens the schedule asks the block to remove
    (its content is never read); ``dst_draw`` [B, W] int64 holds random destination positions or is
    None (first token of each window); ``cache_in`` maps a sub-layer to its valid cache, ``cache_out`` to
    the buffer its full output is stored into.
    """

    state: "SDTMState"
    layer: int
    block: torch.nn.Module | None = None
    sublayers: dict[str, str] = field(default_factory=lambda: {"attn": "attn", "mlp": "mlp"})
    action: BlockAction | None = None
    remove: torch.Tensor | None = None
    dst_draw: torch.Tensor | None = None
    age_exists: bool = False
    stream: CallStream | None = None
    cache_in: dict[str, torch.Tensor] = field(default_factory=dict)
    cache_out: dict[str, torch.Tensor] = field(default_factory=dict)
    # Whether the block ran in the current call (set by its hook; a step cache may skip it), the caches
    # this call made valid, and the index of the call's record of the block.
    ran: bool = True
    new_caches: tuple[tuple[str, int], ...] = ()
    record: int = -1

    def runs_unchanged(self) -> bool:
        """Whether the block runs as without SDTM in this call (after checking that its transformer
        prepared it). For an UNCHANGED block of a protected layer the merge age is reset here (the next
        merge starts T afresh)."""
        action = self.action
        if action is None:
            raise RuntimeError(
                "an SDTM-patched block was called outside its transformer's forward; call the transformer."
            )
        if action.mode is not BlockMode.UNCHANGED:
            return False
        if action.reset_merge_age:
            self.stream.merge_age.zero_()
        return True


@dataclass
class SDTMState:
    """Everything SDTM keeps between calls of one transformer.

    ``timesteps_source`` returns the scheduler's current ``timesteps`` tensor (or None when no schedule is
    known); the patch sets it from the pipeline's scheduler or the ``scheduler`` given to apply.
    """

    config: SDTMConfig
    num_layers: int
    timesteps_source: Callable[[], torch.Tensor | None] | None = None
    adapter: Any = None  # the model family's ModelAdapter (sdtm/models)
    links: list[BlockLink] = field(default_factory=list)
    # Current step, set by begin_call.
    step: int = -1
    num_steps: int = 0
    grid: Grid | None = None
    generation: int = 0
    call_in_step: int = 0
    ops: OpSet | None = None  # the ops of the current call
    backend_ops: OpSet | None = None  # the configured backend's ops for ``ops_device``
    ops_device: torch.device | None = None
    # Per generation.
    streams: dict[int, CallStream] = field(default_factory=dict)
    generator: torch.Generator | None = None
    _records: list[StepRecord] = field(default_factory=list)
    _timesteps: torch.Tensor | None = None
    _timestep_values: list[float] = field(default_factory=list)
    _remove_buffer: torch.Tensor | None = None
    _draw_buffer: torch.Tensor | None = None  # [L, B, W] random destinations of a call, filled in place
    adapter_memo: dict = field(default_factory=dict)
    _skipped_blocks: int = 0  # block calls a step cache skipped, over the state's life
    _age_before: bool = False  # whether merge age existed before the last prepared call  # what the model's adapter remembers between calls
    _resolved: tuple[int, SDTMConfig] | None = None  # (step count, config with the default switch step)

    def reset(self) -> None:
        """Forget the current generation: step, generator, records; caches become invalid and merge
        age is zeroed (their buffers are kept for the next generation)."""
        self.step = -1
        self.call_in_step = 0
        for stream in self.streams.values():
            stream.restart()
        self.generator = None
        self._records.clear()

    @property
    def records(self) -> list[StepRecord]:
        """Token counts of every block call of the current generation, in call order; a block a step cache
        skipped is recorded with mode "skipped" and no tokens."""
        self.settle()
        return self._records

    @property
    def skipped_blocks(self) -> int:
        """Block calls a step cache skipped since SDTM was applied."""
        self.settle()
        return self._skipped_blocks

    def replayed(self) -> None:
        """The prepared call ran as a replayed CUDA graph: every block ran as when it was captured."""
        for link in self.links:
            link.ran = True

    def settle(self) -> int:
        """Account for the blocks of the last prepared call that did not run (a step cache skipped them):
        their records say "skipped", the caches they were to fill first are not valid, and whether merge
        age exists follows the blocks that ran. SDTM's state is then as if those blocks had not been called
        at that step. Returns the number of blocks skipped."""
        skipped = [link for link in self.links if not link.ran]
        if not skipped:
            return 0
        for link in skipped:
            link.ran = True  # settled once
            record = self._records[link.record]
            self._records[link.record] = StepRecord(record.step, record.layer, "skipped", record.phase, 0, 0)
            link.stream.valid.difference_update(link.new_caches)
        skipped_ids, age_exists = {id(link) for link in skipped}, self._age_before
        for link in self.links:  # as prepare_blocks, over the blocks that ran
            if id(link) not in skipped_ids:
                age_exists = (age_exists and not link.action.reset_merge_age) or link.action.mode is BlockMode.MERGED
        self.links[0].stream.age_exists = age_exists
        self._skipped_blocks += len(skipped)
        return len(skipped)

    def begin_call(self, timestep: torch.Tensor | float, grid_height: int, grid_width: int,
                   timestep_scale: float = 1.0, frames: int = 1):
        """Locate the step of a transformer call (on ``frames`` frames of ``grid_height`` x ``grid_width``
        tokens; its ``timestep * timestep_scale`` is in the scheduler's units) and start a new generation
        when needed."""
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
            self._timestep_values = timesteps.detach().cpu().flatten().double().tolist()
        step = self._locate(timestep, timestep_scale)
        if new_schedule or step < self.step:
            self.reset()
            self.generation += 1
        self.call_in_step = self.call_in_step + 1 if step == self.step else 0
        self.step = step
        self.num_steps = len(self._timestep_values)
        config = self.config
        grid = Grid(grid_height, grid_width, config.sy, config.sx, frames, config.st)
        if grid.num_windows == 0 and grid != self.grid:
            warnings.warn(
                f"SDTM: no {grid.describe_window()} window fits the {grid.describe()} token grid, so no token "
                "can be merged and the model runs unmerged; use a smaller window (sy, sx, st).",
                stacklevel=4,
            )
        self.grid = grid

    def prepare_blocks(self, batch: int, channels: int, dtype: torch.dtype, device: torch.device,
                       autograd: bool = False) -> None:
        """Decide what every block does in this call and hand each its inputs (see ``BlockLink``); append
        the call's token counts to ``records``. Runs after ``begin_call``. ``autograd``: the call runs
        with autograd on."""
        grid, config = self.grid, self.config
        # A block whose attention carries another hook that may return a stored output (a cache of
        # attention outputs: PyramidAttentionBroadcast, TaylorSeer, ...) never merges its attention: the
        # stored output must keep the full token count.
        hooked = tuple(any(hooks.replaces_output(m) for m in self.adapter.attention_modules(link.block))
                       for link in self.links) if self.adapter is not None else (False,) * len(self.links)
        program = _block_program(self._resolved_config(), self.step, self.num_steps, grid,
                                 tuple(frozenset(link.sublayers.values()) for link in self.links), hooked)
        if self.backend_ops is None or self.ops_device != device:
            self.backend_ops, self.ops_device = ops_for(config.backend, device), device
        # The fused ops have no autograd formulas: with autograd on, the torch twins (differentiable) run.
        self.ops = TORCH_OPS if autograd else self.backend_ops
        stream = self._stream(batch, channels, dtype, device)
        draws = self._draws(program, stream, batch, grid, device)
        age_exists = self._age_before = stream.age_exists
        for link, action in zip(self.links, program):
            link.action, link.stream, link.ran = action, stream, False
            if action.reset_merge_age:
                age_exists = False
            link.age_exists = age_exists
            link.dst_draw = draws.pop(0) if draws and _needs_draw(action, age_exists) else None
            link.remove = self._remove_view(action.reduce_num, device) if action.mode is BlockMode.MERGED else None
            link.cache_in, link.cache_out = self._caches(link, action, stream, batch, channels, dtype, device)
            if action.mode is BlockMode.MERGED:
                age_exists = True
            merged = merged_tokens(action, grid.num_tokens, grid.window_size, grid.num_windows)
            link.record = len(self._records)
            self._records.append(StepRecord(
                self.step, link.layer, action.mode.value, action.phase.value,
                merged if action.merge_attn else grid.num_tokens, merged if action.merge_mlp else grid.num_tokens,
            ))
        stream.age_exists = age_exists

    def _resolved_config(self) -> SDTMConfig:
        """``config`` with the model's default switch step filled in for this generation's step count."""
        if self.config.switch_step is not None:
            return self.config
        if self._resolved is None or self._resolved[0] != self.num_steps:
            share = self.adapter.structure_share if self.adapter is not None else None
            self._resolved = (self.num_steps, self.config.resolved(self.num_steps, share))
        return self._resolved[1]

    def _stream(self, batch: int, channels: int, dtype: torch.dtype, device: torch.device) -> CallStream:
        """The current call's stream, its merge age allocated for this batch and grid."""
        stream = self.streams.setdefault(self.call_in_step, CallStream())
        shape = (batch, self.grid.num_tokens)
        age = stream.merge_age
        if age is not None and (tuple(age.shape) != shape or age.device != device):
            if stream.valid or stream.age_exists:
                raise ValueError(
                    f"this call has batch {batch} and {shape[1]} image tokens but the generation started with "
                    f"batch {age.shape[0]} and {age.shape[1]} tokens; batch and image size must stay fixed within "
                    "a generation (set the scheduler's timesteps again to start a new one)."
                )
            stream.merge_age, stream.caches = None, {}
        if stream.merge_age is None:
            stream.merge_age = torch.zeros(shape, dtype=torch.int32, device=device)
        for key, cache in list(stream.caches.items()):
            if cache.dtype != dtype or cache.shape[-1] != channels:
                del stream.caches[key]
                stream.valid.discard(key)
        return stream

    def _caches(self, link: BlockLink, action: BlockAction, stream: CallStream, batch: int, channels: int,
                dtype: torch.dtype, device: torch.device) -> tuple[dict, dict]:
        """The valid caches the block may blend with, and the buffers it stores into (allocated once)."""
        if action.mode is BlockMode.UNCHANGED:
            link.new_caches = ()
            return {}, {}
        kinds = link.sublayers
        cache_in = {}
        if action.mode is BlockMode.MERGED:  # only merged sub-layers blend
            merging = [n for n, kind in kinds.items() if (action.merge_mlp if kind == "mlp" else action.merge_attn)]
            cache_in = {n: stream.caches[(n, link.layer)] for n in merging if (n, link.layer) in stream.valid}
        cache_out, new = {}, []
        for name, kind in kinds.items():
            if not (action.store_mlp_cache if kind == "mlp" else action.store_attn_cache):
                continue
            key = (name, link.layer)
            if key not in stream.caches:
                stream.caches[key] = torch.empty(batch, self.grid.num_tokens, channels, dtype=dtype, device=device)
            cache_out[name] = stream.caches[key]
            if key not in stream.valid:
                new.append(key)
                stream.valid.add(key)  # holds this call's output once the block has run
        link.new_caches = tuple(new)
        return cache_in, cache_out

    def _remove_view(self, reduce_num: int, device: torch.device) -> torch.Tensor:
        """A tensor of length ``reduce_num`` (a view of one buffer), marked as a dynamic size for dynamo."""
        buffer = self._remove_buffer
        if buffer is None or buffer.numel() < reduce_num or buffer.device != device:
            buffer = self._remove_buffer = torch.empty(max(reduce_num, self.grid.num_tokens), dtype=torch.uint8,
                                                       device=device)
        view = buffer[:reduce_num]
        torch._dynamo.maybe_mark_dynamic(view, 0)
        return view

    def _draws(self, program: tuple[BlockAction, ...], stream: CallStream, batch: int, grid: Grid,
               device: torch.device) -> list[torch.Tensor]:
        """Random destination positions of every block of this call that picks at random, drawn at once
        from the generation's generator: [B, W] int64 each, in block order."""
        # With an odd batch, conditional and unconditional samples cannot pair up: randomness off (for
        # models whose batches hold such pairs).
        odd_pairs = batch % 2 and getattr(self.adapter, "cfg_pairs", True)
        if not self.config.use_rand or odd_pairs or grid.num_windows == 0:
            return []
        needed, age_exists = 0, stream.age_exists
        for action in program:
            age_exists = age_exists and not action.reset_merge_age
            needed += _needs_draw(action, age_exists)
            age_exists = age_exists or action.mode is BlockMode.MERGED
        if needed == 0:
            return []
        shape = (self.num_layers, batch, grid.num_windows)
        buffer = self._draw_buffer
        if buffer is None or tuple(buffer.shape) != shape or buffer.device != device:
            buffer = self._draw_buffer = torch.empty(shape, dtype=torch.int64, device=device)
        generator = self.random_generator(device)
        if generator.device == device:
            torch.randint(grid.window_size, (needed, batch, grid.num_windows), generator=generator,
                          out=buffer[:needed])
        else:
            buffer[:needed].copy_(torch.randint(grid.window_size, (needed, batch, grid.num_windows),
                                                generator=generator, device=generator.device))
        return list(buffer[:needed].unbind(0))

    def graph_signature(self) -> tuple:
        """What a captured CUDA graph of the current call depends on beyond the call's own inputs: every
        block's action and the addresses of the tensors it reads and writes (sdtm/core/graphs.py)."""

        def address(tensor: torch.Tensor | None) -> int | None:
            return None if tensor is None else tensor.data_ptr()

        return (self.ops.name if self.ops is not None else None, self.grid, tuple(
            (_work(link.action), link.age_exists and _reads_age_existence(link.action), address(link.dst_draw),
             address(link.stream.merge_age),
             tuple(sorted((name, address(t)) for name, t in link.cache_in.items())),
             tuple(sorted((name, address(t)) for name, t in link.cache_out.items())))
            for link in self.links
        ))

    def _locate(self, timestep: torch.Tensor | float, scale: float = 1.0) -> int:
        """The step of ``timestep`` (times ``scale``): from its address when it is a view into the
        scheduler's timesteps; else from the pipeline's current timestep when the value lives on an
        accelerator (reading it would wait for the device); else from its value, the nearest of the
        scheduler's timesteps within the rounding of the value's dtype (ties of a low-precision value go
        to the pipeline's step, the scheduler's step count, this step, then the next)."""
        step = self._locate_view(timestep) if scale == 1.0 else None
        if step is not None:
            return step
        hint = self._pipeline_step()
        if hint is not None and isinstance(timestep, torch.Tensor) and timestep.device.type not in ("cpu", "meta"):
            return hint
        rtol = TIMESTEP_RTOL
        if isinstance(timestep, torch.Tensor):
            if timestep.dtype.is_floating_point:
                rtol = max(rtol, 2 * torch.finfo(timestep.dtype).eps)
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
        t *= scale
        distances = [abs(v - t) for v in self._timestep_values]
        candidates = [i for i, d in enumerate(distances) if d <= rtol * max(1.0, abs(t))]
        if not candidates:
            raise ValueError(
                f"timestep {t} is not one of the scheduler's timesteps; SDTM derives the step from it. "
                "Pass the scheduler that produced the timesteps."
            )
        counted = getattr(self.timesteps_source, "scheduler_step", None)
        for preferred in (hint, counted() if counted is not None else None, self.step, self.step + 1):
            if preferred in candidates and len(candidates) > 1:
                return preferred
        return min(candidates, key=distances.__getitem__)

    def _pipeline_step(self) -> int | None:
        """The step of the pipeline's current timestep (a view into the scheduler's timesteps), if known."""
        current = getattr(self.timesteps_source, "current_timestep", None)
        timestep = current() if current is not None else None
        return self._locate_view(timestep) if timestep is not None else None

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
        """The generation's generator of random destinations, seeded with ``config.seed`` at the first draw
        of every generation: the same inputs give the same choices whatever torch's global RNG did (and
        SDTM never advances it). CUDA draws on the device; any other device draws on the CPU."""
        wanted = device if device.type == "cuda" else torch.device("cpu")
        if self.generator is None or self.generator.device != wanted:
            self.generator = torch.Generator(device=wanted).manual_seed(self.config.seed)
        return self.generator

    def cache_bytes(self) -> int:
        """Bytes held by the output caches of all streams."""
        return sum(t.numel() * t.element_size() for s in self.streams.values() for t in s.caches.values())


def compute_dtype(block: torch.nn.Module, device: torch.device) -> torch.dtype:
    """The dtype ``block`` computes in on ``device``, which its sub-layer outputs (and so SDTM's caches)
    have: autocast's dtype when autocast is on, the compute dtype of diffusers' layerwise casting when its
    hook sits on one of the block's modules (parameters stored in another dtype), else the dtype of the
    block's first parameter."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    for module in block.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook("layerwise_casting") if registry is not None else None
        if hook is not None:
            return hook.compute_dtype
    return next(block.parameters()).dtype


@functools.lru_cache(maxsize=512)
def _block_program(config: SDTMConfig, step: int, num_steps: int, grid: Grid,
                   kinds: tuple[frozenset[str], ...], hooked: tuple[bool, ...]) -> tuple[BlockAction, ...]:
    """Every block's action at ``step``, for blocks with sub-layers of ``kinds`` (one entry per block),
    ``hooked`` of them with attention that must not merge."""
    program = step_program(config, step, num_steps, len(kinds), grid.num_tokens, grid.num_windows)
    return tuple(action_for_sublayers(action, k, merge_attention=not h) for action, k, h in zip(program, kinds, hooked))


def _needs_draw(action: BlockAction, age_exists: bool) -> bool:
    """Whether a block picks random destinations: SSM always, IDM while no merge age exists."""
    if action.mode is not BlockMode.MERGED:
        return False
    return action.phase is Phase.STRUCTURE or not age_exists


def _reads_age_existence(action: BlockAction) -> bool:
    """Whether a block's work depends on T existing yet (IDM destinations fall back to random without it)."""
    return action.mode is BlockMode.MERGED and action.phase is Phase.DETAIL


def _work(action: BlockAction) -> tuple:
    """The parts of an action the block's tensor work depends on (a protected block's phase is only a label)."""
    phase = action.phase if action.mode is BlockMode.MERGED else None
    return (action.mode, phase, action.reduce_num, action.merge_attn, action.merge_mlp, action.store_attn_cache,
            action.store_mlp_cache, action.reset_merge_age)
