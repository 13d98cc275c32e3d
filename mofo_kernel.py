"""
MoFO's steps 4-5 compiled for the CPU: opt-in, MoFO(..., compiled=True), bit for bit the same.

mofo_fast.py finds a big tensor's exact threshold tau (the k-th largest |m|) in eager PyTorch: a
strided sample brackets tau, `band` splits the tensor into the entries above the bracket
(counted) and inside it (gathered), and an exact selection among the few gathered ones gives
tau; then `hardshrink` masks m and `addcdiv_` takes the step. Eagerly, that is a chain of full
passes (abs, two comparisons, a count, a subtraction, a scan, a gather, the mask, the step),
each about as costly as one of AdamW's, plus a dozen small ops per tensor. Here it is two calls:

    mofo_threshold: the same bracket (mofo_fast.bracket), then one read of m for the band, then an
                    exact selection on the floats' bits  ->  tau, count; or "missed"
    mofo_apply:     p = p + (-step_size * (|m| >= tau ? m : 0)) / denom, in addcdiv_'s
                    operation order, so the parameters are bitwise those of the eager step

The bracket is only a guess (a miss falls back to mofo_fast.py's full selection); tau is always an
exact k-th value, so the mask is the reference's: tests/test_mofo_kernel.py checks tau, count and
the step against torch bit for bit. Moments and denominator stay eager PyTorch (steps 1-3), as
they must for alpha = 1 to remain torch's AdamW.

It needs a C compiler with OpenMP (cc -fopenmp, as gcc has; $CC picks another), once per source
version: the library is built on first use (0.3 s with gcc 12) into the temp directory under a
name with the source's hash, so an edited kernel is rebuilt, never served stale. No PyTorch
headers and no ninja: the functions are called through ctypes on the tensors' data pointers.
"""
import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile

import torch

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

/* The k-th largest of v[0..m), 1 <= k <= m, by Hoare's selection with Wirth's partition: v is
   reordered so that v[0..k-1) >= v[k-1] >= v[k..m). Its branches go either way at random on
   random data, so it is kept for the last few hundred entries (kth_largest). */
static float hoare_select(float *v, long m, long k) {
    long lo = 0, hi = m - 1, t = k - 1;
    while (lo < hi) {
        float pivot = v[t];
        long i = lo, j = hi;
        do {
            while (v[i] > pivot) i++;
            while (pivot > v[j]) j--;
            if (i <= j) { float w = v[i]; v[i] = v[j]; v[j] = w; i++; j--; }
        } while (i <= j);
        if (j < t) lo = i;
        if (t < i) hi = j;
    }
    return v[t];
}

/* The k-th largest of v[0..m) (1 <= k <= m; values >= 0, no NaN, as |x| is) and, in *ge (if
   not NULL), how many are >= it. The bits of a float >= 0 read as an integer rise with its value,
   so a histogram of the bits' top 11 varying digits splits v into 2048 ordered buckets: the k-th
   largest lies in the bucket where the count from the top reaches k. Keep that bucket (v is
   overwritten), count those above it, repeat until a few hundred are left: ~3 plain passes. */
static float kth_largest(float *v, long m, long k, long *ge) {
    long above = 0, count[2048];
    while (m > 256) {
        uint32_t lo = UINT32_MAX, hi = 0, b;
        for (long i = 0; i < m; i++) { memcpy(&b, v + i, 4); lo = b < lo ? b : lo; hi = b > hi ? b : hi; }
        if (lo == hi) { if (ge) *ge = above + m; return v[0]; }
        int shift = 0;
        while (((hi - lo) >> shift) >= 2048) shift++;
        memset(count, 0, sizeof count);
        for (long i = 0; i < m; i++) { memcpy(&b, v + i, 4); count[(b - lo) >> shift]++; }
        long j = (hi - lo) >> shift, n = 0;
        for (; count[j] < k; j--) {  /* the k-th largest lies below bucket j */
            k -= count[j];
            above += count[j];
        }
        for (long i = 0; i < m; i++) { memcpy(&b, v + i, 4); if (((b - lo) >> shift) == (uint32_t)j) v[n++] = v[i]; }
        m = n;
    }
    float t = hoare_select(v, m, k);
    long c = 0;
    for (long i = 0; i < m; i++) c += v[i] >= t;
    if (ge) *ge = above + c;
    return t;
}

static long gcd(long a, long b) { while (b) { long r = a % b; a = b; b = r; } return a; }

/* mofo_fast.band on |x|, in one read of x: each thread takes a contiguous part, 256 entries at a
   time. A plain loop (which the compiler turns into SIMD code) flags the band's entries, a byte
   each, and counts those above hi; then the flags are read 8 at a time as one 64-bit word and
   only the set bytes of the few nonzero words are visited, writing |x| at the start of the
   part's region of `out` (room for n). The parts are then moved together, in order. Returns
   the band's size; *above gets the count above hi. */
static long band(const float *x, long n, float lo, float hi, float *out, long *above, int threads) {
    long found[64], over[64];
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        long start = n * t / nt, end = n * (t + 1) / nt, a = 0, c = 0;
        unsigned char flags[256];
        for (long i = start; i < end; i += 256) {
            long len = end - i < 256 ? end - i : 256, j = 0;
            for (long e = 0; e < len; e++) {
                float s = fabsf(x[i + e]);
                flags[e] = (s >= lo) & (s <= hi);
                a += s > hi;
            }
            for (; j + 8 <= len; j += 8) {
                uint64_t word;
                memcpy(&word, flags + j, 8);
                for (; word; word &= word - 1)  /* a set byte holds one set bit, its lowest */
                    out[start + c++] = fabsf(x[i + j + (__builtin_ctzll(word) >> 3)]);
            }
            for (; j < len; j++)
                if (flags[j]) out[start + c++] = fabsf(x[i + j]);
        }
        found[t] = c;
        over[t] = a;
        #pragma omp barrier
        #pragma omp single
        for (int u = 1; u < nt; u++) {
            memmove(out + found[0], out + n * u / nt, found[u] * sizeof(float));
            found[0] += found[u];
            over[0] += over[u];
        }
    }
    *above = over[0];
    return found[0];
}

