"""The ``sdtm`` command line (also ``python -m sdtm``): demo, generate, macs, bench.

Bad arguments exit with code 2 and one line saying what is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import Callable

from .cli_options import add_sdtm_options, config_from_args, positive_int
from ..models import default_family, families, family, presets


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message (``sdtm <command>: <reason>``) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message}\n")


def _even(text: str) -> int:
    value = positive_int(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"must be even, got {value}")
    return value


def _families_text(describe: Callable, names) -> str:
    """``describe(adapter)`` for each registered family of ``names``, joined."""
    return "; ".join(f"{adapter.name}: {describe(adapter)}" for adapter in families() if adapter.name in names)


def _demo_family(adapter) -> str:
    from .demo import demo_model

    demo = demo_model(adapter)
    if demo.batch == 2:
        batch = "classifier-free guidance, batch 2"
    else:
        batch = "guidance-distilled, batch 1" if adapter.distilled_guidance else "classifier-free guidance, a call per branch"
    switch = adapter.demo_switch_step(50)
    switch = (f"switch step {switch} of 50 steps, in proportion" if switch is not None
              else f"the family's switch step ({adapter.describe_switch_step()})")
    return f"{demo.title} ({batch}; {switch})"


def _demo_sizes(adapter) -> str:
    rule = adapter.tiny_size_rule(adapter.demo_spec)
    limit = f", at most {rule.max_side}" if rule.max_side is not None else ""
    return f"multiples of {rule.multiple}{limit}"


def _add_demo(commands) -> None:
    from .demo import DEMO_MODELS

    default = default_family().name
    demo = commands.add_parser(
        "demo", help="generate on a tiny built-in pipeline of a model family with and without SDTM and compare",
        description="Builds a tiny pipeline of the --model family from config (random weights, no downloads), "
                    "generates with and without SDTM, prints latency, MACs, speedup and tokens per phase, and "
                    "writes a PNG (the two images side by side and the tokens per step). "
                    + _families_text(_demo_family, DEMO_MODELS).replace("%", "%%") + ".")
    demo.add_argument("--model", choices=list(DEMO_MODELS), default=default,
                      help=f"model family of the tiny pipeline (default {default})")
    demo.add_argument("--size", type=_even, default=None,
                      help="image side in pixels (default: the family's, "
                           + ", ".join(f"{a.name} {a.demo_size}" for a in families() if a.name in DEMO_MODELS)
                           + "; " + _families_text(_demo_sizes, DEMO_MODELS) + ")")
    demo.add_argument("--steps", type=positive_int, default=12, help="denoising steps (default 12)")
    demo.add_argument("--repeats", type=positive_int, default=3, help="timed runs of each variant (default 3)")
    demo.add_argument("--backend", choices=["auto", "torch", "cpp", "triton"], default="auto")
    demo.add_argument("--out", default=".", help="folder for sdtm_demo.png (default: the current folder)")
    _add_cache_option(demo, "a step cache stacked with SDTM (sdtm.cli.caches, a deterministic schedule computing "
                            "about 70%% of the steps): four variants instead of two (unmerged, the cache alone, "
                            "SDTM alone, both), with the block calls each computed and the stacking efficiency; "
                            f"fbcache: {_fbcache_families()}; cache-dit: the [cache] extra (default: none, no cache)")


def _fbcache_families() -> str:
    from .caches import runs_on

    return " and ".join(runs_on("fbcache"))


def _add_macs(commands) -> None:
    macs = commands.add_parser(
        "macs", help="theoretical MACs of a whole schedule, unmerged and with SDTM (meta device)",
        description="Counts the multiply-accumulates of every transformer call of a generation on the meta "
                    "device (no weights, no memory), without and with SDTM, with a per-phase breakdown.")
    macs.add_argument("--config", required=True,
                      help=f"{', '.join(presets())}, a transformer config.json or a diffusers folder")
    macs.add_argument("--height", type=positive_int, default=1024)
    macs.add_argument("--width", type=positive_int, default=1024)
    macs.add_argument("--steps", type=positive_int, default=50)
    videos = ", ".join(f"{a.name} {a.default_frames}" for a in families() if a.video)
    macs.add_argument("--frames", type=positive_int, default=None,
                      help=f"generated frames of a video model (default: the family's: {videos}; images: 1)")
    macs.add_argument("--batch", type=positive_int, default=2,
                      help="batch per transformer call (2 with CFG: one call of a pair, or two calls of one)")
    text_tokens = ", ".join(f"{adapter.text_tokens(preset.config)} {name}" for name, (adapter, preset) in presets().items())
    macs.add_argument("--text-tokens", type=positive_int,
                      help=f"text tokens (default: the model family's pipeline's: {text_tokens})")
    macs.add_argument("--json", action="store_true", help="print one JSON object")
    macs.add_argument("--plot", help="write tokens and MACs per step to this PNG")
    add_sdtm_options(macs, with_disable=False, family_switch_step=True)


# Options of `sdtm bench host` (those of _STACKING_OPTIONS also of `sdtm bench e2e --cache`): (flag, type,
# default, help).
_HOST_OPTIONS = (
    ("--steps", positive_int, 12, "denoising steps (host: default 12; e2e --cache: default 10)"),
    ("--switch-step", int, 5, "last structure-phase step (default 5: protected, structure and detail steps)"),
    ("--layers", positive_int, 24, "blocks (host: default 24, as the host topology's released model; e2e --cache: "
                                   "the --model's shrunk transformer's: the first kind of blocks where a family "
                                   "has two)"),
    ("--grid", positive_int, 16, "image token grid side (host: default 16: 16x16 tokens; e2e --cache: default 32)"),
    ("--text-tokens", positive_int, 16, "text tokens (default 16)"),
    ("--heads", positive_int, 1, "attention heads (host: default 1; e2e --cache: the --model's shrunk "
                                 "transformer's)"),
    ("--head-dim", positive_int, 16, "width of a head (default 16)"),
    ("--ratio", float, 0.3, "SDTM's ratio (default 0.3, as apply_SDTM)"),
    ("--deviation", float, 0.2, "SDTM's deviation (default 0.2, as apply_SDTM)"),
    ("--threads", positive_int, 1, "torch CPU threads while timing (host: default 1; e2e --cache: default "
                                   "torch's)"),
    ("--compile", str, "eager", "torch.compile backend of the compiled variants: eager (default: dynamo's "
                                "graphs, quickest to compile), aot_eager (plus AOT autograd's functionalisation "
                                "and runtime wrappers), inductor, or none (eager variants only)"),
)


_STACKING_OPTIONS = ("--steps", "--grid", "--layers", "--heads", "--threads")


def _add_cache_option(parser, help_text: str) -> None:
    from .caches import CACHES

    parser.add_argument("--cache", choices=CACHES, default=None, help=help_text)


def _add_bench(commands) -> None:
    bench = commands.add_parser(
        "bench", help="time the backends on this machine (kernels, one block's SDTM share, end to end, or "
                      "the host's cost per step)",
        description="Times each available backend on this machine, rounds interleaved, and reports medians "
                    "and ratios with the machine's description. e2e: a transformer of the --model family's "
                    "shape, shrunk for the CPU, over a whole denoising schedule, unmerged and with SDTM per "
                    "backend, against the theoretical MAC ratio (meta device); and SDTM at ratio 0.5 in "
                    "every step against the unmerged model on as many tokens. host: a released model's topology "
                    "(the first family with one) with tensors shrunk until compute is small, unmerged and SDTM per backend, eager and compiled: host "
                    "time per denoising step and launches (dispatched ops) per step and per block by phase.")
    bench.add_argument("what", choices=["kernels", "block", "e2e", "host"])
    from .bench import E2E_MODELS

    bench.add_argument("--model", choices=list(E2E_MODELS), default=None,
                       help=f"e2e only: the transformer's family (default {default_family().name}): "
                            + _families_text(lambda adapter: adapter.bench_help, E2E_MODELS)
                            + "; 64x64 tokens, 10 steps, SDTM's defaults with the family's switch step")
    bench.add_argument("--rounds", type=positive_int, default=5)
    bench.add_argument("--backends", nargs="+", choices=["torch", "cpp", "triton"], default=None,
                       help="backends to compare (kernels: default every one available here, torch always "
                            "timed as the reference; block, e2e: default torch and cpp, run on the CPU; host: "
                            "default torch and cpp on the CPU, and triton where a CUDA device is)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.add_argument("--plot", help="write a bar chart of the speedups to this PNG")
    _add_cache_option(bench, "e2e only: a step cache stacked with SDTM instead of the backend comparison: four "
                             "variants in interleaved rounds (unmerged, the cache alone, SDTM alone, both) on a "
                             "deterministic cache schedule (about 70%% of the steps computed), with the steps and "
                             "blocks each computed and the stacking efficiency speedup(both) / (speedup(cache) x "
                             f"speedup(sdtm)); fbcache: {_fbcache_families()}; cache-dit: the [cache] extra; none: the "
                             "control (no cache). 32x32 tokens, 10 steps by default (--grid, --steps, --layers, "
                             "--heads, --threads); one SDTM backend (--backends, default cpp when built, else torch)")
    host = bench.add_argument_group("host (and e2e --cache) options")
    for flag, kind, default, text in _HOST_OPTIONS:
        host.add_argument(flag, type=kind, default=None, help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdtm", description="Structure-then-Detail Token Merging for diffusion transformers "
                                              f"({', '.join(a.title for a in families())}).")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_demo(commands)
    from . import generate

    generate.add_parser(commands)
    _add_macs(commands)
    _add_bench(commands)
    return parser


def _check_plot_path(path: str) -> None:
    """Raise a ValueError unless ``path`` names a file that can be written as a plot: an image extension
    matplotlib writes, in an existing writable folder, not a folder itself."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"--plot {path!r} is a folder; name a file in it, such as {os.path.join(path, 'plot.png')!r}.")
    if not os.path.isdir(folder):
        raise ValueError(f"--plot {path!r}: the folder {folder!r} does not exist; create it first.")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--plot {path!r}: the folder {folder!r} is not writable.")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    if extension not in formats:
        raise ValueError(f"--plot {path!r} must end in an image extension matplotlib writes "
                         f"({', '.join('.' + f for f in sorted(formats))}), e.g. .png.")


