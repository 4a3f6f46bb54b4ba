"""Theoretical MACs of a whole SDTM schedule, counted on the meta device (no weights, no memory).

Every block's multiply-accumulates are counted once per token count with torch's FlopCounterMode on a
meta-device copy of the block; the schedule (sdtm.schedule) then says how many tokens each block's
attention and feed-forward see at each step. The plan's own matmul (IDM's source x destination cosine
similarities) is counted too; SSM's window scores are elementwise work of O(W K^2 C) and are not.
"""

from __future__ import annotations

import functools
import json
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import SDTMConfig
from .schedule import BlockAction, BlockMode, Phase, block_action, sources_to_merge, windows_to_merge

TEXT_TOKENS = 333  # 77 CLIP + 256 T5 tokens
VAE_SCALE = 8

_SD3_COMMON = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                   joint_attention_dim=4096, pooled_projection_dim=2048)
PRESETS: dict[str, dict] = {
    "sd3-medium": dict(_SD3_COMMON, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                       pos_embed_max_size=192),
    "sd3.5-medium": dict(_SD3_COMMON, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                         pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "sd3.5-large": dict(_SD3_COMMON, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                        pos_embed_max_size=192, qk_norm="rms_norm"),
}
_INT_KEYS = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
             "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
             "pos_embed_max_size")
# diffusers accepts null for these: out_channels then follows in_channels, and without a positional table
# size the sin-cos table is computed for each input size.
_NULLABLE_INT_KEYS = ("out_channels", "pos_embed_max_size")
_CONFIG_KEYS = _INT_KEYS + ("dual_attention_layers", "qk_norm")


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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_key(path: str, key: str, value) -> None:
    """Raise a ValueError naming ``path`` and ``key`` when ``value`` is not what the transformer expects."""
    if key in _INT_KEYS:
        if value is None and key in _NULLABLE_INT_KEYS:
            return
        if not _is_int(value) or value < 1:
            expected = "a positive int or null" if key in _NULLABLE_INT_KEYS else "a positive int"
            raise ValueError(f"{path}: {key} must be {expected}, got {value!r}.")
    elif key == "dual_attention_layers":
        if not isinstance(value, (list, tuple)) or not all(_is_int(v) and v >= 0 for v in value):
            raise ValueError(f"{path}: dual_attention_layers must be a list of layer indices (ints >= 0), "
                             f"got {value!r}.")
    elif key == "qk_norm" and value is not None and not isinstance(value, str):
        raise ValueError(f"{path}: qk_norm must be null or a string such as \"rms_norm\", got {value!r}.")


def validate_config(raw: dict, path: str) -> dict:
    """The transformer keys of the config object ``raw`` read from ``path`` (lists as tuples), checked;
    ValueError naming the file and the key otherwise."""
    class_name = raw.get("_class_name", "SD3Transformer2DModel")
    if class_name != "SD3Transformer2DModel":
        raise ValueError(f"{path} is a {class_name!r} config, not an SD3Transformer2DModel one; pass the "
                         "transformer's config.json or a diffusers SD3 folder.")
    if "num_layers" not in raw:
        raise ValueError(f"{path} has no num_layers; is it an SD3Transformer2DModel config.json?")
    config = {k: v for k, v in raw.items() if k in _CONFIG_KEYS}
    for key, value in config.items():
        _check_key(path, key, value)
    heads, head_dim = config.get("num_attention_heads", 18), config.get("attention_head_dim", 64)
    caption_dim = config.get("caption_projection_dim", 1152)
    if caption_dim != heads * head_dim:
        raise ValueError(f"{path}: caption_projection_dim ({caption_dim}) must equal num_attention_heads x "
                         f"attention_head_dim ({heads} x {head_dim} = {heads * head_dim}), the blocks' width.")
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()}


