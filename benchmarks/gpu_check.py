"""Time generation on one GPU: unmerged and SDTM, eager and on a fast path, into one JSON file.

    python benchmarks/gpu_check.py                       # CUDA: the default preset's shapes, 1024x1024
    python benchmarks/gpu_check.py --model NAME          # another preset: its dtype, steps and batch
    python benchmarks/gpu_check.py --device cpu --tiny   # smoke run: a 2-block model of the family, a few steps
    python benchmarks/gpu_check.py --cache cache-dit     # a step cache stacked with SDTM (four variants, below)
    python benchmarks/gpu_check.py --model NAME --cache taylorseer   # or fbcache, where the family takes it
    bash benchmarks/gpu_check.sh [--model ...]           # wheels, the GPU tests, then this script

``--model`` names a preset of a registered model family that the check offers (sdtm.models: a ``Preset``
with ``gpu_check`` set; ``--help`` lists them; the first is the default): the released model's transformer
config (the one ``sdtm macs --config NAME`` counts), its dtype, denoising steps and transformer batch (2:
the classifier-free-guidance pair; 1: guidance-distilled). Its transformer with random weights runs a plain
denoising loop over random latents and random prompt embeddings of the family's text tokens, called as its
diffusers pipeline calls it (sdtm.cli.bench.Denoiser: ``ModelAdapter.denoising_inputs``).

SDTM runs with its defaults and the family's switch step (``ModelAdapter.resolve_config``); the JSON's
``model`` says which model ran. Variants:

    unmerged_eager          no SDTM
    unmerged_fast           no SDTM, the transformer on the fast path
    sdtm_eager              apply_sdtm(transformer, SDTMConfig(backend=...), scheduler=...)
    sdtm_fast               the same on the fast path
    sdtm_aggressive_eager   SDTM with ratio=0.5, deviation=0.0
    sdtm_aggressive_fast    the same on the fast path

With ``--cache NAME`` (cache-dit, taylorseer or fbcache; sdtm.cli.caches: a deterministic schedule computing
about 70% of the steps) the variants are four, all eager (CUDA graphs cannot replay the blocks a cache
skips)::

    unmerged_eager          no SDTM, no cache
    cache_eager             the step cache alone
    sdtm_eager              SDTM alone
    both_eager              the step cache and SDTM

and the JSON adds ``cache``, ``stacking_efficiency`` (speedup(both) / (speedup(cache) x speedup(sdtm)), each
speedup over unmerged_eager) and ``stacking``: the cache's schedule, what each variant computed in its last
generation (block calls computed out of all, the steps at which every block was computed: counted by a
forward pre-hook on a sub-module every real block forward calls) and SDTM's records by mode. The file is
gpu-<date>[-<model>]-<cache>-<device>.json. cache-dit comes from .whl/ on the bare GPU image
(gpu_check.sh).

The fast path is CUDA-graph replay (sdtm.core.graphs: one graph captured per distinct transformer call,
replayed after), or torch.compile of the transformer's blocks (--fast compile, and the fallback when
sdtm.core.graphs cannot be imported; the JSON says which ran and why). Every variant is a copy of one
transformer that shares its weights, so the variants keep their own SDTM state and graphs side by side.

Measured, per variant: the first generation (Triton compilation, graph capture or compilation included:
first_generation_seconds), then one extra instrumented generation with an event around every transformer
call (per_step_ms, per_phase_ms: medians at protected, structure-phase and detail-phase steps, the steps
classified with SDTM's default schedule for every variant, so the phases compare; ``per_step_source``), then
``--rounds`` (5) interleaved rounds of whole generations timed with CUDA events (perf_counter on the CPU):
the medians are ``seconds``, ``seconds_stats`` has min / median / max, ``round_seconds`` every round.
``speedup`` compares each SDTM variant with the unmerged one on the same path, ``realised_share`` is that
speedup over the theoretical MAC ratio (sdtm.cli.macs.schedule_macs, counted on the meta device).

Output check: each variant's final latents must be finite, a fast variant's within ``--fast-tolerance``
of the same variant eager, and sdtm_eager's (--backend, triton on CUDA) within ``--backend-tolerance`` of
one more generation with the torch backend at the same size (relative L2 differences; the tolerances are in
``output_check_tolerances``). Past them the JSON says ``"passed": false`` and ``failure``, and the exit code
is 1; ``tree`` has the commit and whether the working tree was dirty (``.whl/`` and benchmarks/results/ left
out; "unknown" without git).

Memory (CUDA): measured with torch.cuda.max_memory_allocated (``peak_memory_bytes``) and
max_memory_reserved (``memory.peak_reserved_bytes``: CUDA graph pools included), the peak statistics reset
before each variant's warm-up and its instrumented generation; both include what was resident before the
variant (``memory.allocated_before_bytes``). On the CPU they are null, with the reason in ``memory.note``.

``--budget`` caps the run: a variant is skipped (and said so) when its warm-up would start late, and the
rounds are cut to what fits; a JSON file is written after every stage, so a run stopped early (SIGINT)
still leaves one. The file is benchmarks/results/gpu-<date>-<device>.json (gpu-<date>-<model>-<device>.json
for a --model other than the default; ``--out-dir``, ``--json``), copied into $OUT when that variable is set.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

STARTED = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: this repository's sdtm
    sys.path.insert(0, str(ROOT))

VARIANTS = ("unmerged_eager", "unmerged_fast", "sdtm_eager", "sdtm_fast", "sdtm_aggressive_eager",
            "sdtm_aggressive_fast")
# Warm-up order: when the budget runs short the variants at the end are the ones skipped.
PRIORITY = ("unmerged_eager", "sdtm_eager", "unmerged_fast", "sdtm_fast", "sdtm_aggressive_eager",
            "sdtm_aggressive_fast")
ALWAYS_RUN = ("unmerged_eager", "sdtm_eager")
# --cache: the step cache stacked with SDTM, eager (see the description); every one of them always runs.
CACHE_VARIANTS = ("unmerged_eager", "cache_eager", "sdtm_eager", "both_eager")
CACHES = ("cache-dit", "taylorseer", "fbcache")
AGGRESSIVE = dict(ratio=0.5, deviation=0.0)
PHASES = ("protected", "structure", "detail")


def gpu_models() -> dict:
    """The presets the check offers, by name: (family adapter, ``sdtm.models.Preset``), the default first;
    {} when sdtm cannot be imported (diffusers missing: only --help can run then)."""
    try:
        from sdtm.models import presets
    except ImportError:
        return {}
    return {name: entry for name, entry in presets().items() if entry[1].gpu_check is not None}


def model_entry(args) -> tuple:
    """(family adapter, preset) of ``args.model``."""
    return gpu_models()[args.model]


# A variant's warm-up starts only while less than this share of --budget is spent.
WARMUP_SHARE = 0.6


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models = gpu_models()
    model = parser.add_argument_group("model and generation")
    listed = "; ".join(f"{name} ({preset.dtype}, {preset.steps} steps, batch {preset.batch}, "
                       f"{adapter.text_tokens(preset.config)} text tokens)" for name, (adapter, preset) in models.items())
    model.add_argument("--model", choices=list(models) or None, default=next(iter(models), None),
                       help="the transformer's shapes (random weights): "
                            + (f"{listed}; {next(iter(models))}" if models else
                               "a preset of sdtm.models (listing them needs diffusers installed)"))
    model.add_argument("--device", default=None,
                       help="torch device; default cuda when available, else cpu (cpu only makes sense with --tiny)")
    model.add_argument("--tiny", action="store_true",
                       help="smoke settings: a transformer of the model's family shrunk to about 2 blocks ("
                            + "; ".join(f"{name}: {preset.gpu_check}" for name, (_, preset) in models.items())
                            + ") with its text tokens, float32, 256x256, 6 steps, 1 round (each can still be set "
                            "by its own option)")
    model.add_argument("--size", type=int, default=None, help="image side in pixels (latents are 8x smaller); 1024")
    model.add_argument("--steps", type=int, default=None, help="denoising steps; the model's")
    model.add_argument("--batch", type=int, default=None,
                       help="batch of every transformer call; the model's (CFG: 2; guidance-distilled: 1)")
    model.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                       help="weights and activations; the model's, float32 with --tiny or on the CPU")
    model.add_argument("--seed", type=int, default=0, help="seed of the weights, latents and embeddings; 0")
    model.add_argument("--threads", type=int, default=None,
                       help="torch's CPU threads; 1 with --device cpu (timings there are a smoke test only), "
                            "torch's default otherwise")
    sdtm = parser.add_argument_group("SDTM and the fast path")
    sdtm.add_argument("--backend", choices=["auto", "torch", "cpp", "triton"], default=None,
                      help="SDTM's op backend; triton on CUDA, auto elsewhere")
    sdtm.add_argument("--fast", choices=["graphs", "compile"], default=None,
                      help="the fast path: CUDA-graph replay (sdtm.core.graphs; on the CPU a stand-in that re-runs "
                           "each replayed call, for tests) or torch.compile of every transformer block; graphs "
                           "on CUDA, compile elsewhere; graphs falls back to compile when sdtm.core.graphs is missing")
    sdtm.add_argument("--compile-backend", default=None,
                      help="torch.compile backend of --fast compile; inductor on CUDA, eager elsewhere")
    sdtm.add_argument("--compile-mode", default=None,
                      help="torch.compile mode with inductor (e.g. max-autotune-no-cudagraphs, which tunes "
                           "every matmul and does not fit the budget); inductor's default")
    sdtm.add_argument("--skip-aggressive", action="store_true",
                      help="leave out the ratio=0.5, deviation=0.0 variants (their keys hold null)")
    sdtm.add_argument("--cache", choices=CACHES, default=None,
                      help="time a step cache stacked with SDTM instead: unmerged, the cache alone, SDTM alone and "
                           "both, eager, on the cache's deterministic schedule (about 70%% of the steps computed), "
                           "with the steps and blocks each computed and the stacking efficiency; fbcache: "
                           + " and ".join(name for name, (adapter, _) in models.items()
                                          if "fbcache" not in adapter.cache_refusals))
    check = parser.add_argument_group("output check (the run fails past these)")
    check.add_argument("--fast-tolerance", type=float, default=None,
                       help="largest relative difference ||fast - eager|| / ||eager|| of the final latents of a "
                            "variant on the fast path and the same variant eager; 0.01 (graph replay), 0.05 "
                            "(torch.compile)")
    check.add_argument("--backend-tolerance", type=float, default=0.05,
                       help="largest relative difference of sdtm_eager's final latents with --backend (triton on "
                            "CUDA) and with the torch backend, at the run's full size; 0.05")
    timing = parser.add_argument_group("timing and budget")
    timing.add_argument("--rounds", type=int, default=None, help="interleaved timed rounds; 5 (1 with --tiny)")
    timing.add_argument("--budget", type=float, default=330.0,
                        help="seconds this script may take: variants whose warm-up would start after "
                             f"{WARMUP_SHARE * 100:.0f}%% of it are skipped and the rounds are cut to fit; "
                             "0: no cap. 330")
    output = parser.add_argument_group("output")
    output.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"),
                        help="folder of gpu-<date>[-<model>]-<device>.json; benchmarks/results")
    output.add_argument("--json", default=None, help="write the JSON here instead")
    output.add_argument("--no-out-copy", action="store_true", help="do not copy the JSON into $OUT")
    shell = parser.add_argument_group("recorded from gpu_check.sh")
    shell.add_argument("--tests-exit-code", type=int, default=None, help="exit code of the GPU tests")
    shell.add_argument("--tests-summary", default=None, help="pytest's summary line")
    shell.add_argument("--tests-seconds", type=float, default=None, help="seconds the tests took")
    shell.add_argument("--install-seconds", type=float, default=None, help="seconds the wheel install took")
    shell.add_argument("--started-at", type=float, default=None,
                       help="Unix time the whole check started (wall_seconds then counts from it)")
    args = parser.parse_args(argv)
    for name in ("size", "steps", "rounds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be positive, got {value}")
    for name in ("fast_tolerance", "backend_tolerance"):
        value = getattr(args, name)
        if value is not None and value < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative, got {value}")
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be positive, got {args.batch}")
    if not models:
        parser.error("sdtm cannot be imported (is diffusers installed?); only --help runs without it")
    adapter, preset = models[args.model]
    reason = adapter.cache_refusals.get(args.cache) if args.cache else None
    if reason is not None:
        others = sorted(c for c in CACHES if c != args.cache and c not in adapter.cache_refusals)
        runs = [name for name, (a, _) in models.items() if args.cache not in a.cache_refusals]
        parser.error(f"--cache {args.cache} does not run on --model {args.model} here ({reason}); use "
                     f"{' or '.join(others)} with --model {args.model}, or --model {' or '.join(runs)}")
    token = 8 * adapter.token_side(preset.config)
    if args.size is not None and args.size % token:
        parser.error(f"--size must be a multiple of {token} (8x VAE factor x {adapter.token_side(preset.config)} "
                     f"latent pixels a token), got {args.size}")
    return args


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on the device and on --tiny (needs torch)."""
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available; use --device cpu --tiny")
    cuda = args.device.type == "cuda"
    _, preset = model_entry(args)
    adapter, _ = model_entry(args)
    args.size = args.size or (256 if args.tiny else preset.gpu_size or 1024)
    args.steps = args.steps or (6 if args.tiny else preset.gpu_steps or preset.steps)
    args.frames = preset.gpu_frames  # generated frames (video presets); the token grid's: args.token_frames
    args.token_frames = adapter.latent_frames(args.frames)
    args.rounds = args.rounds or (1 if args.tiny else 5)
    args.batch = args.batch or preset.batch
    args.dtype = args.dtype or ("float32" if args.tiny or not cuda else preset.dtype)
    args.backend = args.backend or ("triton" if cuda else "auto")
    args.fast = args.fast or ("graphs" if cuda else "compile")
    args.compile_backend = args.compile_backend or ("inductor" if cuda else "eager")
    args.threads = args.threads or (None if cuda else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


# ----------------------------------------------------------------------------------------------- timing


class Clock:
    """CUDA events on a CUDA device, perf_counter elsewhere."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def mark(self):
        if self.cuda:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        """Seconds between two marks (call after ``sync``)."""
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    def time(self, fn) -> tuple[float, object]:
        """(seconds, result) of ``fn()``, synchronised before and after."""
        self.sync()
        start = self.mark()
        result = fn()
        end = self.mark()
        self.sync()
        return self.seconds(start, end), result


class StepTimer:
    """Marks around every transformer call of one generation."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.marks: list[tuple[object, object]] = []
        self._start = None

    def start(self) -> None:
        self._start = self.clock.mark()

    def stop(self) -> None:
        self.marks.append((self._start, self.clock.mark()))

    def milliseconds(self) -> list[float]:
        self.clock.sync()
        return [self.clock.seconds(a, b) * 1e3 for a, b in self.marks]


class Elapsed:
    """Wall-clock seconds of the script's stages, printed as each ends."""

    def __init__(self):
        self.stages: dict[str, float] = {}
        self._stage, self._since = None, time.perf_counter()

    def begin(self, stage: str) -> None:
        self.end()
        self._stage, self._since = stage, time.perf_counter()
        print(f"[{self.total():6.1f} s] {stage} ...", flush=True)

    def end(self) -> None:
        if self._stage is not None:
            seconds = time.perf_counter() - self._since
            self.stages[self._stage] = round(seconds, 3)
            print(f"[{self.total():6.1f} s] {self._stage}: {seconds:.1f} s", flush=True)
            self._stage = None

    @staticmethod
    def total() -> float:
        return time.perf_counter() - STARTED


# ------------------------------------------------------------------------------------------ the model


def build_transformer(args):
    """The --model transformer (or its tiny shrunk version) with random weights, on the device, in eval
    mode; and its config as sdtm.cli.macs reads it (for the MAC count)."""
    import torch

    from sdtm.cli.bench import mac_config

    dtype = getattr(torch, args.dtype)
    latent = args.size // 8
    adapter, preset = model_entry(args)
    if args.tiny:
        model = adapter.tiny_bench_transformer(latent, seed=args.seed, device=args.device, dtype=dtype)
    else:
        import diffusers

        cls = getattr(diffusers, adapter.config_classes[0])
        config = {k: v for k, v in preset.config.items() if not k.startswith("_")}
        torch.manual_seed(args.seed)
        try:
            # Built on the device (random initialisation of billions of weights on the host is slow) and in
            # the run's dtype (12 billion weights in float32 and a cast copy would not fit beside each other
            # on an 80 GB GPU).
            with torch.device(args.device), default_dtype(dtype):
                model = cls(**config)
        except Exception as error:
            print(f"building on {args.device} failed ({type(error).__name__}: {error}); building on the CPU",
                  flush=True)
            torch.manual_seed(args.seed)
            model = cls(**config)
        # nn.Module.to: diffusers' ModelMixin.to warns about dtype casts.
        model = torch.nn.Module.to(model, device=args.device, dtype=dtype).eval()
        if args.device.type == "cuda":
            torch.cuda.empty_cache()  # a float32 copy, where one was made
    return model, mac_config(model)


@contextlib.contextmanager
def default_dtype(dtype):
    """torch's default floating-point dtype set to ``dtype`` for the block's duration."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def shared_copy(module):
    """A deep copy of ``module`` that shares its parameters and buffers (no memory for weights)."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def make_generation(transformer, args):
    """The family's denoising loop over ``transformer`` (sdtm.cli.bench.Denoiser: its own scheduler, random
    latents, prompt embeddings of the model's text tokens), with an optional timer around each
    transformer call."""
    import torch

    from sdtm.cli.bench import Denoiser

    class Generation(Denoiser):
        @torch.no_grad()
        def __call__(self, timer: StepTimer | None = None) -> torch.Tensor:
            x = self.latents
            for t in self.set_timesteps():
                if timer is not None:
                    timer.start()
                out = self.predict(x, t)
                if timer is not None:
                    timer.stop()
                x = self.scheduler.step(out, t, x, return_dict=False)[0]
            return x

    latent = args.size // 8
    return Generation(transformer, latent, latent, args.steps, args.batch, seed=args.seed,
                      text_tokens=text_tokens(args), frames=args.token_frames)


def text_tokens(args) -> int:
    """The text tokens of the --model family's pipeline for its preset."""
    adapter, preset = model_entry(args)
    return adapter.text_tokens(preset.config)


class RerunCapture:
    """CPU stand-in for CUDA-graph capture (sdtm.core.graphs' ``capture`` argument): a replay runs the captured
    call again on the static inputs and writes the static outputs. Exercises the graphed path on the CPU."""

    def check(self, tensors) -> None:
        pass

    def capture(self, run, example_outputs):
        from torch.utils import _pytree as pytree

        static = pytree.tree_map(lambda x: x.clone() if hasattr(x, "clone") else x, example_outputs)

        def replay():
            fresh = run()
            for target, value in zip(pytree.tree_leaves(static), pytree.tree_leaves(fresh)):
                if hasattr(target, "copy_"):
                    target.copy_(value)

        return replay, static


def graphs_module():
    """(sdtm.core.graphs, None), or (None, why it cannot be imported)."""
    try:
        from sdtm.core import graphs

        graphs.enable_cuda_graphs, graphs.disable_cuda_graphs  # noqa: B018 (the API this script uses)
    except Exception as error:  # ImportError, AttributeError, or an error inside the module
        return None, f"sdtm.core.graphs cannot be used ({type(error).__name__}: {error})"
    return graphs, None


class FastPath:
    """How a variant's transformer is put on the fast path: graph replay or compiled blocks."""

    def __init__(self, args):
        self.args = args
        self.note = None
        self.graphs = None
        self.mode = None
        if args.fast == "graphs":
            self.graphs, self.note = graphs_module()
        self.kind = "cuda_graphs" if self.graphs is not None else "torch.compile"
        if self.kind == "cuda_graphs":
            self.detail = ("sdtm.core.graphs: one CUDA graph captured per distinct transformer call, replayed after"
                           if args.device.type == "cuda" else
                           "sdtm.core.graphs with a CPU stand-in capture (a replay runs the call again): a smoke "
                           "run of the graphed path, not a fast path")
        else:
            self.mode = args.compile_mode if args.compile_backend == "inductor" else None
            self.detail = (f"torch.compile of every transformer block (backend {args.compile_backend!r}"
                           + (f", mode {self.mode!r}" if self.mode else "") + "); the rest of the transformer eager")

    def config(self, sdtm_config):
        """The SDTMConfig of a fast SDTM variant: ``cuda_graphs=True`` where the field exists on CUDA."""
        if (self.kind == "cuda_graphs" and self.args.device.type == "cuda"
                and "cuda_graphs" in getattr(type(sdtm_config), "__dataclass_fields__", {})):
            return sdtm_config.replace(cuda_graphs=True)
        return sdtm_config

    def prepare(self, transformer, sdtm_config) -> str:
        """Put ``transformer`` on the fast path before SDTM (if any) is applied with ``config(...)``;
        returns how."""
        if self.kind == "cuda_graphs":
            if sdtm_config is not None and getattr(self.config(sdtm_config), "cuda_graphs", False):
                return "SDTMConfig(cuda_graphs=True)"  # apply_sdtm enables them
            if self.args.device.type == "cuda":
                self.graphs.enable_cuda_graphs(transformer)
            else:
                self.graphs.enable_cuda_graphs(transformer, capture=RerunCapture())
            return "enable_cuda_graphs(transformer)"
        return "blocks compiled"

    def finish(self, transformer) -> None:
        """After SDTM is applied: compile the blocks (compile path)."""
        if self.kind != "torch.compile":
            return
        import torch

        from sdtm.models import adapter_for

        # Every variant, block form and token count is a compiled variant of the blocks' forward: raise
        # dynamo's limits so that none falls back to eager.
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
        kwargs = dict(backend=self.args.compile_backend)
        if self.mode:
            kwargs["mode"] = self.mode
        for block in adapter_for(transformer).blocks(transformer):
            block.compile(**kwargs)

    def stats(self, transformer) -> dict | None:
        if self.kind != "cuda_graphs" or not hasattr(self.graphs, "graph_stats"):
            return None
        return self.graphs.graph_stats(transformer)


class Variant:
    def __init__(self, name: str, sdtm_config, fast: bool, cache: str | None = None):
        self.name, self.sdtm_config, self.fast, self.cache = name, sdtm_config, fast, cache
        self.transformer = None
        self.generation = None
        self.how = None
        self.step_cache = None  # sdtm.cli.caches.StepCache (--cache: the cache, or "none" to count the blocks)

    def setup(self, base, args, fast_path: FastPath) -> None:
        from sdtm import apply_sdtm

        self.transformer = base if self.name == "unmerged_eager" else shared_copy(base)
        self.generation = make_generation(self.transformer, args)
        if self.cache is not None:
            from sdtm.cli.caches import apply_cache

            self.step_cache = apply_cache(self.cache, self.transformer, args.steps, self.generation.scheduler)
        config = self.sdtm_config
        if self.fast:
            self.how = fast_path.prepare(self.transformer, config)
            config = fast_path.config(config) if config is not None else None
        if config is not None:
            apply_sdtm(self.transformer, config, scheduler=self.generation.scheduler)
        if self.fast:
            fast_path.finish(self.transformer)

    def __call__(self, timer: StepTimer | None = None):
        return self.generation(timer)


def default_config(args):
    """SDTM's defaults with the family's switch step (None: resolved when the step count is known)."""
    from sdtm import SDTMConfig

    return SDTMConfig(backend=args.backend, switch_step=None)


def resolved(args, config):
    """``config`` with the family's switch step for ``args.steps`` steps, as apply_sdtm resolves it."""
    adapter, _ = model_entry(args)
    return adapter.resolve_config(config, args.steps)


def variant_names(args) -> tuple[str, ...]:
    return CACHE_VARIANTS if args.cache else VARIANTS


def variants(args) -> list[Variant]:
    default = default_config(args)
    if args.cache:
        return [Variant("unmerged_eager", None, False, "none"), Variant("cache_eager", None, False, args.cache),
                Variant("sdtm_eager", default, False, "none"), Variant("both_eager", default, False, args.cache)]
    aggressive = default.replace(**AGGRESSIVE)
    specs = {"unmerged_eager": (None, False), "unmerged_fast": (None, True), "sdtm_eager": (default, False),
             "sdtm_fast": (default, True), "sdtm_aggressive_eager": (aggressive, False),
             "sdtm_aggressive_fast": (aggressive, True)}
    names = [n for n in PRIORITY if not (args.skip_aggressive and "aggressive" in n)]
    return [Variant(name, *specs[name]) for name in names]


# ---------------------------------------------------------------------------------------------- report


def step_phases(steps: int, default=None) -> list[str]:
    """Each step's phase under ``default`` (an SDTMConfig with a switch step; None: SDTM's defaults, switch
    step 20): protected, structure or detail."""
    from sdtm import SDTMConfig
    from sdtm.core.schedule import Phase, is_protected_step, phase_at_step

    default = default or SDTMConfig()
    return ["protected" if is_protected_step(default, s) else
            ("structure" if phase_at_step(default, s) is Phase.STRUCTURE else "detail") for s in range(steps)]


def phase_medians(step_ms: list[float], phases: list[str]) -> dict[str, float | None]:
    out = {}
    for phase in PHASES:
        values = [ms for ms, p in zip(step_ms, phases) if p == phase]
        out[phase] = round(statistics.median(values), 4) if values else None
    return out


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "diffusers"):
        try:
            out[name] = __import__(name).__version__
        except Exception as error:  # not installed, or broken
            out[name] = None
            out[f"{name}_error"] = f"{type(error).__name__}: {error}"
    out["commit"] = tree_state()["commit"]
    return out


