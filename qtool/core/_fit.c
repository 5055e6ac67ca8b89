/* qtool._kernels.fit_search: the --range search fit of qtool/core/fit.py, here for range
 * units of at most FIT_MAX_N values (groups, and channels of short rows); longer ones are
 * _fit_long.c's.
 *
 * fit.py's numpy code runs these units transposed, (n, units), so that each per-unit sum is
 * a reduction over the outer axis, which numpy computes as out[j] = out[j] + a[i, j] for
 * i = 0, 1, ... in float32. Here FL units sit side by side in the FL lanes of one vector,
 * their values transposed into an (n, FL) buffer in L1, and every step is the same float32
 * operation numpy performs, in the same order: the fitted scales and zero points are
 * bit-identical to numpy's (the tests compare them), except that a q or a sum may be -0.0
 * where numpy has +0.0 or the reverse, which no result depends on. The per-unit least-squares
 * algebra is fit.py's _lsq and _grid, in float64, operation by operation.
 *
 * Each group is read from memory once: min-max, every candidate grid and every refit round
 * run on the transposed copy while it is in cache (L1 up to 128 values per unit, L2 beyond).
 */
#include "_fit.h"

typedef struct {
    vf sq, sqq, sqx; /* sum(q), sum(q q), sum(q x) */
    double err[FL];  /* sum((w_hat - x)**2), w_hat = (q - z) * s: fit.py's _werr */
} Pass;

/* One requantization of the batch (n, FL) with per-lane s and z, fused with what is wanted
 * of it: the sums for the least-squares fit and/or the exact error. Nothing is stored: the
 * batch stays in L1 and each pass is one loop over it in registers. The error is summed in
 * float32 and, in the lanes where that under- or overflows, again in float64. */
INLINE void requant(const vf *x, Py_ssize_t n, vf s, vf z, const FitArgs *a, int asym,
                    int sums, int err, Pass *p)
{
    const vf qlo = splat(a->qmin), qhi = splat(a->qmax);
    vf aq = splat(0.0f), aqq = splat(0.0f), aqx = splat(0.0f), ae = splat(0.0f);
    for (Py_ssize_t i = 0; i < n; i++) {
        vf t = qval(x[i], s, z, qlo, qhi, asym);
        if (sums) {
            aq += t;
            aqq += t * t;
            aqx += t * x[i];
        }
        if (err) {
            vf d = (t - z) * s - x[i];
            ae += d * d;
        }
    }
    p->sq = aq;
    p->sqq = aqq;
    p->sqx = aqx;
    if (!err)
        return;
    double *e64 = p->err;
    for (int l = 0; l < FL; l++)
        e64[l] = ae[l];
    for (int l = 0; l < FL; l++)
        if (!isfinite(e64[l]) || e64[l] < 1e-30) {
            double r = 0.0;
            for (Py_ssize_t i = 0; i < n; i++) {
                vf d = (qval(x[i], s, z, qlo, qhi, asym) - z) * s - x[i];
                r += (double)d[l] * (double)d[l];
            }
            e64[l] = r;
        }
}

/* The requantizations fit_batch makes, each its own loop. */
INLINE void requant_as(const vf *x, Py_ssize_t n, vf s, vf z, const FitArgs *a, int sums,
                       int err, Pass *p)
{
    if (a->scheme == FIT_ASYM) {
        if (sums && err)
            requant(x, n, s, z, a, 1, 1, 1, p);
        else if (sums)
            requant(x, n, s, z, a, 1, 1, 0, p);
        else
            requant(x, n, s, z, a, 1, 0, 1, p);
    } else {
        if (sums && err)
            requant(x, n, s, z, a, 0, 1, 1, p);
        else if (sums)
            requant(x, n, s, z, a, 0, 1, 0, p);
        else
            requant(x, n, s, z, a, 0, 0, 1, p);
    }
}

/* The per-unit state of fit_batch, half a batch (DL lanes) per vector. */
typedef struct {
    vd lo, hi, sw, swx, swxx;
    vd best, s, zp;                    /* the best candidate so far: error, scale, zero point */
    vd s0, z0, e0, best_s, best_z, best_e; /* min-max, and the best exact error so far */
} Half;