def build_meta_transformer(config: dict) -> torch.nn.Module:
    """An ``SD3Transformer2DModel`` of ``config`` on the meta device (no weights, no memory); ValueError
    when diffusers rejects the config."""
    from diffusers import SD3Transformer2DModel

    try:
        with torch.device("meta"):
            return SD3Transformer2DModel(**config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"SD3Transformer2DModel cannot be built from this config: {_first_line(error)}") from None


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
    checked: ValueError naming the file, the key and what is expected."""
    if name_or_path in PRESETS:
        return dict(PRESETS[name_or_path])
    path = config_file(name_or_path)
    config = validate_config(_read_json_object(path), path)
    try:
        build_meta_transformer(config)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return config


def load_vae_scale(name_or_path: str) -> int:
    """The latent down-sampling factor for ``--config name_or_path``: ``2 ** (len(block_out_channels) - 1)``
    of a diffusers folder's vae/config.json; SD3's 8 for presets and bare transformer config files."""
    if name_or_path in PRESETS or not os.path.isdir(name_or_path):
        return VAE_SCALE
    if not os.path.isfile(os.path.join(name_or_path, "transformer", "config.json")):
        return VAE_SCALE  # a transformer folder (config.json at its top): no VAE to read
    path = os.path.join(name_or_path, "vae", "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--config {name_or_path!r} has no vae/config.json to read the latent factor from; pass "
                         "its transformer/config.json instead to assume SD3's factor of 8.")
    channels = _read_json_object(path).get("block_out_channels")
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

    @property
    def mac_ratio(self) -> float:
        return self.baseline_macs / self.sdtm_macs

    def to_json(self) -> dict:
        out = asdict(self)
        out["mac_ratio"] = self.mac_ratio
        return out


class _MetaModel:
    """A meta-device transformer whose blocks are counted once per image token count."""

    def __init__(self, config: dict, batch: int, text_tokens: int):
        self.model = build_meta_transformer(config)
        self.batch, self.text_tokens = batch, text_tokens
        self.channels = self.model.inner_dim

    def outside_blocks(self, latent_h: int, latent_w: int) -> int:
        """MACs of one forward outside the transformer blocks (embeddings, output projection)."""
        m, b = self.model, self.batch
        with FlopCounterMode(display=False) as counter:
            m(hidden_states=torch.empty(b, m.config.in_channels, latent_h, latent_w, device="meta"),
              timestep=torch.empty(b, device="meta"),
              encoder_hidden_states=torch.empty(b, self.text_tokens, m.config.joint_attention_dim, device="meta"),
              pooled_projections=torch.empty(b, m.config.pooled_projection_dim, device="meta"))
        counts = counter.get_flop_counts()
        blocks = sum(sum(v.values()) for k, v in counts.items() if k.endswith(tuple(
            f"transformer_blocks.{i}" for i in range(len(m.transformer_blocks)))))
        return (counter.get_total_flops() - blocks) // 2

    def block(self, layer: int, tokens: int) -> tuple[int, int]:
        """(MACs of everything but the feed-forward, MACs of the feed-forward) of block ``layer`` on
        ``tokens`` image tokens."""
        b = self.model.transformer_blocks[layer]
        # Blocks of one shape cost the same: count the first block of each shape only.
        shape = (b.use_dual_attention, b.context_pre_only)
        first = next(i for i, other in enumerate(self.model.transformer_blocks)
                     if (other.use_dual_attention, other.context_pre_only) == shape)
        return self._count(first, tokens)

    @functools.lru_cache(maxsize=None)
    def _count(self, layer: int, tokens: int) -> tuple[int, int]:
        block, b, c = self.model.transformer_blocks[layer], self.batch, self.channels
        with FlopCounterMode(display=False) as counter:
            block(hidden_states=torch.empty(b, tokens, c, device="meta"),
                  encoder_hidden_states=torch.empty(b, self.text_tokens, c, device="meta"),
                  temb=torch.empty(b, c, device="meta"))
        counts = counter.get_flop_counts()
        ff = next((sum(v.values()) for k, v in counts.items() if k.endswith(".ff") or k == "ff"), 0)
        return (counter.get_total_flops() - ff) // 2, ff // 2


def _token_grid(config: dict, height: int, width: int, vae_scale: int) -> tuple[int, int]:
    """The image token grid (rows, columns) of ``height`` x ``width`` pixels; ValueError when the size does
    not divide into tokens or the grid exceeds the model's positional table."""
    patch = config.get("patch_size", 2)
    if height % (vae_scale * patch) or width % (vae_scale * patch):
        raise ValueError(f"height and width must be multiples of {vae_scale * patch} (VAE factor {vae_scale} x "
                         f"patch {patch}), got {height}x{width}.")
    grid_h, grid_w = height // (vae_scale * patch), width // (vae_scale * patch)
    max_grid = config.get("pos_embed_max_size", 96)
    if max_grid is not None and max(grid_h, grid_w) > max_grid:
        raise ValueError(f"{height}x{width} needs a {grid_h}x{grid_w} token grid, larger than the model's "
                         f"positional table ({max_grid}); use at most {max_grid * vae_scale * patch} pixels a side.")
    return grid_h, grid_w


