/* One-pass summaries of dense CPU tensors, for lightning_bn.stats (see lightning_bn/stats/_summary.py).
 *
 * summarize(address, dtype, lead, channels, trail, zero_tol, channel_address) reads a float32 (dtype 0) or
 * float64 (dtype 1) buffer of lead * channels * trail values laid out as (lead, channels, trail) and returns
 * (count, sum, sum_sq, abs_max, zeros, nonfinite) as moments.tensor_summary defines them: non-finite values are
 * counted apart and left out of the sums, the maximum and the zeros. When channel_address is not 0 it also writes
 * the per-channel sums (channels doubles) and then the per-channel sums of squares (channels doubles) there; those
 * are plain sums of every value (a non-finite value makes its channel's sums non-finite, as torch's would).
 *
 * Eager torch needs 4-5 passes for these figures (aminmax, sum, dot, sign and a dot for the zeros) plus 2 for the
 * channel sums; this is one pass. float32 values are summed in 16 float lanes for at most BLOCK steps, then the
 * two halves are added and moved to double: each float partial sum holds at most 2 * BLOCK = 32 values. Counts are
 * exact integers. A row (a (lead, channel) row in channel mode, else the whole buffer) whose float sums overflow is
 * summed again in double; if the sum of squares is still not finite, a non-finite value is present and a second,
 * scalar pass recomputes the six figures without the non-finite values (the channel sums stay plain sums).
 * The GIL is released while it runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#if !defined(__GNUC__) && !defined(__clang__)
#error "lightning_bn._kernels needs GCC or Clang vector extensions; lightning_bn falls back to torch without it"
#endif

/* An AVX2 build next to the baseline one, chosen at load time by the CPU (GNU ifunc: x86-64 Linux). */
#if defined(__x86_64__) && defined(__linux__) && (defined(__clang__) || __GNUC__ >= 6)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

#define BLOCK 16 /* vector steps summed in float before the partial sums move to double */

typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));

/* Lane-wise select without the C-only restriction on vector ?: (GCC allows it in C++ only). */
#define SEL8(m, a, b) ((v8f)(((v8i)(a) & (m)) | ((v8i)(b) & ~(m))))
#define SEL4(m, a, b) ((v4d)(((v4l)(a) & (m)) | ((v4l)(b) & ~(m))))

typedef struct {
    double sum, sum_sq, lo, hi;
    int64_t zeros, nonfinite;
} Summary;

#define HSUM4(v) (((v)[0] + (v)[1]) + ((v)[2] + (v)[3]))

/* The careful pass, only when a non-finite value is present: finite values only, in double. */
#define CAREFUL_PASS(T, x, n, tol, s)                                                                       \
    do {                                                                                                   \
        double S = 0.0, Q = 0.0, lo = INFINITY, hi = -INFINITY;                                            \
        int64_t z = 0, nf = 0;                                                                             \
        for (int64_t k = 0; k < (n); k++) {                                                                \
            T v = (x)[k];                                                                                  \
            if (!isfinite(v)) {                                                                            \
                nf++;                                                                                      \
                continue;                                                                                  \
            }                                                                                              \
            S += v;                                                                                        \
            Q += (double)v * v;                                                                            \
            z += fabs((double)v) <= (double)(tol);                                                         \
            lo = v < lo ? v : lo;                                                                          \
            hi = v > hi ? v : hi;                                                                          \
        }                                                                                                  \
        (s)->sum = S, (s)->sum_sq = Q, (s)->lo = lo, (s)->hi = hi, (s)->zeros = z, (s)->nonfinite = nf;    \
    } while (0)

/* The vector lanes' zero counts, minima and maxima folded into the scalar ones. */
#define FOLD_LANES(lanes, vz, vlo, vhi, zeros, lo, hi)                                                        \
    for (int k = 0; k < (lanes); k++) {                                                                    \
        (zeros) += (vz)[k];                                                                                \
        (lo) = (vlo)[k] < (lo) ? (vlo)[k] : (lo);                                                          \
        (hi) = (vhi)[k] > (hi) ? (vhi)[k] : (hi);                                                          \
    }

/* The result: the one pass's figures if the sum of squares is finite, else the careful pass's. */
#define FINISH(T, x, n, tol, S, Q, lo, hi, zeros, out)                                                        \
    do {                                                                                                   \
        if (isfinite(Q)) {                                                                                 \
            (out)->sum = (S), (out)->sum_sq = (Q), (out)->lo = (lo), (out)->hi = (hi);                     \
            (out)->zeros = (zeros), (out)->nonfinite = 0;                                                  \
        } else {                                                                                           \
            CAREFUL_PASS(T, x, n, tol, out);                                                               \
        }                                                                                                  \
    } while (0)

