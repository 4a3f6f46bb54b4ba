"""An SD3-shaped transformer over a short schedule, for end-to-end timing and MAC counting.

SD3 widths (333 text tokens from a 4096-wide context, patch 2, 16 latent channels) with fewer blocks and
C = 768 so that a run fits a CPU. Weights are random; only speed and MACs are measured.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from sdtm import SDTMConfig, apply_sdtm, remove_sdtm

TEXT_TOKENS = 333


def sd3_shaped_transformer(num_layers: int = 2, heads: int = 12, sample_size: int = 128, seed: int = 0):
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=16, num_layers=num_layers, attention_head_dim=64,
        num_attention_heads=heads, joint_attention_dim=4096, caption_projection_dim=heads * 64,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=sample_size // 2,
    )
    return model.eval()


class Denoiser:
    """Runs the transformer over ``steps`` flow-matching steps on [batch, 16, h, w] latents."""

    def __init__(self, transformer, latent_h: int, latent_w: int, steps: int = 10, batch: int = 2, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.transformer = transformer
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        self.steps = steps
        self.latents = torch.randn(batch, 16, latent_h, latent_w, generator=g)
        self.context = torch.randn(batch, TEXT_TOKENS, 4096, generator=g)
        self.pooled = torch.randn(batch, 2048, generator=g)

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        self.scheduler.set_timesteps(self.steps)
        x = self.latents
        for t in self.scheduler.timesteps:
            out = self.transformer(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=self.context,
                                   pooled_projections=self.pooled, return_dict=False)[0]
            x = self.scheduler.step(out, t, x, return_dict=False)[0]
        return x

    def patch(self, config: SDTMConfig | None) -> "Denoiser":
        """Apply ``config`` (None: unpatched) to the transformer; returns self."""
        remove_sdtm(self.transformer)
        if config is not None:
            apply_sdtm(self.transformer, config, scheduler=self.scheduler)
        return self

    def macs(self) -> int:
        with FlopCounterMode(display=False) as counter:
            self()
        return counter.get_total_flops() // 2


# Every step a structure step at ratio 0.5: 4096 -> 2080 tokens on a 64 x 64 grid, which is exactly the
# token count of an unpatched 40 x 52 grid.
ALL_STRUCTURE = dict(ratio=0.5, deviation=0.0, switch_step=1000, protect_steps_frequency=None, use_rand=True)
