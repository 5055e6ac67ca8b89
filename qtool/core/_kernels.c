/* qtool._kernels: the per-value loops of the quantizing core.
 *
 * An optional accelerator. qtool/quant.py computes exactly the same integers, scales and
 * zero points with numpy when this module is absent (or QTOOL_PURE_NUMPY=1); the tests check
 * that both paths write the same bytes. It exists because numpy needs about ten passes per
 * block (divide, round, clip, store, dequantize, subtract, four reductions), each a separate
 * call that reads and writes the whole block; here a block is read twice (its ranges, then
 * everything else), a chunk of 1024 values at a time that stays in L1.
 *
 * Exactness: every float operation is the float32 operation numpy performs, in the same
 * order, and the module is compiled with -ffp-contract=off (no fused multiply-add) and
 * without -ffast-math, so the integers are bit-identical to numpy's. The error statistics
 * are summed in fixed lanes, float32 within a chunk and float64 across chunks, and combined
 * in a fixed order: the same figures whatever the instruction set or the thread count.
 *
 * The GIL is released around every loop, so qtool's worker threads run them in parallel.
 * Buffers come through the buffer protocol (numpy arrays, memory maps), and every buffer's
 * length is checked against the shape before a loop runs: no numpy headers are needed to
 * build this file, and no index can leave a buffer.
 */
#include "_kernels.h"

/* ------------------------------------------------------------------------------ ranges */

/* Min and max of each range unit: (rows, cols) split into groups of g columns (g = cols per
 * channel). Returns 0 if any value is NaN or infinite: v * 0 is NaN exactly for those, and a
 * NaN anywhere makes the sum NaN (the comparisons alone would pass over NaN silently). */
INLINE int minmax_src(const void *x, int src, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t g,
                      float *mn_out, float *mx_out)
{
    Py_ssize_t units = (cols + g - 1) / g;
    vf bad = splat(0.0f);
    float bad_s = 0.0f;
    for (Py_ssize_t r = 0; r < rows; r++) {
        for (Py_ssize_t u = 0; u < units; u++) {
            Py_ssize_t a = r * cols + u * g;
            Py_ssize_t n = (u + 1) * g <= cols ? g : cols - u * g;
            vf mn = splat(INFINITY), mx = splat(-INFINITY);
            Py_ssize_t i = 0;
            for (; i + W <= n; i += W) {
                vf v = load_v(x, src, a + i);
                mn = vmin(v, mn);
                mx = vmax(v, mx);
                bad += v * 0.0f;
            }
            float lo = INFINITY, hi = -INFINITY;
            for (; i < n; i++) {
                float v = load_s(x, src, a + i);
                lo = smin(v, lo);
                hi = smax(v, hi);
                bad_s += v * 0.0f;
            }
            for (int j = 0; j < W; j++) {
                lo = smin(mn[j], lo);
                hi = smax(mx[j], hi);
            }
            mn_out[r * units + u] = lo;
            mx_out[r * units + u] = hi;
        }
    }
    for (int j = 0; j < W; j++)
        bad_s += bad[j];
    return bad_s == 0.0f;
}

HOT static int minmax(const void *x, int src, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t g,
                      float *mn_out, float *mx_out)
{
    /* Two copies of the loop, each with its source type fixed. */
    if (src == SRC_BF16)
        return minmax_src(x, SRC_BF16, rows, cols, g, mn_out, mx_out);
    return minmax_src(x, SRC_F32, rows, cols, g, mn_out, mx_out);
}

/* ---------------------------------------------------------------------------- quantize */

typedef struct {
    double signal_sq, error_sq, cross;
    float max_abs_error;
} Stats;

typedef struct {
    const float *scale, *inv, *zero; /* per unit; inv may be NULL (then divide by scale) */
    Py_ssize_t row_stride;           /* units per row in those arrays; 0: one for the tensor */
    float qmin, qmax;
} QArgs;

