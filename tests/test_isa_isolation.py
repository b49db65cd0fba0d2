"""Each ISA's kernels stay in their own namespace: no library code is compiled for an ISA the CPU may lack.

The linker keeps one copy of every weak symbol (std::vector<float>'s constructor, say) across the
translation units that instantiate it.  If fused_knn_avx512.cpp compiled those with AVX-512, the
AVX2 and generic kernels could call the AVX-512 copy and die with SIGILL on a CPU without it (this
happened on an AVX2-only AMD EPYC).  The fix is structural (fused_knn_std.h); this test compiles each
ISA translation unit as CMake does and checks that only tlfast::cpu::<isa>:: functions use vector
registers wider than SSE (ymm, zmm) or AVX-512 mask registers.
"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("g++") or shutil.which("c++")
OBJDUMP = shutil.which("objdump")
pytestmark = pytest.mark.skipif(not (CXX and OBJDUMP), reason="needs a C++ compiler and objdump (CI has both)")

WIDE = re.compile(r"%zmm|%ymm|%k[0-7]\b")


def functions_using_wide_registers(obj: Path) -> dict[str, str]:
    dis = subprocess.run([OBJDUMP, "-d", "--no-show-raw-insn", "-C", str(obj)], capture_output=True, text=True,
                         check=True).stdout
    found, current = {}, None
    for line in dis.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            current = head.group(1)
        elif current and WIDE.search(line):
            found.setdefault(current, line.strip())
    return found


@pytest.mark.parametrize("kernel,isa", [("fused_knn", isa) for isa in ("amx", "avx512bf16", "avx512", "avx2", "generic")]
                         + [(kernel, isa) for kernel in ("sinkhorn", "gram") for isa in ("avx512", "avx2", "generic")])
def test_only_the_isa_namespace_uses_the_isa(kernel, isa, tmp_path):
    obj = tmp_path / f"{isa}.o"
    # The flags CMakeLists.txt gives every C++ source (no ISA flags: the TU's pragma sets the ISA).
    subprocess.run([CXX, "-O3", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp", "-std=gnu++17", "-fPIC",
                    f"-I{ROOT / 'csrc'}", "-c", str(ROOT / "csrc" / "cpu" / f"{kernel}_{isa}.cpp"), "-o", str(obj)],
                   check=True)
    wide = functions_using_wide_registers(obj)
    leaked = {name: insn for name, insn in wide.items() if f"tlfast::cpu::{isa}::" not in name}
    assert not leaked, f"code outside tlfast::cpu::{isa} compiled with wide registers: {leaked}"
    if isa == "generic":
        assert not wide
    else:
        assert wide, "the ISA pragma did not take effect: no kernel uses the wide registers"


@pytest.mark.parametrize("amx", [0, 1])
def test_bf16_pair_layout_matches_the_float32_kernel(amx, tmp_path):
    """The AVX512-BF16 kernel's pair packing and epilogue (amx=1: the AMX kernel's 16-query blocks
    and tile layout), with vdpbf16ps / tdpbf16ps written out, built for AVX2 (this machine has
    neither): same answers as the float32 kernel on the widened inputs."""
    exe = tmp_path / "bf16_pairs_check"
    subprocess.run([CXX, "-O2", "-fopenmp", "-std=gnu++17", f"-DCHECK_AMX={amx}", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "tests" / "cpp" / "bf16_pairs_check.cpp"), "-o", str(exe)], check=True)
    proc = subprocess.run([str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("layout", [0, 1, 2], ids=["generic-4x12", "avx2-4x24", "avx512-8x48"])
def test_gram_kernel_tiles_every_layout(layout, tmp_path):
    """The Gram kernel's packing and triangular tiling in each ISA's register layout, built without ISA
    flags (GCC lowers the wide vectors), so the AVX-512 layout is checked on any CPU: the upper
    triangle equals a float64 product on odd shapes and thread counts, nothing wholly below it is written."""
    exe = tmp_path / "gram_check"
    subprocess.run([CXX, "-O2", "-fopenmp", "-std=gnu++17", "-Wno-psabi", f"-DCHECK_LAYOUT={layout}",
                    f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "cpp" / "gram_check.cpp"), "-o", str(exe)], check=True)
    proc = subprocess.run([str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")
