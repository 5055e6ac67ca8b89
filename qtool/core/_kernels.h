/* qtool._kernels: what its two C files share (_kernels.c: ranges, quantize, dequantize;
 * _fit.c: the --range search fit). See _kernels.c for exactness and threading. */
#ifndef QTOOL_KERNELS_H
#define QTOOL_KERNELS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Bit-identical float32 results need float32 arithmetic: where the compiler evaluates float
 * expressions in a wider type (x87 without SSE), refuse to build; qtool then uses numpy. */
#if !defined(FLT_EVAL_METHOD) || FLT_EVAL_METHOD != 0
#error "qtool._kernels needs float expressions evaluated in float (FLT_EVAL_METHOD == 0)"
#endif

/* Each hot loop is compiled twice, for AVX2 and for the baseline, and picked at load time
 * (GCC's function multi-versioning). Both run the same operations in the same order, so
 * they give the same bits. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define HOT __attribute__((target_clones("avx2", "default")))
#else
#define HOT
#endif
#define INLINE static inline __attribute__((always_inline))

/* Eight lanes of the min/max pass, written with the GCC/Clang vector extensions (the
 * compiler did not vectorise the plain loop: it ran at a quarter of the speed). They map to
 * the widest registers the clone has: one AVX2 register, or two SSE2 ones. */
#define W 8
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));
typedef uint16_t vh __attribute__((vector_size(2 * W)));

/* 1.5 * 2^23: for |t| <= 2^22, (t + MAGIC) - MAGIC is t rounded to the nearest integer, ties
 * to even (the FPU's default mode), which is numpy's rint; unlike rintf it vectorises on
 * every x86-64. Callers clamp t to a few units beyond [qmin, qmax] first. */
#define MAGIC 12582912.0f

/* Source element types of quantize, and output types of dequantize. */
enum { SRC_F32 = 0, SRC_BF16 = 1 };
enum { OUT_F32 = 0, OUT_BF16 = 1 };

INLINE vf splat(float a) { return (vf){a, a, a, a, a, a, a, a}; }
/* a < b ? a : b and a > b ? a : b lane by lane, as the scalar code below writes them. */
INLINE vf vmin(vf a, vf b)
{
    vi m = a < b;
    return (vf)(((vi)a & m) | ((vi)b & ~m));
}
INLINE vf vmax(vf a, vf b)
{
    vi m = a > b;
    return (vf)(((vi)a & m) | ((vi)b & ~m));
}
INLINE float smin(float a, float b) { return a < b ? a : b; }
INLINE float smax(float a, float b) { return a > b ? a : b; }

/* bfloat16 is the top half of a float32: widening is exact. */
INLINE float bf16_to_f32(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

INLINE vf load_v(const void *x, int src, Py_ssize_t i)
{
    if (src == SRC_BF16) {
        vh h;
        memcpy(&h, (const uint16_t *)x + i, sizeof h);
        return (vf)(__builtin_convertvector(h, vu) << 16);
    }
    vf v;
    memcpy(&v, (const float *)x + i, sizeof v);
    return v;
}

/* Through memcpy, like load_v: a buffer handed in (a numpy view of a file's bytes at any
 * offset) need not be aligned to its element size, and a misaligned float or uint16 load
 * through a typed pointer is undefined behaviour (UBSan flags it). It compiles to one mov. */
INLINE float load_s(const void *x, int src, Py_ssize_t i)
{
    if (src == SRC_BF16) {
        uint16_t h;
        memcpy(&h, (const uint16_t *)x + i, sizeof h);
        return bf16_to_f32(h);
    }
    float f;
    memcpy(&f, (const float *)x + i, sizeof f);
    return f;
}


/* Borrow a C-contiguous buffer of exactly ``nbytes`` bytes (``what`` names it in errors). */
static inline int get_buffer(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t nbytes,
                      const char *what)
{
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0)
        return -1;
    if (view->len != nbytes) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd bytes, got %zd", what, nbytes,
                     view->len);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static inline int check_shape(Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t *g)
{
    /* rows * cols * 4 (the largest byte count computed from them) must not overflow. */
    if (rows < 0 || cols < 1 || *g < 1 || cols > PY_SSIZE_T_MAX / 4 ||
        rows > PY_SSIZE_T_MAX / 4 / cols) {
        PyErr_SetString(PyExc_ValueError, "bad block shape");
        return -1;
    }
    /* A group longer than the row is the whole row (one unit per row). Clamping keeps every
       u * g and (u + 1) * g at most cols + g <= 2 cols: no overflow, whatever g. */
    if (*g > cols)
        *g = cols;
    return 0;
}

#endif
