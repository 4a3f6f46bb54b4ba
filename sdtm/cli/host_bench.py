"""Host cost of SDTM: time per denoising step and launches per step and per block, unmerged against SDTM.

On a GPU the host that launches the kernels bounds SDTM's speed once the tensors are small enough. This
benchmark reproduces that regime on any machine: the host family's topology (the first registered family
with a ``ModelAdapter.host_topology``: its released model's blocks, 24 by default) with tensors shrunk until
their compute is small (one head of width 16, a 16 x 16 token grid, 16 text tokens, batch 2, float32), run
over a whole schedule that has protected, structure and detail steps.

Launches: every op that reaches the dispatcher's kernels, counted with a ``TorchDispatchMode`` (aten ops
after the composite ones such as ``linear`` or ``layer_norm`` were decomposed, and SDTM's compiled
``sdtm::*`` ops, one each), except views and metadata ops (ops whose output aliases an input, such as
``view``, ``transpose``, ``expand``, ``slice``, ``unbind``, ``detach``, plus ``_unsafe_view``), which
launch nothing. Allocations (``empty`` and its kin) launch nothing on a GPU either but cost host time: they
count, and are also reported on their own. Triton kernels count once per launch (their launcher is
wrapped; the tensor ops Triton's interpreter runs inside a launch are not counted).

Compiled variants are ``torch.compile(transformer)`` with a backend that compiles quickly here: "eager" by
default (dynamo's graphs, run op by op; the three SDTM graphs of 24 blocks take about 1.5 minutes per
backend on two CPU cores), or "aot_eager" (adds AOT autograd's functionalisation and runtime wrappers,
which inductor shares; about 3 minutes per backend), or "inductor". Their ops are counted the same way:
with "eager" those the graph's torch calls dispatch, with "aot_eager" those of the AOT graph
(functionalised: in-place ops become out-of-place ops plus copies; mutating custom ops run inside
``auto_functionalized``, whose clones count), with inductor only the ops its generated code dispatches
(extern kernels such as ``addmm``; its fused C++ / Triton kernels are not seen). Blocks are inlined into
the graphs, so compiled variants have launches per step but not per block.

Times are host times: the transformer call (SDTM's pre-hook included, the scheduler update left out)
from its start to its return, without synchronising a GPU. Variants run interleaved, one generation
each per round, and the medians over the steps of all rounds are reported; the first generation of
each variant (caches, compilation) is timed apart. As many further rounds of the eager variants time
the parts of each call through module hooks (``RegionTimer``): SDTM's pre-hook, each block call by phase,
and the rest.

``triton_block_launches`` counts the triton backend's launches per block call by phase, on CUDA or on CPU
tensors in Triton's interpreter.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import gc
import os
import statistics
import sys
import time
import types
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

from ..core.config import SDTMConfig
from ..core.ops import cpp_unavailable_reason, ops_for, triton_unavailable_reason
from ..core.patch import apply_sdtm, sdtm_state
from ..models import adapter_for, families
from ..models.base import ModelAdapter

OUTSIDE = -1  # the region of ops run outside any block (embeddings, output layers, SDTM's pre-hook)
UNMERGED = "unmerged"
COMPILE_BACKENDS = ("eager", "aot_eager", "inductor")
HOST_TIME_TARGET = 1.15  # SDTM eager host time per step over unmerged
BLOCK_LAUNCH_TARGET = 1.3  # a merged block's launches over an unmerged block's
MERGED_PHASES = ("structure", "detail")  # the phases whose blocks merge, which the block target is about
# Its output aliases no input in its schema, but it creates a view all the same.
_METADATA_OPS = {torch.ops.aten._unsafe_view}
_ALLOCATION_OPS = {torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.new_empty,
                   torch.ops.aten.empty_strided, torch.ops.aten.new_empty_strided}


def host_family() -> ModelAdapter:
    """The family whose topology the host benchmark shrinks: the first registered with a ``host_topology``."""
    for adapter in families():
        if adapter.host_topology is not None:
            return adapter
    raise ValueError("no registered model family has a host_topology for the host benchmark.")


@dataclass(frozen=True)
class HostSetting:
    """The shrunk host topology of the benchmark (``host_family``) and its schedule. ``grid`` is the token
    grid side (latent side ``2 * grid``, 2 x 2 latent pixels a token); SDTM runs its defaults except
    ``switch_step`` (and ``ratio`` /
    ``deviation`` when given), so ``steps`` = 12 with ``switch_step`` = 5 and protection every 3rd step
    has protected (0, 3, 6, 9), structure (1, 2, 4, 5) and detail (7, 8, 10, 11) steps."""

    layers: int = 24
    heads: int = 1
    head_dim: int = 16
    grid: int = 16
    text_tokens: int = 16
    joint_attention_dim: int = 32
    pooled_projection_dim: int = 32
    batch: int = 2
    steps: int = 12
    switch_step: int = 5
    ratio: float = SDTMConfig.ratio
    deviation: float = SDTMConfig.deviation
    threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("layers", "heads", "head_dim", "grid", "text_tokens", "batch", "steps", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        self.sdtm_config("torch")  # validates ratio, deviation and switch_step

    def sdtm_config(self, backend: str) -> SDTMConfig:
        return SDTMConfig(ratio=self.ratio, deviation=self.deviation, switch_step=self.switch_step, backend=backend)

    def describe(self) -> dict:
        return {**asdict(self), "channels": self.heads * self.head_dim, "image_tokens": self.grid * self.grid,
                "dtype": "float32", "protect_steps_frequency": SDTMConfig.protect_steps_frequency}


# --------------------------------------------------------------------------------------------- counting


def op_category(func) -> str:
    """"view" (views and metadata: no launch), "allocation" (empty and kin) or "kernel"."""
    packet = func.overloadpacket
    if func.is_view or packet in _METADATA_OPS:
        return "view"
    if packet in _ALLOCATION_OPS:
        return "allocation"
    return "kernel"


class LaunchCounter(TorchDispatchMode):
    """Counts the ops reaching the dispatcher per (step, region) and category; the region is the block
    running (its layer, set by ``block_regions``) or ``OUTSIDE``. ``triton`` counts Triton launches per
    (step, region) when ``count_triton_launches`` is active. Ops dispatched while ``paused`` are not
    counted."""

    def __init__(self):
        super().__init__()
        self.supports_higher_order_operators = True  # compiled graphs wrap mutating custom ops in them
        self.step = -1  # ops before the first step (the scheduler's set-up) belong to no step
        self.region = OUTSIDE
        self.paused = 0
        self.ops: dict[tuple[int, int], collections.Counter] = collections.defaultdict(collections.Counter)
        self.triton: collections.Counter = collections.Counter()
        # Launches (not views) by op name, per (step, region).
        self.names: dict[tuple[int, int], collections.Counter] = collections.defaultdict(collections.Counter)

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        """Off while torch.compile compiles, on while its compiled code runs: a compiled model is counted
        running its compiled graphs rather than falling back to eager."""
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            # A compiled graph's wrapper of a mutating op (auto_functionalized) or of a Triton kernel: run
            # its dense implementation with this mode on, so the ops and launches inside it count.
            dense = func.py_kernels.get(torch._C.DispatchKey.CompositeExplicitAutograd)
            if dense is not None:
                with self:
                    return dense(*args, **kwargs)
            return func(*args, **kwargs)
        if not self.paused:
            category = op_category(func)
            self.ops[self.step, self.region][category] += 1
            if category != "view":
                self.names[self.step, self.region][str(func.overloadpacket)] += 1
        return func(*args, **kwargs)

    def launches(self, step: int, region: int) -> int:
        """Launches (kernels, allocations, Triton launches) of one region at one step."""
        counts = self.ops.get((step, region), {})
        return counts.get("kernel", 0) + counts.get("allocation", 0) + self.triton[step, region]

    def step_launches(self, step: int) -> int:
        regions = {r for s, r in self.ops if s == step} | {r for s, r in self.triton if s == step}
        return sum(self.launches(step, r) for r in regions)


@contextlib.contextmanager
def block_regions(transformer: torch.nn.Module, counter: LaunchCounter) -> Iterator[None]:
    """Attribute the ops of each block to its layer while active (module hooks; eager only)."""
    blocks = adapter_for(transformer).blocks(transformer)
    handles = []
    for layer, block in enumerate(blocks):
        def enter(module, args, layer=layer):
            counter.region = layer

        def leave(module, args, output):
            counter.region = OUTSIDE

        handles += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _launch_entry_points() -> list[type]:
    """The classes whose ``run`` launches one Triton kernel: the compiled kernels' JITFunction and the
    interpreter's InterpretedFunction (an autotuner's run calls one of them once per launch)."""
    if "triton" not in sys.modules:
        return []
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return [JITFunction, InterpretedFunction]


@contextlib.contextmanager
def count_triton_launches(counter: LaunchCounter) -> Iterator[None]:
    """Count every Triton kernel launch into ``counter.triton[step, region]`` while active; the tensor
    ops a launch runs itself (the interpreter's copies) are not counted as aten ops. Triton must be
    imported already (a module that was never imported launches nothing)."""
    originals = []
    for cls in _launch_entry_points():
        original = cls.__dict__["run"]

        def run(self, *args, grid, warmup, _original=original, **kwargs):
            if warmup:
                return _original(self, *args, grid=grid, warmup=warmup, **kwargs)
            counter.triton[counter.step, counter.region] += 1
            counter.paused += 1
            try:
                return _original(self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                counter.paused -= 1

        originals.append((cls, original))
        cls.run = run
    try:
        yield
    finally:
        for cls, original in originals:
            cls.run = original


# ------------------------------------------------------------------------------------------- the model


def host_transformer(setting: HostSetting, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The shrunk host topology of ``setting`` (``ModelAdapter.host_transformer``: random weights, eval mode,
    float32)."""
    model = host_family().host_transformer(setting)
    return torch.nn.Module.to(model, device=device)


def _private_forward(transformer: torch.nn.Module) -> None:
    """Give ``transformer`` a forward with a code object of its own: torch.compile keeps its compiled
    graphs and guards per code object, so each compiled variant then checks only its own guards."""
    forward = type(transformer).forward
    private = types.FunctionType(forward.__code__.replace(), forward.__globals__, forward.__name__,
                                 forward.__defaults__, forward.__closure__)
    private.__kwdefaults__ = forward.__kwdefaults__
    private.__dict__.update(forward.__dict__)
    transformer.forward = types.MethodType(private, transformer)


class _Forward:
    """Stands for the transformer in the family's denoising loop: calls the denoiser's current ``model``
    (eager or compiled) and reports the transformer's device, dtype and config."""

    def __init__(self, denoiser: "HostDenoiser"):
        self._denoiser = denoiser

    def __getattr__(self, name: str):
        return getattr(self._denoiser.transformer, name)

    def __call__(self, *args, **kwargs):
        return self._denoiser.model(*args, **kwargs)


class HostDenoiser:
    """One variant: a transformer (patched or not, compiled or not) over its family's schedule on fixed
    random inputs (``ModelAdapter.denoising_inputs``), called through ``model`` (the transformer, or its
    compiled form)."""

    def __init__(self, transformer: torch.nn.Module, setting: HostSetting, device: torch.device):
        g = torch.Generator().manual_seed(setting.seed)
        side = 2 * setting.grid
        self.setting, self.device = setting, device
        self.transformer = self.model = transformer
        self.inputs = adapter_for(transformer).denoising_inputs(
            _Forward(self), side, side, setting.batch, setting.text_tokens, g)
        self.scheduler, self.latents = self.inputs.scheduler, self.inputs.latents

    @torch.no_grad()
    def generation(self, step_seconds: list[float] | None = None,
                   on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """One generation; appends each transformer call's host seconds to ``step_seconds``."""
        x = self.latents
        for step, t in enumerate(self.inputs.set_timesteps(self.setting.steps)):
            if on_step is not None:
                on_step(step)
            start = time.perf_counter()
            out = self.inputs.predict(x, t)
            if step_seconds is not None:
                step_seconds.append(time.perf_counter() - start)
            if on_step is not None:
                on_step(-1)  # the scheduler's update belongs to no step
            x = self.scheduler.step(out, t, x, return_dict=False)[0]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return x


# ------------------------------------------------------------------------------------ block and step kinds


def block_phases(transformer: torch.nn.Module, setting: HostSetting) -> dict[tuple[int, int], str]:
    """(step, layer) -> "protected" / "structure" / "detail" / "unchanged" of the last generation of an
    SDTM-patched ``transformer``; every block "unmerged" when it is not patched."""
    state = sdtm_state(transformer)
    if state is None:
        return {(s, layer): UNMERGED for s in range(setting.steps) for layer in range(setting.layers)}
    phases = {}
    for record in state.records:
        if record.mode == "merged":
            phases[record.step, record.layer] = "structure" if record.phase == "ssm" else "detail"
        else:
            phases[record.step, record.layer] = record.mode
    return phases


def step_kinds(phases: dict[tuple[int, int], str], steps: int) -> list[str]:
    """Each step's kind: "unmerged", or the phase of its merged blocks, else "protected" / "unchanged"."""
    kinds = []
    for step in range(steps):
        present = {p for (s, _), p in phases.items() if s == step}
        for kind in (UNMERGED, "structure", "detail", "protected", "unchanged"):
            if kind in present:
                kinds.append(kind)
                break
        else:
            kinds.append("unchanged")
    return kinds


def _typical(values: list[int]) -> int:
    """The most common value (the larger one on ties)."""
    counts = collections.Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def _block_summary(calls: list[tuple[int, int]], counter: "LaunchCounter") -> dict:
    """Launches per call of the blocks ``calls`` [(step, layer)]: the typical count (the joint blocks;
    the last block, which has no text output, launches fewer), the mean, the histogram, and the
    allocations, Triton launches and op names of one typical call."""
    launches = [counter.launches(*call) for call in calls]
    typical = _typical(launches)
    example = calls[launches.index(typical)]
    return {
        "typical": typical,
        "mean": statistics.fmean(launches),
        "calls": len(calls),
        "counts": {str(v): n for v, n in sorted(collections.Counter(launches).items())},
        "allocations": counter.ops.get(example, {}).get("allocation", 0),
        "triton": counter.triton[example],
        "ops": dict(counter.names[example].most_common()),
    }


@dataclass
class LaunchReport:
    """Launches of one counted generation: per step (total and outside the blocks) and, when blocks were
    told apart, per block call by phase ("unmerged" for the unpatched model)."""

    per_step: list[int]
    outside_per_step: list[int] | None  # None when blocks were not told apart
    step_kinds: list[str]
    per_block: dict[str, dict] = field(default_factory=dict)
    per_layer: list[list[int]] | None = None  # [step][layer], when blocks were told apart
    ops: dict[str, int] = field(default_factory=dict)  # launches by op name over the generation

    @property
    def per_step_mean(self) -> float:
        return statistics.fmean(self.per_step)

    def per_step_kind(self) -> dict[str, float]:
        kinds = collections.defaultdict(list)
        for kind, n in zip(self.step_kinds, self.per_step):
            kinds[kind].append(n)
        return {kind: statistics.fmean(ns) for kind, ns in kinds.items()}

    def to_json(self) -> dict:
        return {"per_step_mean": self.per_step_mean, "per_step": self.per_step,
                "per_step_kind": self.per_step_kind(), "outside_blocks_per_step": self.outside_per_step,
                "per_block": self.per_block, "ops": self.ops}


def count_generation(denoiser: HostDenoiser, per_block: bool = True) -> LaunchReport:
    """Count the launches of one generation of ``denoiser`` (run a warm one first: first calls fill
    caches). ``per_block`` attributes ops to blocks through module hooks, which a compiled model must
    not get (they would change its graphs): pass False for a compiled model."""
    setting = denoiser.setting
    counter = LaunchCounter()

    def on_step(step: int) -> None:
        counter.step = step

    regions = block_regions(denoiser.transformer, counter) if per_block else contextlib.nullcontext()
    with regions, count_triton_launches(counter), counter:
        denoiser.generation(on_step=on_step)
    phases = block_phases(denoiser.transformer, setting)
    kinds = step_kinds(phases, setting.steps)
    per_step = [counter.step_launches(s) for s in range(setting.steps)]
    outside = [counter.launches(s, OUTSIDE) for s in range(setting.steps)] if per_block else None
    names = sum((c for (step, _), c in counter.names.items() if step >= 0), collections.Counter())
    report = LaunchReport(per_step, outside, kinds, ops=dict(names.most_common()))
    if per_block:
        layers = range(setting.layers)
        report.per_layer = [[counter.launches(s, layer) for layer in layers] for s in range(setting.steps)]
        by_phase = collections.defaultdict(list)
        for call, phase in sorted(phases.items()):
            by_phase[phase].append(call)
        report.per_block = {phase: _block_summary(calls, counter) for phase, calls in by_phase.items()}
    return report


# ------------------------------------------------------------------------------------ host time by region


class RegionTimer:
    """Host time of each part of the eager transformer calls of a generation, through module hooks: the
    transformer's forward pre-hooks (SDTM's ``_pre_forward``; nothing for the unpatched model), each
    block call, and the rest of the call (embeddings, output layers, the blocks' loop)."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.step = -1
        self.hooks_s: dict[int, float] = {}  # step -> seconds in the transformer's pre-hooks
        self.blocks_s: dict[tuple[int, int], float] = {}  # (step, layer) -> seconds
        self.calls_s: dict[int, float] = {}  # step -> seconds of the whole call
        self._marks: dict[str, float] = {}

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        handles = [
            self.transformer.register_forward_pre_hook(lambda m, a: self._mark("call"), prepend=True),
            self.transformer.register_forward_pre_hook(lambda m, a: self._since("call", self.hooks_s, self.step)),
            self.transformer.register_forward_hook(lambda m, a, o: self._since("call", self.calls_s, self.step)),
        ]
        for layer, block in enumerate(adapter_for(self.transformer).blocks(self.transformer)):
            handles.append(block.register_forward_pre_hook(lambda m, a: self._mark("block")))
            handles.append(block.register_forward_hook(
                lambda m, a, o, layer=layer: self._since("block", self.blocks_s, (self.step, layer))))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _mark(self, name: str) -> None:
        self._marks[name] = time.perf_counter()

    def _since(self, name: str, into: dict, key) -> None:
        into[key] = time.perf_counter() - self._marks[name]


def host_breakdown(timers: list[RegionTimer], phases: dict[tuple[int, int], str], layers: int) -> dict:
    """Medians over the timed generations of ``timers``: ms per step in the pre-hooks, in the blocks and
    in the rest of the call; µs per call of a block (all but the last, which may differ) by phase."""
    hooks, blocks, rest = [], [], []
    per_phase = collections.defaultdict(list)
    for timer in timers:
        for step, call in timer.calls_s.items():
            in_blocks = sum(t for (s, _), t in timer.blocks_s.items() if s == step)
            hook = timer.hooks_s.get(step, 0.0)
            hooks.append(hook)
            blocks.append(in_blocks)
            rest.append(call - hook - in_blocks)
        for (step, layer), seconds in timer.blocks_s.items():
            if layer < layers - 1:
                per_phase[phases[step, layer]].append(seconds)
    return {
        "pre_hook_ms_per_step": statistics.median(hooks) * 1e3,
        "blocks_ms_per_step": statistics.median(blocks) * 1e3,
        "rest_ms_per_step": statistics.median(rest) * 1e3,
        "block_us_by_phase": {phase: statistics.median(ts) * 1e6 for phase, ts in per_phase.items()},
    }


# ---------------------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """One line of the benchmark: the unmerged model or SDTM with ``backend``, eager or compiled."""

    backend: str | None  # None: unmerged
    compiled: bool
    device: torch.device
    denoiser: HostDenoiser
    times: list[float] = field(default_factory=list)
    first_generation_s: float = 0.0
    timers: list[RegionTimer] = field(default_factory=list)  # eager: host time by region, per generation

    @property
    def name(self) -> str:
        return UNMERGED if self.backend is None else self.backend

    @property
    def mode(self) -> str:
        return "compiled" if self.compiled else "eager"

    @property
    def label(self) -> str:
        device = "" if self.device.type == "cpu" else f"@{self.device.type}"
        return f"{self.mode} {self.name}{device}"


def host_backends(backends: list[str] | None = None) -> list[tuple[str, torch.device]]:
    """The (backend, device) pairs of SDTM to time: torch and cpp on the CPU, triton on CUDA (default:
    all of them that run here). ValueError for a backend that cannot run here."""
    available = [("torch", torch.device("cpu"))]
    if cpp_unavailable_reason() is None:
        available.append(("cpp", torch.device("cpu")))
    if torch.cuda.is_available() and triton_unavailable_reason(torch.device("cuda")) is None:
        available.append(("triton", torch.device("cuda")))
    if backends is None:
        return available
    names = {name for name, _ in available}
    for name in backends:
        if name not in names:
            if name == "cpp":
                raise ValueError(f"backend='cpp' is not available: {cpp_unavailable_reason()}.")
            if name == "triton":
                raise ValueError("the host benchmark times triton on a CUDA device only; on the CPU, count its "
                                 "launches with sdtm.cli.host_bench.triton_block_launches under TRITON_INTERPRET=1.")
            raise ValueError(f"unknown backend {name!r}.")
    return [(name, device) for name, device in available if name in backends]


def build_variants(setting: HostSetting, backends: list[tuple[str, torch.device]],
                   compile_backend: str | None) -> list[Variant]:
    """Unmerged and SDTM per backend, on the backend's device, eager and (``compile_backend``) compiled:
    every variant a copy of one transformer."""
    devices = [torch.device("cpu")] + sorted({d for _, d in backends if d.type != "cpu"}, key=str)
    base = {d: host_transformer(setting, d) for d in devices}
    variants = []
    for compiled in (False, True) if compile_backend else (False,):
        for device in devices:
            names = [None] + [name for name, d in backends if d == device]
            for name in names:
                transformer = copy.deepcopy(base[device])
                denoiser = HostDenoiser(transformer, setting, device)
                if name is not None:
                    ops_for(name, device)  # raises when the backend cannot run on this device
                    apply_sdtm(transformer, setting.sdtm_config(name), scheduler=denoiser.scheduler)
                if compiled:
                    _private_forward(transformer)
                    denoiser.model = torch.compile(transformer, backend=compile_backend)
                variants.append(Variant(name, compiled, device, denoiser))
    return variants


@contextlib.contextmanager
def _threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _timed_generation(variant: Variant, by_region: bool = False) -> None:
    """One generation with the garbage collector off: step times into ``variant.times``, or (``by_region``)
    host time by region into a new ``RegionTimer`` of ``variant.timers``."""
    gc.collect()
    gc.disable()
    try:
        if not by_region:
            variant.denoiser.generation(variant.times)
            return
        timer = RegionTimer(variant.denoiser.transformer)
        with timer.active():
            variant.denoiser.generation(on_step=lambda step: setattr(timer, "step", step))
        variant.timers.append(timer)
    finally:
        gc.enable()


def _median_by_kind(times: list[float], kinds: list[str]) -> dict[str, float]:
    by_kind = collections.defaultdict(list)
    for i, seconds in enumerate(times):
        by_kind[kinds[i % len(kinds)]].append(seconds)
    return {kind: statistics.median(ts) * 1e3 for kind, ts in by_kind.items()}


def bench_host(setting: HostSetting = HostSetting(), backends: list[str] | None = None, rounds: int = 5,
               compile_backend: str | None = "eager", progress: bool = True) -> dict:
    """Time and count every variant (see the module's description); one JSON-ready dict.

    ``compile_backend``: the ``torch.compile`` backend of the compiled variants (see the module's
    description), or None for eager variants only."""
    if compile_backend is not None and compile_backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile backend must be one of {COMPILE_BACKENDS}, got {compile_backend!r}.")
    pairs = host_backends(backends)
    with _threads(setting.threads), torch._dynamo.config.patch(recompile_limit=64):
        variants = build_variants(setting, pairs, compile_backend)
        for variant in tqdm(variants, desc="first generations", leave=False, disable=not progress):
            start = time.perf_counter()
            variant.denoiser.generation()
            variant.first_generation_s = time.perf_counter() - start
        for r in tqdm(range(rounds), desc="rounds", leave=False, disable=not progress):
            shift = r % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                _timed_generation(variant)
        # Then as many rounds of the eager variants timed by region (the hooks cost a little host time,
        # so these are kept out of the step times above).
        eager = [v for v in variants if not v.compiled]
        for r in tqdm(range(rounds), desc="rounds by region", leave=False, disable=not progress):
            shift = r % len(eager)
            for variant in eager[shift:] + eager[:shift]:
                _timed_generation(variant, by_region=True)
        reports = {}
        for variant in variants:
            if variant.compiled:
                # Count what was timed: the compiled graphs, never a recompilation.
                with torch.compiler.set_stance("fail_on_recompile"):
                    reports[variant.label] = count_generation(variant.denoiser, per_block=False)
            else:
                reports[variant.label] = count_generation(variant.denoiser)
    return _result(setting, variants, reports, compile_backend)


def _result(setting: HostSetting, variants: list[Variant], reports: dict[str, LaunchReport],
            compile_backend: str | None) -> dict:
    from .bench import machine_info

    rows = []
    for variant in variants:
        report = reports[variant.label]
        rows.append({
            "label": variant.label, "name": variant.name, "backend": variant.backend, "mode": variant.mode,
            "device": variant.device.type,
            "host_ms_per_step": statistics.median(variant.times) * 1e3,
            # The median step is that of the most common step kind; a generation's mean step weighs them all.
            "host_ms_per_step_mean": statistics.median(
                statistics.fmean(variant.times[i:i + setting.steps]) for i in range(0, len(variant.times),
                                                                                    setting.steps)) * 1e3,
            "host_ms_per_step_kind": _median_by_kind(variant.times, report.step_kinds),
            "timed_steps": len(variant.times),
            "first_generation_s": variant.first_generation_s,
            "launches_per_step": report.per_step_mean,
            "launches_per_step_kind": report.per_step_kind(),
            "launches_outside_blocks_per_step": (statistics.fmean(report.outside_per_step)
                                                 if report.outside_per_step else None),
            "launches_per_block": report.per_block or None,
            "host_breakdown": (host_breakdown(variant.timers, block_phases(variant.denoiser.transformer, setting),
                                              setting.layers) if variant.timers else None),
            "launches": report.to_json(),
        })
    ratios = {}
    for row in rows:
        if row["backend"] is None:
            continue
        base = next(r for r in rows if r["backend"] is None and r["mode"] == row["mode"]
                    and r["device"] == row["device"])
        entry = {"host_time": row["host_ms_per_step"] / base["host_ms_per_step"],
                 "host_time_mean": row["host_ms_per_step_mean"] / base["host_ms_per_step_mean"],
                 "launches_per_step": row["launches_per_step"] / base["launches_per_step"]}
        if row["launches_per_block"] and base["launches_per_block"]:
            unmerged_block = base["launches_per_block"][UNMERGED]["typical"]
            entry["block_launches"] = {phase: stats["typical"] / unmerged_block
                                       for phase, stats in row["launches_per_block"].items()}
        ratios.setdefault(row["mode"], {})[row["name"] if row["device"] == "cpu"
                                           else f"{row['name']}@{row['device']}"] = entry
    return {
        "machine": machine_info(),
        "setting": {**setting.describe(), "compile_backend": compile_backend},
        "counted": "ops reaching the dispatcher's kernels (TorchDispatchMode, after composite ops decompose), "
                   "views and metadata ops excluded, allocations included; plus Triton kernel launches",
        "variants": rows,
        "ratios": ratios,
        "targets": host_targets(ratios.get("eager", {})),
    }


def host_targets(eager: dict[str, dict]) -> dict:
    """The targets against the eager ratios of each backend: met (True), missed (False) or not measured
    (None). Both are about the cost of merging, so a backend none of whose blocks merged (ratio 0, a
    schedule without merging steps) measured neither; the block target is judged on the merged phases
    measured, and ``block_launches_not_measured`` names those that had no merged block."""
    host_time, blocks, not_measured = {}, {}, {}
    for backend, ratio in eager.items():
        merged = {p: v for p, v in ratio.get("block_launches", {}).items() if p in MERGED_PHASES}
        host_time[backend] = ratio["host_time"] <= HOST_TIME_TARGET if merged else None
        blocks[backend] = all(v <= BLOCK_LAUNCH_TARGET for v in merged.values()) if merged else None
        not_measured[backend] = [p for p in MERGED_PHASES if p not in merged]
    return {"host_time_max_ratio": HOST_TIME_TARGET, "block_launches_max_ratio": BLOCK_LAUNCH_TARGET,
            "host_time_met": host_time, "block_launches_met": blocks, "block_launches_not_measured": not_measured}


# --------------------------------------------------------------------------------- triton launch counts


def triton_block_launches(setting: HostSetting = HostSetting(layers=3, steps=8, switch_step=4),
                          device: torch.device | str | None = None) -> dict:
    """Launches of the triton backend per block call by phase (aten ops and Triton kernel launches
    apart), against the unmerged model on the same device: {"unmerged": {...}, "triton": {phase: ...},
    "per_step": {...}}.

    Runs on CUDA, or on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1 set before triton was
    first imported); there a generation is slow, hence the default of 3 blocks and 8 steps (protected,
    structure and detail steps), which gives the same counts per block as 24 blocks."""
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                            else "cpu")
    reason = triton_unavailable_reason(device)
    if reason is not None:
        raise ValueError(f"backend='triton' cannot run on {device}: {reason}.")
    if device.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        from sdtm_kernels import merge as triton_merge

        if not isinstance(triton_merge._merge_kernel, InterpretedFunction):
            raise ValueError("triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run on "
                             "CPU tensors; set TRITON_INTERPRET=1 in the environment before starting Python.")
    result = {}
    with _threads(setting.threads):
        base = host_transformer(setting, device)
        for name in (None, "triton"):
            transformer = copy.deepcopy(base)
            denoiser = HostDenoiser(transformer, setting, device)
            if name is not None:
                apply_sdtm(transformer, setting.sdtm_config(name), scheduler=denoiser.scheduler)
            denoiser.generation()  # warm: fills caches and, on a GPU, autotunes
            report = count_generation(denoiser)
            label = name or UNMERGED
            result[label] = report.per_block if name else report.per_block[UNMERGED]
            result.setdefault("per_step", {})[label] = report.per_step
            result.setdefault("ops", {})[label] = report.ops
    for phase, stats in result["triton"].items():
        stats["aten"] = stats["typical"] - stats["triton"]
    result["unmerged"]["aten"] = result["unmerged"]["typical"]
    result["device"] = device.type
    result["interpreted"] = os.environ.get("TRITON_INTERPRET") == "1" and device.type == "cpu"
    return result


# ------------------------------------------------------------------------------------------------ report


def _fmt(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def format_host_report(result: dict) -> str:
    """The benchmark's result as text: host time and launches per step, launches per block call by phase,
    host time by region, and the ratios of SDTM over unmerged."""
    s = result["setting"]
    lines = [
        f"{host_family().host_topology} shrunk: {s['layers']} blocks, {s['heads']} head(s) x {s['head_dim']} "
        f"(C={s['channels']}), {s['grid']}x{s['grid']} image + {s['text_tokens']} text tokens, batch {s['batch']}, "
        f"float32, {s['threads']} thread(s); {s['steps']} steps, switch_step {s['switch_step']}, ratio "
        f"{s['ratio']} +- {s['deviation']}; compiled with {s['compile_backend'] or '(none)'}",
        "host ms/step: median over the timed steps of the transformer call (SDTM's pre-hook included; mean: "
        "a generation's mean step, median over rounds); "
        "launches: ops reaching the dispatcher's kernels (views excluded) plus Triton launches; per block: "
        "a block's typical call",
        f"{'variant':22}{'host ms/step':>13}{'(mean)':>8}{'first gen s':>12}{'launches/step':>14}{'outside':>9}  "
        "launches per block call by phase",
    ]
    for row in result["variants"]:
        blocks = row["launches_per_block"]
        per_block = ("  ".join(f"{p} {v['typical']}" for p, v in blocks.items()) if blocks
                     else "(blocks inlined in the compiled graphs)")
        lines.append(f"{row['label']:22}{row['host_ms_per_step']:>13.2f}{row['host_ms_per_step_mean']:>8.2f}"
                     f"{row['first_generation_s']:>12.2f}"
                     f"{row['launches_per_step']:>14.1f}{_fmt(row['launches_outside_blocks_per_step'], 9, 1)}  "
                     f"{per_block}")
    lines.append("host ms per step by step kind:")
    for row in result["variants"]:
        lines.append(f"  {row['label']:20}"
                     + "  ".join(f"{k} {v:.2f}" for k, v in row["host_ms_per_step_kind"].items()))
    lines.append("eager host time by region (hooks; separate rounds): ms per step in SDTM's pre-hook / in the "
                 "blocks / in the rest of the call; µs per block call by phase")
    for row in result["variants"]:
        b = row.get("host_breakdown")
        if b:
            phases = "  ".join(f"{p} {us:.0f}" for p, us in b["block_us_by_phase"].items())
            lines.append(f"  {row['label']:20}{b['pre_hook_ms_per_step']:6.2f} /{b['blocks_ms_per_step']:7.2f} /"
                         f"{b['rest_ms_per_step']:6.2f}   {phases}")
    lines.append("SDTM / unmerged:")
    for mode, per_backend in result["ratios"].items():
        for backend, r in per_backend.items():
            blocks = r.get("block_launches")
            text = ("  block launches " + "  ".join(f"{p} {v:.2f}x" for p, v in blocks.items())) if blocks else ""
            lines.append(f"  {mode:9}{backend:8} host time {r['host_time']:.3f}x (mean {r['host_time_mean']:.3f}x)  "
                         "launches/step "
                         f"{r['launches_per_step']:.3f}x{text}")
    lines.append(format_targets(result["targets"]))
    return "\n".join(lines)


def _verdict(met: bool | None) -> str:
    return "not measured: no block merged" if met is None else "met" if met else "missed"


def format_targets(targets: dict) -> str:
    """One line: each eager backend's verdict on each target; "not measured" where no block merged (in
    a merged phase, for the block target), never "met" over nothing."""
    t = targets
    host = ", ".join(f"{b} {_verdict(met)}" for b, met in t["host_time_met"].items())
    blocks = []
    for backend, met in t["block_launches_met"].items():
        missing = t.get("block_launches_not_measured", {}).get(backend, [])
        text = f"{backend} {_verdict(met)}"
        if met is None:
            text += f" in the {' or '.join(MERGED_PHASES)} phase"
        elif missing:
            text += f" ({' and '.join(missing)} phase not measured: no block merged in it)"
        blocks.append(text)
    return (f"targets (eager): host time <= {t['host_time_max_ratio']}x: {host or 'not measured: no SDTM backend'}"
            f"; merged block launches <= {t['block_launches_max_ratio']}x: "
            f"{', '.join(blocks) or 'not measured: no SDTM backend'}")