def _write_plot(write: Callable[[str], None], path: str) -> None:
    """Call ``write(path)``; a ValueError saying why when the file cannot be written."""
    try:
        write(path)
    except OSError as error:
        raise ValueError(f"cannot write --plot {path!r}: {error.strerror or error}.") from None


def _run_macs(args) -> int:
    from .macs import format_report, load_config, load_vae_scale, plot_report, schedule_macs

    if args.plot:
        _check_plot_path(args.plot)
    config = load_config(args.config)
    report = schedule_macs(config, args.height, args.width, args.steps, args.batch, config_from_args(args),
                           text_tokens=args.text_tokens, vae_scale=load_vae_scale(args.config), frames=args.frames)
    if args.plot:
        _write_plot(lambda path: plot_report(report, path), args.plot)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(format_report(report, args.config))
    return 0


def _check_demo_args(args) -> None:
    """Raise a ValueError before any work when the demo's options cannot run: an image side the family's
    tiny pipeline refuses (``ModelAdapter.tiny_size_rule``: not a multiple, or larger than its positional
    table), an output folder that is missing or read-only, a backend that does not run on the CPU (where
    the demo runs), a step cache that does not run on the model or is not installed."""
    import torch

    from .caches import check_cache
    from .demo import check_demo_size
    from ..core.ops import ops_for

    if args.size is None:
        args.size = family(args.model).demo_size
    check_demo_size(args.model, args.size)
    if args.cache is not None:
        check_cache(args.cache, args.model)
    if not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} is not a folder.")
    if not os.access(args.out, os.W_OK):
        raise ValueError(f"--out {args.out!r} is not writable.")
    ops_for(args.backend, torch.device("cpu"))


