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
import platform
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

/* mofo_fast.bracket on a sample of `size` values (overwritten; room for 2 * size): lo and hi
   around the k-th largest of n entries, the sampled values of its ranks r_lo > r_hi. */
static void bracket(float *sample, long size, long n, long k, double z, float *lo, float *hi) {
    float *copy = sample + size;  /* kth_largest overwrites: 2 copies */
    memcpy(copy, sample, size * sizeof(float));
    double mean = (double)k / n * size, spread = z * sqrt(mean * (1 - (double)k / n)) + 1;
    long r_lo = (long)ceil(mean + spread), r_hi = (long)floor(mean - spread), m = 0;
    if (r_lo > size) r_lo = size;
    *lo = kth_largest(sample, size, r_lo, NULL);
    if (r_hi < 1) {
        *hi = INFINITY;
        return;
    }
    /* The r_hi-th largest is among the r_lo or more values >= lo (NaN kept, as it ranks first
       in kth_largest too): select among those few instead of all. */
    for (long i = 0; i < size; i++)
        if (!(copy[i] < *lo)) copy[m++] = copy[i];
    *hi = kth_largest(copy, m, r_hi, NULL);
}

/* mofo_fast.topk_threshold on |x|: *tau = the k-th largest |x_i| and *count =
   #{i : |x_i| >= tau}; returns 0, or 1 when the bracket missed tau (nothing written). The bracket
   is mofo_fast.bracket's; a tensor of at most 4 * sample_size entries is all band.
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
        float *sample = malloc(2 * sample_size * sizeof(float));
        if (!sample) return 1;
        for (long i = stride / 2; i < n && size < sample_size; i += stride) sample[size++] = fabsf(x[i]);
        bracket(sample, size, n, k, z, &lo, &hi);
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

/* ----- The fused step (MoFO(compiled=True)'s path): steps 1-5 of one tensor in two passes over
   memory, mofo_moments_band then mofo_masked_step, each rounding as torch's CPU ops do, op for op.
   Found by comparing with torch bit for bit (tests/test_mofo_kernel.py), and checked again at
   first use (mofo_fast.fused_matches_torch), since they are a torch build's choices:

   exp_avg.lerp_(g, w1)   ATen's lerp: fma(w1, g - m, m) if |w1| < 0.5, else fma(w1 - 1, g - m, g);
                          its vectorized loop calls fmadd, and its scalar tail is contracted to the
                          same fma, so every entry rounds alike wherever the loop's chunks end.
   exp_avg_sq.mul_(b2).addcmul_(g, g, value=w2)    v * b2 rounded, then fma(w2 * g, g, v * b2).
   torch.sqrt(v)          MKL's vmsSqrt (VML_HA) where torch is built with MKL: within an ulp, not
                          always the rounded root, so this kernel calls the very same function
                          (passed in as `vsqrt`); sqrtf where torch's is the correctly rounded one.
   .div_(c).add_(eps)     a true division by the float c, then an addition.
   p.mul_(decay)          one rounded product (only where weight_decay != 0, as mofo_update_).
   p.addcdiv_(m * mask, denom, value=step)   p + step * (m * mask) / denom, rounded op by op;
                          m * mask is m times 1.0 or 0.0, so a dropped entry is a zero with m's
                          sign (NaN for an infinite m), as mofo.select_reference's m * mask.
   Everything else is built with -ffp-contract=off: no fused multiply-add but where written. */

#define BLOCK 256  /* entries per block: the flags and roots stay in the L1 cache */

/* One entry's new m, as ATen's lerp (above); sign = -1 for maximize (-g is exact). */
static inline float lerp_m(float m, float g, float w1, int small) {
    return small ? fmaf(w1, g - m, m) : fmaf(w1 - 1.0f, g - m, g);
}

/* Pass 1 over x[start..end) of this thread: the new moments of every entry, written back, and
   the band of mofo_fast.band on the new |m| (flags as in band() above), gathered to out + start.
   *above: how many new |m| > hi; *nan: how many are NaN (torch.topk ranks those first). */