INLINE void load2(vd *dst, const double *src)
{
    memcpy(dst, src, sizeof *dst);
}

/* Fit FL units of n values each, already transposed into x (n, FL). Returns 0 if a value
 * is NaN or inf (v * 0 is NaN exactly for those); lowers *lowest to the smallest value. */
INLINE int fit_batch(const vf *x, Py_ssize_t n, const FitArgs *a, float *s_out, int32_t *z_out,
                     double *e_out, double *e0_out, float *lowest)
{
    /* Min-max, and the weights' sums: sum(1) = n, sum(x), sum(x x). */
    vf mn = splat(INFINITY), mx = splat(-INFINITY), gx = splat(0.0f), gxx = splat(0.0f);
    vf bad = splat(0.0f);
    for (Py_ssize_t i = 0; i < n; i++) {
        mn = vmin(x[i], mn);
        mx = vmax(x[i], mx);
        gx += x[i];
        gxx += x[i] * x[i];
        bad += x[i] * 0.0f;
    }
    for (int l = 0; l < FL; l++) {
        if (bad[l] != 0.0f)
            return 0;
        *lowest = mn[l] < *lowest ? mn[l] : *lowest;
    }
    Half hs[2];
    const vd zero = dsplat(0.0);
    for (int h = 0; h < 2; h++) {
        Half *u = &hs[h];
        vd mn64 = half(mn, h), mx64 = half(mx, h);
        u->sw = dsplat((double)n);
        u->swx = half(gx, h);
        u->swxx = half(gxx, h);
        if (a->scheme == FIT_ASYM) {
            u->lo = dmin(mn64, zero);
            u->hi = dmax(mx64, zero);
        } else if (a->scheme == FIT_SYM) {
            u->hi = dmax(mx64, -mn64);
            u->lo = -u->hi;
        } else {
            u->lo = zero;
            u->hi = dmax(mx64, zero);
        }
    }
    /* Every candidate grid (0: min-max), rounded, then its least-squares refit; the best one
     * per unit (the first on ties) is kept as it comes. */
    for (int c = 0; c < a->k; c++) {
        vd sc[2], zc[2];
        for (int h = 0; h < 2; h++)
            grid(hs[h].lo * a->ratio[c], hs[h].hi * a->ratio[c], a, &sc[h], &zc[h]);
        Pass p;
        requant_as(x, n, join(sc[0], sc[1]), join(zc[0], zc[1]), a, 1, c == 0, &p);
        for (int h = 0; h < 2; h++) {
            Half *u = &hs[h];
            Sums m = {half(p.sq, h), half(p.sqq, h), half(p.sqx, h)};
            vd fs, fz, err = lsq(&m, u->sw, u->swx, u->swxx, a, &fs, &fz);
            if (c == 0) {
                u->s0 = u->best_s = sc[h];
                u->z0 = u->best_z = zc[h];
                load2(&u->e0, p.err + h * DL);
                u->best_e = u->e0;
                u->best = err;
                u->s = fs;
                u->zp = fz;
            } else {
                vl better = err < u->best;
                u->best = sel(better, err, u->best);
                u->s = sel(better, fs, u->s);
                u->zp = sel(better, fz, u->zp);
            }
        }
    }
    /* Requantize-and-refit rounds: a round's parameters are kept where their exact error is
     * lower (strictly: min-max keeps every tie). */
    for (int r = 0; r < a->rounds; r++) {
        int last = r == a->rounds - 1;
        vd s32[2] = {to_f32(hs[0].s), to_f32(hs[1].s)};
        Pass p;
        requant_as(x, n, join(s32[0], s32[1]), join(hs[0].zp, hs[1].zp), a, !last, 1, &p);
        for (int h = 0; h < 2; h++) {
            Half *u = &hs[h];
            vd e;
            load2(&e, p.err + h * DL);
            vl better = e < u->best_e;
            u->best_s = sel(better, s32[h], u->best_s);
            u->best_z = sel(better, u->zp, u->best_z);
            u->best_e = sel(better, e, u->best_e);
            if (!last) {
                Sums m = {half(p.sq, h), half(p.sqq, h), half(p.sqx, h)};
                lsq(&m, u->sw, u->swx, u->swxx, a, &u->s, &u->zp);
            }
        }
    }
    for (int l = 0; l < FL; l++) {
        const Half *u = &hs[l / DL];
        s_out[l] = (float)u->best_s[l % DL];
        z_out[l] = (int32_t)u->best_z[l % DL];
        e_out[l] = u->best_e[l % DL];
        e0_out[l] = u->e0[l % DL];
    }
    return 1;
}

