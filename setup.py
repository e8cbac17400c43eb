"""Build sparseops: the CPU extension `sparseops._C` always, the CUDA extension `sparseops._cuda`
when a CUDA build of torch and nvcc are present (or FORCE_CUDA=1).

Environment switches:
  SPARSEOPS_NO_CUDA=1     skip the CUDA extension
  FORCE_CUDA=1            build the CUDA extension even if detection says no
  TORCH_CUDA_ARCH_LIST    GPU targets (default "8.0;9.0+PTX": sm_80, sm_90 and PTX for newer GPUs)
  CUDA_HOME               CUDA toolkit root (default: /usr/local/cuda, else found from nvcc)
  DEBUG=1                 -O0 -g
  MAX_JOBS                parallel compile jobs (ninja)
  NVCC_THREADS            nvcc --threads: GPU targets compiled in parallel per .cu file (default 2)
  VERSION_SUFFIX          local version suffix, e.g. "+cu130torch2.14"

The package requires torch of the minor version it is built against (e.g. torch>=2.14,<2.15): the
extensions link against libtorch's C++ API, which is not stable across minor versions.
"""
import glob
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home():
    # torch's own detection follows `which nvcc`; where nvcc is a wrapper script it picks a wrong root.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:  # ask nvcc itself where it lives (works through wrappers)
        out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True).stderr
        for line in out.splitlines():
            if "TOP=" in line:
                return line.split("TOP=", 1)[1].strip()
    except OSError:
        pass
    return str(Path(os.path.realpath(nvcc)).parent.parent)


_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home  # must be set before torch.utils.cpp_extension is imported
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")  # PTX: forward compatibility

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

DEBUG = _env_flag("DEBUG")
opt = ["-O0", "-g"] if DEBUG else ["-O3"]
# No -march=native: csrc/cpu/isa_*.cpp select AVX2/AVX-512 per function and dispatch at run time.
cxx_flags = opt + ["-std=c++20", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi", "-fno-math-errno"]


def want_cuda():
    if _env_flag("SPARSEOPS_NO_CUDA"):
        return False, "SPARSEOPS_NO_CUDA=1"
    if _env_flag("FORCE_CUDA"):
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if not _cuda_home or not os.path.exists(os.path.join(_cuda_home, "bin", "nvcc")):
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA_HOME={_cuda_home}"


def extensions():
    exts = [
        CppExtension(
            "sparseops._C",
            sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")),
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=False,
        )
    ]
    build_cuda, why = want_cuda()
    print(f"sparseops: CUDA extension {'ON' if build_cuda else 'OFF'} ({why}); "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    if build_cuda:
        include_dirs = []
        # ATen/cuda headers include cusparse.h; pip's CUDA runtime puts it under nvidia/cu*/include.
        try:
            import nvidia  # namespace package that pip's CUDA runtime wheels install into
            for base in nvidia.__path__:
                include_dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        except ImportError:
            pass
        exts.append(
            CUDAExtension(
                "sparseops._cuda",
                sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp")),
                include_dirs=include_dirs,
                define_macros=[("SPARSEOPS_CUDA_ARCHS", '"' + os.environ["TORCH_CUDA_ARCH_LIST"] + '"')],
                extra_compile_args={
                    "cxx": opt + ["-std=c++20"],
                    "nvcc": opt + ["-std=c++20", "-lineinfo",
                                   f"--threads={os.environ.get('NVCC_THREADS', '2')}"],
                },
            )
        )
    return exts


def install_requires():
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    return [f"torch>={major}.{minor},<{major}.{minor + 1}", "numpy", "tqdm>=4.60", "platformdirs>=3"]


def version():
    v = (ROOT / "version.txt").read_text().strip()
    return v + os.environ.get("VERSION_SUFFIX", "")


setup(
    version=version(),
    install_requires=install_requires(),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