/* Values are handled a chunk at a time: loaded (and widened from bfloat16) into a float32
 * buffer that stays in L1, then each step is a simple loop over the chunk, which the compiler
 * vectorises (measured: about 4x faster than one fused loop, which it does not). */
#define CHUNK 1024
/* Lanes of the statistics' partial sums: each lane sums at most CHUNK / LANES terms in
 * float32 (vectorised) before they are added to the float64 totals. */
#define LANES 16

INLINE void load_chunk(const void *x, int src, Py_ssize_t a, Py_ssize_t n, float *v)
{
    if (src == SRC_BF16) {
        const uint16_t *p = (const uint16_t *)x + a;
        for (Py_ssize_t i = 0; i < n; i++)
            v[i] = bf16_to_f32(p[i]);
    } else {
        memcpy(v, (const float *)x + a, (size_t)n * sizeof(float));
    }
}

/* One chunk of one unit. For every value: t = w / s (or w * inv for gnmt), rounded, + zero
 * point, clipped to [qmin, qmax]; q = (int) t stored as a byte; then the error
 * e = (t - z) * s - w and its sums. These are the float32 operations of qtool/quant.py's
 * numpy path, in its order. Clamping t to [qmin - z - 1, qmax - z + 1] before rounding
 * changes no result (rounding is monotonic, and those integer bounds end at qmin and qmax
 * after the final clip either way) and keeps |t| small enough for MAGIC. */
INLINE void quantize_chunk(const float *restrict v, Py_ssize_t m, float s, int use_inv,
                           float inv, float z, float qlo, float qhi, uint8_t *restrict q,
                           float *restrict t, double *ss, double *es, double *cs, float *me)
{
    if (use_inv)
        for (Py_ssize_t i = 0; i < m; i++)
            t[i] = v[i] * inv;
    else
        for (Py_ssize_t i = 0; i < m; i++)
            t[i] = v[i] / s;
    const float tlo = qlo - z - 1.0f, thi = qhi - z + 1.0f;
    for (Py_ssize_t i = 0; i < m; i++) {
        float u = t[i];
        u = u < tlo ? tlo : u;
        u = u > thi ? thi : u;
        u = (u + MAGIC) - MAGIC;
        u = u + z;
        u = u < qlo ? qlo : u;
        u = u > qhi ? qhi : u;
        t[i] = u;
    }
    for (Py_ssize_t i = 0; i < m; i++)
        q[i] = (uint8_t)(int32_t)t[i];
    for (Py_ssize_t i = 0; i < m; i++)
        t[i] = (t[i] - z) * s - v[i]; /* the error w_hat - w */
    float s2[LANES] = {0}, e2[LANES] = {0}, c2[LANES] = {0};
    Py_ssize_t i = 0;
    for (; i + LANES <= m; i += LANES)
        for (int j = 0; j < LANES; j++) {
            float w = v[i + j], e = t[i + j];
            s2[j] += w * w;
            e2[j] += e * e;
            c2[j] += w * e;
            float ae = fabsf(e);
            me[j] = ae > me[j] ? ae : me[j];
        }
    for (; i < m; i++) {
        float w = v[i], e = t[i];
        s2[0] += w * w;
        e2[0] += e * e;
        c2[0] += w * e;
        float ae = fabsf(e);
        me[0] = ae > me[0] ? ae : me[0];
    }
    for (int j = 0; j < LANES; j++) {
        ss[j] += s2[j];
        es[j] += e2[j];
        cs[j] += c2[j];
    }
}

/* Where the chunk's scratch t goes inside a buffer of CHUNK + 1024 floats: 2 KB away from
 * the values v modulo 4 KB. A load whose address matches that of a pending store in its
 * low 12 bits waits for the store ("4K aliasing"); with t at an arbitrary distance from v
 * the same loop ran anywhere from 2.6 to 4.7 GB/s. */
INLINE float *away_from(float *buf, const float *v)
{
    uintptr_t d = ((uintptr_t)v + 2048u - (uintptr_t)buf) & 4095u;
    return buf + (d & ~(uintptr_t)63) / sizeof(float);
}

