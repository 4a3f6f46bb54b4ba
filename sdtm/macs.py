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
from .schedule import BlockMode, Phase, block_action, sources_to_merge, windows_to_merge

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
_CONFIG_KEYS = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                "num_attention_heads", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim",
                "out_channels", "pos_embed_max_size", "dual_attention_layers", "qk_norm")


def load_config(name_or_path: str) -> dict:
    """A preset name, a transformer ``config.json``, or a diffusers folder (its transformer/config.json)."""
    if name_or_path in PRESETS:
        return dict(PRESETS[name_or_path])
    path = name_or_path
    if os.path.isdir(path):
        candidates = [os.path.join(path, "transformer", "config.json"), os.path.join(path, "config.json")]
        path = next((c for c in candidates if os.path.isfile(c)), candidates[0])
    if not os.path.isfile(path):
        raise ValueError(f"--config {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a config file.")
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
    if raw.get("_class_name", "SD3Transformer2DModel") != "SD3Transformer2DModel" or "num_layers" not in raw:
        raise ValueError(f"{path} is not an SD3Transformer2DModel config.")
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in _CONFIG_KEYS}


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
        from diffusers import SD3Transformer2DModel

        with torch.device("meta"):
            self.model = SD3Transformer2DModel(**config)
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


def schedule_macs(config: dict, height: int, width: int, steps: int, batch: int = 2,
                  sdtm: SDTMConfig | None = None, text_tokens: int = TEXT_TOKENS,
                  vae_scale: int = VAE_SCALE) -> MacReport:
    """MACs of ``steps`` transformer calls at ``height`` x ``width`` pixels (latents ``vae_scale`` times
    smaller), without and with ``sdtm`` (default: SDTMConfig())."""
    if height <= 0 or width <= 0 or steps <= 0 or batch <= 0:
        raise ValueError("height, width, steps and batch must be positive.")
    sdtm = sdtm or SDTMConfig()
    patch = config.get("patch_size", 2)
    if height % (vae_scale * patch) or width % (vae_scale * patch):
        raise ValueError(f"height and width must be multiples of {vae_scale * patch}, got {height}x{width}.")
    latent_h, latent_w = height // vae_scale, width // vae_scale
    grid_h, grid_w = latent_h // patch, latent_w // patch
    if max(grid_h, grid_w) > config.get("pos_embed_max_size", 96):
        raise ValueError(f"{height}x{width} needs a {grid_h}x{grid_w} token grid, larger than the model's "
                         f"positional table ({config.get('pos_embed_max_size')}).")
    meta = _MetaModel(config, batch, text_tokens)
    n, layers = grid_h * grid_w, len(meta.model.transformer_blocks)
    k = sdtm.sx * sdtm.sy
    windows = (grid_h // sdtm.sy) * (grid_w // sdtm.sx)
    outside = meta.outside_blocks(latent_h, latent_w)
    full = sum(sum(meta.block(layer, n)) for layer in range(layers)) + outside

    report = MacReport(config=config, height=height, width=width, grid=(grid_h, grid_w), steps=steps, batch=batch,
                       baseline_macs=full * steps, sdtm_macs=0, plan_macs=0)
    phases: dict = defaultdict(lambda: {"block_calls": 0, "macs": 0})
    for step in range(steps):
        step_macs, attn_sum, mlp_sum, modes = outside, 0, 0, set()
        for layer in range(layers):
            action = block_action(sdtm, step, steps, layer, layers, n)
            attn_tokens = mlp_tokens = n
            plan = 0
            if action.mode is BlockMode.MERGED:
                if action.phase is Phase.STRUCTURE:
                    merged = n - windows_to_merge(action.reduce_num, k, windows) * (k - 1)
                else:
                    merged = n - sources_to_merge(action.reduce_num, windows * (k - 1))
                    plan = batch * windows * (k - 1) * windows * meta.channels
                attn_tokens = merged if action.merge_attn else n
                mlp_tokens = merged if action.merge_mlp else n
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
    return report


def format_report(report: MacReport, name: str) -> str:
    grid_h, grid_w = report.grid
    lines = [
        f"{name}: {report.height}x{report.width} ({grid_h}x{grid_w} = {grid_h * grid_w} tokens), "
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
