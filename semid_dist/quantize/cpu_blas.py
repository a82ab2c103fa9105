"""The CPU kernel's threads and BLAS: how many threads torch and numpy's BLAS get
(`set_cpu_threads`), the row blocks the kernel splits a batch into, one per thread, each
with MKL and numpy's BLAS at one thread (`row_parallel`), and which sgemm multiplies on this
machine (torch's MKL, or numpy's BLAS: `mkl_local_threads`, `torch_gemm_is_exact`,
`mkl_is_faster`), and the CPU's /proc/cpuinfo fields and torch's CPU library that decide it
(`cpuinfo`, `cpu_vendor`, `torch_cpu_library`). `semid_dist.quantize.encode` runs its
chunks through them."""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait

import threadpoolctl
import torch
from threadpoolctl import ThreadpoolController, threadpool_limits

_cpu_threads: int | None = None


def set_cpu_threads(n: int) -> None:
    """Give torch and the BLAS libraries loaded in this process so far (numpy's, which the
    CPU kernel calls) exactly `n` threads; oversubscribing 2 cores is up to 2x slower."""
    global _cpu_threads
    n = max(1, int(n))
    torch.set_num_threads(n)
    if n != _cpu_threads:  # threadpoolctl scans the loaded libraries: only when it changes
        threadpool_limits(limits=n, user_api="blas")
        # threadpoolctl >= 3.8 lets only the thread that last set OpenBLAS's process-wide
        # limit change it again while that thread lives: hand the control back, so that the
        # kernel's one-thread limit (`row_parallel`) holds in whichever thread it runs
        release = getattr(getattr(threadpoolctl, "OpenBLASController", None),
                          "clear_controlling_thread", None)
        if release is not None:
            release()
        _cpu_threads = n


# (pid, workers, pool): a forked child, or a caller wanting more threads, makes a new one
_pool: tuple[int, int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()
_blas: ThreadpoolController | None = None
_mkl_local: Callable[[int], int] | bool | None = None  # resolved on first use
_mkl_lock = threading.Lock()


def mkl_local_threads() -> Callable[[int], int] | None:
    """MKL's `MKL_Set_Num_Threads_Local` inside torch, or None where it cannot be found (a
    torch without MKL, or whose library hides the symbol): the kernel then multiplies on
    numpy's BLAS.

    The CPU kernel multiplies through torch's MKL, one thread per row block. torch's own
    `set_num_threads` is no use there: it sets MKL's count for the calling thread only (so a
    pool thread's sgemm ran on every core, against the other blocks) and torch's process-wide
    count as well. This call sets the calling thread's MKL count and nothing else."""
    global _mkl_local
    if _mkl_local is not None:
        return _mkl_local or None
    with _mkl_lock:  # resolved once: no caller sees it half-resolved
        if _mkl_local is None:
            found: Callable[[int], int] | bool = False
            if torch.backends.mkl.is_available():
                try:
                    fn = ctypes.CDLL(torch_cpu_library()).MKL_Set_Num_Threads_Local
                except (OSError, AttributeError):
                    pass
                else:
                    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                    found = fn
            _mkl_local = found
    return _mkl_local or None


def torch_cpu_library() -> str:
    """Path of torch's CPU library, which holds its MKL (Linux wheels)."""
    return os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")


def cpuinfo() -> dict[str, str]:
    """The first CPU's fields in /proc/cpuinfo (`vendor_id`, `model name`, `flags`, ...),
    or {} where it cannot be read (not Linux)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if not line.strip():  # the end of the first CPU's block
                    break
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


_cpu_vendor: str | None = None


def cpu_vendor() -> str:
    """The CPU's vendor string (`GenuineIntel`, `AuthenticAMD`, ...), or "" where it cannot
    be read; read once."""
    global _cpu_vendor
    if _cpu_vendor is None:
        _cpu_vendor = cpuinfo().get("vendor_id", "")
    return _cpu_vendor


def mkl_is_faster() -> bool:
    """Whether torch's MKL sgemm beats numpy's OpenBLAS on this CPU. On Intel's it does
    (1.1-1.2x at the kernel's shapes on a Xeon); on AMD's it does not (a Zen 4 EPYC: numpy's
    OpenBLAS 1.03-1.10x MKL on one thread, and the whole kernel 1.06-1.18x on two), so there
    numpy's BLAS multiplies. Fixed by the CPU, so every process of one machine multiplies
    alike."""
    return cpu_vendor() != "AuthenticAMD"


def torch_gemm_is_exact() -> bool:
    """Whether torch multiplies fp32 in fp32 now: a process that set
    `torch.set_float32_matmul_precision("medium")` (common in training scripts) or oneDNN's
    fp32 precision to bf16 / tf32 would have torch's CPU matmul round to bf16, and the kernel
    then multiplies on numpy's BLAS instead. So it does where torch will not say (it refuses
    while the backends' settings disagree, as inside another thread's `Tf32Switch` block)."""
    try:
        if torch.get_float32_matmul_precision() != "highest":
            return False
    except RuntimeError:
        return False
    mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
    return getattr(mkldnn, "fp32_precision", "none") in ("none", "ieee")


def row_parallel(fn: Callable[[slice], None], n: int, chunk_rows: int, threads: int) -> None:
    """Run fn(rows) over up to `threads` contiguous blocks of whole `chunk_rows` chunks of
    range(n), one per thread (the caller runs the first), with MKL (torch's sgemm, see
    `encode._gemm`) and the BLAS that numpy calls at one thread in each. So every chunk is the same
    one-thread sgemm on the same rows whatever the thread count, and the results are
    bit-identical on every engine."""
    global _pool, _blas
    chunks = -(-n // chunk_rows)
    parts = max(1, min(threads, chunks))
    bounds = [min(n, (chunks * i // parts) * chunk_rows) for i in range(parts + 1)]
    blocks = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    with _pool_lock:
        if parts > 1 and (_pool is None or _pool[0] != os.getpid() or _pool[1] < parts - 1):
            _pool = (os.getpid(), parts - 1,
                     ThreadPoolExecutor(parts - 1, thread_name_prefix="semid-kernel"))
        pool = _pool[2] if parts > 1 else None
        if _blas is None:
            _blas = ThreadpoolController()
    mkl = mkl_local_threads()

    def one_thread(rows: slice) -> None:
        before = mkl(1) if mkl else 0
        try:
            fn(rows)
        finally:
            if mkl:
                mkl(before)

    with _blas.limit(limits=1, user_api="blas"):
        futures = [pool.submit(one_thread, block) for block in blocks[1:]] if pool else []
        try:
            one_thread(blocks[0])
        finally:  # no block may still run (or write outputs) once the limit is lifted
            wait(futures)
        for future in futures:
            future.result()