INLINE void quantize_src(const void *x, int src, int use_inv, Py_ssize_t rows, Py_ssize_t cols,
                         Py_ssize_t g, const QArgs *p, uint8_t *q, Stats *st)
{
    Py_ssize_t units = (cols + g - 1) / g;
    double ss[LANES] = {0}, es[LANES] = {0}, cs[LANES] = {0};
    float me[LANES] = {0};
    float v[CHUNK] __attribute__((aligned(64)));
    float tbuf[CHUNK + 1024] __attribute__((aligned(64)));
    for (Py_ssize_t r = 0; r < rows; r++) {
        for (Py_ssize_t u = 0; u < units; u++) {
            Py_ssize_t k = r * p->row_stride + u;
            Py_ssize_t a0 = r * cols + u * g;
            Py_ssize_t n = (u + 1) * g <= cols ? g : cols - u * g;
            for (Py_ssize_t c0 = 0; c0 < n; c0 += CHUNK) {
                Py_ssize_t m = n - c0 < CHUNK ? n - c0 : CHUNK;
                const float *vp = v;
                if (src == SRC_F32)
                    vp = (const float *)x + a0 + c0; /* read in place */
                else
                    load_chunk(x, src, a0 + c0, m, v);
                quantize_chunk(vp, m, p->scale[k], use_inv, use_inv ? p->inv[k] : 0.0f,
                               p->zero[k], p->qmin, p->qmax, q + a0 + c0, away_from(tbuf, vp),
                               ss, es, cs, me);
            }
        }
    }
    st->signal_sq = st->error_sq = st->cross = 0.0;
    st->max_abs_error = 0.0f;
    for (int j = 0; j < LANES; j++) {
        st->signal_sq += ss[j];
        st->error_sq += es[j];
        st->cross += cs[j];
        st->max_abs_error = me[j] > st->max_abs_error ? me[j] : st->max_abs_error;
    }
}

HOT static void quantize(const void *x, int src, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t g,
                         const QArgs *p, uint8_t *q, Stats *st)
{
    /* Four copies of the loop, each with its source type and divide/multiply fixed. */
    if (src == SRC_BF16) {
        if (p->inv)
            quantize_src(x, SRC_BF16, 1, rows, cols, g, p, q, st);
        else
            quantize_src(x, SRC_BF16, 0, rows, cols, g, p, q, st);
    } else {
        if (p->inv)
            quantize_src(x, SRC_F32, 1, rows, cols, g, p, q, st);
        else
            quantize_src(x, SRC_F32, 0, rows, cols, g, p, q, st);
    }
}

/* -------------------------------------------------------------------------- dequantize */

/* Round to nearest even, as ml_dtypes' cast does; NaN becomes the quiet NaN 0x7fc0 with its
 * sign (as in qtool/core/bf16.py). Branch-free, so that the loop vectorises. */
INLINE uint16_t to_bf16(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    uint32_t quiet = ((bits >> 16) & 0x8000u) | 0x7fc0u;
    return (uint16_t)((bits & 0x7fffffffu) > 0x7f800000u ? quiet : rounded);
}

/* w = (q - z) * s per value, in float32 (numpy's order: convert, subtract, multiply). */
INLINE void dequantize_src(const uint8_t *restrict q, int is_signed, int out_code,
                           Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t g, const float *scale,
                           const float *zero, Py_ssize_t row_stride, void *restrict out)
{
    Py_ssize_t units = (cols + g - 1) / g;
    for (Py_ssize_t r = 0; r < rows; r++) {
        for (Py_ssize_t u = 0; u < units; u++) {
            Py_ssize_t k = r * row_stride + u;
            const float s = scale[k], z = zero[k];
            Py_ssize_t a = r * cols + u * g;
            Py_ssize_t n = (u + 1) * g <= cols ? g : cols - u * g;
            const int8_t *qs = (const int8_t *)q + a;
            const uint8_t *qu = q + a;
            if (out_code == OUT_F32) {
                float *o = (float *)out + a;
                if (is_signed)
                    for (Py_ssize_t i = 0; i < n; i++)
                        o[i] = ((float)qs[i] - z) * s;
                else
                    for (Py_ssize_t i = 0; i < n; i++)
                        o[i] = ((float)qu[i] - z) * s;
            } else {
                uint16_t *o = (uint16_t *)out + a;
                if (is_signed)
                    for (Py_ssize_t i = 0; i < n; i++)
                        o[i] = to_bf16(((float)qs[i] - z) * s);
                else
                    for (Py_ssize_t i = 0; i < n; i++)
                        o[i] = to_bf16(((float)qu[i] - z) * s);
            }
        }
    }
}

