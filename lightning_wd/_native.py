"""CPU loops that torch has no single operator for, built once per process with the C compiler.

* ``decay_sumsq_``: ``p <- p * factor`` and ``sum p²`` of the result, in one loop: one read and one
  write of every element, the norm of a logged step at no extra pass (torch needs a second
  reduction over each block, which costs 0.5-0.8 of a pass even with the block in cache);
* ``cautious_``: the cautious mask and decay in one loop (one read of the parameters and of their
  copy, one write), the bits of the ``torch.compile`` kernel it replaces on CPU, without its compile
  (5-12 s) or its on-disk cache;
* ``abs_sum``: ``sum |x|`` (relative mode's measure) in one read;
* ``stream_copy``: a copy whose stores bypass the cache (non-temporal stores, on x86), so the
  destination is not read before it is written: 1.3-1.5 passes where a plain copy costs about two.

The source is compiled on first use into a temporary directory (a fraction of a second), loaded by
``ctypes`` and the file removed: nothing is cached on disk, so a shared home directory or a later
compiler cannot hand a process a stale or foreign library. Where no compiler is found or the build
fails, ``library()`` returns None with the reason in ``_STATE`` and callers keep their torch
path, which gives the same bits (the decay) and the same bytes (the copy).

Only plain, contiguous CPU tensors of float32 or float64 reach these loops; the callers check.
The loops are split over ``torch.get_num_threads()`` OpenMP threads where the compiler has OpenMP,
each thread owning one contiguous range, and the partial sums are added in thread order, so a
result depends only on the data and the thread count.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

import torch
from torch import Tensor

_SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__SSE2__)
#include <immintrin.h>
#endif

/* Elements of one thread's range start on a multiple of this (whole cache lines). */
#define GRAIN 1024
#define MAXT 256

static void range_of(long n, int t, int nt, long *lo, long *hi) {
    long chunks = (n + GRAIN - 1) / GRAIN;
    long a = chunks * t / nt, b = chunks * (t + 1) / nt;
    *lo = a * GRAIN < n ? a * GRAIN : n;
    *hi = b * GRAIN < n ? b * GRAIN : n;
}

/* p[lo:hi] *= f and the sum of squares of the result, in double (no overflow of float32 squares):
   LANES independent sums over GRAIN elements, then added, so the compiler vectorises the loop without
   reordering any sum; the multiply is one rounding, as torch's (no contraction: -ffp-contract=off). */
#define DECAY_SUMSQ(NAME, T, LANES)                                                   \
static double NAME##_range(T *restrict p, long lo, long hi, T f) {                    \
    double total = 0.0;                                                               \
    long i = lo;                                                                      \
    for (; i + GRAIN <= hi; i += GRAIN) {                                             \
        double acc[LANES] = {0};                                                      \
        for (long k = i; k < i + GRAIN; k += LANES) {                                 \
            for (int j = 0; j < LANES; j++) {                                         \
                T y = p[k + j] * f;                                                   \
                p[k + j] = y;                                                         \
                acc[j] += (double)y * (double)y;                                      \
            }                                                                         \
        }                                                                             \
        double chunk = 0.0;                                                           \
        for (int j = 0; j < LANES; j++) chunk += acc[j];                              \
        total += chunk;                                                               \
    }                                                                                 \
    for (; i < hi; i++) {                                                             \
        T y = p[i] * f;                                                               \
        p[i] = y;                                                                     \
        total += (double)y * (double)y;                                               \
    }                                                                                 \
    return total;                                                                     \
}                                                                                     \
double NAME(T *p, long n, double factor, int nt) {                                    \
    double partial[MAXT];                                                             \
    T f = (T)factor;                                                                  \
    if (nt < 1) nt = 1;                                                               \
    if (nt > MAXT) nt = MAXT;                                                         \
    _Pragma("omp parallel num_threads(nt)")                                           \
    {                                                                                 \
        int t = 0, got = 1;                                                           \
        LWD_THREAD(t, got);                                                           \
        for (int u = t; u < nt; u += got) {                                           \
            long lo, hi;                                                              \
            range_of(n, u, nt, &lo, &hi);                                             \
            partial[u] = NAME##_range(p, lo, hi, f);                                  \
        }                                                                             \
    }                                                                                 \
    double total = 0.0;                                                               \
    for (int u = 0; u < nt; u++) total += partial[u];                                 \
    return total;                                                                     \
}

#ifdef _OPENMP
#define LWD_THREAD(t, got) do { t = omp_get_thread_num(); got = omp_get_num_threads(); } while (0)
#else
#define LWD_THREAD(t, got) do { } while (0)
#endif

DECAY_SUMSQ(decay_sumsq_f32, float, 16)
DECAY_SUMSQ(decay_sumsq_f64, double, 8)

/* Where the update moved p toward zero ((p - b) b < 0, b the parameters before it), p <- p - p s, or
   p - clamp(p, -s, s) with soft (the soft threshold of ord=1); elsewhere p is written back unchanged. */
#define CAUTIOUS(NAME, T)                                                             \
static void NAME##_range(T *restrict p, const T *restrict b, long lo, long hi, T s, int soft) { \
    if (soft) {                                                                       \
        for (long i = lo; i < hi; i++) {                                              \
            T x = p[i], o = b[i];                                                     \
            T c = x < -s ? -s : (x > s ? s : x);                                      \
            p[i] = ((x - o) * o < (T)0) ? x - c : x;                                  \
        }                                                                             \
    } else {                                                                          \
        for (long i = lo; i < hi; i++) {                                              \
            T x = p[i], o = b[i];                                                     \
            p[i] = ((x - o) * o < (T)0) ? x - x * s : x;                              \
        }                                                                             \
    }                                                                                 \
}                                                                                     \
void NAME(T *p, const T *b, long n, double step, int soft, int nt) {                  \
    T s = (T)step;                                                                    \
    if (nt < 1) nt = 1;                                                               \
    if (nt > MAXT) nt = MAXT;                                                         \
    _Pragma("omp parallel num_threads(nt)")                                           \
    {                                                                                 \
        int t = 0, got = 1;                                                           \
        LWD_THREAD(t, got);                                                           \
        for (int u = t; u < nt; u += got) {                                           \
            long lo, hi;                                                              \
            range_of(n, u, nt, &lo, &hi);                                             \
            NAME##_range(p, b, lo, hi, s, soft);                                      \
        }                                                                             \
    }                                                                                 \
}

CAUTIOUS(cautious_f32, float)
CAUTIOUS(cautious_f64, double)

/* sum |x| in double, by LANES independent sums over GRAIN elements (as DECAY_SUMSQ). */
#define ABS_SUM(NAME, T, LANES)                                                       \
static double NAME##_range(const T *restrict x, long lo, long hi) {                   \
    double total = 0.0;                                                               \
    long i = lo;                                                                      \
    for (; i + GRAIN <= hi; i += GRAIN) {                                             \
        double acc[LANES] = {0};                                                      \
        for (long k = i; k < i + GRAIN; k += LANES) {                                 \
            for (int j = 0; j < LANES; j++) {                                         \
                T v = x[k + j];                                                       \
                acc[j] += (double)(v < (T)0 ? -v : v);                                \
            }                                                                         \
        }                                                                             \
        double chunk = 0.0;                                                           \
        for (int j = 0; j < LANES; j++) chunk += acc[j];                              \
        total += chunk;                                                               \
    }                                                                                 \
    for (; i < hi; i++) total += (double)(x[i] < (T)0 ? -x[i] : x[i]);                \
    return total;                                                                     \
}                                                                                     \
double NAME(const T *x, long n, int nt) {                                             \
    double partial[MAXT];                                                             \
    if (nt < 1) nt = 1;                                                               \
    if (nt > MAXT) nt = MAXT;                                                         \
    _Pragma("omp parallel num_threads(nt)")                                           \
    {                                                                                 \
        int t = 0, got = 1;                                                           \
        LWD_THREAD(t, got);                                                           \
        for (int u = t; u < nt; u += got) {                                           \
            long lo, hi;                                                              \
            range_of(n, u, nt, &lo, &hi);                                             \
            partial[u] = NAME##_range(x, lo, hi);                                     \
        }                                                                             \
    }                                                                                 \
    double total = 0.0;                                                               \
    for (int u = 0; u < nt; u++) total += partial[u];                                 \
    return total;                                                                     \
}

ABS_SUM(abs_sum_f32, float, 16)
ABS_SUM(abs_sum_f64, double, 8)

/* dst[0:n] = src[0:n] (bytes), the stores of whole aligned vectors non-temporal where the CPU has them. */
static void stream_range(char *restrict dst, const char *restrict src, size_t n) {
#if defined(__AVX512F__)
    const size_t W = 64;
#elif defined(__AVX__)
    const size_t W = 32;
#elif defined(__SSE2__)
    const size_t W = 16;
#else
    const size_t W = 0;
#endif
    size_t i = 0;
    if (W) {
        size_t head = (W - ((uintptr_t)dst & (W - 1))) & (W - 1);
        if (head > n) head = n;
        memcpy(dst, src, head);
        i = head;
        for (; i + W <= n; i += W) {
#if defined(__AVX512F__)
            _mm512_stream_si512((void *)(dst + i), _mm512_loadu_si512((const void *)(src + i)));
#elif defined(__AVX__)
            _mm256_stream_si256((__m256i *)(dst + i), _mm256_loadu_si256((const __m256i *)(src + i)));
#elif defined(__SSE2__)
            _mm_stream_si128((__m128i *)(dst + i), _mm_loadu_si128((const __m128i *)(src + i)));
#endif
        }
#if defined(__SSE2__)
        _mm_sfence();
#endif
    }
    memcpy(dst + i, src + i, n - i);
}

void stream_copy(void *dst, const void *src, size_t n, int nt) {
    if (nt < 1) nt = 1;
    if (nt > MAXT) nt = MAXT;
    _Pragma("omp parallel num_threads(nt)")
    {
        int t = 0, got = 1;
        LWD_THREAD(t, got);
        for (int u = t; u < nt; u += got) {
            size_t lo = (n / 64) * u / nt * 64, hi = u + 1 == nt ? n : (n / 64) * (u + 1) / nt * 64;
            stream_range((char *)dst + lo, (const char *)src + lo, hi - lo);
        }
    }
}
"""

