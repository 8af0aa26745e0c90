"""What this machine is and can do, for choices made per host: the default dtype, cache keys.

`dtype="auto"` takes bfloat16 only where the CPU multiplies it natively (AMX or AVX512-BF16 in
/proc/cpuinfo's flags): bfloat16 GEMMs were measured several times slower than float32 on an AVX2
host and several times faster on an AMX one (benchmarks/results/cpu_linear*, the design notes).
torch 2.13 has no public query for these flags, so they are read from the kernel's own list.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
HALF_DTYPES = ("bfloat16", "float16")


def _cpuinfo(field: str) -> str | None:
    """The first value of `field` in /proc/cpuinfo, or None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.cache
def cpu_flags() -> frozenset[str]:
    return frozenset((_cpuinfo("flags") or "").split())


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def native_bf16_flags() -> list[str]:
    return [f for f in NATIVE_BF16_FLAGS if f in cpu_flags()]


def auto_dtype(checkpoint_dtype: str | None, device: torch.device) -> tuple[str, str]:
    """(dtype name, why) for `dtype="auto"`. checkpoint_dtype: the weights' own dtype ("float32",
    "bfloat16", "float16"; "quantized" for a GGUF file's low-precision blocks; None when not stated).
    A float32 checkpoint stays float32; a half-precision or quantized one runs bfloat16 where the
    device multiplies it natively, else float32."""
    if checkpoint_dtype not in (*HALF_DTYPES, "quantized"):
        return "float32", f"the checkpoint's weights are {checkpoint_dtype or 'float32 (not stated)'}"
    if device.type == "cuda":
        return "bfloat16", "a CUDA device"
    flags = native_bf16_flags()
    if flags:
        return "bfloat16", f"this CPU multiplies bfloat16 natively ({', '.join(flags)})"
    return "float32", "this CPU has no native bfloat16 (no AMX or AVX512-BF16)"


def cache_dir() -> Path:
    """Where forklm keeps what it measured or parsed once per host: $FORKLM_CACHE_DIR, else
    $XDG_CACHE_HOME/forklm (~/.cache/forklm)."""
    if os.environ.get("FORKLM_CACHE_DIR"):
        return Path(os.environ["FORKLM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "forklm"


def write_cache_file(path: Path, text: str) -> None:
    """Write a cache entry atomically (another process reads either the old file or the new one);
    raises OSError where it cannot."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def release_free_heap() -> None:
    """Hand the C heap's freed pages back to the OS (glibc's malloc_trim). Loading a checkpoint frees
    hundreds of MB of transient float32 copies that glibc otherwise keeps in the process (the
    embedded model: resident 0.99 -> 0.78 GB, measured). A no-op where glibc is absent."""
    if platform.system() != "Linux":
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError) as e:
        log.debug("malloc_trim unavailable: %s", e)


def _busy_seconds() -> tuple[float, float, float] | None:
    """(CPU seconds every process used, CPU seconds this process used, wall clock), or None where
    /proc/stat is not there."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]  # cpu user nice system idle iowait ...
    except OSError:
        return None
    ticks = [int(x) for x in fields]
    busy = sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)  # all but idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.perf_counter()


class OthersMeter:
    """How many cores other processes kept busy between `start()` and `cores()` (0 where unknown):
    a measurement taken while a neighbour ran is not one to keep."""

    def start(self) -> OthersMeter:
        self._mark = _busy_seconds()
        return self

    def cores(self) -> float:
        now = _busy_seconds()
        if self._mark is None or now is None:
            return 0.0
        (busy0, own0, t0), (busy1, own1, t1) = self._mark, now
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-3)
