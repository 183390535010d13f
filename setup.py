"""Installed import names: the folders ``kernels/`` and ``quantize/`` install as ``gq_kernels`` and
``gq_quantize`` (plain ``kernels`` and ``quantize`` are names other distributions install too:
Hugging Face's ``kernels`` is a top-level ``kernels`` that transformers probes for). Everything
else is in pyproject.toml."""
from setuptools import find_packages, setup

PACKAGES = {"gq_serve": "gq_serve", "gq_kernels": "kernels", "gq_quantize": "quantize"}

packages = [name for name in PACKAGES]
for name, folder in PACKAGES.items():
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=PACKAGES)