static long moments_part(const float *restrict g, float *restrict m, float *restrict v,
                         long start, long end, float sign, float w1, int small, float b2, float w2,
                         float lo, float hi, float *restrict out, long *above, long *nan) {
    unsigned char flags[BLOCK];
    long c = 0, a = 0, z = 0;
    for (long i = start; i < end; i += BLOCK) {
        long len = end - i < BLOCK ? end - i : BLOCK, j = 0;
        int ab = 0, nb = 0;  /* int counters: the loop vectorizes in 32-bit lanes */
        for (long e = 0; e < len; e++) {
            float gi = sign * g[i + e], mi = lerp_m(m[i + e], gi, w1, small);
            v[i + e] = fmaf(w2 * gi, gi, v[i + e] * b2);
            m[i + e] = mi;
            float s = fabsf(mi);
            flags[e] = (s >= lo) & (s <= hi);
            ab += s > hi;
            nb += s != s;
        }
        a += ab;
        z += nb;
        for (; j + 8 <= len; j += 8) {  /* as in band(): 8 flags at a time, set bytes only */
            uint64_t word;
            memcpy(&word, flags + j, 8);
            for (; word; word &= word - 1)
                out[start + c++] = fabsf(m[i + j + (__builtin_ctzll(word) >> 3)]);
        }
        for (; j < len; j++)
            if (flags[j]) out[start + c++] = fabsf(m[i + j]);
    }
    *above = a;
    *nan = z;
    return c;
}

#define RUN 16  /* entries per sampled run: 64 bytes, one cache line */

/* Steps 2 and 4 in one read of g, m, v: m = lerp(m, g, w1), v = v * b2 + w2 * g * g (torch's
   rounding, above), written back; then *tau = the k-th largest new |m| and *count = #{|m| >= tau}.
   The bracket is mofo_fast.bracket's but for its sample: sample_size / RUN runs of RUN adjacent
   entries, not single entries, so that it reads a cache line of m and of g per RUN sampled values
   instead of one per value (on bench.py's tensors the strided sample read about as many lines as
   the pass itself). The runs are evenly strided in steps coprime with the number of runs that fit,
   so they walk through all columns of a matrix whose rows are whole runs. The sampled values are
   the new |m|, computed from the old m and g before the pass with the pass's formula. A bracket
   that misses tau makes all of |m| the band (a full selection, in C). Returns 0; or 1 where an |m|
   is NaN (torch.topk ranks NaN first: mofo_fast selects with it); the moments are written either
   way. sign: -1.0 for maximize. out: room for n floats (the band). */
int mofo_moments_band(const float *g, float *m, float *v, long n, long k, float sign, float w1,
                      float b2, float w2, long sample_size, double z, float *out, int threads,
                      float *tau, long *count) {
    long found[64], over[64], nans[64];
    float lo = 0.0f, hi = INFINITY;
    int small = fabsf(w1) < 0.5f;
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    if (n > 4 * sample_size) {  /* the sample sits in out, which the pass overwrites later */
        long runs = n / RUN, stride = runs / (sample_size / RUN), size = 0;
        while (gcd(stride, runs) > 1) stride--;
        for (long j = stride / 2; j < runs && size < sample_size; j += stride)
            for (long i = j * RUN; i < (j + 1) * RUN; i++)
                out[size++] = fabsf(lerp_m(m[i], sign * g[i], w1, small));
        bracket(out, size, n, k, z, &lo, &hi);
    }
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        long start = n * t / nt, end = n * (t + 1) / nt;
        found[t] = moments_part(g, m, v, start, end, sign, w1, small, b2, w2, lo, hi, out,
                                over + t, nans + t);
        #pragma omp barrier
        #pragma omp single
        for (int u = 1; u < nt; u++) {  /* the parts' bands moved together, in order */
            memmove(out + found[0], out + n * u / nt, found[u] * sizeof(float));
            found[0] += found[u];
            over[0] += over[u];
            nans[0] += nans[u];
        }
    }
    long above = over[0], band_size = found[0], c;
    if (nans[0]) return 1;
    if (!(above < k && k <= above + band_size))  /* missed: all of |m| is the band */
        band_size = band(m, n, 0.0f, INFINITY, out, &above, threads);
    float t = kth_largest(out, band_size, k - above, &c);  /* the band's (k - above)-th largest */
    *count = above + c;
    *tau = t;
    return 0;
}

/* MKL's vmsSqrt through its Fortran entry (n, a, r, mode by address), as libtorch_cpu exports it */
typedef void (*vsqrt_fn)(const int *n, const float *a, float *r, const long long *mode);