HOT static void dequantize_any(const uint8_t *q, int is_signed, Py_ssize_t rows, Py_ssize_t cols,
                               Py_ssize_t g, const float *scale, const float *zero,
                               Py_ssize_t row_stride, void *out, int out_code)
{
    dequantize_src(q, is_signed, out_code, rows, cols, g, scale, zero, row_stride, out);
}

/* -------------------------------------------------------------------- Python interface */
static PyObject *py_minmax(PyObject *self, PyObject *args)
{
    PyObject *xo, *mno, *mxo;
    int src;
    Py_ssize_t rows, cols, g;
    if (!PyArg_ParseTuple(args, "OinnnOO", &xo, &src, &rows, &cols, &g, &mno, &mxo))
        return NULL;
    if (check_shape(rows, cols, &g) < 0)
        return NULL;
    Py_ssize_t units = (cols + g - 1) / g, itemsize = src == SRC_BF16 ? 2 : 4;
    Py_buffer x, mn, mx;
    if (get_buffer(xo, &x, 0, rows * cols * itemsize, "x") < 0)
        return NULL;
    if (get_buffer(mno, &mn, 1, rows * units * 4, "mn") < 0) {
        PyBuffer_Release(&x);
        return NULL;
    }
    if (get_buffer(mxo, &mx, 1, rows * units * 4, "mx") < 0) {
        PyBuffer_Release(&x);
        PyBuffer_Release(&mn);
        return NULL;
    }
    int finite;
    Py_BEGIN_ALLOW_THREADS
    finite = minmax(x.buf, src, rows, cols, g, mn.buf, mx.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&x);
    PyBuffer_Release(&mn);
    PyBuffer_Release(&mx);
    return PyBool_FromLong(finite);
}

static PyObject *py_quantize(PyObject *self, PyObject *args)
{
    PyObject *xo, *so, *io, *zo, *qo;
    int src;
    Py_ssize_t rows, cols, g, row_stride;
    float qmin, qmax;
    if (!PyArg_ParseTuple(args, "OinnnOOOnffO", &xo, &src, &rows, &cols, &g, &so, &io, &zo,
                          &row_stride, &qmin, &qmax, &qo))
        return NULL;
    if (check_shape(rows, cols, &g) < 0)
        return NULL;
    Py_ssize_t units = (cols + g - 1) / g, itemsize = src == SRC_BF16 ? 2 : 4;
    /* Parameters per unit of every row, or (row_stride 0) one set shared by all rows. */
    Py_ssize_t nparams = row_stride == 0 ? units : rows * units;
    if (row_stride != 0 && row_stride != units) {
        PyErr_SetString(PyExc_ValueError, "row_stride must be 0 or the units per row");
        return NULL;
    }
    Py_buffer x, s, inv = {0}, z, q;
    int have_inv = io != Py_None, ok = 0;
    if (get_buffer(xo, &x, 0, rows * cols * itemsize, "x") < 0)
        return NULL;
    if (get_buffer(so, &s, 0, nparams * 4, "scale") < 0)
        goto release_x;
    if (have_inv && get_buffer(io, &inv, 0, nparams * 4, "inv_scale") < 0)
        goto release_s;
    if (get_buffer(zo, &z, 0, nparams * 4, "zero_point") < 0)
        goto release_inv;
    if (get_buffer(qo, &q, 1, rows * cols, "q") < 0)
        goto release_z;
    QArgs p = {s.buf, have_inv ? inv.buf : NULL, z.buf, row_stride, qmin, qmax};
    Stats st;
    Py_BEGIN_ALLOW_THREADS
    quantize(x.buf, src, rows, cols, g, &p, q.buf, &st);
    Py_END_ALLOW_THREADS
    ok = 1;
    PyBuffer_Release(&q);
release_z:
    PyBuffer_Release(&z);
release_inv:
    if (have_inv)
        PyBuffer_Release(&inv);
release_s:
    PyBuffer_Release(&s);
release_x:
    PyBuffer_Release(&x);
    if (!ok)
        return NULL;
    return Py_BuildValue("dddd", st.signal_sq, st.error_sq, st.cross, (double)st.max_abs_error);
}

