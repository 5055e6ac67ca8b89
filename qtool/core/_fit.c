/* qtool._kernels.fit_search: the --range search fit of qtool/core/fit.py, for range units of
 * at most FIT_MAX_N values (groups, and channels of short rows).
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
 * run on the transposed copy while it is in L1.
 */
#include "_kernels.h"

#define FL W          /* units per batch: the lanes of one vector */
#define FIT_MAX_N 256 /* fit.py's _TRANSPOSE_MAX_N */
#define FIT_MAX_K 9   /* candidate grids: min-max and up to 8 ratios */
#define MIN_SCALE FLT_MIN

enum { FIT_ASYM = 0, FIT_SYM = 1, FIT_UNSIGNED = 2 };

typedef struct {
    int scheme, k, rounds;
    float qmin, qmax;
    double ratio[FIT_MAX_K]; /* ratio[0] = 1: min-max itself */
} FitArgs;

/* Four lanes of float64 (one AVX2 register), for the per-unit algebra (fit.py's _grid and
 * _lsq), done for each half of a batch's FL units at a time, branch-free: masks and selects
 * as numpy's np.where. */
#define DL 4
typedef double vd __attribute__((vector_size(8 * DL)));
typedef int64_t vl __attribute__((vector_size(8 * DL)));
typedef float vf4 __attribute__((vector_size(4 * DL)));

INLINE vd dsplat(double a) { return (vd){a, a, a, a}; }
INLINE vd sel(vl m, vd a, vd b) { return (vd)(((vl)a & m) | ((vl)b & ~m)); }
INLINE vd dmax(vd a, vd b) { return sel(a > b, a, b); } /* np.maximum on non-NaN */
INLINE vd dmin(vd a, vd b) { return sel(a < b, a, b); }
INLINE vl vfinite(vd a) { return (a - a) == 0; } /* NaN for NaN and inf */
/* np.clip(v, 0, qmax): min(max(v, 0), qmax). */
INLINE vd dclip(vd v, double qmax) { return dmin(dmax(v, dsplat(0.0)), dsplat(qmax)); }
/* rint for 0 <= v < 2^51 (ties to even), and floor for the same range. */
#define DMAGIC 6755399441055744.0 /* 1.5 * 2^52 */
INLINE vd drint(vd v) { return (v + DMAGIC) - DMAGIC; }
INLINE vd dfloor(vd v)
{
    vd r = drint(v);
    return sel(r > v, r - 1.0, r);
}
/* Half h of eight float32 lanes, widened; and eight lanes from two halves, narrowed. */
INLINE vd half(vf a, int h)
{
    return h ? (vd){a[4], a[5], a[6], a[7]} : (vd){a[0], a[1], a[2], a[3]};
}
INLINE vf join(vd a, vd b)
{
    vf4 x = __builtin_convertvector(a, vf4), y = __builtin_convertvector(b, vf4);
    return (vf){x[0], x[1], x[2], x[3], y[0], y[1], y[2], y[3]};
}
INLINE vd to_f32(vd a) { return __builtin_convertvector(__builtin_convertvector(a, vf4), vd); }

typedef struct {
    vd sq, sqq, sqx;
} Sums;

/* fit.py's _grid: qparams' scale (a float32 value) and zero point of the ranges [lo, hi]. The zero
 * point -lo / s is at most about qmax (s >= (hi - lo) / qmax), in drint's range; clipping
 * before rounding instead of after gives the same integers, and keeps it there. */
INLINE void grid(vd lo, vd hi, const FitArgs *a, vd *s, vd *z)
{
    vd span = a->scheme == FIT_ASYM ? (hi - lo) / a->qmax : hi / a->qmax;
    *s = to_f32(sel(span == 0, dsplat(1.0), dmax(span, dsplat((double)MIN_SCALE))));
    *z = a->scheme == FIT_ASYM ? drint(dclip(-lo / *s, a->qmax)) : dsplat(0.0);
}

/* fit.py's _lsq, refit(): the scale for integer zero points zp, and its error (inf: invalid). */
INLINE void refit(const Sums *u, vd sw, vd swx, vd swxx, vd zp, vd *s_out, vd *e_out)
{
    vd suu = u->sqq - 2.0 * zp * u->sq + zp * zp * sw;
    vd sux = u->sqx - zp * swx;
    vd s = sux / suu;
    vd err = swxx - sux * s;
    vl ok = (suu > 0) & (s > 0) & vfinite(s) & vfinite(err);
    *s_out = sel(ok, dmax(s, dsplat((double)MIN_SCALE)), dsplat(1.0));
    *e_out = sel(ok, err, dsplat(INFINITY));
}

