"""Command-line options shared by the subcommands: every apply_SDTM setting, and parsing helpers."""

from __future__ import annotations

import argparse
import dataclasses

from ..core.config import BACKENDS, SDTMConfig

_HELP = {
    "ratio": "mean share of image tokens removed, in [0, 1]",
    "deviation": "cosine schedule from ratio+deviation (step 0) to ratio-deviation (last step)",
    "switch_step": "last structure-phase step (SSM); later steps are the detail phase (IDM)",
    "use_rand": "random destination token per window",
    "seed": "seed of SDTM's random destinations, reseeded every generation",
    "sx": "window width in tokens",
    "sy": "window height in tokens",
    "st": "window depth in frames (video token grids; 1: images)",
    "a_s": "merge-age weight in the SSM window score",
    "a_d": "merge-age weight in the IDM source score",
    "a_p": "accepted for compatibility, unused",
    "pseudo_merge": "a group takes its destination's value instead of the mean",
    "mcw": "weight of the fresh output when blending with the cache, in [0, 1]",
    "protect_steps_frequency": "steps s with s %% f == 0 run unmerged (<= 0: off)",
    "protect_layers_frequency": "layers l with l %% f == 0 and the last never merge (<= 0: off)",
    "merge_attn": "allow merging before attention",
    "merge_mlp": "allow merging before the feed-forward",
    "cache_each_step": "refresh the output caches at every merging step",
    "cuda_graphs": "replay each distinct step as a CUDA graph (CUDA devices)",
}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def family_switch_step_help() -> str:
    """--switch-step's help where it defaults to the model family's: each registered family's default."""
    from ..models import families

    defaults = "; ".join(f"{a.title}: {a.describe_switch_step()}" for a in families())
    return ("last structure-phase step (SSM); later steps are the detail phase (IDM) (default: the model "
            f"family's: {defaults})").replace("%", "%%")


def add_sdtm_options(parser: argparse.ArgumentParser, with_disable: bool = True,
                     family_switch_step: bool = False) -> None:
    """Add one option per SDTMConfig field (--ratio, --use-rand/--no-use-rand, ...), --backend, and
    (``with_disable``) --no-sdtm. ``family_switch_step``: --switch-step defaults to None, the model
    family's default (``ModelAdapter.resolve_config``), instead of SDTMConfig's 20."""
    group = parser.add_argument_group("SDTM settings (defaults as apply_SDTM)")
    defaults = SDTMConfig()
    for field in dataclasses.fields(SDTMConfig):
        name, default = field.name, getattr(defaults, field.name)
        flag = "--" + name.replace("_", "-")
        if name == "seed":  # --seed is the image's seed where a command has one
            flag = "--sdtm-seed"
        if name == "switch_step" and family_switch_step:
            group.add_argument(flag, type=int, default=None, help=family_switch_step_help())
        elif name == "backend":
            group.add_argument(flag, choices=BACKENDS, default=default,
                               help="ops backend (default auto: cpp on CPU, triton on CUDA)")
        elif isinstance(default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                               help=f"{_HELP[name]} (default {default})")
        elif name.startswith("protect_") or isinstance(default, int):
            group.add_argument(flag, type=int, default=default, help=f"{_HELP[name]} (default {default})")
        else:
            group.add_argument(flag, type=float, default=default, help=f"{_HELP[name]} (default {default})")
    if with_disable:
        group.add_argument("--no-sdtm", action="store_true", help="run the unpatched model")


def sdtm_option(args: argparse.Namespace, name: str, default=None):
    """The value of SDTMConfig field ``name`` in parsed ``args`` (``seed`` is the --sdtm-seed option)."""
    return getattr(args, "sdtm_seed" if name == "seed" else name, default)


def config_from_args(args: argparse.Namespace) -> SDTMConfig | None:
    """The SDTMConfig the options describe (None with --no-sdtm); raises ValueError on bad values."""
    if getattr(args, "no_sdtm", False):
        return None
    values = {f.name: sdtm_option(args, f.name) for f in dataclasses.fields(SDTMConfig)}
    return SDTMConfig(**values)