def _quiet_transformers() -> None:
    """Silence transformers' import-time notices (the demo has no text encoders or image processors)."""
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    transformers_logging.set_verbosity_error()


def _run_demo(args) -> int:
    _check_demo_args(args)
    _quiet_transformers()
    from .demo import run_demo

    run_demo(size=args.size, steps=args.steps, repeats=args.repeats, backend=args.backend, out=args.out,
             model=args.model, cache=args.cache or "none")
    return 0


def _host_setting(args):
    """The HostSetting and compile backend of `sdtm bench host`'s options; ValueError for options of host
    given to another benchmark (but those `e2e --cache` takes), or for values that cannot run."""
    given = [flag for flag, *_ in _HOST_OPTIONS if getattr(args, flag[2:].replace("-", "_")) is not None]
    if args.cache is not None and args.what != "e2e":
        raise ValueError(f"--cache: an option of `sdtm bench e2e` only, not of `sdtm bench {args.what}`.")
    if args.what != "host":
        if args.what == "e2e" and args.cache is not None:
            others = [flag for flag in given if flag not in _STACKING_OPTIONS]
            if others:
                raise ValueError(f"{', '.join(others)}: options of `sdtm bench host` only.")
            return None, None
        if given:
            which = " (--steps, --grid, --layers, --heads and --threads also of `sdtm bench e2e --cache`)" if any(
                flag in _STACKING_OPTIONS for flag in given) else ""
            raise ValueError(f"{', '.join(given)}: options of `sdtm bench host` only{which}.")
        return None, None
    values = {flag[2:].replace("-", "_"): default for flag, _, default, _ in _HOST_OPTIONS}
    values.update({k: v for k, v in vars(args).items() if k in values and v is not None})
    from .host_bench import COMPILE_BACKENDS, HostSetting

    compile_backend = values.pop("compile")
    if compile_backend not in COMPILE_BACKENDS + ("none",):
        choices = ", ".join(COMPILE_BACKENDS + ("none",))
        raise ValueError(f"--compile must be one of {choices}, got {compile_backend!r}.")
    return HostSetting(**values), None if compile_backend == "none" else compile_backend