static PyObject *py_dequantize(PyObject *self, PyObject *args)
{
    PyObject *qo, *so, *zo, *oo;
    int is_signed, out_code;
    Py_ssize_t rows, cols, g, row_stride;
    if (!PyArg_ParseTuple(args, "OpnnnOOnOi", &qo, &is_signed, &rows, &cols, &g, &so, &zo,
                          &row_stride, &oo, &out_code))
        return NULL;
    if (check_shape(rows, cols, &g) < 0)
        return NULL;
    Py_ssize_t units = (cols + g - 1) / g;
    /* Parameters per unit of every row, or (row_stride 0) one set shared by all rows. */
    Py_ssize_t nparams = row_stride == 0 ? units : rows * units;
    if (row_stride != 0 && row_stride != units) {
        PyErr_SetString(PyExc_ValueError, "row_stride must be 0 or the units per row");
        return NULL;
    }
    Py_buffer q, s, z, o;
    int ok = 0;
    if (get_buffer(qo, &q, 0, rows * cols, "q") < 0)
        return NULL;
    if (get_buffer(so, &s, 0, nparams * 4, "scale") < 0)
        goto release_q;
    if (get_buffer(zo, &z, 0, nparams * 4, "zero_point") < 0)
        goto release_s;
    if (get_buffer(oo, &o, 1, rows * cols * (out_code == OUT_BF16 ? 2 : 4), "out") < 0)
        goto release_z;
    Py_BEGIN_ALLOW_THREADS
    dequantize_any(q.buf, is_signed, rows, cols, g, s.buf, z.buf, row_stride, o.buf, out_code);
    Py_END_ALLOW_THREADS
    ok = 1;
    PyBuffer_Release(&o);
release_z:
    PyBuffer_Release(&z);
release_s:
    PyBuffer_Release(&s);
release_q:
    PyBuffer_Release(&q);
    if (!ok)
        return NULL;
    Py_RETURN_NONE;
}

PyObject *qtool_py_fit_search(PyObject *self, PyObject *args); /* _fit.c */

static PyMethodDef methods[] = {
    {"minmax", py_minmax, METH_VARARGS,
     "minmax(x, src, rows, cols, group, mn, mx) -> bool: per-unit min and max into mn, mx "
     "(float32); False if x holds NaN or inf."},
    {"quantize", py_quantize, METH_VARARGS,
     "quantize(x, src, rows, cols, group, scale, inv_scale|None, zero, row_stride, qmin, qmax, "
     "q) -> (signal_sq, error_sq, cross, max_abs_error)"},
    {"dequantize", py_dequantize, METH_VARARGS,
     "dequantize(q, signed, rows, cols, group, scale, zero, row_stride, out, out_code)"},
    {"fit_search", qtool_py_fit_search, METH_VARARGS,
     "fit_search(x, src, rows, cols, group, scheme, qmin, qmax, ratios, rounds, tile, scale, "
     "zero, error, minmax_error) -> (finite, lowest): qtool.core.fit's fit of every unit."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels",
    "Fused per-value loops of the quantizing core (optional; see qtool/quant.py).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