/* lut[bits]: the positions of the set bits of a byte, in order. Selected entries (a tenth or
   more) are too many for a branch per entry or per set flag to be predicted; with lut, 8 flags
   become their indices in 8 stores and a popcount. */
static unsigned char lut[256][8];

static void __attribute__((constructor)) fill_lut(void) {
    for (int bits = 0; bits < 256; bits++)
        for (int t = 0, c = 0; t < 8; t++)
            if (bits >> t & 1) lut[bits][c++] = t;
}

#define STEP_BLOCK 4096  /* entries per block of mofo_masked_step: its buffers stay in cache */

/* Steps 1, 3 and 5 in one read of p, m, v: p = p * decay, denom = sqrt(v) / c + eps,
   p = p + step * (m * (|m| >= tau)) / denom, each rounded as torch's op (above). decay = 1 where
   mofo_update_ skips the product (weight_decay = 0): p * 1 is p, bit for bit. vsqrt: torch's
   square root (MKL), or NULL for sqrtf.

   The square root and the two divisions are what an Adam step spends its time on (a CPU's one
   divider does both), and a dropped entry needs neither: its step * (m * 0) / denom is that zero
   (or a NaN for an infinite m) whatever denom is, so long as denom > 0, that is v > 0, or v >= 0
   with eps > 0. So a first loop decays every entry, steps the dropped ones so, and flags the
   rest (the selected, and any whose denom may not be > 0); their few v are then gathered,
   rooted in one call and divided, and their p stepped as written: the divider works on the
   alpha share of the entries only, for the very same bits. */
