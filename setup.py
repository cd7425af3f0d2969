"""Packaging for seft: prune LLaMA/Mistral-family LMs and repair them with SEFT.

torch is deliberately a loose range: `make install` puts the CPU wheel
(torch==2.13.0) in first, and a range it satisfies adds nothing heavier.

`seft_peft_hook.pth` goes to site-packages itself (not to a package folder):
Python runs its one line at start-up, which makes peft learn the SEFT adapter
type the moment peft is imported (seft/_peft_hook.py says why this
mechanism). setuptools has no option for a file at the site-packages root,
so `install_data` is pointed at the library folder: that is the wheel's root
for `pip install .` and for the editable wheel of `pip install -e .` alike.
setuptools' editable build asks the distribution `has_data()` (which plain
setuptools lacks: data files were silently left out of editable wheels)
before it runs install_data, hence `SeftDistribution`.
tests/test_import_hook.py builds both wheels and checks the .pth in each.
"""
from setuptools import find_packages, setup
from setuptools.dist import Distribution

try:
    from setuptools.command.install_data import install_data
except ImportError:  # older setuptools: the distutils command it re-exports
    from distutils.command.install_data import install_data

PTH = "seft_peft_hook.pth"


class InstallDataToSitePackages(install_data):
    """install_data into the library folder (site-packages), where .pth files are read."""

    def finalize_options(self) -> None:
        self.set_undefined_options("install", ("install_lib", "install_dir"))
        super().finalize_options()


class SeftDistribution(Distribution):
    def has_data(self) -> bool:
        """What setuptools' editable_wheel asks before installing data files (it never asks has_data_files)."""
        return self.has_data_files()


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
    data_files=[("", [PTH])],
    cmdclass={"install_data": InstallDataToSitePackages},
    distclass=SeftDistribution,
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