/* Channels innermost, (lead, channels) rows (trail == 1): per-channel sums in double, scalar (a rare layout here).
 * |v| <= tol is compared in double, which gives the float32 comparison's answer for float32 v and tol. */
#define CHANNELS_INNERMOST(x, lead, channels, tol, ch, S, Q, zeros, lo, hi)                                  \
    do {                                                                                                   \
        for (int64_t r = 0; r < (lead); r++) {                                                             \
            for (int64_t c = 0; c < (channels); c++) {                                                     \
                double v = (x)[r * (channels) + c];                                                        \
                (ch)[c] += v;                                                                              \
                (ch)[(channels) + c] += v * v;                                                             \
                (zeros) += fabs(v) <= (double)(tol);                                                       \
                (lo) = v < (lo) ? v : (lo);                                                                \
                (hi) = v > (hi) ? v : (hi);                                                                \
            }                                                                                              \
        }                                                                                                  \
        for (int64_t c = 0; c < (channels); c++) (S) += (ch)[c], (Q) += (ch)[(channels) + c];              \
    } while (0)

CLONES static void summarize_f32(const float *x, int64_t lead, int64_t channels, int64_t trail, float tol,
                                 double *ch, Summary *out) {
    const int64_t rows = lead * channels, n = rows * trail;
    v8f vlo, vhi, vtol;
    v8i absmask, vz = {0};
    for (int k = 0; k < 8; k++) vlo[k] = INFINITY, vhi[k] = -INFINITY, vtol[k] = tol, absmask[k] = 0x7fffffff;
    double S = 0.0, Q = 0.0;
    float lo = INFINITY, hi = -INFINITY;
    int64_t zeros = 0, steps = 0;
    if (ch) memset(ch, 0, 2 * (size_t)channels * sizeof(double));
    if (ch && trail == 1) {
        CHANNELS_INNERMOST(x, lead, channels, tol, ch, S, Q, zeros, lo, hi);
    } else {
        const int64_t len = ch ? trail : n, count = ch ? rows : (n > 0);
        for (int64_t r = 0; r < count; r++) {
            const float *p = x + r * len;
            v4d ds = {0.0}, dq = {0.0};
            int64_t j = 0;
            while (j + 16 <= len) {
                v8f s0 = {0.0f}, q0 = {0.0f}, s1 = {0.0f}, q1 = {0.0f};
                int64_t end = j + 16 * (int64_t)BLOCK;
                if (end > len) end = len - (len - j) % 16;
                for (; j < end; j += 16) {
                    v8f a, b;
                    memcpy(&a, p + j, sizeof a);
                    memcpy(&b, p + j + 8, sizeof b);
                    s0 += a, q0 += a * a, s1 += b, q1 += b * b;
                    vz -= (v8f)((v8i)a & absmask) <= vtol; /* a true comparison is -1 */
                    vz -= (v8f)((v8i)b & absmask) <= vtol;
                    v8i m = a < b;
                    v8f small = SEL8(m, a, b), big = SEL8(m, b, a);
                    vlo = SEL8(small < vlo, small, vlo);
                    vhi = SEL8(big > vhi, big, vhi);
                }
                s0 += s1, q0 += q1;
                v4f s_lo, s_hi, q_lo, q_hi;
                memcpy(&s_lo, &s0, 16), memcpy(&s_hi, (char *)&s0 + 16, 16);
                memcpy(&q_lo, &q0, 16), memcpy(&q_hi, (char *)&q0 + 16, 16);
                ds += __builtin_convertvector(s_lo, v4d) + __builtin_convertvector(s_hi, v4d);
                dq += __builtin_convertvector(q_lo, v4d) + __builtin_convertvector(q_hi, v4d);
                if (++steps >= (1 << 25)) { /* a lane of vz gains at most 2 * BLOCK per block: flush before 2**31 */
                    for (int k = 0; k < 8; k++) zeros += vz[k], vz[k] = 0;
                    steps = 0;
                }
            }
            double rs = HSUM4(ds), rq = HSUM4(dq);
            for (; j < len; j++) {
                float v = p[j];
                rs += v;
                rq += (double)v * v;
                zeros += fabsf(v) <= tol;
                lo = v < lo ? v : lo;
                hi = v > hi ? v : hi;
            }
            if (!isfinite(rq) || !isfinite(rs)) { /* a float32 partial sum overflowed (or a value is not finite) */
                rs = 0.0, rq = 0.0;
                for (int64_t k = 0; k < len; k++) rs += p[k], rq += (double)p[k] * p[k];
            }
            if (ch) ch[r % channels] += rs, ch[channels + r % channels] += rq;
            S += rs, Q += rq;
        }
        FOLD_LANES(8, vz, vlo, vhi, zeros, lo, hi);
    }
    FINISH(float, x, n, tol, S, Q, lo, hi, zeros, out);
}