void mofo_masked_step(float *restrict p, const float *restrict m, const float *restrict v, long n,
                      float tau, float decay, float c, float eps, float step, int threads,
                      vsqrt_fn vsqrt) {
    /* VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE: the mode ATen's vml.h calls it with */
    const long long mode = 0x2 | 0x140000 | 0x100;
    if (threads < 1) threads = 1;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (long i = 0; i < n; i += STEP_BLOCK) {
        unsigned char flags[STEP_BLOCK];
        int idx[STEP_BLOCK + 8], kept = 0, j = 0;
        int len = n - i < STEP_BLOCK ? (int)(n - i) : STEP_BLOCK;
        float sel_v[STEP_BLOCK], root[STEP_BLOCK];
        for (int e = 0; e < len; e++) {
            float mi = m[i + e], vi = v[i + e], q = p[i + e] * decay;
            /* exact: the selected, and the dropped whose denom may not be > 0 (then 0 / 0, or a
               NaN v's own NaN: the division itself says which bits) */
            int exact = fabsf(mi) >= tau || !(vi > 0.0f || (eps > 0.0f && vi >= 0.0f));
            p[i + e] = exact ? q : q + step * (mi * 0.0f);
            flags[e] = exact;
        }
        for (; j + 8 <= len; j += 8) {  /* 8 flags at a time, without a branch (see lut) */
            uint64_t word;
            memcpy(&word, flags + j, 8);
            unsigned bits = (word * 0x0102040810204080ULL) >> 56;  /* bit t: flags[j + t] */
            for (int t = 0; t < 8; t++) idx[kept + t] = j + lut[bits][t];
            kept += __builtin_popcount(bits);
        }
        for (; j < len; j++) {
            idx[kept] = j;
            kept += flags[j];
        }
        for (int s = 0; s < kept; s++) sel_v[s] = v[i + idx[s]];
        if (vsqrt && kept)
            vsqrt(&kept, sel_v, root, &mode);
        else
            for (int s = 0; s < kept; s++) root[s] = sqrtf(sel_v[s]);
        for (int s = 0; s < kept; s++) {
            long e = i + idx[s];
            float denom = root[s] / c + eps, kept_m = m[e] * (float)(fabsf(m[e]) >= tau);
            p[e] = p[e] + step * kept_m / denom;
        }
    }
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


def cpu_flags():
    """This CPU's feature flags (Linux), or its architecture: part of the library's name, since it
    is built for this CPU (-march=native) and must not be loaded on another from a shared /tmp."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.machine()


@functools.cache
def library():
    """The compiled library, built on first use (a second) and then loaded from disk."""
    key = hashlib.sha256((SOURCE + cpu_flags()).encode()).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f"mofo_kernel-{key}.so")
    if not os.path.exists(path):
        src, tmp = f"{path}.{os.getpid()}.c", f"{path}.{os.getpid()}.tmp"
        with open(src, "w") as f:
            f.write(SOURCE)
        # -march=native: the CPU's fma and vector width (without it fmaf is a library call per
        # entry); a compiler that has no such flag builds for the generic CPU instead.
        # -fno-math-errno and -fno-trapping-math (as torch is built) let sqrtf and m * mask
        # vectorize; they change no result. -ffp-contract=off: see the fused step's comment.
        cmd = [os.environ.get("CC", "cc"), "-O3", "-ffp-contract=off", "-fno-math-errno",
               "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC", src, "-o", tmp, "-lm"]
        try:
            for flags in (["-march=native"], []):
                run = subprocess.run(cmd + flags, capture_output=True, text=True)
                if run.returncode == 0:
                    break
            else:
                raise RuntimeError(run.stderr)
        except (OSError, RuntimeError) as e:
            raise RuntimeError(f"MoFO(compiled=True) needs a C compiler with OpenMP; "
                               f"`{' '.join(cmd)}` failed: {e}") from e
        finally:
            os.remove(src)
        os.replace(tmp, path)  # atomic: a concurrent build never loads half a file
    lib = ctypes.CDLL(path)
    ptr, long_, float_, int_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int
    lib.mofo_threshold.restype = int_
    lib.mofo_threshold.argtypes = [ptr, long_, long_, long_, ctypes.c_double, ptr, int_,
                                   ctypes.POINTER(float_), ctypes.POINTER(long_)]
    lib.mofo_apply.restype = None
    lib.mofo_apply.argtypes = [ptr, ptr, ptr, long_, float_, float_, int_]
    lib.mofo_moments_band.restype = int_
    lib.mofo_moments_band.argtypes = [ptr, ptr, ptr, long_, long_, float_, float_, float_, float_,
                                      long_, ctypes.c_double, ptr, int_, ctypes.POINTER(float_),
                                      ctypes.POINTER(long_)]
    lib.mofo_masked_step.restype = None
    lib.mofo_masked_step.argtypes = [ptr, ptr, ptr, long_, float_, float_, float_, float_, float_,
                                     int_, ptr]
    return lib


@functools.cache
def torch_sqrt():
    """The address of the square root torch.sqrt runs on float32 CPU tensors where that is not
    sqrtf: MKL's vmsSqrt, exported by libtorch_cpu of builds with MKL; None (sqrtf) elsewhere.
    mofo_fast.fused_matches_torch checks the choice against torch.sqrt before it is used."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return ctypes.cast(lib.VMSSQRT_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


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


def moments_threshold_c(g, m, v, k, sign, w1, b2, w2, sample_size, z, out):
    """Steps 2 and 4 of the fused step: m.lerp_(sign * g, w1), v.mul_(b2).addcmul_(g, g, value=w2)
    in place, bit for bit, and (tau, count) of the new |m| as threshold_c; None where an |m| is NaN
    (the moments are updated all the same). out: float32, >= m's size."""
    assert compilable(g, m, v, out) and out.numel() >= m.numel() and 1 <= k <= m.numel()
    assert g.numel() == m.numel() == v.numel()
    tau, count = ctypes.c_float(), ctypes.c_long()
    missed = library().mofo_moments_band(g.data_ptr(), m.data_ptr(), v.data_ptr(), m.numel(), k,
                                         sign, w1, b2, w2, sample_size, z, out.data_ptr(),
                                         torch.get_num_threads(), ctypes.byref(tau),
                                         ctypes.byref(count))
    return None if missed else (tau.value, count.value)


def masked_step_c(p, m, v, tau, decay, c, eps, step):
    """Steps 1, 3 and 5 of the fused step, bit for bit: p.mul_(decay) (unless decay is None),
    denom = torch.sqrt(v).div_(c).add_(eps), p.addcdiv_(m * (|m| >= tau), denom, value=step)."""
    assert compilable(p, m, v) and p.numel() == m.numel() == v.numel()
    library().mofo_masked_step(p.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel(), tau,
                               1.0 if decay is None else decay, c, eps, step,
                               torch.get_num_threads(), torch_sqrt())
