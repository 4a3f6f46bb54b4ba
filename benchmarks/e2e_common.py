"""The end-to-end setting shared by test_bench_e2e.py and e2e.py (defined in sdtm.cli.bench): the shrunk
transformer of each model family, the denoising loop its pipeline runs, and the settings compared."""

from sdtm.cli.bench import (  # noqa: F401
    ALL_STRUCTURE,
    E2E_MODELS,
    Denoiser,
    mac_config,
    resolved_config,
    shaped_transformer,
)
