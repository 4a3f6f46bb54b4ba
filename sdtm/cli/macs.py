"""Theoretical MACs of a whole SDTM schedule, counted on the meta device (no weights, no memory).

Every block's multiply-accumulates are counted once per token count with torch's FlopCounterMode on a
meta-device copy of the block, split into the feed-forward and the rest (the attention side: what merges
with the attention in the structure phase); the schedule (sdtm.core.schedule) then says how many image tokens
each side sees at each step. The plan's own matmul (IDM's source x destination cosine similarities) is
counted too; SSM's window scores are elementwise work of O(W K^2 C) and are not.

What counting needs of a model family comes from its adapter (sdtm.models, ``ModelAdapter``): the presets,
the transformer class and config keys, how to build meta inputs for the model and for one block, which
blocks cost the same, the token's side in latent pixels and the positional table's limit. The blocks, their
order, the kinds of their sub-layers and the default switch step are the ones SDTM uses at run time, so a
family whose blocks merge only in the structure phase (every sub-layer of the attention kind) is counted
unmerged in the detail phase, where it computes no plan.

``switch_step=None`` takes the family's default for the step count (``ModelAdapter.resolve_config``).
"""

from __future__ import annotations

import functools
import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..core.config import SDTMConfig
from ..core.plans import Grid
from ..core.schedule import BlockAction, BlockMode, Phase, action_for_sublayers, block_action, merged_tokens
from ..models import default_family, families, presets
from ..models.base import ModelAdapter, is_int

VAE_SCALE = 8  # the latent factor of the presets and of bare transformer config files


def _presets() -> dict[str, dict]:
    return {name: preset.config for name, (_, preset) in presets().items()}


PRESETS: dict[str, dict] = _presets()  # every family's presets: name -> transformer config


def _mac_families() -> list[ModelAdapter]:
    """The registered families that describe their configs for counting (``config_classes`` set)."""
    return [adapter for adapter in families() if adapter.config_classes]


def _class_list() -> str:
    names = [adapter.config_classes[0] for adapter in _mac_families()]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def family_of(config: dict) -> ModelAdapter:
    """The family of a transformer config: the one that owns it (its ``_class_name``, or without one its
    signature keys, ``ModelAdapter.owns_config``); a config without a class name that no family claims is the
    default family's. ValueError for a class name no family has."""
    for adapter in _mac_families():
        if adapter.owns_config(config):
            return adapter
    name = config.get("_class_name")
    if name is None:
        return default_family()
    raise ValueError(f"a {name!r} config is not an {_class_list()} one.")


def default_text_tokens(config: dict) -> int:
    """Text tokens per prompt when none are given: the family's pipeline's (``ModelAdapter.text_tokens``)."""
    return family_of(config).text_tokens(config)


def _read_json_object(path: str) -> dict:
    """The JSON object in ``path``; ValueError when it cannot be read or holds something else."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got a {type(data).__name__}.")
    return data


def _check_int_key(family: ModelAdapter, path: str, key: str, value) -> None:
    """Raise a ValueError naming ``path`` and ``key`` when ``value`` is not a positive int (or null, for the
    family's nullable keys)."""
    if value is None and key in family.config_nullable_int_keys:
        return
    if not is_int(value) or value < 1:
        expected = "a positive int or null" if key in family.config_nullable_int_keys else "a positive int"
        raise ValueError(f"{path}: {key} must be {expected}, got {value!r}.")


def validate_config(raw: dict, path: str) -> dict:
    """The transformer keys of the config object ``raw`` read from ``path`` (lists as tuples) with the
    ``_class_name`` of its family, checked; ValueError naming the file and the key otherwise."""
    try:
        family = family_of(raw)
    except ValueError:
        folders = ", ".join(adapter.title for adapter in _mac_families())
        raise ValueError(f"{path} is a {raw['_class_name']!r} config, not an {_class_list()} one; pass the "
                         f"transformer's config.json or a diffusers {folders} folder.") from None
    class_name = family.config_classes[0]
    if "num_layers" not in raw:
        raise ValueError(f"{path} has no num_layers; is it a {class_name} config.json?")
    keys = family.config_int_keys + family.config_other_keys
    config = {k: v for k, v in raw.items() if k in keys}
    for key, value in config.items():
        if key in family.config_int_keys:
            _check_int_key(family, path, key, value)
    family.check_config(config, path)
    config = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()}
    return {"_class_name": class_name, **config}