def _run_host_bench(args, setting, compile_backend, requested):
    from .host_bench import bench_host, format_host_report, host_backends

    host_backends(requested)  # a backend that cannot run here fails before any work
    result = bench_host(setting, requested, rounds=args.rounds, compile_backend=compile_backend,
                        progress=not args.json)
    labels, values = [], []
    for mode, per_backend in result["ratios"].items():
        for backend, ratio in per_backend.items():
            labels.append(f"{mode}\n{backend}")
            values.append(ratio["host_time"])
    return result, labels, values, format_host_report(result).splitlines()


def _run_bench(args) -> int:
    from .bench import bench_block_share, bench_e2e, bench_kernels, machine_info

    setting, compile_backend = _host_setting(args)
    if args.model is not None and args.what != "e2e":
        raise ValueError(f"--model: an option of `sdtm bench e2e` only, not of `sdtm bench {args.what}`.")
    if args.plot:
        _check_plot_path(args.plot)
    requested = list(dict.fromkeys(args.backends)) if args.backends else None
    info = machine_info()
    if args.what == "host":
        result, labels, values, text = _run_host_bench(args, setting, compile_backend, requested)
    elif args.what == "kernels":
        rows = bench_kernels([(64, 64), (32, 32), (48, 84)], rounds=args.rounds, progress=not args.json,
                             backends=requested)
        result = {"machine": info, "kernels": [asdict(r) for r in rows]}
        labels = [f"{r.op}\n{r.shape.split('-')[0]} {r.backend}" for r in rows if r.backend != "torch"]
        values = [r.speedup_vs_torch for r in rows if r.backend != "torch"]
        text = [f"{'op':16}{'shape':22}{'backend':9}{'device':7}{'median ms':>11}{'vs torch':>10}"]
        text += [f"{r.op:16}{r.shape:22}{r.backend:9}{r.device:7}{r.median_ms:>11.3f}{r.speedup_vs_torch:>9.2f}x"
                 for r in rows]
    elif args.what == "block":
        backends = requested or ["torch", "cpp"]
        shares = bench_block_share(backends, rounds=args.rounds, progress=not args.json)
        result = {"machine": info, "block": [{**asdict(r), "share": r.share, "net_share": r.net_share}
                                             for r in shares]}
        labels = [f"{r.backend} {r.phase}" for r in shares]
        values = [r.share * 100 for r in shares]
        adapter = default_family()
        text = [f"{adapter.title} block (C={24 * adapter.bench_head_dim}, 64x64 image + {adapter.bench_text_tokens} text "
                "tokens, batch 2): unmerged "
                f"{shares[0].block_seconds * 1e3:.1f} ms, of which {shares[0].replaced_seconds * 1e3:.1f} ms "
                "norm2 + modulation + gates + residual adds; added by SDTM at ratio 0.5 (plan, merges, unmerges):"]
        text += [f"  {r.backend:8}{r.phase:5}{r.added_seconds * 1e3:>9.1f} ms  {r.share:.2%} of the block "
                 f"({r.net_share:.2%} net of the block work the fused ops replace)" for r in shares]
    elif args.cache is not None:
        result, labels, values, text = _run_stacking_bench(args, requested, info)
    else:
        backends = requested or ["torch", "cpp"]
        result = {"machine": info, **bench_e2e(backends, rounds=args.rounds, progress=not args.json,
                                               model=args.model or default_family().name)}
        labels, values = backends, [result["speedup"][b] for b in backends]
        (gh, gw), (sh, sw) = result["grids"]["sdtm"], result["grids"]["unmerged_equal_tokens"]
        shape = result["transformer"]
        text = [f"{shape['title']} (C={shape['channels']}, {shape['blocks']} blocks), {gh}x{gw} tokens + "
                f"{shape['text_tokens']} text tokens, batch {shape['batch']}, {shape['steps']} steps, switch step "
                f"{shape['switch_step']}; MAC ratio {result['mac_ratio']:.3f}",
                f"  unmerged {result['seconds']['unmerged']:.2f} s"]
        text += [f"  {b:8} {result['seconds'][b]:.2f} s  speedup {result['speedup'][b]:.3f}  "
                 f"({result['realised_share'][b]:.1%} of the MAC ratio)" for b in backends]
        text.append(f"ratio 0.5 every step on {gh}x{gw} vs unmerged {sh}x{sw} (equal token counts): "
                    f"{result['overhead_seconds']['unmerged']:.2f} s unmerged")
        text += [f"  {b:8} {result['overhead_seconds'][b]:.2f} s ({result['overhead_added'][b]:+.1%})"
                 for b in backends]
    if args.plot:
        title = ("sdtm bench block: % of the block's time added" if args.what == "block"
                 else "sdtm bench host: host time per step, SDTM / unmerged" if args.what == "host"
                 else f"sdtm bench e2e --cache {args.cache}: speedup over unmerged" if args.cache is not None
                 else f"sdtm bench {args.what}: speedup over torch/unmerged")
        ylabel = {"block": "% of the block's time", "host": "host time ratio"}.get(args.what, "speedup")
        _write_plot(lambda path: _bar_plot(labels, values, path, title, ylabel), args.plot)
    if args.json:
        print(json.dumps(result))
    else:
        shown = result.get("machine") or info
        print(f"machine: {shown['processor']}, {shown['torch_threads']} threads, torch {shown['torch']}, "
              f"GPU {shown['cuda'] or 'none'}")
        print("\n".join(text))
    return 0