CLONES static void summarize_f64(const double *x, int64_t lead, int64_t channels, int64_t trail, double tol,
                                 double *ch, Summary *out) {
    const int64_t rows = lead * channels, n = rows * trail;
    v4d vlo, vhi, vtol;
    v4l absmask, vz = {0};
    for (int k = 0; k < 4; k++) vlo[k] = INFINITY, vhi[k] = -INFINITY, vtol[k] = tol, absmask[k] = INT64_MAX;
    double S = 0.0, Q = 0.0, lo = INFINITY, hi = -INFINITY;
    int64_t zeros = 0;
    if (ch) memset(ch, 0, 2 * (size_t)channels * sizeof(double));
    if (ch && trail == 1) {
        CHANNELS_INNERMOST(x, lead, channels, tol, ch, S, Q, zeros, lo, hi);
    } else {
        const int64_t len = ch ? trail : n, count = ch ? rows : (n > 0);
        for (int64_t r = 0; r < count; r++) {
            const double *p = x + r * len;
            v4d s0 = {0.0}, q0 = {0.0}, s1 = {0.0}, q1 = {0.0};
            int64_t j = 0;
            for (; j + 8 <= len; j += 8) {
                v4d a, b;
                memcpy(&a, p + j, sizeof a);
                memcpy(&b, p + j + 4, sizeof b);
                s0 += a, q0 += a * a, s1 += b, q1 += b * b;
                vz -= (v4d)((v4l)a & absmask) <= vtol;
                vz -= (v4d)((v4l)b & absmask) <= vtol;
                v4l m = a < b;
                v4d small = SEL4(m, a, b), big = SEL4(m, b, a);
                vlo = SEL4(small < vlo, small, vlo);
                vhi = SEL4(big > vhi, big, vhi);
            }
            double rs = HSUM4(s0 + s1), rq = HSUM4(q0 + q1);
            for (; j < len; j++) {
                double v = p[j];
                rs += v;
                rq += v * v;
                zeros += fabs(v) <= tol;
                lo = v < lo ? v : lo;
                hi = v > hi ? v : hi;
            }
            if (ch) ch[r % channels] += rs, ch[channels + r % channels] += rq;
            S += rs, Q += rq;
        }
        FOLD_LANES(4, vz, vlo, vhi, zeros, lo, hi);
    }
    FINISH(double, x, n, tol, S, Q, lo, hi, zeros, out);
}

static PyObject *summarize(PyObject *self, PyObject *args) {
    unsigned long long address, channel_address;
    int dtype;
    long long lead, channels, trail;
    double tol;
    (void)self;
    if (!PyArg_ParseTuple(args, "KiLLLdK", &address, &dtype, &lead, &channels, &trail, &tol, &channel_address))
        return NULL;
    if (dtype != 0 && dtype != 1) {
        PyErr_Format(PyExc_ValueError, "`dtype` must be 0 (float32) or 1 (float64), got %d", dtype);
        return NULL;
    }
    if (lead < 0 || channels < 1 || trail < 0) {
        PyErr_Format(PyExc_ValueError, "`lead`, `channels`, `trail` must be >= 0, >= 1, >= 0, got %lld, %lld, %lld",
                     lead, channels, trail);
        return NULL;
    }
    if (address == 0 && lead * trail > 0) {
        PyErr_SetString(PyExc_ValueError, "`address` is 0 for a non-empty buffer");
        return NULL;
    }
    Summary s;
    double *ch = (double *)(uintptr_t)channel_address;
    Py_BEGIN_ALLOW_THREADS
    if (dtype == 0)
        summarize_f32((const float *)(uintptr_t)address, lead, channels, trail, (float)tol, ch, &s);
    else
        summarize_f64((const double *)(uintptr_t)address, lead, channels, trail, tol, ch, &s);
    Py_END_ALLOW_THREADS
    const int64_t n = lead * channels * trail, count = n - s.nonfinite;
    double abs_max = count > 0 ? (-s.lo > s.hi ? -s.lo : s.hi) + 0.0 : 0.0; /* + 0.0: -0.0 becomes 0.0 */
    return Py_BuildValue("(dddddd)", (double)count, s.sum, s.sum_sq, abs_max, (double)s.zeros, (double)s.nonfinite);
}

static PyMethodDef methods[] = {
    {"summarize", summarize, METH_VARARGS,
     "summarize(address, dtype, lead, channels, trail, zero_tol, channel_address) -> (count, sum, sum_sq, abs_max, "
     "zeros, nonfinite) of a dense (lead, channels, trail) float32 (dtype 0) or float64 (dtype 1) CPU buffer; "
     "per-channel sums, then sums of squares, written as doubles at channel_address unless it is 0."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "lightning_bn._kernels",
                                    "One-pass tensor summaries on the CPU (see lightning_bn.stats._summary).", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
