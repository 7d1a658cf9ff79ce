"""tbrm-verl: Trajectory Bellman Residual Minimization (arXiv 2505.15311) as a verl 0.9.1 extension.

CPU install (development, CI):   pip install torch==2.13.0 -e ".[test]"
GPU install (README "GPU install"; CUDA 13.0 torch wheels, NVIDIA driver >= 580), in this order:
    pip install torch==2.11.0
    pip install -e ".[gpu]"
    pip install flash-attn==2.8.3 --no-build-isolation
flash-attn is no extra: PyPI has only its source distribution, whose build imports torch, so it must be built
without build isolation after torch is installed. Without it GPU runs fall back to sdpa (tbrm_verl/attn.py).
Check that the GPU pins resolve (no install): python -m tbrm_verl.check_gpu_install
"""

from setuptools import find_packages, setup

setup(
    name="tbrm-verl",
    version="0.1.0",
    description="TBRM (Trajectory Bellman Residual Minimization) for LLM reasoning on top of verl",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["tbrm_verl", "tbrm_verl.*"]),
    include_package_data=True,
    install_requires=[
        # verl internals used here (engine loss hook, v1 trainer registry, rollout registry) change between minor
        # releases: pin exactly.
        "verl[verl-core]==0.9.1",
        "ray[default]>=2.41",
        # No upper pin: a CPU machine pins torch==2.13.0 itself (see README); the gpu extra takes verl's CUDA torch.
        "torch>=2.6",
        "hydra-core>=1.3,<1.4",
        "omegaconf>=2.3,<2.4",
        # Math-Verify's LaTeX parser needs ANTLR; hydra/omegaconf need antlr4 4.9.x: this extra keeps them compatible.
        "math-verify[antlr4_9_3]>=0.7",
        "pandas",
        "pyarrow>=19",
        "datasets",
        "tokenizers",
        "matplotlib",
    ],
    extras_require={
        # GPU-only pieces, as verl 0.9.1's vllm extra pins them (it also pins torch==2.11.0). Never installed on a
        # CPU machine. flash-attn==2.8.3 is installed by a separate command (see the docstring above).
        "gpu": ["verl[vllm]==0.9.1", "vllm==0.24.0"],
        # The Table 4 tasks (python -m tbrm_verl.data reasoning_gym, tbrm_verl/tasks/reasoning_gym/reward.py). Pinned: its
        # generators define which problems a seed gives. Pure Python; in `test` too, so that CI tests the tasks.
        "reasoning_gym": ["reasoning-gym==0.1.25"],
        "test": ["pytest>=8", "reasoning-gym==0.1.25", "ruff==0.17.6"],  # ruff: tests/test_repo_hygiene.py (ruff.toml)
    },
    entry_points={
        # verl imports every `verl.plugins` entry point in each of its processes: this registers the CPU platform,
        # the CPU rollout backend and the TBRM advantage stub in driver, TaskRunner and workers alike.
        "verl.plugins": ["tbrm_verl = tbrm_verl.plugin"],
    },
)
