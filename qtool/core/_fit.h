/* qtool._kernels: what the search fit's two files share (_fit.c: units of up to FIT_MAX_N
 * values, FL at a time, transposed; _fit_long.c: longer units, one at a time, in lanes). */
#ifndef QTOOL_FIT_H
#define QTOOL_FIT_H
#include "_kernels.h"

#define FL W          /* units per batch: the lanes of one vector */
#define FIT_MAX_N 2048 /* fit.py's _TRANSPOSE_MAX_N */
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

/* The long-unit path (_fit_long.c): fit units longer than FIT_MAX_N, one at a time. */
int qtool_fit_long(const void *xb, int src, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t g,
                   Py_ssize_t tile, const FitArgs *a, float *s_out, int32_t *z_out,
                   double *e_out, double *e0_out, float *lowest);

#endif
