"""The model-agnostic part of SDTM: settings, schedule, merge plans, ops, per-call state, the block
engine, apply / remove, CUDA-graph replay."""