/* Gather the batch's units (start offsets off[], n values each) transposed into x (n, FL);
 * lanes past m repeat unit 0 (their results are dropped). Each x[i] is built in registers
 * and stored whole: eight 4-byte stores read back as one vector would stall the loads that
 * follow (no store-to-load forwarding). */
INLINE void gather(const void *src_buf, int src, const Py_ssize_t *off, int m, Py_ssize_t n,
                   vf *x)
{
    Py_ssize_t o[FL];
    for (int l = 0; l < FL; l++)
        o[l] = off[l < m ? l : 0];
    for (Py_ssize_t i = 0; i < n; i++)
        x[i] = (vf){load_s(src_buf, src, o[0] + i), load_s(src_buf, src, o[1] + i),
                    load_s(src_buf, src, o[2] + i), load_s(src_buf, src, o[3] + i),
                    load_s(src_buf, src, o[4] + i), load_s(src_buf, src, o[5] + i),
                    load_s(src_buf, src, o[6] + i), load_s(src_buf, src, o[7] + i)};
}

/* All units of a (rows, cols) block in groups of g columns (the last group of a row may be
 * shorter): full-length units in batches of FL, then the short ones. Outputs are (rows, units)
 * in row-major order. Returns 0 on NaN or inf. */
INLINE int fit_src(const void *xb, int src, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t g,
                   const FitArgs *a, float *s_out, int32_t *z_out, double *e_out,
                   double *e0_out, float *lowest, vf *x)
{
    Py_ssize_t units = (cols + g - 1) / g, full = cols / g, tail = cols - full * g;
    Py_ssize_t off[FL], idx[FL];
    float s[FL];
    int32_t z[FL];
    double e[FL], e0[FL];
    for (int pass = 0; pass < 2; pass++) {
        Py_ssize_t n = pass == 0 ? g : tail, per_row = pass == 0 ? full : (tail ? 1 : 0);
        Py_ssize_t total = n <= FIT_MAX_N ? rows * per_row : 0; /* else _fit_long.c's */
        for (Py_ssize_t b = 0; b < total; b += FL) {
            int m = total - b < FL ? (int)(total - b) : FL;
            for (int l = 0; l < m; l++) {
                Py_ssize_t r = (b + l) / per_row, u = pass == 0 ? (b + l) % per_row : full;
                off[l] = r * cols + u * g;
                idx[l] = r * units + u;
            }
            gather(xb, src, off, m, n, x);
            if (!fit_batch(x, n, a, s, z, e, e0, lowest))
                return 0;
            for (int l = 0; l < m; l++) {
                s_out[idx[l]] = s[l];
                z_out[idx[l]] = z[l];
                e_out[idx[l]] = e[l];
                e0_out[idx[l]] = e0[l];
            }
        }
    }
    return 1;
}

HOT static int fit_all(const void *xb, int src, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t g,
                       const FitArgs *a, float *s_out, int32_t *z_out, double *e_out,
                       double *e0_out, float *lowest)
{
    /* The transposed batch, up to 64 KB: on the heap (thread stacks may be small). */
    vf *x = aligned_alloc(sizeof(vf), FIT_MAX_N * sizeof(vf));
    if (x == NULL)
        return -1;
    int ok = src == SRC_BF16
                 ? fit_src(xb, SRC_BF16, rows, cols, g, a, s_out, z_out, e_out, e0_out, lowest, x)
                 : fit_src(xb, SRC_F32, rows, cols, g, a, s_out, z_out, e_out, e0_out, lowest, x);
    free(x);
    return ok;
}