def schedule_macs(config: dict, height: int, width: int, steps: int, batch: int = 2,
                  sdtm: SDTMConfig | None = None, text_tokens: int = TEXT_TOKENS,
                  vae_scale: int = VAE_SCALE) -> MacReport:
    """MACs of ``steps`` transformer calls at ``height`` x ``width`` pixels (latents ``vae_scale`` times
    smaller), without and with ``sdtm`` (default: SDTMConfig())."""
    if min(height, width, steps, batch, text_tokens, vae_scale) <= 0:
        raise ValueError("height, width, steps, batch, text_tokens and vae_scale must be positive.")
    sdtm = sdtm or SDTMConfig()
    grid = _token_grid(config, height, width, vae_scale)
    meta = _MetaModel(config, batch, text_tokens)
    report = MacReport(config=config, height=height, width=width, grid=grid, steps=steps, batch=batch,
                       baseline_macs=0, sdtm_macs=0, plan_macs=0, vae_scale=vae_scale)
    try:
        _count_schedule(meta, report, sdtm)
    except RuntimeError as error:  # e.g. a meta tensor too large for int64 sizes
        raise ValueError(f"cannot count the MACs of {grid[0] * grid[1]} image and {text_tokens} text tokens at "
                         f"batch {batch}: {_first_line(error)}; use fewer tokens or a smaller batch.") from None
    return report


def _tokens_and_plan(action: BlockAction, n: int, k: int, windows: int, batch_channels: int) -> tuple[int, int, int]:
    """(attention tokens, feed-forward tokens, plan matmul MACs) of one block call under ``action`` on
    ``n`` image tokens in ``windows`` windows of ``k`` tokens (``batch_channels``: batch x width)."""
    if action.mode is not BlockMode.MERGED:
        return n, n, 0
    plan = 0
    if action.phase is Phase.STRUCTURE:
        merged = n - windows_to_merge(action.reduce_num, k, windows) * (k - 1)
    else:
        merged = n - sources_to_merge(action.reduce_num, windows * (k - 1))
        plan = batch_channels * windows * (k - 1) * windows
    return (merged if action.merge_attn else n), (merged if action.merge_mlp else n), plan


def _count_schedule(meta: _MetaModel, report: MacReport, sdtm: SDTMConfig) -> None:
    """Fill ``report``'s totals, per-step table and phases from the block counts of ``meta``."""
    (grid_h, grid_w), steps, batch = report.grid, report.steps, report.batch
    n, layers = grid_h * grid_w, len(meta.model.transformer_blocks)
    k = sdtm.sx * sdtm.sy
    windows = (grid_h // sdtm.sy) * (grid_w // sdtm.sx)
    patch = meta.model.config.patch_size
    outside = meta.outside_blocks(grid_h * patch, grid_w * patch)
    full = sum(sum(meta.block(layer, n)) for layer in range(layers)) + outside
    report.baseline_macs = full * steps
    phases: dict = defaultdict(lambda: {"block_calls": 0, "macs": 0})
    for step in range(steps):
        step_macs, attn_sum, mlp_sum, modes = outside, 0, 0, set()
        for layer in range(layers):
            action = block_action(sdtm, step, steps, layer, layers, n)
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
    lines = [
        f"{name}: {report.height}x{report.width} (VAE factor {report.vae_scale}, {grid_h}x{grid_w} = "
        f"{grid_h * grid_w} tokens), "
        f"{report.steps} steps, batch {report.batch}",
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
