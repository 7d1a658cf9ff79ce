"""Everything that lets verl 0.9.1's real pipeline run on a machine without a GPU.

`platform` registers a verl device platform named "cpu" (selected with VERL_PLATFORM=cpu); `rollout` registers a
rollout backend named "cpu_hf", a transformers-based stand-in for the vLLM rollout that GPU runs use.
"""
