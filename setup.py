"""Installed import names: the folders ``kernels/`` and ``quantize/`` install as ``gq_kernels`` and
``gq_quantize`` (plain ``kernels`` and ``quantize`` are names other distributions install too:
Hugging Face's ``kernels`` is a top-level ``kernels`` that transformers probes for). Everything
else is in pyproject.toml."""
from setuptools import find_packages, setup

PACKAGES = {"gq_serve": "gq_serve", "gq_kernels": "kernels", "gq_quantize": "quantize"}

packages = [name for name in PACKAGES]
for name, folder in PACKAGES.items():
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

# The CPU kernels' C++ sources, compiled on first use (gq_kernels/cpu/build.py): a data-only package.
packages.append("gq_kernels.cpu.csrc")
PACKAGE_DATA = {"gq_kernels.cpu.csrc": ["*.h", "*.cpp"]}

setup(packages=packages, package_dir=PACKAGES, package_data=PACKAGE_DATA)