/* fit.py's _lsq: the best scale and integer zero point for fixed integers, and the error. */
INLINE vd lsq(const Sums *u, vd sw, vd swx, vd swxx, const FitArgs *a, vd *s_out, vd *z_out)
{
    vd e;
    if (a->scheme != FIT_ASYM) {
        *z_out = dsplat(0.0);
        refit(u, sw, swx, swxx, *z_out, s_out, &e);
        return e;
    }
    vd det = sw * u->sqq - u->sq * u->sq;
    vd s = (sw * u->sqx - swx * u->sq) / det;
    vd m = (u->sqq * swx - u->sq * u->sqx) / det;
    vd z = sel((det > 0) & (s > 0), -m / s, dsplat(0.0));
    z = sel(vfinite(z), z, dsplat(0.0));
    /* clip(floor(z), 0, qmax) = floor(clip(z, 0, qmax)): the bounds are integers. */
    vd zl = dfloor(dclip(z, a->qmax)), zh = dclip(zl + 1.0, a->qmax);
    vd sl, el, sh, eh;
    refit(u, sw, swx, swxx, zl, &sl, &el);
    refit(u, sw, swx, swxx, zh, &sh, &eh);
    vl up = eh < el;
    *s_out = sel(up, sh, sl);
    *z_out = sel(up, zh, zl);
    return sel(up, eh, el);
}

/* qtool's formula for one value of each lane: clip(rint(x / s) + z, qmin, qmax). The MAGIC
 * rounding is exact for |t| <= 2^22; a larger |t| (up to inf) comes out of it still beyond
 * 2^21 with its sign, which the clip then takes to qmin or qmax as it takes rint(t): no
 * clamp is needed before it. */
INLINE vf qval(vf x, vf s, vf z, vf qlo, vf qhi, int asym)
{
    vf t = x / s;
    t = (t + MAGIC) - MAGIC;
    if (asym)
        t = t + z;
    return vmin(vmax(t, qlo), qhi);
}

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
                   double *e0_out, float *lowest)
{
    Py_ssize_t units = (cols + g - 1) / g, full = cols / g, tail = cols - full * g;
    vf x[FIT_MAX_N];
    Py_ssize_t off[FL], idx[FL];
    float s[FL];
    int32_t z[FL];
    double e[FL], e0[FL];
    for (int pass = 0; pass < 2; pass++) {
        Py_ssize_t n = pass == 0 ? g : tail, per_row = pass == 0 ? full : (tail ? 1 : 0);
        Py_ssize_t total = rows * per_row;
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
    if (src == SRC_BF16)
        return fit_src(xb, SRC_BF16, rows, cols, g, a, s_out, z_out, e_out, e0_out, lowest);
    return fit_src(xb, SRC_F32, rows, cols, g, a, s_out, z_out, e_out, e0_out, lowest);
}

PyObject *qtool_py_fit_search(PyObject *self, PyObject *args)
{
    PyObject *xo, *ratios, *so, *zo, *eo, *e0o;
    int src, scheme, rounds;
    Py_ssize_t rows, cols, g;
    float qmin, qmax;
    if (!PyArg_ParseTuple(args, "OinnniffO!iOOOO", &xo, &src, &rows, &cols, &g, &scheme, &qmin,
                          &qmax, &PyTuple_Type, &ratios, &rounds, &so, &zo, &eo, &e0o))
        return NULL;
    if (check_shape(rows, cols, &g) < 0)
        return NULL;
    Py_ssize_t k = PyTuple_GET_SIZE(ratios) + 1;
    if (g > FIT_MAX_N || k > FIT_MAX_K || scheme < FIT_ASYM || scheme > FIT_UNSIGNED ||
        rounds < 0) {
        PyErr_SetString(PyExc_ValueError, "fit_search: group over 256 values, over 8 ratios, "
                                          "or a bad scheme or round count");
        return NULL;
    }
    FitArgs a = {scheme, (int)k, rounds, qmin, qmax, {1.0}};
    for (Py_ssize_t c = 1; c < k; c++) {
        a.ratio[c] = PyFloat_AsDouble(PyTuple_GET_ITEM(ratios, c - 1));
        if (a.ratio[c] == -1.0 && PyErr_Occurred())
            return NULL;
    }
    Py_ssize_t units = (cols + g - 1) / g, itemsize = src == SRC_BF16 ? 2 : 4;
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
    int finite;
    float lowest = INFINITY;
    Py_BEGIN_ALLOW_THREADS
    finite = fit_all(x.buf, src, rows, cols, g, &a, s.buf, z.buf, e.buf, e0.buf, &lowest);
    Py_END_ALLOW_THREADS
    res = Py_BuildValue("Nd", PyBool_FromLong(finite), (double)lowest);
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
