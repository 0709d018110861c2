"""rise_jax: RISE (Recursive Introspection) in JAX/Flax."""

from setuptools import find_packages, setup

_TEST_CORE = ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6", "scipy>=1.10"]

setup(
    name="rise_jax",
    version="0.1.0",
    description="RISE: Recursive Introspection for LLM self-improvement, in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["rise_jax", "rise_jax.*"]),
    package_data={"rise_jax": ["chat_templates/*.jinja", "tasks/prompts/*.json"]},
    install_requires=[
        # Ranges are the versions this project is tested with (see README "Tested versions"); every module that
        # rise_jax imports is listed (CI installs this list alone into a fresh virtualenv and imports them all).
        "jax>=0.10,<0.13",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "transformers>=5.20,<6",
        "datasets>=5,<6",
        "ml_collections>=1.0,<2",
        "safetensors>=0.6,<1",
        "sentencepiece>=0.2,<0.3",
        "numpy>=2.0,<3",
        "tqdm>=4.66,<5",
        "matplotlib>=3.8,<4",
        "math-verify[antlr4-13-2]>=0.8,<1",
        "absl-py>=2.0",
        "jinja2>=3.1,<4",
        "ml_dtypes>=0.5",
        "tokenizers>=0.22,<1",
        "tensorboardX>=2.6,<3",
        "gguf>=0.10,<1",                 # reading .gguf checkpoints (rise_jax.gguf)
    ],
    extras_require={
        # test-core: what the suite needs besides torch (the Python 3.12 CI leg, where no CPU-only torch is on PyPI).
        "test-core": _TEST_CORE,
        # accelerate: transformers' own GGUF loader (the tests' reference for rise_jax.gguf) requires it.
        "test": _TEST_CORE + ["accelerate>=1", "torch>=2.5", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6"],
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
    },
    entry_points={"console_scripts": []},
)
