"""The machine a measurement ran on: CPU model and ISA flags, core counts, package versions.

A ranking measured on one CPU does not carry to the next (MEASURED.md trap 11): every figure
edgecli reports carries this description beside it.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_flags() -> tuple[str, set[str], int | None]:
    """(CPU model, ISA flags, physical cores or None) from /proc/cpuinfo, where there is one."""
    cpu_model, flags, cores = platform.processor() or platform.machine(), set(), set()
    try:
        phys = core = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key, val = key.strip(), val.strip()
            if key in ("model name", "Model", "Hardware") and val and cpu_model in (platform.processor(), platform.machine(), ""):
                cpu_model = val
            elif key in ("flags", "Features") and not flags:
                flags = set(val.split())
            elif key == "physical id":
                phys = val
            elif key == "core id":
                core = val
                cores.add((phys, core))
    except OSError:
        pass
    return cpu_model, flags, len(cores) or None


def isa_summary(flags: set[str]) -> dict[str, bool]:
    """The instruction-set features that decide which kernels (and so which precision) win."""
    isa = {
        "avx2": "avx2" in flags,
        "avx512": "avx512f" in flags,
        "vnni": bool({"avx512_vnni", "avx_vnni"} & flags),
        "amx": bool({"amx_tile", "amx_int8", "amx_bf16"} & flags),
        "bf16": bool({"avx512_bf16", "amx_bf16"} & flags),
    }
    if "asimd" in flags or "neon" in flags:  # Arm
        isa.update(neon=True, dotprod="asimddp" in flags, sve="sve" in flags)
    return isa


def versions(packages=("onnxruntime", "onnxruntime-gpu", "torch", "onnx", "numpy", "ai-edge-litert", "executorch",
                       "openvino")) -> dict[str, str]:
    """Python, edgecli and the installed ``packages`` (those not installed are left out)."""
    from importlib import metadata

    from edgecli import __version__

    out = {"python": platform.python_version(), "edgecli": __version__}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def environment() -> dict:
    """CPU model and ISA flags, core counts, versions: what a reader needs to compare two runs."""
    from edgecli.runtimes.ort import available_providers

    cpu_model, flags, physical = cpu_flags()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "cpu_model": cpu_model,
        "isa": isa_summary(flags),
        "isa_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "asimd", "sve"))),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "physical_cores": physical,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "versions": versions(),
        "ort_providers_available": available_providers(),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
