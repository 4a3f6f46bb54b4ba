"""Builds the package and its compiled CPU ops (sdtm._C) against the installed torch.

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch already installed
(the Makefile pins torch==2.13.0). ``DEBUG=1`` builds with -O0 -g.
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

DEBUG = os.environ.get("DEBUG", "0") == "1"
# -ffp-contract=off: no fused multiply-adds, so each product and sum rounds as in torch's op sequence.
CXX_FLAGS = ["-O0", "-g"] if DEBUG else ["-O3", "-ffp-contract=off", "-fopenmp"]
CXX_FLAGS += ["-std=c++17", "-fvisibility=hidden"]

setup(
    packages=find_packages(include=["sdtm", "sdtm.*", "sdtm_kernels", "sdtm_kernels.*"]),
    ext_modules=[
        CppExtension(
            name="sdtm._C",
            sources=sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")),
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=[] if DEBUG else ["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