PyObject *qtool_py_fit_search(PyObject *self, PyObject *args)
{
    PyObject *xo, *ratios, *so, *zo, *eo, *e0o;
    int src, scheme, rounds;
    Py_ssize_t rows, cols, g, tile;
    float qmin, qmax;
    if (!PyArg_ParseTuple(args, "OinnniffO!inOOOO", &xo, &src, &rows, &cols, &g, &scheme, &qmin,
                          &qmax, &PyTuple_Type, &ratios, &rounds, &tile, &so, &zo, &eo, &e0o))
        return NULL;
    if (check_shape(rows, cols, &g) < 0)
        return NULL;
    Py_ssize_t k = PyTuple_GET_SIZE(ratios) + 1;
    if (k > FIT_MAX_K || scheme < FIT_ASYM || scheme > FIT_UNSIGNED || rounds < 0 || tile < 1) {
        PyErr_SetString(PyExc_ValueError, "fit_search: over 8 ratios, or a bad scheme, round "
                                          "count or tile size");
        return NULL;
    }
    FitArgs a = {scheme, (int)k, rounds, qmin, qmax, {1.0}};
    for (Py_ssize_t c = 1; c < k; c++) {
        a.ratio[c] = PyFloat_AsDouble(PyTuple_GET_ITEM(ratios, c - 1));
        if (a.ratio[c] == -1.0 && PyErr_Occurred())
            return NULL;
    }
    Py_ssize_t units = (cols + g - 1) / g, itemsize = src == SRC_BF16 ? 2 : 4;
    /* check_shape bounds rows * cols * 4; the float64 outputs need rows * units * 8, which
     * with g = 1 is twice that. */
    if (rows > 0 && units > PY_SSIZE_T_MAX / 8 / rows) {
        PyErr_SetString(PyExc_ValueError, "bad block shape");
        return NULL;
    }
    Py_buffer x, s, z, e, e0;
    PyObject *res = NULL;
    if (get_buffer(xo, &x, 0, rows * cols * itemsize, "x") < 0)
        return NULL;
    if (get_buffer(so, &s, 1, rows * units * 4, "scale") < 0)
        goto release_x;
    if (get_buffer(zo, &z, 1, rows * units * 4, "zero_point") < 0)
        goto release_s;
    if (get_buffer(eo, &e, 1, rows * units * 8, "error") < 0)
        goto release_z;
    if (get_buffer(e0o, &e0, 1, rows * units * 8, "minmax_error") < 0)
        goto release_e;
    /* The outputs are written through typed pointers: each must be aligned to its element
     * (the input x is read through memcpy and may be at any offset). */
    if ((uintptr_t)s.buf % 4 || (uintptr_t)z.buf % 4 || (uintptr_t)e.buf % 8 ||
        (uintptr_t)e0.buf % 8) {
        PyErr_SetString(PyExc_ValueError, "fit_search: an output buffer is not aligned to its "
                                          "element size");
        goto release_e0;
    }
    int finite;
    float lowest = INFINITY;
    Py_BEGIN_ALLOW_THREADS
    finite = fit_all(x.buf, src, rows, cols, g, &a, s.buf, z.buf, e.buf, e0.buf, &lowest);
    if (finite == 1)
        finite = qtool_fit_long(x.buf, src, rows, cols, g, tile, &a, s.buf, z.buf, e.buf,
                                e0.buf, &lowest);
    Py_END_ALLOW_THREADS
    if (finite < 0)
        PyErr_NoMemory();
    else
        res = Py_BuildValue("Nd", PyBool_FromLong(finite), (double)lowest);
release_e0:
    PyBuffer_Release(&e0);
release_e:
    PyBuffer_Release(&e);
release_z:
    PyBuffer_Release(&z);
release_s:
    PyBuffer_Release(&s);
release_x:
    PyBuffer_Release(&x);
    return res;
}
