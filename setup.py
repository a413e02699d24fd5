"""Build anchor_ext._C.

A CUDAExtension when torch has CUDA and nvcc is found, else a CppExtension (CPU
only). Environment variables:

* ``ANCHOR_EXT_BUILD=cpu|cuda|auto`` (default auto): force a CPU-only build, or
  require a CUDA build (then a missing nvcc or CUTLASS is an error, not a fallback).
* ``TORCH_CUDA_ARCH_LIST`` (default ``9.0a``): ``;``/space separated, e.g.
  ``"9.0a;8.0"``. The Hopper kernels need ``9.0a`` (wgmma); other archs get the
  portable kernels only.
* ``CUTLASS_DIR``: a CUTLASS checkout (its ``include/`` is used); else
  ``third_party/cutlass``; else the ``nvidia-cutlass`` PyPI package.
* ``MAX_JOBS``: parallel compile jobs for ninja (default: CPU count).
* ``CUDA_HOME``: the toolkit folder; found like the Makefile does when unset or wrong.

Build with ``pip install --no-build-isolation .``: the extension is compiled against the
installed torch, which an isolated build environment does not have (the build then stops
at once and says so). The wheel's version carries that torch (``0.1.0+torch2.14.1.cu130``)
and its metadata pins it.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _fail(msg: str) -> None:
    sys.exit(f"anchor_ext build error: {msg}")


NO_ISOLATION_HINT = (
    "build against the torch you have installed: `pip install --no-build-isolation .` "
    "(pip's default build isolation gives the build a fresh environment without your torch, "
    "and the extension's binary is bound to the torch it is compiled with)")


def import_torch():
    """torch from the build environment, or a failure in the first seconds saying what to run."""
    try:
        import torch
    except ImportError:
        _fail(f"torch is not importable in the build environment; {NO_ISOLATION_HINT}")
    return torch


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder holding bin/nvcc and include/cuda_runtime.h, found as the
    Makefile does: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, then the folder above the real
    nvcc on PATH. torch guesses from the nvcc on PATH, which may be a wrapper elsewhere."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def version_tag(torch) -> str:
    """The wheel's local version: the torch it is bound to and its CUDA (or cpu), e.g.
    ``torch2.14.1.cu130`` (flash-attn and FlashInfer wheels carry the same)."""
    base = torch.__version__.split("+")[0]
    cuda = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return f"torch{base}.{cuda}"


def find_cutlass_include() -> str | None:
    """CUTLASS/CuTe headers: $CUTLASS_DIR, then third_party/cutlass, then nvidia-cutlass."""
    candidates = []
    if os.environ.get("CUTLASS_DIR"):
        candidates.append(os.path.join(os.environ["CUTLASS_DIR"], "include"))
    candidates.append(os.path.join(ROOT, "third_party", "cutlass", "include"))
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(os.path.join(loc, "source", "include"))
    for inc in candidates:
        if os.path.isfile(os.path.join(inc, "cute", "tensor.hpp")):
            return inc
    return None


def gencode_flags(arch_list: str) -> list[str]:
    flags = []
    for arch in arch_list.replace(";", " ").split():
        arch = arch.replace("+PTX", "")
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def nvidia_include_dirs() -> list[str]:
    """CUDA 13 headers shipped as pip packages beside torch (site-packages/nvidia/cu13/include)."""
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    return [p for p in glob.glob(os.path.join(site, "nvidia", "cu*", "include")) if os.path.isdir(p)]


def make_extension():
    torch = import_torch()
    from torch.utils import cpp_extension

    mode = os.environ.get("ANCHOR_EXT_BUILD", "auto").lower()
    if mode not in ("auto", "cpu", "cuda"):
        _fail(f"ANCHOR_EXT_BUILD must be auto, cpu or cuda, got {mode!r}")
    nvcc = None
    if cpp_extension.CUDA_HOME is not None:
        candidate = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
        nvcc = candidate if os.path.exists(candidate) else None
    has_cuda_torch = torch.version.cuda is not None
    want_cuda = mode == "cuda" or (mode == "auto" and has_cuda_torch and nvcc is not None)
    if mode == "cuda" and not has_cuda_torch:
        _fail("ANCHOR_EXT_BUILD=cuda but this torch has no CUDA (torch.version.cuda is None)")
    if want_cuda and nvcc is None:
        _fail("a CUDA build needs nvcc: set CUDA_HOME to the toolkit folder holding bin/nvcc")

    # No -std flag: torch's BuildExtension adds the standard its own headers were
    # built with (C++17 up to torch 2.12, C++20 from 2.13). Forcing another one
    # changes the layout of c10 types shared with libtorch (seen: a segfault on
    # the first c10::Error thrown, C++20 objects against torch 2.11).
    cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unused-function"]
    # Keep the symbols of static archives the toolchain links in (a compiler whose
    # libstdc++ is static, like the lent GPU image's /opt/gcc) local to the extension:
    # exported, they mix with the process's shared libstdc++ (loaded by torch) and
    # std::ostream's numeric formatting segfaults (bench/diagnose_ostream.py: the default
    # link crashes, this flag or the shared system libstdc++ cures it).
    link_flags = ["-fopenmp", "-Wl,--exclude-libs,ALL"]
    sources = ["csrc/ops.cpp", "csrc/module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not want_cuda:
        print("anchor_ext: building the CPU-only extension")
        return cpp_extension.CppExtension(
            "anchor_ext._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

    cutlass = find_cutlass_include()
    if cutlass is None:
        _fail("CUTLASS/CuTe headers not found: set CUTLASS_DIR, clone CUTLASS into "
              "third_party/cutlass, or `pip install nvidia-cutlass` (see third_party/README.md)")
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0a")
    print(f"anchor_ext: building CUDA extension (nvcc {nvcc}, archs {arch_list}, CUTLASS {cutlass})")
    sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/**/*.cu", recursive=True))
    include_dirs += [cutlass] + nvidia_include_dirs()
    nvcc_flags = [
        "-O3", "--use_fast_math", "--expt-relaxed-constexpr",
        "-DANCHOR_WITH_CUDA", "-lineinfo", "--resource-usage",
        "-Xcompiler=-Wno-unused-function",
    ] + gencode_flags(arch_list)
    return cpp_extension.CUDAExtension(
        "anchor_ext._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags + ["-DANCHOR_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=link_flags)


def main():
    cuda_home = find_cuda_home()
    if cuda_home is not None:  # before torch.utils.cpp_extension reads it at import
        os.environ["CUDA_HOME"] = cuda_home
    torch = import_torch()
    from torch.utils.cpp_extension import BuildExtension

    if shutil.which("ninja") is None:
        print("anchor_ext: ninja not found, the build will be slow (pip install ninja)")
    setup(
        name="anchor_ext",
        version=f"0.1.0+{version_tag(torch)}",
        description="AnchorAttention sparse prefill kernels for long-context LLMs",
        packages=find_packages(include=["anchor_ext", "anchor_ext.*"]),
        ext_modules=[make_extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)},
        python_requires=">=3.10",
        # The binary is bound to the torch it was compiled with.
        install_requires=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
