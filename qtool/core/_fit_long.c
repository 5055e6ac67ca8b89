/* qtool._kernels.fit_search for range units longer than FIT_MAX_N values (channels of long
 * rows, large groups), one unit at a time.
 *
 * fit.py (fit_tile.py) sums such a unit's values in LANES lanes: value i of a tile goes to
 * lane i % LANES and each lane is summed in order in float32, the values past the last whole
 * row of lanes are added to the first lanes, and the lanes are then added up in order in
 * float64. A unit longer than fit.TILE_ELEMS is cut into tiles of that many values, whose
 * sums are added in float64. Here every pass over a unit does exactly that, with the same
 * float32 operations as _fit.c's batch path: the results are numpy's bit for bit. The
 * per-unit algebra is _fit.h's, in lane 0 of its vectors.
 */
#include "_fit.h"

#define LANES 256          /* fit_tile.LANES */
#define LV (LANES / W)     /* vectors per row of lanes */

typedef struct {
    double sq, sqq, sqx, err; /* float64 totals of one pass over a unit */
} LongSums;

/* One row of lanes: LANES values from i (widened from bfloat16 if need be). */
INLINE void load_lanes(const void *xb, int src, Py_ssize_t i, vf *v)
{
    for (int j = 0; j < LV; j++)
        v[j] = load_v(xb, src, i + (Py_ssize_t)j * W);
}

/* Lane sums added up as fit_tile.lane_sum does, in float64: lane j into eight partial sums
 * (j % 8), each in order, then those eight in order. */
INLINE double finish8(vd lo, vd hi)
{
    double t = lo[0];
    for (int j = 1; j < 4; j++)
        t += lo[j];
    for (int j = 0; j < 4; j++)
        t += hi[j];
    return t;
}

INLINE double combine_d(const double *lanes)
{
    vd lo, hi;
    memcpy(&lo, lanes, sizeof lo);
    memcpy(&hi, lanes + 4, sizeof hi);
    for (int k = 8; k < LANES; k += 8) {
        vd a, b;
        memcpy(&a, lanes + k, sizeof a);
        memcpy(&b, lanes + k + 4, sizeof b);
        lo += a;
        hi += b;
    }
    return finish8(lo, hi);
}

/* Four sets of float32 lanes at once (independent chains, interleaved): into out[0..3]. */
INLINE void combine4(const float *l0, const float *l1, const float *l2, const float *l3,
                     double *out)
{
    const float *l[4] = {l0, l1, l2, l3};
    vd lo[4], hi[4];
    for (int c = 0; c < 4; c++) {
        vf v;
        memcpy(&v, l[c], sizeof v);
        lo[c] = half(v, 0);
        hi[c] = half(v, 1);
    }
    for (int k = 8; k < LANES; k += 8)
        for (int c = 0; c < 4; c++) {
            vf v;
            memcpy(&v, l[c] + k, sizeof v);
            lo[c] += half(v, 0);
            hi[c] += half(v, 1);
        }
    for (int c = 0; c < 4; c++)
        out[c] = finish8(lo[c], hi[c]);
}

/* qval (_fit.h) for one value. */
INLINE float qval_s(float x, float s, float z, float qlo, float qhi, int asym)
{
    float t = x / s;
    t = (t + MAGIC) - MAGIC;
    if (asym)
        t = t + z;
    t = t > qlo ? t : qlo;
    return t < qhi ? t : qhi;
}

/* One tile [a, a + c) of a unit requantized with scale s and zero point z: its sums (what
 * fit.py's _wsums and _werr add for the tile, in its lane order) added to *out. */