def build_meta_transformer(config: dict) -> torch.nn.Module:
    """The transformer of ``config`` (its family's diffusers class; keys starting with ``_`` left out) on
    the meta device (no weights, no memory); ValueError when diffusers rejects the config."""
    import diffusers

    class_name = family_of(config).config_classes[0]
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            return getattr(diffusers, class_name)(**kwargs)
    except (TypeError, ValueError, NotImplementedError, ZeroDivisionError) as error:
        raise ValueError(f"{class_name} cannot be built from this config: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def config_file(name_or_path: str) -> str:
    """The transformer config file that ``--config name_or_path`` (not a preset) names."""
    path = name_or_path
    if os.path.isdir(path):
        candidates = [os.path.join(path, "transformer", "config.json"), os.path.join(path, "config.json")]
        path = next((c for c in candidates if os.path.isfile(c)), candidates[0])
    if not os.path.isfile(path):
        raise ValueError(f"--config {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a config file.")
    return path


def load_config(name_or_path: str) -> dict:
    """A preset name, a transformer ``config.json``, or a diffusers folder (its transformer/config.json),
    checked: ValueError naming the file, the key and what is expected. The model is built and run once
    on one image token on the meta device, so that widths that do not fit together fail here."""
    if name_or_path in PRESETS:
        return dict(PRESETS[name_or_path])
    path = config_file(name_or_path)
    config = validate_config(_read_json_object(path), path)
    try:
        meta = _MetaModel(config, batch=1, text_tokens=1)
        meta.forward(1, 1)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    except RuntimeError as error:
        raise ValueError(f"{path}: {family_of(config).config_classes[0]} cannot run this config: "
                         f"{_first_line(error)}") from None
    return config


def load_vae_scale(name_or_path: str) -> int:
    """The latent down-sampling factor for ``--config name_or_path``: ``2 ** (len(block_out_channels) - 1)``
    of a diffusers folder's vae/config.json; 8 (every preset's) for presets and bare transformer config
    files."""
    if name_or_path in PRESETS or not os.path.isdir(name_or_path):
        return VAE_SCALE
    if not os.path.isfile(os.path.join(name_or_path, "transformer", "config.json")):
        return VAE_SCALE  # a transformer folder (config.json at its top): no VAE to read
    path = os.path.join(name_or_path, "vae", "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--config {name_or_path!r} has no vae/config.json to read the latent factor from; pass "
                         "its transformer/config.json instead to assume a factor of 8.")
    vae = _read_json_object(path)
    if is_int(vae.get("scale_factor_spatial")) and vae["scale_factor_spatial"] > 0:
        return vae["scale_factor_spatial"]  # video VAEs state their spatial factor
    channels = vae.get("block_out_channels")
    if not isinstance(channels, list) or not channels:
        raise ValueError(f"{path}: block_out_channels must be a non-empty list (the latent factor is "
                         f"2 ** (len(block_out_channels) - 1)), got {channels!r}.")
    return 2 ** (len(channels) - 1)


@dataclass
class StepMacs:
    """One denoising step: mean tokens per block call and MACs without / with SDTM."""

    step: int
    phase: str
    attn_tokens: float
    mlp_tokens: float
    baseline_macs: int
    sdtm_macs: int


@dataclass
class MacReport:
    """Totals over all steps (MACs, batch included) and their breakdown."""

    config: dict
    height: int
    width: int
    grid: tuple[int, int]
    steps: int
    batch: int
    baseline_macs: int
    sdtm_macs: int
    plan_macs: int
    per_step: list[StepMacs] = field(default_factory=list)
    phases: dict = field(default_factory=dict)
    vae_scale: int = VAE_SCALE
    text_tokens: int = 0  # the family's default when the count was given none
    model: str = ""  # the transformer class counted
    switch_step: int | None = None  # the last structure-phase step the count used (the family's by default)
    frames: int = 1  # generated frames (video); the token grid has ``token_frames`` frames of ``grid``
    token_frames: int = 1

    @property
    def mac_ratio(self) -> float:
        return self.baseline_macs / self.sdtm_macs

    def to_json(self) -> dict:
        out = asdict(self)
        out["mac_ratio"] = self.mac_ratio
        return out


class _MetaModel:
    """A meta-device transformer whose blocks are counted once per image token count.

    ``blocks`` are the blocks SDTM patches, in the order the transformer calls them (the order of SDTM's
    layer index); ``kinds`` the kinds of each block's sub-layers ("attn", "mlp")."""

    def __init__(self, config: dict, batch: int, text_tokens: int):
        self.family = family = family_of(config)
        self.model = build_meta_transformer(config)
        self.blocks = family.blocks(self.model)
        self.kinds = [frozenset(family.sublayers(block).values()) for block in self.blocks]
        self.batch, self.text_tokens = batch, text_tokens
        self.channels = family.channels(self.model)

    def forward(self, grid_h: int, grid_w: int, frames: int = 1) -> FlopCounterMode:
        """The FLOP counter of one forward on ``frames`` frames of ``grid_h`` x ``grid_w`` image tokens."""
        inputs = self.family.meta_inputs(self.model, self.batch, grid_h, grid_w, self.text_tokens, frames=frames)
        with FlopCounterMode(display=False) as counter:
            self.model(**inputs)
        return counter

    def outside_blocks(self, grid_h: int, grid_w: int, frames: int = 1) -> int:
        """MACs of one forward outside the blocks (embeddings, output projection)."""
        counter = self.forward(grid_h, grid_w, frames)
        ids = {id(block) for block in self.blocks}
        # Counter keys are module paths under the model's class name, e.g.
        # "<Class>.single_transformer_blocks.3"; the leading dot keeps
        # "transformer_blocks.3" from matching "single_transformer_blocks.3".
        names = tuple("." + name for name, module in self.model.named_modules() if id(module) in ids)
        blocks = sum(sum(v.values()) for k, v in counter.get_flop_counts().items() if k.endswith(names))
        return (counter.get_total_flops() - blocks) // 2

    def block(self, layer: int, tokens: int) -> tuple[int, int]:
        """(MACs of everything but the feed-forward, MACs of the feed-forward) of block ``layer`` on
        ``tokens`` image tokens."""
        # Blocks of one shape cost the same: count the first block of each shape only.
        shape = self.family.block_shape(self.blocks[layer])
        first = next(i for i, other in enumerate(self.blocks) if self.family.block_shape(other) == shape)
        return self._count(first, tokens)

    @functools.lru_cache(maxsize=None)
    def _count(self, layer: int, tokens: int) -> tuple[int, int]:
        inputs = self.family.block_inputs(self.model, self.blocks[layer], self.batch, tokens, self.text_tokens)
        with FlopCounterMode(display=False) as counter:
            self.blocks[layer](**inputs)
        name = self.family.feed_forward
        counts = counter.get_flop_counts()
        ff = next((sum(v.values()) for k, v in counts.items() if k.endswith("." + name) or k == name), 0)
        return (counter.get_total_flops() - ff) // 2, ff // 2


def _token_grid(config: dict, height: int, width: int, vae_scale: int) -> tuple[int, int]:
    """The image token grid (rows, columns) of ``height`` x ``width`` pixels; ValueError when the size does
    not divide into tokens or the grid exceeds the model's positional table."""
    family = family_of(config)
    patch = family.token_side(config)
    if height % (vae_scale * patch) or width % (vae_scale * patch):
        raise ValueError(f"height and width must be multiples of {vae_scale * patch} (VAE factor {vae_scale} x "
                         f"{family.token_side_name} {patch}), got {height}x{width}.")
    grid_h, grid_w = height // (vae_scale * patch), width // (vae_scale * patch)
    max_grid = family.max_token_grid(config)
    if max_grid is not None and max(grid_h, grid_w) > max_grid:
        raise ValueError(f"{height}x{width} needs a {grid_h}x{grid_w} token grid, larger than the model's "
                         f"positional table ({max_grid}); use at most {max_grid * vae_scale * patch} pixels a side.")
    return grid_h, grid_w


def schedule_macs(config: dict, height: int, width: int, steps: int, batch: int = 2,
                  sdtm: SDTMConfig | None = None, text_tokens: int | None = None,
                  vae_scale: int = VAE_SCALE, frames: int | None = None) -> MacReport:
    """MACs of ``steps`` transformer calls at ``height`` x ``width`` pixels (latents ``vae_scale`` times
    smaller), without and with ``sdtm`` (default: SDTMConfig with the family's default switch step);
    a ``switch_step`` of None is the family's default for ``steps`` steps (``ModelAdapter.resolve_config``);
    ``text_tokens`` None: the family's default (``default_text_tokens``); ``frames``: the generated frames
    of a video family (None: its default; images: 1)."""
    family = family_of(config)
    frames = family.default_frames if frames is None else frames
    token_frames = family.latent_frames(frames)
    if text_tokens is None:
        text_tokens = family.text_tokens(config)
    if min(height, width, steps, batch, text_tokens, vae_scale) <= 0:
        raise ValueError("height, width, steps, batch, text_tokens and vae_scale must be positive.")
    sdtm = family.resolve_config(sdtm if sdtm is not None else SDTMConfig(switch_step=None), steps)
    grid = _token_grid(config, height, width, vae_scale)
    meta = _MetaModel(config, batch, text_tokens)
    report = MacReport(config=config, height=height, width=width, grid=grid, steps=steps, batch=batch,
                       baseline_macs=0, sdtm_macs=0, plan_macs=0, vae_scale=vae_scale, text_tokens=text_tokens,
                       model=family.config_classes[0], switch_step=sdtm.switch_step, frames=frames,
                       token_frames=token_frames)
    try:
        _count_schedule(meta, report, sdtm)
    except RuntimeError as error:  # e.g. a meta tensor too large for int64 sizes
        raise ValueError(f"cannot count the MACs of {token_frames * grid[0] * grid[1]} image and {text_tokens} text tokens at "
                         f"batch {batch}: {_first_line(error)}; use fewer tokens or a smaller batch.") from None
    return report


def _tokens_and_plan(action: BlockAction, n: int, k: int, windows: int, batch_channels: int) -> tuple[int, int, int]:
    """(attention tokens, feed-forward tokens, plan matmul MACs) of one block call under ``action`` (the
    block's own, after ``action_for_sublayers``) on ``n`` image tokens in ``windows`` windows of ``k``
    tokens (``batch_channels``: batch x width). IDM's plan compares the ``windows * (k - 1)`` sources with
    the ``windows`` destinations; it is computed only by blocks that merge in the detail phase."""
    merged = merged_tokens(action, n, k, windows)
    plan = 0
    if action.mode is BlockMode.MERGED and action.phase is Phase.DETAIL:
        plan = batch_channels * windows * (k - 1) * windows
    return (merged if action.merge_attn else n), (merged if action.merge_mlp else n), plan


def _count_schedule(meta: _MetaModel, report: MacReport, sdtm: SDTMConfig) -> None:
    """Fill ``report``'s totals, per-step table and phases from the block counts of ``meta``."""
    (grid_h, grid_w), steps, batch = report.grid, report.steps, report.batch
    grid = Grid(grid_h, grid_w, sdtm.sy, sdtm.sx, report.token_frames, sdtm.st)
    n, layers = grid.num_tokens, len(meta.blocks)
    k, windows = grid.window_size, grid.num_windows
    outside = meta.outside_blocks(grid_h, grid_w, report.token_frames)
    full = sum(sum(meta.block(layer, n)) for layer in range(layers)) + outside
    report.baseline_macs = full * steps
    phases: dict = defaultdict(lambda: {"block_calls": 0, "macs": 0})
    for step in range(steps):
        step_macs, attn_sum, mlp_sum, modes = outside, 0, 0, set()
        for layer in range(layers):
            action = action_for_sublayers(block_action(sdtm, step, steps, layer, layers, n, windows),
                                          meta.kinds[layer])
            attn_tokens, mlp_tokens, plan = _tokens_and_plan(action, n, k, windows, batch * meta.channels)
            macs = meta.block(layer, attn_tokens)[0] + meta.block(layer, mlp_tokens)[1] + plan
            key = action.phase.value if action.mode is BlockMode.MERGED else action.mode.value
            phases[key]["block_calls"] += 1
            phases[key]["macs"] += macs
            modes.add(key)
            report.plan_macs += plan
            step_macs += macs
            attn_sum += attn_tokens
            mlp_sum += mlp_tokens
        label = "/".join(sorted(modes))
        report.per_step.append(StepMacs(step, label, attn_sum / layers, mlp_sum / layers, full, step_macs))
        report.sdtm_macs += step_macs
    phases["outside blocks"] = {"block_calls": 0, "macs": outside * steps}
    report.phases = dict(phases)


def format_report(report: MacReport, name: str) -> str:
    grid_h, grid_w = report.grid
    size, grid = f"{report.height}x{report.width}", f"{grid_h}x{grid_w}"
    if report.token_frames > 1 or report.frames > 1:
        size, grid = f"{report.frames} frames of {size}", f"{report.token_frames}x{grid}"
    lines = [
        f"{name}: {size} (VAE factor {report.vae_scale}, {grid} = "
        f"{report.token_frames * grid_h * grid_w} tokens), {report.text_tokens} text tokens, "
        f"{report.steps} steps, batch {report.batch}, switch step {report.switch_step}",
        f"baseline {report.baseline_macs / 1e12:10.3f} TMACs ({report.baseline_macs / report.steps / 1e12:.3f} a step)",
        f"SDTM     {report.sdtm_macs / 1e12:10.3f} TMACs (plan matmuls {report.plan_macs / 1e12:.3f})",
        f"MAC ratio {report.mac_ratio:.3f}",
        "",
        f"{'phase':16}{'block calls':>12}{'TMACs':>12}",
    ]
    for phase, values in report.phases.items():
        lines.append(f"{phase:16}{values['block_calls']:>12}{values['macs'] / 1e12:>12.3f}")
    return "\n".join(lines)


def plot_report(report: MacReport, path: str) -> None:
    """Tokens per block and MACs per step over the schedule, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [s.step for s in report.per_step]
    fig, (tokens_ax, macs_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    tokens_ax.plot(steps, [s.attn_tokens for s in report.per_step], label="attention")
    tokens_ax.plot(steps, [s.mlp_tokens for s in report.per_step], label="feed-forward", linestyle="--")
    tokens_ax.set_ylabel("image tokens (mean per block)")
    tokens_ax.legend()
    macs_ax.plot(steps, [s.baseline_macs / 1e12 for s in report.per_step], label="unmerged")
    macs_ax.plot(steps, [s.sdtm_macs / 1e12 for s in report.per_step], label="SDTM")
    macs_ax.set_ylabel("TMACs per step")
    macs_ax.set_xlabel("denoising step")
    macs_ax.legend()
    fig.suptitle(f"MAC ratio {report.mac_ratio:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