/* mofo_fast.topk_threshold on |x|: *tau = the k-th largest |x_i| and *count =
   #{i : |x_i| >= tau}; returns 0, or 1 when the bracket missed tau (nothing written). The bracket
   is mofo_fast.bracket's, line for line; a tensor of at most 4 * sample_size entries is all band.
   out: room for n. */
int mofo_threshold(const float *x, long n, long k, long sample_size, double z, float *out,
                   int threads, float *tau, long *count) {
    long above, c;
    float lo = 0.0f, hi = INFINITY;
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    if (n > 4 * sample_size) {
        long stride = n / sample_size, size = 0;
        while (gcd(stride, n) > 1) stride--;
        float *sample = malloc(2 * sample_size * sizeof(float));  /* kth_largest overwrites: 2 copies */
        if (!sample) return 1;
        for (long i = stride / 2; i < n && size < sample_size; i += stride) sample[size++] = fabsf(x[i]);
        memcpy(sample + size, sample, size * sizeof(float));
        double mean = (double)k / n * size, spread = z * sqrt(mean * (1 - (double)k / n)) + 1;
        long r_lo = (long)ceil(mean + spread), r_hi = (long)floor(mean - spread);
        if (r_lo > size) r_lo = size;
        lo = kth_largest(sample, size, r_lo, NULL);
        hi = r_hi >= 1 ? kth_largest(sample + size, size, r_hi, NULL) : INFINITY;
        free(sample);
    }
    long m = band(x, n, lo, hi, out, &above, threads);
    if (!(above < k && k <= above + m)) return 1;
    if (n <= 4 * sample_size && m < n) return 1;  /* a NaN, which torch.topk ranks first */
    float t = kth_largest(out, m, k - above, &c);  /* exact: the band's (k - above)-th largest */
    *count = above + c;
    *tau = t;
    return 0;
}

/* p.addcdiv_(m * (|m| >= tau), denom, value=step) without the masked copy: torch's CPU
   addcdiv computes self + value * t1 / t2, rounding after each operation, and so does this
   loop (built with -ffp-contract=off: no fused multiply-add), so p gets the very same bits. */
void mofo_apply(float *p, const float *m, const float *denom, long n, float tau, float step,
                int threads) {
    if (threads < 1) threads = 1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < n; i++) {
        float kept = fabsf(m[i]) >= tau ? m[i] : 0.0f;
        p[i] = p[i] + step * kept / denom[i];
    }
}
"""


@functools.cache
def library():
    """The compiled library, built on first use (0.3 s) and then loaded from disk."""
    name = f"mofo_kernel-{hashlib.sha256(SOURCE.encode()).hexdigest()[:12]}.so"
    path = os.path.join(tempfile.gettempdir(), name)
    if not os.path.exists(path):
        src, tmp = f"{path}.{os.getpid()}.c", f"{path}.{os.getpid()}.tmp"
        with open(src, "w") as f:
            f.write(SOURCE)
        cmd = [os.environ.get("CC", "cc"), "-O3", "-ffp-contract=off", "-fopenmp", "-shared",
               "-fPIC", src, "-o", tmp, "-lm"]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as e:
            raise RuntimeError(f"MoFO(compiled=True) needs a C compiler with OpenMP; `{' '.join(cmd)}` "
                               f"failed: {getattr(e, 'stderr', None) or e}") from e
        finally:
            os.remove(src)
        os.replace(tmp, path)  # atomic: a concurrent build never loads half a file
    lib = ctypes.CDLL(path)
    ptr, long_, float_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
    lib.mofo_threshold.restype = ctypes.c_int
    lib.mofo_threshold.argtypes = [ptr, long_, long_, long_, ctypes.c_double, ptr, ctypes.c_int,
                                   ctypes.POINTER(float_), ctypes.POINTER(long_)]
    lib.mofo_apply.restype = None
    lib.mofo_apply.argtypes = [ptr, ptr, ptr, long_, float_, float_, ctypes.c_int]
    return lib


def compilable(*tensors):
    """Whether the compiled path takes these tensors: contiguous float32 on the CPU."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def threshold_c(m, k, sample_size, z, out):
    """(tau, count) as mofo_fast.topk_threshold(|m|, k), as Python numbers, or None where the
    bracket missed (or m holds a NaN). out: float32, m's size (overwritten)."""
    assert compilable(m, out) and out.numel() >= m.numel() and 1 <= k <= m.numel()
    tau, count = ctypes.c_float(), ctypes.c_long()
    missed = library().mofo_threshold(m.data_ptr(), m.numel(), k, sample_size, z, out.data_ptr(),
                                      torch.get_num_threads(), ctypes.byref(tau), ctypes.byref(count))
    return None if missed else (tau.value, count.value)


def apply_c(p, m, denom, tau, step):
    """p.addcdiv_(m * (|m| >= tau), denom, value=step), bit for bit, in one pass."""
    assert compilable(p, m, denom) and p.numel() == m.numel() == denom.numel()
    library().mofo_apply(p.data_ptr(), m.data_ptr(), denom.data_ptr(), p.numel(), float(tau), step,
                         torch.get_num_threads())