INLINE void long_tile(const void *xb, int src, Py_ssize_t a0, Py_ssize_t c, float s, float z,
                      const FitArgs *a, int asym, int sums, LongSums *out)
{
    vf lq[LV], lqq[LV], lqx[LV], le[LV], v[LV];
    const vf S = splat(s), Z = splat(z), qlo = splat(a->qmin), qhi = splat(a->qmax);
    for (int j = 0; j < LV; j++)
        lq[j] = lqq[j] = lqx[j] = le[j] = splat(0.0f);
    Py_ssize_t m = c / LANES, i = 0;
    for (Py_ssize_t r = 0; r < m; r++, i += LANES) {
        load_lanes(xb, src, a0 + i, v);
        for (int j = 0; j < LV; j++) {
            vf t = qval(v[j], S, Z, qlo, qhi, asym);
            if (sums) {
                lq[j] += t;
                lqq[j] += t * t;
                lqx[j] += t * v[j];
            }
            vf d = (t - Z) * s - v[j];
            le[j] += d * d;
        }
    }
    /* The rest goes into the first lanes: whole vectors of it as above, then value by value. */
    for (int j = 0; i + W <= c; j++, i += W) {
        vf x = load_v(xb, src, a0 + i), t = qval(x, S, Z, qlo, qhi, asym);
        if (sums) {
            lq[j] += t;
            lqq[j] += t * t;
            lqx[j] += t * x;
        }
        vf d = (t - Z) * s - x;
        le[j] += d * d;
    }
    float fq[LANES], fqq[LANES], fqx[LANES], fe[LANES];
    memcpy(fq, lq, sizeof fq);
    memcpy(fqq, lqq, sizeof fqq);
    memcpy(fqx, lqx, sizeof fqx);
    memcpy(fe, le, sizeof fe);
    for (Py_ssize_t j = i - m * LANES; m * LANES + j < c; j++) { /* value m * LANES + j */
        float x = load_s(xb, src, a0 + m * LANES + j);
        float t = qval_s(x, s, z, a->qmin, a->qmax, asym);
        fq[j] += t;
        fqq[j] += t * t;
        fqx[j] += t * x;
        float d = (t - z) * s - x;
        fe[j] += d * d;
    }
    double t[4];
    combine4(fq, fqq, fqx, fe, t);
    if (sums) {
        out->sq += t[0];
        out->sqq += t[1];
        out->sqx += t[2];
    }
    double e = t[3];
    if (!isfinite(e) || e < 1e-30) { /* fit.py's _werr: again in float64, same lanes */
        double de[LANES] = {0};
        for (Py_ssize_t k = 0; k < c; k++) {
            float x = load_s(xb, src, a0 + k), t = qval_s(x, s, z, a->qmin, a->qmax, asym);
            double d = (double)((t - z) * s - x);
            de[k < m * LANES ? k % LANES : k - m * LANES] += d * d;
        }
        e = combine_d(de);
    }
    out->err += e;
}

/* One pass over a whole unit, tile by tile. */
INLINE LongSums long_pass(const void *xb, int src, Py_ssize_t a0, Py_ssize_t n, Py_ssize_t tile,
                          float s, float z, const FitArgs *a, int sums)
{
    LongSums out = {0.0, 0.0, 0.0, 0.0};
    const int asym = a->scheme == FIT_ASYM;
    for (Py_ssize_t c0 = 0; c0 < n; c0 += tile) {
        Py_ssize_t c = n - c0 < tile ? n - c0 : tile;
        if (asym)
            long_tile(xb, src, a0 + c0, c, s, z, a, 1, sums, &out);
        else
            long_tile(xb, src, a0 + c0, c, s, z, a, 0, sums, &out);
    }
    return out;
}

/* Min, max and the weights' sums sum(x), sum(x x) of a unit, tile by tile; 0 on NaN or inf. */
INLINE int long_stats(const void *xb, int src, Py_ssize_t a0, Py_ssize_t n, Py_ssize_t tile,
                      float *mn_out, float *mx_out, double *gx, double *gxx)
{
    float mn = INFINITY, mx = -INFINITY, bad = 0.0f;
    *gx = *gxx = 0.0;
    for (Py_ssize_t c0 = 0; c0 < n; c0 += tile) {
        Py_ssize_t c = n - c0 < tile ? n - c0 : tile, m = c / LANES, i = 0;
        vf lx[LV], lxx[LV], v[LV], vmn = splat(INFINITY), vmx = splat(-INFINITY);
        vf vbad = splat(0.0f);
        for (int j = 0; j < LV; j++)
            lx[j] = lxx[j] = splat(0.0f);
        for (Py_ssize_t r = 0; r < m; r++, i += LANES) {
            load_lanes(xb, src, a0 + c0 + i, v);
            for (int j = 0; j < LV; j++) {
                vmn = vmin(v[j], vmn);
                vmx = vmax(v[j], vmx);
                vbad += v[j] * 0.0f;
                lx[j] += v[j];
                lxx[j] += v[j] * v[j];
            }
        }
        float fx[LANES], fxx[LANES];
        memcpy(fx, lx, sizeof fx);
        memcpy(fxx, lxx, sizeof fxx);
        for (Py_ssize_t j = 0; i + j < c; j++) {
            float x = load_s(xb, src, a0 + c0 + i + j);
            mn = smin(x, mn);
            mx = smax(x, mx);
            bad += x * 0.0f;
            fx[j] += x;
            fxx[j] += x * x;
        }
        for (int j = 0; j < W; j++) {
            mn = smin(vmn[j], mn);
            mx = smax(vmx[j], mx);
            bad += vbad[j];
        }
        double t[4];
        combine4(fx, fxx, fx, fxx, t);
        *gx += t[0];
        *gxx += t[1];
    }
    *mn_out = mn;
    *mx_out = mx;
    return bad == 0.0f;
}

