"""Builds the fused_bn._C extension against the installed torch.

    pip install --no-build-isolation -e .

Environment:
    FUSED_BN_CUDA=1/0      force / skip the CUDA kernels (default: build them when
                           nvcc is found and the installed torch is a CUDA build)
    TORCH_CUDA_ARCH_LIST   CUDA architectures (default: DEFAULT_CUDA_ARCHS below)
    FUSED_BN_WERROR=1      fail on any warning in the CUDA sources (nvcc and host compiler)
    FUSED_BN_PTXAS_VERBOSE=1  print ptxas register/spill usage of every kernel
    MAX_JOBS               parallel compile jobs (ninja)
"""

import glob
import os
import platform
import re
import sys

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
# CUDA 13 dropped Volta (sm_70); Turing to Hopper natively, plus PTX for newer GPUs.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"


def read_version():
    with open(os.path.join(ROOT, "fused_bn", "version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def relative_sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def want_cuda():
    requested = os.environ.get("FUSED_BN_CUDA", "").strip()
    available = cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    if requested == "0":
        return False, "FUSED_BN_CUDA=0"
    if requested == "1":
        if not available:
            sys.exit(
                "fused_bn: FUSED_BN_CUDA=1 but CUDA cannot be built: "
                f"CUDA_HOME={cpp_extension.CUDA_HOME}, torch.version.cuda={torch.version.cuda}"
            )
        return True, "FUSED_BN_CUDA=1"
    if available:
        return True, (
            f"nvcc at {cpp_extension.CUDA_HOME}, torch built with CUDA {torch.version.cuda}"
        )
    if torch.version.cuda is None:
        return False, "the installed torch is a CPU build"
    return False, "nvcc not found (set CUDA_HOME)"


def pip_cuda_include_dirs():
    """CUDA headers shipped by the nvidia-* wheels that CUDA builds of torch depend on.

    A bare toolkit may lack headers (cuBLAS, cuSPARSE, ...) that torch's own headers include.
    """
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def env_flag(name):
    return os.environ.get(name, "").strip() == "1"


def nvcc_flags():
    flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    # Host-compiler warnings for the CUDA sources, as for the C++ ones; torch's
    # headers come in through -I, so the strict mode stays on nvcc diagnostics
    # and the host warnings that our code can trigger.
    flags += ["-Xcompiler", "-Wall,-Wextra,-Wno-unused-parameter"]
    if env_flag("FUSED_BN_WERROR"):
        flags += ["-Werror", "all-warnings", "-Xcompiler", "-Werror"]
    if env_flag("FUSED_BN_PTXAS_VERBOSE"):
        flags += ["-Xptxas", "-v"]
    return flags


# CPU kernel sources compiled once per instruction set, as ATen compiles its own
# CPU kernels: each copy gets the ISA's flags and CPU_CAPABILITY=<ISA>, which puts
# it (and at::vec::Vectorized) in a namespace of its own; csrc/cpu/cpu_capability.cpp
# picks one at run time. -ffp-contract=off: the compiler must not fuse multiply-adds
# differently in the forward and backward passes (see batch_norm_kernel.cpp).
CPU_ISA_SOURCES = ["csrc/cpu/batch_norm_kernel.cpp"]
CPU_ISA_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}
# torch's vector headers trip these two warnings by the hundred with GCC.
CPU_ISA_COMMON_FLAGS = ["-ffp-contract=off", "-Wno-maybe-uninitialized", "-Wno-unknown-pragmas"]


def cpu_isas(compiler_type):
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return list(CPU_ISA_FLAGS) if x86 and compiler_type == "unix" else ["DEFAULT"]


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, plus the per-ISA copies of CPU_ISA_SOURCES."""

    def build_extension(self, ext):
        isas = cpu_isas(self.compiler.compiler_type)
        print(f"fused_bn: CPU kernels for {', '.join(isas)}", flush=True)
        ext.define_macros += [(f"FUSED_BN_WITH_{isa}", None) for isa in isas if isa != "DEFAULT"]
        ext.depends = list(ext.depends) + CPU_ISA_SOURCES  # rebuild when they change
        for isa in isas:
            cflags = dict(ext.extra_compile_args)
            cflags["cxx"] = list(cflags["cxx"]) + CPU_ISA_FLAGS[isa] + CPU_ISA_COMMON_FLAGS
            ext.extra_objects += self.compiler.compile(
                CPU_ISA_SOURCES,
                output_dir=os.path.join(self.build_temp, f"cpu_{isa.lower()}"),
                macros=ext.define_macros
                + [("CPU_CAPABILITY", isa), (f"CPU_CAPABILITY_{isa}", None)],
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs=cflags,
                depends=ext.depends,
            )
        super().build_extension(ext)


def openmp_flags():
    """at::parallel_for is an inline template over `#pragma omp parallel`: without
    -fopenmp it compiles to a serial loop. Compile with OpenMP when torch itself uses
    it, and do not link an OpenMP runtime: the GOMP symbols resolve to the one torch
    loads (libtorch_cpu's libgomp), so there is a single thread pool per process."""
    if not torch._C.has_openmp or sys.platform != "linux":
        return []
    return ["-fopenmp"]


def extension():
    with_cuda, reason = want_cuda()
    version = read_version()
    sources = relative_sources("csrc/*.cpp") + relative_sources("csrc/cpu/*.cpp")
    sources = [s for s in sources if s not in CPU_ISA_SOURCES]  # see BuildExtension
    define_macros = [("FUSED_BN_VERSION", f'"{version}"')]
    cxx_flags = ["-O3", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    cxx_flags += openmp_flags()
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    extra = {"cxx": cxx_flags}
    builder = cpp_extension.CppExtension
    archs = ""
    if with_cuda:
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        sources += relative_sources("csrc/cuda/*.cu")
        define_macros += [("FUSED_BN_WITH_CUDA", None)]
        include_dirs += pip_cuda_include_dirs()
        extra["nvcc"] = nvcc_flags()
        builder = cpp_extension.CUDAExtension
    define_macros.append(("FUSED_BN_CUDA_ARCHS", f'"{archs}"'))
    print(
        f"fused_bn {version}: building "
        + (
            f"CPU + CUDA kernels (archs {archs}; {reason})"
            if with_cuda
            else f"CPU kernels only ({reason})"
        ),
        flush=True,
    )
    return builder(
        name="fused_bn._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
    )


setup(
    version=read_version(),
    packages=["fused_bn"],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
