"""Build bn_ext._C against the PyTorch installed in this environment.

Environment variables:
  FORCE_CUDA=1            build the CUDA kernels or fail (nvcc and a CUDA-enabled torch required)
  BN_EXT_DISABLE_CUDA=1   build the CPU kernels only, even where CUDA is available
  TORCH_CUDA_ARCH_LIST    GPU architectures, e.g. "9.0" or "8.0;9.0+PTX"
  MAX_JOBS                parallel compile jobs (ninja)
  BN_EXT_DEBUG=1          -O0 -g builds
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup


def _find_cuda_home():
    """torch guesses CUDA_HOME as the grandparent folder of the first nvcc on PATH, which is wrong
    for a wrapper script or link such as /usr/local/bin/nvcc. Prefer a folder that really holds a
    toolkit (bin/nvcc and include/cuda_runtime_api.h)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and os.path.exists(
            os.path.join(root, "include", "cuda_runtime_api.h")
        ):
            os.environ["CUDA_HOME"] = root
            return


_find_cuda_home()

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "bn_ext is compiled against the PyTorch of the environment it is installed into, and none "
        "was found.\nInstall torch first (pip install torch), then build without build isolation "
        "so the build sees it:\n    pip install --no-build-isolation .\n"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_DEFAULT_ARCHS = "8.0;8.6;9.0+PTX"


def env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def relative(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def cuda_wanted(cuda_sources):
    """CUDA kernels are built when there are any, torch has CUDA and nvcc is found (no GPU needed)."""
    reasons = []
    if not cuda_sources:
        reasons.append("there are no CUDA sources in csrc/cuda")
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        reasons.append("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if env_flag("BN_EXT_DISABLE_CUDA"):
        reasons.append("BN_EXT_DISABLE_CUDA is set")
    if env_flag("FORCE_CUDA") and reasons:
        sys.exit("FORCE_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))
    if reasons:
        print("bn_ext: building CPU kernels only: " + "; ".join(reasons))
    return not reasons


def extension():
    cpp_sources = relative(
        glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    )
    cuda_sources = relative(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    # -g0 in release builds: Python's own CFLAGS bring -g, and debug information for the kernels'
    # template instantiations was a quarter of their compile time and most of a 270 MB library.
    opt = ["-O0", "-g"] if env_flag("BN_EXT_DEBUG") else ["-O3"]
    cxx_opt = opt if env_flag("BN_EXT_DEBUG") else opt + ["-g0"]
    # -fopenmp: at::parallel_for's OpenMP implementation is a header template, compiled into our
    # own objects, and without the flag its `#pragma omp parallel` is dropped (serial loops).
    # The library then needs libgomp.so.1, and the loader reuses the one torch already loaded.
    # -ffp-contract=off: the compiler may otherwise fuse a * b + c into an FMA in one loop and not in
    # its twin (AVX2 build: float64 input gradients 1 ulp apart between the per-channel and split
    # paths). FMAs the kernels want are written out (std::fma, intrinsics), so results are the same
    # bits whichever path and build computes them.
    # -fno-trapping-math: no code here reads floating-point exception flags, and without it GCC
    # keeps a loop with a float comparison in a ternary (ReLU, clamps) scalar. It changes no value.
    cxx = cxx_opt + ["-fvisibility=hidden", "-ffp-contract=off", "-fno-trapping-math"]
    cxx += ["-fopenmp"] if sys.platform.startswith("linux") else []
    # The C++ runtime must not be mixed. The GPU machine's g++ is a wrapper whose -B search path
    # finds a static libstdc++ (even for an explicit -lstdc++), so the extension got its own
    # copy; that copy's exported symbols then resolved partly to the process's libstdc++.so.6
    # (loaded by torch), and formatting an integer into an error message crashed (SIGSEGV).
    # -lstdc++ links the shared runtime wherever the search path has it; --exclude-libs keeps any
    # static copy private to the extension (tests/test_errors.py checks that none is exported).
    link = ["-fopenmp", "-lstdc++", "-Wl,--exclude-libs,ALL"] if sys.platform.startswith("linux") else []
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if cuda_wanted(cuda_sources):
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            # No GPU to ask: build for common data-centre parts, with PTX for anything newer.
            os.environ["TORCH_CUDA_ARCH_LIST"] = CUDA_DEFAULT_ARCHS
        print(
            f"bn_ext: building CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(this GPU)')}"
        )
        return CUDAExtension(
            "bn_ext._C",
            cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("BN_EXT_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": opt + ["--use_fast_math", "-lineinfo"]},
            extra_link_args=link,
        )
    return CppExtension(
        "bn_ext._C", cpp_sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx}, extra_link_args=link
    )


# Name, version and the rest of the metadata: pyproject.toml.
setup(
    packages=find_packages(include=["bn_ext", "bn_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