#: The C compilers tried, in order, after ``$CC``.
_CC = ("cc", "gcc", "clang")

#: Elements from which a loop is split over threads (a thread per this many, up to torch's count):
#: below it, starting the threads costs more than they save.
_PER_THREAD = 1 << 18

#: The loaded library, or the reason none could be built (``failed``); None before the first use.
_STATE: dict[str, Any] = {"library": None, "failed": None}


def library() -> Any:
    """The built library (a ``ctypes.CDLL``), built on first call; None where it cannot be (``_STATE["failed"]``)."""
    if _STATE["library"] is None and _STATE["failed"] is None:
        try:
            _STATE["library"] = _build()
        except Exception as err:  # no compiler, a failed build or load: callers keep their torch path
            _STATE["failed"] = f"{type(err).__name__}: {next(iter(str(err).strip().splitlines()), '')}"
    return _STATE["library"]


def _compiler() -> str:
    found = [os.environ["CC"]] if os.environ.get("CC") else []
    for name in (*found, *_CC):
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError("no C compiler found ($CC, " + ", ".join(_CC) + ")")


def _build() -> Any:
    if sys.platform == "win32":
        raise OSError("the CPU kernels are built with a Unix C compiler; Windows keeps the torch path")
    cc = _compiler()
    with tempfile.TemporaryDirectory(prefix="lightning_wd_") as folder:
        source = os.path.join(folder, "kernels.c")
        target = os.path.join(folder, "kernels.so")
        with open(source, "w") as f:
            f.write(_SOURCE)
        base = [cc, "-O3", "-std=c11", "-ffp-contract=off", "-shared", "-fPIC", source, "-o", target]
        errors = []
        # the widest build first; each fallback drops what a compiler may lack
        for extra in (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], []):
            done = subprocess.run([*base[:-4], *extra, *base[-4:]], capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                lib = ctypes.CDLL(target)  # loaded before the folder (and the file) is removed
                break
            errors.append(done.stderr.strip())
        else:
            raise RuntimeError(f"{cc} could not build the CPU kernels: {errors[-1] or errors[0]}")
    for name in ("decay_sumsq_f32", "decay_sumsq_f64"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_double
        fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_double, ctypes.c_int]
    for name in ("cautious_f32", "cautious_f64"):
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_double, ctypes.c_int, ctypes.c_int]
    for name in ("abs_sum_f32", "abs_sum_f64"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_double
        fn.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
    lib.stream_copy.restype = None
    lib.stream_copy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return lib


def _threads(numel: int) -> int:
    return max(1, min(torch.get_num_threads(), numel // _PER_THREAD))


def decay_sumsq_(t: Tensor, factor: float) -> float:
    """``t <- t * factor`` (``factor`` rounded to ``t``'s dtype, as torch rounds a Python number) and ``sum t²``
    after it, in double. ``t``: a plain, contiguous, non-empty float32 or float64 CPU tensor (unchecked)."""
    fn = library().decay_sumsq_f32 if t.dtype == torch.float32 else library().decay_sumsq_f64
    return float(fn(t.data_ptr(), t.numel(), factor, _threads(t.numel())))


def stream_copy(copy: Tensor, t: Tensor, nbytes: int) -> None:
    """``copy[:] = t``: ``nbytes`` bytes of two contiguous CPU tensors of one shape and dtype (unchecked)."""
    library().stream_copy(copy.data_ptr(), t.data_ptr(), nbytes, _threads(nbytes // t.element_size()))


def cautious_(t: Tensor, before: Tensor, step: float, soft: bool) -> None:
    """Where ``(t - before) before < 0``: ``t <- t - t step`` (``soft``: ``t - clamp(t, -step, step)``), ``step``
    rounded to ``t``'s dtype; ``t`` and ``before``: plain, contiguous, non-empty float32 or float64 CPU tensors of one
    shape and dtype (unchecked)."""
    fn = library().cautious_f32 if t.dtype == torch.float32 else library().cautious_f64
    fn(t.data_ptr(), before.data_ptr(), t.numel(), step, int(soft), _threads(t.numel()))


def abs_sum(t: Tensor) -> float:
    """``sum |t|`` in double; ``t``: a plain, contiguous, non-empty float32 or float64 CPU tensor (unchecked)."""
    fn = library().abs_sum_f32 if t.dtype == torch.float32 else library().abs_sum_f64
    return float(fn(t.data_ptr(), t.numel(), _threads(t.numel())))
