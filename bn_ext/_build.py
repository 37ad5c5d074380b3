"""What this bn_ext build was compiled with, and the runtime it runs in."""

import torch

from . import _C


def _loaded_openmp_runtimes():
    """Shared libraries of OpenMP runtimes mapped into this process (Linux only; [] elsewhere)."""
    names = set()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                base = path.rsplit("/", 1)[-1]
                if base.startswith(("libgomp", "libiomp", "libomp")):
                    names.add(path)
    except OSError:
        return []
    return sorted(names)


def build_info() -> dict:
    """torch version, whether bn_ext was built with CUDA (and which), and CPU threading."""
    flags = _C._build_flags()
    cuda_version = flags["cuda_version"]
    if cuda_version is not None:
        cuda_version = f"{cuda_version // 1000}.{(cuda_version % 1000) // 10}"
    return {
        "bn_ext": __import__("bn_ext").__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda": bool(flags["cuda"]),
        "cuda_version": cuda_version,
        "cuda_device_available": torch.cuda.is_available(),
        # which build of the CPU loops runs: "avx512bf16", "avx2" or "default" (BN_EXT_CPU_ISA caps it)
        "cpu_kernels": flags["cpu_kernels"],
        # whether the CPU loops that stream tensors prefetch ahead (off on AMD CPUs with AVX-512;
        # BN_EXT_PREFETCH=0 or =1 overrides)
        "cpu_prefetch": flags["cpu_prefetch"],
        "num_threads": torch.get_num_threads(),
        "openmp_runtimes": _loaded_openmp_runtimes(),
    }
