"""Packaging for seft: prune LLaMA/Mistral-family LMs and repair them with SEFT.

torch is deliberately a loose range: `make install` puts the CPU wheel
(torch==2.13.0) in first, and a range it satisfies adds nothing heavier.
"""
from setuptools import find_packages, setup

setup(
    name="seft",
    version="0.1.0",
    description="Prune LLaMA/Mistral-family LLMs and repair them with Sparsity Evolution Fine-Tuning",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["seft", "seft.*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0,<6",
        "peft>=0.21",
        "accelerate>=1.0",
        "datasets>=3.0",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "gguf>=0.10",
        "gensim>=4.3",
    ],
    extras_require={
        "eval": ["lm-eval[hf]>=0.4.8,<0.5"],
        "quant": ["bitsandbytes>=0.45"],
        "dev": ["pytest>=8", "pytest-timeout>=2.2", "ruff>=0.5", "matplotlib>=3.7", "tensorboard>=2.14"],
    },
    entry_points={"console_scripts": ["seft=seft.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