# Untracked paths the check itself brings or writes: not a change to the code that ran.
TREE_IGNORED = (".whl/", "benchmarks/results/")


def tree_state() -> dict:
    """The commit that ran and whether the working tree differed from it (``git status --porcelain``, the
    paths under TREE_IGNORED left out; ``changed``: the first 20 paths); "unknown" where git cannot tell."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                                capture_output=True, text=True, timeout=30)
        if commit.returncode != 0 or status.returncode != 0 or not commit.stdout.strip():
            raise RuntimeError((commit.stderr or status.stderr).strip() or "git failed")
    except Exception as error:  # no git, or not a repository (a copied working tree)
        return {"commit": "unknown", "dirty": "unknown", "changed": None,
                "note": f"git cannot tell ({type(error).__name__}: {error})"}
    changed = []
    for line in status.stdout.splitlines():
        path = line[3:].split(" -> ")[-1].strip('"')
        if path and not path.startswith(TREE_IGNORED):
            changed.append(path)
    return {"commit": commit.stdout.strip(), "dirty": bool(changed), "changed": changed[:20],
            "changed_count": len(changed), "ignored": list(TREE_IGNORED)}


def relative_difference(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class Report:
    """The JSON document, written after every stage."""

    def __init__(self, args, path: Path):
        self.args, self.path = args, path
        self.data: dict = {}

    def write(self, status: str) -> None:
        self.data["status"] = status
        self.data["script_seconds"] = round(Elapsed.total(), 3)
        started = self.args.started_at
        self.data["wall_seconds"] = round(time.time() - started if started else Elapsed.total(), 3)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)
        out = os.environ.get("OUT")
        if out and not self.args.no_out_copy:
            try:
                Path(out).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.path, Path(out) / self.path.name)
            except OSError as error:
                print(f"could not copy the JSON into $OUT ({error})", file=sys.stderr)


def round_stats(values: list[float]) -> dict:
    """min / median / max seconds of a variant's timed rounds, and how many there were."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "rounds": len(values)}


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def summarise(data: dict) -> str:
    s, sp, rs = data["seconds"], data["speedup"], data["realised_share"]
    first, phase, mem = data["first_generation_seconds"], data["per_phase_ms"], data["peak_memory_bytes"]
    settings = data["settings"]
    lines = [
        f"{data.get('model', next(iter(gpu_models()), 'the default model'))} on {data['device']}: torch {data['torch']}, triton {data['triton']}, {settings['dtype']}, "
        f"{settings['size'][0]}x{settings['size'][1]}, {settings['steps']} steps, batch {settings['batch']}, "
        f"{settings['rounds'] or 0} rounds; fast path {data['fast_path']}",
        f"MAC ratio {data['mac_ratio']:.3f} (defaults), {data['mac_ratio_aggressive']:.3f} (aggressive)"
        if data.get("mac_ratio") and data.get("mac_ratio_aggressive") else f"MAC ratio {data.get('mac_ratio')}",
        f"{'variant':24}{'median s':>10}{'min s':>9}{'max s':>9}{'speedup':>9}{'of MACs':>9}{'first s':>9}"
        f"{'prot ms':>9}{'struct ms':>10}{'detail ms':>10}{'peak GiB':>9}",
    ]

    def fmt(value, spec):
        if isinstance(value, (int, float)):
            return format(value, spec)
        return "-".rjust(int(re.match(r"\d*", spec).group() or 0))

    for name in data.get("variants") or VARIANTS:
        p = phase.get(name) or {}
        gib = mem.get(name) / 2**30 if isinstance(mem.get(name), (int, float)) else None
        st = (data.get("seconds_stats") or {}).get(name) or {}
        lines.append(f"{name:24}{fmt(s.get(name), '10.3f')}{fmt(st.get('min'), '9.3f')}{fmt(st.get('max'), '9.3f')}"
                     f"{fmt(sp.get(name), '9.3f')}"
                     f"{fmt(rs.get(name), '9.1%')}{fmt(first.get(name), '9.2f')}"
                     f"{fmt(p.get('protected'), '9.2f')}{fmt(p.get('structure'), '10.2f')}"
                     f"{fmt(p.get('detail'), '10.2f')}{fmt(gib, '9.2f')}")
    stacking = data.get("stacking") or {}
    if stacking:
        schedule = stacking.get("schedule") or {}
        lines.append(f"cache {data.get('cache')}: {schedule.get('description')}; {schedule.get('computed_steps')} of "
                     f"{schedule.get('steps')} steps computed")
        for name, done in (stacking.get("computed") or {}).items():
            records = (stacking.get("sdtm_records") or {}).get(name)
            lines.append(f"  {name:22}block calls computed {done['computed_block_calls']}/{done['block_calls']}, "
                         f"steps with every block {done['computed_steps']}/{done['steps']}"
                         + (f", SDTM records {records}" if records else ""))
        efficiency = data.get("stacking_efficiency")
        lines.append("stacking efficiency speedup(both) / (speedup(cache) x speedup(sdtm)): "
                     + (f"{efficiency:.3f}" if isinstance(efficiency, (int, float)) else "-"))
    tests = data.get("tests") or {}
    if tests.get("exit_code") is not None:
        lines.append(f"tests: exit {tests['exit_code']}, {tests.get('summary')}")
    for name, error in data.get("errors", {}).items():
        lines.append(f"error in {name}: {error}")
    for name, why in data.get("skipped", {}).items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def run(args, report: Report, elapsed: Elapsed) -> None:
    import torch

    from sdtm.cli.macs import schedule_macs

    cuda = args.device.type == "cuda"
    clock = Clock(args.device)
    data = report.data
    name = device_name(args.device)
    info = versions()
    fast_path = FastPath(args)
    _, preset = model_entry(args)
    default = resolved(args, default_config(args))
    phases = step_phases(args.steps, default)
    names = variant_names(args)
    empty = {v: None for v in names}
    if args.cache == "cache-dit":
        try:
            from sdtm.cli.caches import import_cache_dit

            info["cache_dit"] = getattr(import_cache_dit(), "__version__", None)
        except Exception as error:  # the cache variants record the error
            info["cache_dit"], info["cache_dit_error"] = None, f"{type(error).__name__}: {error}"
    data.update({
        "model": args.model, "device": name, "torch": info["torch"], "triton": info.get("triton"), "versions": info,
        "tree": tree_state(), "passed": None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fast_path": fast_path.kind, "fast_path_detail": fast_path.detail, "fast_path_note": fast_path.note,
        "settings": {"model": preset.gpu_check if args.tiny else f"{args.model}, random weights",
                     "size": [args.size, args.size], "latent": [args.size // 8, args.size // 8],
                     "frames": args.frames, "token_frames": args.token_frames,
                     "steps": args.steps, "batch": args.batch, "dtype": args.dtype, "text_tokens": text_tokens(args),
                     "switch_step": default.switch_step,
                     "rounds": None, "rounds_requested": args.rounds, "backend": args.backend,
                     "fast": args.fast, "seed": args.seed, "budget_seconds": args.budget,
                     "aggressive": AGGRESSIVE, "skip_aggressive": args.skip_aggressive, "cache": args.cache},
        "variants": list(names), "cache": args.cache,
        "tests": {"exit_code": args.tests_exit_code, "summary": args.tests_summary,
                  "seconds": args.tests_seconds},
        "mac_ratio": None, "mac_ratio_aggressive": None,
        "seconds": dict(empty), "speedup": {}, "realised_share": {}, "fast_path_gain": {},
        "first_generation_seconds": dict(empty), "per_phase_ms": dict(empty), "per_step_ms": dict(empty),
        "step_phases": phases, "peak_memory_bytes": dict(empty), "memory": {}, "graph_stats": {},
        "per_step_source": ("one extra instrumented generation per variant (after its warm-up, before the timed "
                            "rounds), an event around every transformer call; not one of the timed rounds"),
        "output_check": {}, "round_seconds": {}, "seconds_stats": dict(empty), "errors": {}, "skipped": {},
        "stages_seconds": elapsed.stages,
        "shell_seconds": {"install": args.install_seconds, "tests": args.tests_seconds},
    })
    if args.cache:
        data.update({"fast_path": "none", "fast_path_note": None, "stacking_efficiency": None, "stacking": {},
                     "fast_path_detail": "eager only: CUDA graphs cannot replay the blocks a step cache skips"})
    elif fast_path.note:
        print(f"note: {fast_path.note}; the fast path is torch.compile", flush=True)
    print(f"{args.model}: {name}, {args.dtype}, {args.size}x{args.size}, {args.steps} steps, batch {args.batch}, "
          f"fast path {data['fast_path']} ({data['fast_path_detail']})"
          + (f", cache {args.cache}" if args.cache else ""), flush=True)
    if cuda and not args.tiny and preset.h100_step_seconds is not None:
        per_gen = preset.h100_step_seconds * args.steps * (args.size / 1024) ** 2 * args.batch / preset.batch
        count = 4 if args.cache else 6 - 2 * args.skip_aggressive
        # A warm-up is about 1.5 generations (graph capture, Triton compilation), then one instrumented
        # generation and the rounds; SDTM's eager generations are assumed no faster than unmerged ones.
        print(f"expected on an H100: about {30 + count * per_gen * (2.5 + args.rounds):.0f} s in all "
              f"({per_gen:.1f} s per unmerged generation)", flush=True)

    elapsed.begin("build the transformer")
    base, config = build_transformer(args)

    elapsed.begin("MAC count (meta device)")
    data["macs"] = {}
    for key, sdtm_config in (("mac_ratio", default), ("mac_ratio_aggressive", default.replace(**AGGRESSIVE))):
        try:
            counted = schedule_macs(config, args.size, args.size, args.steps, batch=args.batch, sdtm=sdtm_config,
                                    text_tokens=text_tokens(args), frames=args.frames)
        except Exception as error:  # the timing goes on without the ratio
            data["errors"][key] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
            continue
        data[key] = counted.mac_ratio
        data["macs"][key] = {"baseline_macs": counted.baseline_macs, "sdtm_macs": counted.sdtm_macs}
        print(f"  {key} {counted.mac_ratio:.3f} ({counted.baseline_macs / 1e9:.1f} -> "
              f"{counted.sdtm_macs / 1e9:.1f} GMACs)", flush=True)
    mac_for = {"sdtm_eager": data["mac_ratio"], "sdtm_fast": data["mac_ratio"], "both_eager": None, "cache_eager": None,
               "sdtm_aggressive_eager": data["mac_ratio_aggressive"],
               "sdtm_aggressive_fast": data["mac_ratio_aggressive"]}
    report.write("running")

    runs = variants(args)
    for v in names:
        if v not in {r.name for r in runs}:
            data["skipped"][v] = "--skip-aggressive"
    clock.sync()
    base_bytes = torch.cuda.memory_allocated(args.device) if cuda else None
    data["memory"] = {
        "base_bytes": base_bytes, "persistent_bytes": {}, "reserved_growth_bytes": {}, "peak_reserved_bytes": {},
        "allocated_before_bytes": {}, "reserved_before_bytes": {},
        "note": ("measured, not estimated: torch.cuda.reset_peak_memory_stats before the variant's warm-up (setup, "
                 "first generation: graph capture and its pool included) and again before its instrumented "
                 "generation; peak_memory_bytes is the larger torch.cuda.max_memory_allocated of the two, "
                 "peak_reserved_bytes the larger max_memory_reserved (CUDA graph pools count there). Both include "
                 "what was resident before the variant (allocated_before_bytes: the weights, the inputs and the "
                 "state of the variants set up before it, in the order of 'variants')") if cuda else
                "null: no CUDA device (torch.cuda memory statistics exist on CUDA only)"}
    if not cuda:
        data["peak_memory_note"] = data["memory"]["note"]

    def reset_peak():
        clock.sync()
        torch.cuda.reset_peak_memory_stats(args.device)

    def record_peak(variant_name):
        clock.sync()
        mem = data["memory"]
        allocated = torch.cuda.max_memory_allocated(args.device)
        reserved = torch.cuda.max_memory_reserved(args.device)
        data["peak_memory_bytes"][variant_name] = max(allocated, data["peak_memory_bytes"][variant_name] or 0)
        mem["peak_reserved_bytes"][variant_name] = max(reserved, mem["peak_reserved_bytes"].get(variant_name, 0))

    report.write("running")

    elapsed.begin("warm-up: the first generation of each variant")
    ready: list[Variant] = []
    for variant in runs:
        always = names if args.cache else ALWAYS_RUN
        if variant.name not in always and args.budget and Elapsed.total() > WARMUP_SHARE * args.budget:
            data["skipped"][variant.name] = (f"budget: {Elapsed.total():.0f} s of {args.budget:.0f} s spent "
                                             "before its warm-up")
            print(f"  skipping {variant.name}: {data['skipped'][variant.name]}", flush=True)
            continue
        try:
            clock.sync()
            if cuda:
                reset_peak()
                before = torch.cuda.memory_allocated(args.device)
                reserved = torch.cuda.memory_reserved(args.device)
                data["memory"]["allocated_before_bytes"][variant.name] = before
                data["memory"]["reserved_before_bytes"][variant.name] = reserved
            variant.setup(base, args, fast_path)
            seconds, _ = clock.time(variant)
            if cuda:
                record_peak(variant.name)
                data["memory"]["persistent_bytes"][variant.name] = torch.cuda.memory_allocated(args.device) - before
                data["memory"]["reserved_growth_bytes"][variant.name] = (torch.cuda.memory_reserved(args.device)
                                                                         - reserved)
        except Exception as error:
            data["errors"][variant.name] = f"{type(error).__name__}: {error}"
            print(f"  {variant.name} failed:\n{traceback.format_exc()}", flush=True)
            continue
        data["first_generation_seconds"][variant.name] = seconds
        if variant.how:
            data.setdefault("fast_path_enabled_by", {})[variant.name] = variant.how
        ready.append(variant)
        print(f"  {variant.name:24} first generation {seconds:8.3f} s", flush=True)
        report.write("running")

    elapsed.begin("one generation per variant with an event around every transformer call")
    outputs = {}
    generation_seconds = {}
    for variant in list(ready):
        try:
            timer = StepTimer(clock)
            if cuda:
                reset_peak()
            wall = time.perf_counter()
            out = variant(timer)
            step_ms = timer.milliseconds()
            generation_seconds[variant.name] = time.perf_counter() - wall
            if cuda:
                record_peak(variant.name)
        except Exception as error:
            data["errors"][variant.name] = f"{type(error).__name__}: {error}"
            print(f"  {variant.name} failed:\n{traceback.format_exc()}", flush=True)
            ready.remove(variant)
            continue
        outputs[variant.name] = out
        data["per_step_ms"][variant.name] = [round(ms, 4) for ms in step_ms]
        data["per_phase_ms"][variant.name] = phase_medians(step_ms, phases)
        p = data["per_phase_ms"][variant.name]
        print(f"  {variant.name:24} " + "  ".join(f"{k} {v:.2f} ms" if v is not None else f"{k} -"
                                                   for k, v in p.items()), flush=True)
    for variant in ready:
        stats = fast_path.stats(variant.transformer) if variant.fast else None
        if stats is not None:
            data["graph_stats"][variant.name] = stats
    backend_check(args, base, default, outputs, data)
    check_outputs(args, fast_path, outputs, data)
    outputs.clear()
    report.write("running")

    elapsed.begin("timed rounds, interleaved")
    per_round = sum(generation_seconds.values())
    rounds = args.rounds
    if args.budget:
        left = args.budget - Elapsed.total() - 5.0
        rounds = max(0, min(rounds, int(left // per_round))) if per_round > 0 else rounds
    data["settings"]["rounds"] = rounds
    times: dict[str, list[float]] = {v.name: [] for v in ready}
    if rounds < args.rounds:
        print(f"  budget: {rounds} of {args.rounds} rounds fit ({per_round:.1f} s a round)", flush=True)
    for r in range(rounds):
        for variant in ready:
            if variant.name in data["errors"]:
                continue
            try:
                seconds, _ = clock.time(variant)
            except Exception as error:
                data["errors"][variant.name] = f"{type(error).__name__}: {error}"
                print(f"  {variant.name} failed:\n{traceback.format_exc()}", flush=True)
                continue
            times[variant.name].append(seconds)
        data["round_seconds"] = {k: [round(s, 5) for s in v] for k, v in times.items()}
        for k, v in times.items():
            if v:
                data["seconds"][k] = statistics.median(v)
                data["seconds_stats"][k] = round_stats(v)
        fill_ratios(data, mac_for)
        fill_stacking(data, ready)
        report.write("running")
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items() if v),
              flush=True)
    if rounds == 0:
        data["seconds_source"] = "the instrumented generation, wall clock (no timed round fitted the budget)"
        for variant in ready:
            data["seconds"][variant.name] = generation_seconds[variant.name]
        fill_ratios(data, mac_for)
        fill_stacking(data, ready)
    else:
        data["seconds_source"] = (f"median of {rounds} interleaved rounds (seconds_stats: min / median / max; "
                                  "round_seconds: every round)")
    for variant in ready:
        stats = fast_path.stats(variant.transformer) if variant.fast else None
        if stats is not None:
            data["graph_stats"][variant.name] = stats
    elapsed.end()


def backend_check(args, base, default, outputs: dict, data: dict) -> None:
    """One more eager SDTM generation with the torch backend (the reference ops), at the run's size, whose final
    latents sdtm_eager's (--backend: triton on CUDA) are compared with in ``check_outputs``."""
    if args.cache or "sdtm_eager" not in outputs:
        return
    if args.backend == "torch":
        data["output_check_backend"] = {"checked": False, "why": "--backend torch: sdtm_eager is the torch path"}
        return
    reference = Variant("sdtm_eager_torch_backend", default.replace(backend="torch"), False)
    try:
        reference.setup(base, args, None)
        outputs["sdtm_eager_torch_backend"] = reference()
    except Exception as error:
        data["errors"]["sdtm_eager_torch_backend"] = f"{type(error).__name__}: {error}"
        print(f"  the torch-backend reference failed:\n{traceback.format_exc()}", flush=True)
    data["output_check_backend"] = {"checked": "sdtm_eager_torch_backend" in outputs, "backend": args.backend,
                                    "reference_backend": "torch", "variant": "sdtm_eager",
                                    "size": [args.size, args.size], "steps": args.steps}


def check_outputs(args, fast_path, outputs: dict, data: dict) -> None:
    """Each variant's final latents: finite; on the fast path, within the fast tolerance of the same variant
    eager; sdtm_eager within the backend tolerance of the torch backend. What is past them goes into
    ``output_check_failures`` (the run then fails); the difference with unmerged_eager is recorded only."""
    import torch

    fast_tolerance = args.fast_tolerance
    if fast_tolerance is None:
        fast_tolerance = 0.01 if fast_path.kind == "cuda_graphs" else 0.05
    data["output_check_tolerances"] = {
        "measure": "relative difference of the final latents, ||a - b|| / ||b|| (float64)",
        "fast_vs_eager": fast_tolerance, "backend_vs_torch": args.backend_tolerance,
        "note": "every output must be finite; relative_difference_vs_unmerged is recorded, not checked "
                "(SDTM changes the output by design)"}
    failures = []
    reference = outputs.pop("sdtm_eager_torch_backend", None)
    for name, out in outputs.items():
        check = {"finite": bool(torch.isfinite(out).all())}
        if not check["finite"]:
            failures.append(f"{name}: the output is not finite")
        eager = name.replace("_fast", "_eager")
        if name.endswith("_fast") and eager in outputs:
            difference = relative_difference(out, outputs[eager])
            check["relative_difference_vs_eager"] = difference
            check["within_tolerance"] = difference <= fast_tolerance
            if not check["within_tolerance"]:
                failures.append(f"{name}: relative difference {difference:.3g} with {eager} is past "
                                f"{fast_tolerance:g}")
        if name == "sdtm_eager" and reference is not None:
            difference = relative_difference(out, reference)
            check["relative_difference_vs_torch_backend"] = difference
            check["within_backend_tolerance"] = difference <= args.backend_tolerance
            if not check["within_backend_tolerance"]:
                failures.append(f"sdtm_eager: relative difference {difference:.3g} of backend {args.backend!r} with "
                                f"the torch backend is past {args.backend_tolerance:g}")
        if name != "unmerged_eager" and not name.startswith("unmerged") and "unmerged_eager" in outputs:
            check["relative_difference_vs_unmerged"] = relative_difference(out, outputs["unmerged_eager"])
        data["output_check"][name] = check
    data["output_check_failures"] = failures
    for failure in failures:
        print(f"  OUTPUT CHECK FAILED: {failure}", flush=True)


def fill_stacking(data: dict, ready: list) -> None:
    """--cache: the cache's schedule, what each variant computed in its last generation and SDTM's records."""
    if not data.get("cache"):
        return
    from sdtm.cli.caches import sdtm_record_counts

    computed, schedule = {}, None
    for variant in ready:
        if variant.step_cache is None:
            continue
        done = variant.step_cache.report()
        if variant.name == "cache_eager":
            schedule = done["schedule"]
        computed[variant.name] = {k: v for k, v in done.items() if k != "schedule"}
    data["stacking"] = {
        "schedule": schedule, "computed": computed,
        "sdtm_records": {v.name: sdtm_record_counts(v.transformer) for v in ready if v.sdtm_config is not None},
    }


def fill_ratios(data: dict, mac_for: dict) -> None:
    s = data["seconds"]
    if data.get("cache"):  # the four stacking variants, each over unmerged_eager
        speedup = {name: ratio(s.get("unmerged_eager"), s.get(name)) for name in CACHE_VARIANTS[1:]}
        data["speedup"] = speedup
        data["realised_share"] = {"sdtm_eager": ratio(speedup["sdtm_eager"], mac_for["sdtm_eager"])}
        product = (speedup["cache_eager"] * speedup["sdtm_eager"]
                   if speedup["cache_eager"] is not None and speedup["sdtm_eager"] is not None else None)
        data["stacking_efficiency"] = ratio(speedup["both_eager"], product)
        data["fast_path_gain"] = {}
        return
    speedup = {}
    for name in ("sdtm_eager", "sdtm_fast", "sdtm_aggressive_eager", "sdtm_aggressive_fast"):
        reference = "unmerged_fast" if name.endswith("_fast") else "unmerged_eager"
        speedup[name] = ratio(s.get(reference), s.get(name))
    data["speedup"] = speedup
    data["realised_share"] = {name: ratio(value, mac_for[name]) for name, value in speedup.items()}
    data["fast_path_gain"] = {
        "unmerged": ratio(s.get("unmerged_eager"), s.get("unmerged_fast")),
        "sdtm": ratio(s.get("sdtm_eager"), s.get("sdtm_fast")),
        "sdtm_aggressive": ratio(s.get("sdtm_aggressive_eager"), s.get("sdtm_aggressive_fast")),
        "sdtm_fast_vs_unmerged_eager": ratio(s.get("unmerged_eager"), s.get("sdtm_fast")),
    }


def output_path(args) -> Path:
    """--json, or gpu-<date>-<device>.json in --out-dir (gpu-<date>-<model>-<device>.json for a model
    other than the default; gpu-<date>[-<model>]-<cache>-<device>.json with --cache), after ``resolve``."""
    if args.json:
        return Path(args.json)
    name = device_name(args.device) if args.device.type == "cuda" else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    model = "" if args.model == next(iter(gpu_models())) else f"{args.model}-"
    cache = f"{args.cache}-" if args.cache else ""
    return Path(args.out_dir) / f"gpu-{date}-{model}{cache}{slug(name)}.json"


def main(argv=None) -> int:
    args = parse_args(argv)
    elapsed = Elapsed()
    elapsed.begin("import torch, diffusers and sdtm")
    args = resolve(args)
    import diffusers  # noqa: F401 (timed here rather than inside the first stage that needs it)

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    report = Report(args, output_path(args))
    status = "complete"
    try:
        run(args, report, elapsed)
    except KeyboardInterrupt:
        status = "interrupted"
        print("interrupted: writing what was measured", file=sys.stderr)
    except Exception as error:
        status = "failed"
        report.data.setdefault("errors", {})["run"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    elapsed.end()
    failures = list(report.data.get("output_check_failures") or [])
    if status != "complete":
        failures.insert(0, f"the run is {status}")
    report.data["passed"] = not failures
    report.data["failure"] = "; ".join(failures) or None
    report.write(status)
    try:
        print(summarise(report.data))
    except Exception as error:  # a report cut short: the JSON is what matters
        print(f"(no summary: {type(error).__name__}: {error})")
    print(f"wrote {report.path} ({status}) after {Elapsed.total():.1f} s")
    if failures:
        print(f"FAILED: {report.data['failure']}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