def _run_stacking_bench(args, requested, info):
    """`sdtm bench e2e --cache NAME`: the four variants (sdtm.cli.bench.bench_stacking); the result, the
    plot's labels and values, and the text lines."""
    from ..core.ops import cpp_unavailable_reason
    from .bench import bench_stacking

    if requested is not None and len(requested) != 1:
        raise ValueError("--cache times one SDTM backend: give one --backends value (default cpp when built, "
                         "else torch).")
    backend = requested[0] if requested else ("cpp" if cpp_unavailable_reason() is None else "torch")
    options = {key: getattr(args, key) for key in ("steps", "grid") if getattr(args, key) is not None}
    import torch

    previous = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        info = {**info, "torch_threads": torch.get_num_threads()}
        result = {"machine": info, **bench_stacking(
            args.cache, backend, rounds=args.rounds, progress=not args.json, model=args.model or default_family().name,
            num_layers=args.layers, heads=args.heads, **options)}
    finally:
        torch.set_num_threads(previous)
    return result, ["cache", "sdtm", "both"], [result["speedup"][v] for v in ("cache", "sdtm", "both")], \
        stacking_lines(result)


def stacking_lines(result: dict) -> list[str]:
    """The text report of a stacking benchmark (``sdtm.cli.bench.bench_stacking``'s result)."""
    shape, schedule = result["transformer"], result["schedule"]
    grid = shape["grid"]
    lines = [f"{shape['title']} (C={shape['channels']}, {shape['blocks']} blocks), {grid[0]}x{grid[1]} tokens + "
             f"{shape['text_tokens']} text tokens, batch {shape['batch']}, {shape['steps']} steps, switch step "
             f"{shape['switch_step']}; SDTM defaults, backend {result['backend']}; {result['rounds']} rounds",
             f"cache {result['cache']}: {schedule['description']}; {schedule['computed_steps']} of "
             f"{schedule['steps']} steps computed",
             f"  {'variant':10}{'median s':>10}{'speedup':>9}{'block calls computed':>22}{'steps all blocks':>18}"
             f"  SDTM records merged/protected/unchanged/skipped"]
    for name in ("unmerged", "cache", "sdtm", "both"):
        done = result["computed"][name]
        records = (result["sdtm_records"] or {}).get(name)
        counts = "/".join(str(records[m]) for m in ("merged", "protected", "unchanged", "skipped")) if records else "-"
        speedup = f"{result['speedup'][name]:.3f}" if name in result["speedup"] else "1"
        lines.append(f"  {name:10}{result['seconds'][name]:>10.3f}{speedup:>9}"
                     f"{done['computed_block_calls']:>13}/{done['block_calls']:<8}"
                     f"{done['computed_steps']:>10}/{done['steps']:<7}  {counts}")
    lines.append(f"stacking efficiency speedup(both) / (speedup(cache) x speedup(sdtm)): "
                 f"{result['stacking_efficiency']:.3f}")
    return lines


def _bar_plot(labels, values, path: str, title: str, ylabel: str = "speedup") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.9), 4))
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    if ylabel in ("speedup", "host time ratio"):
        ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return _run_demo(args)
        if args.command == "generate":
            from . import generate

            return generate.run(args)
        if args.command == "macs":
            return _run_macs(args)
        return _run_bench(args)
    except ValueError as error:
        print(f"sdtm {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