/* fit_batch (_fit.c) for one long unit: the same steps, in lane 0 of _fit.h's vectors. */
INLINE int fit_long_unit(const void *xb, int src, Py_ssize_t a0, Py_ssize_t n, Py_ssize_t tile,
                         const FitArgs *a, float *s_out, int32_t *z_out, double *e_out,
                         double *e0_out, float *lowest)
{
    float mn, mx;
    double gx, gxx;
    if (!long_stats(xb, src, a0, n, tile, &mn, &mx, &gx, &gxx))
        return 0;
    *lowest = mn < *lowest ? mn : *lowest;
    const vd sw = dsplat((double)n), swx = dsplat(gx), swxx = dsplat(gxx), zero = dsplat(0.0);
    vd lo, hi, mn64 = dsplat(mn), mx64 = dsplat(mx);
    if (a->scheme == FIT_ASYM) {
        lo = dmin(mn64, zero);
        hi = dmax(mx64, zero);
    } else if (a->scheme == FIT_SYM) {
        hi = dmax(mx64, -mn64);
        lo = -hi;
    } else {
        lo = zero;
        hi = dmax(mx64, zero);
    }
    double best = 0, s = 0, zp = 0, s0 = 1, z0 = 0, e0 = 0;
    for (int c = 0; c < a->k; c++) {
        vd sc, zc, fs, fz;
        grid(lo * a->ratio[c], hi * a->ratio[c], a, &sc, &zc);
        LongSums p = long_pass(xb, src, a0, n, tile, (float)sc[0], (float)zc[0], a, 1);
        Sums u = {dsplat(p.sq), dsplat(p.sqq), dsplat(p.sqx)};
        double err = lsq(&u, sw, swx, swxx, a, &fs, &fz)[0];
        if (c == 0 || err < best) {
            best = err;
            s = fs[0];
            zp = fz[0];
        }
        if (c == 0) {
            s0 = sc[0];
            z0 = zc[0];
            e0 = p.err;
        }
    }
    float best_s = (float)s0;
    double best_z = z0, best_e = e0;
    for (int r = 0; r < a->rounds; r++) {
        int last = r == a->rounds - 1;
        float s32 = (float)s;
        LongSums p = long_pass(xb, src, a0, n, tile, s32, (float)zp, a, !last);
        if (p.err < best_e) {
            best_s = s32;
            best_z = zp;
            best_e = p.err;
        }
        if (!last) {
            Sums u = {dsplat(p.sq), dsplat(p.sqq), dsplat(p.sqx)};
            vd fs, fz;
            lsq(&u, sw, swx, swxx, a, &fs, &fz);
            s = fs[0];
            zp = fz[0];
        }
    }
    *s_out = best_s;
    *z_out = (int32_t)best_z;
    *e_out = best_e;
    *e0_out = e0;
    return 1;
}

INLINE int fit_long_src(const void *xb, int src, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t g,
                        Py_ssize_t tile, const FitArgs *a, float *s_out, int32_t *z_out,
                        double *e_out, double *e0_out, float *lowest)
{
    Py_ssize_t units = (cols + g - 1) / g;
    for (Py_ssize_t r = 0; r < rows; r++)
        for (Py_ssize_t u = 0; u < units; u++) {
            Py_ssize_t n = (u + 1) * g <= cols ? g : cols - u * g, k = r * units + u;
            if (n <= FIT_MAX_N)
                continue; /* _fit.c's batches */
            if (!fit_long_unit(xb, src, r * cols + u * g, n, tile, a, s_out + k, z_out + k,
                               e_out + k, e0_out + k, lowest))
                return 0;
        }
    return 1;
}

HOT int qtool_fit_long(const void *xb, int src, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t g,
                       Py_ssize_t tile, const FitArgs *a, float *s_out, int32_t *z_out,
                       double *e_out, double *e0_out, float *lowest)
{
    if (src == SRC_BF16)
        return fit_long_src(xb, SRC_BF16, rows, cols, g, tile, a, s_out, z_out, e_out, e0_out,
                            lowest);
    return fit_long_src(xb, SRC_F32, rows, cols, g, tile, a, s_out, z_out, e_out, e0_out,
                        lowest);
}
