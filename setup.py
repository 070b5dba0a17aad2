"""Builds fused_margin and (later) its C++/CUDA extension fused_margin._C."""

from setuptools import setup

setup(
    packages=["fused_margin", "fused_margin.heads", "fused_margin.backends", "fused_margin.triton_kernels"],
    package_dir={"fused_margin.triton_kernels": "triton_kernels"},
)
