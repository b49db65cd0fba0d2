"""Build tlfast._C with CMake (pybind11, OpenMP; CUDA when TLFAST_CUDA allows and nvcc is found).

Environment:
  TLFAST_CUDA=AUTO|ON|OFF      build the CUDA kernels (default AUTO: when nvcc is found)
  CMAKE_CUDA_ARCHITECTURES     e.g. "80;90" (default)
  TLFAST_BUILD_JOBS            parallel compile jobs (default: CPU count)
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        mode = os.environ.get("TLFAST_CUDA", "AUTO").upper()
        if mode not in ("AUTO", "ON", "OFF"):
            raise SystemExit(f"TLFAST_CUDA must be AUTO, ON or OFF, not {mode!r}")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DTLFAST_CUDA={mode}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if os.environ.get("CMAKE_CUDA_ARCHITECTURES"):
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['CMAKE_CUDA_ARCHITECTURES']}")
        if mode != "OFF" and not os.environ.get("CUDACXX"):
            for nvcc in ("/usr/local/cuda/bin/nvcc",):
                if os.path.exists(nvcc):
                    args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        jobs = os.environ.get("TLFAST_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(ext_modules=[CMakeExtension("tlfast._C")], cmdclass={"build_ext": CMakeBuild})
