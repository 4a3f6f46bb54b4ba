"""The end-to-end setting shared by test_bench_e2e.py and e2e.py (defined in sdtm.bench)."""

from sdtm.bench import ALL_STRUCTURE, Denoiser, sd3_shaped_transformer  # noqa: F401
