"""SDTM: Structure-then-Detail Token Merging for Stable Diffusion 3 / 3.5 in diffusers.

    >>> from sdtm import apply_SDTM, remove_SDTM
    >>> pipe = apply_SDTM(pipe)        # doctest: +SKIP
"""

from .core.config import SDTMConfig
from .core.patch import apply_sdtm, apply_SDTM, remove_sdtm, remove_SDTM, sdtm_state
from . import models  # noqa: E402,F401  (registers the model families with sdtm.core.families)

__all__ = ["SDTMConfig", "apply_SDTM", "remove_SDTM", "apply_sdtm", "remove_sdtm", "sdtm_state"]
__version__ = "0.1.0"
