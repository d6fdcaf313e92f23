/* LeNet's first block on the CPU: the 2x2 average pools (forward and backward, torch's own
 * arithmetic in the same order, so the same bits) and the 5x5 convolution of a one-channel
 * image, or of each channel in its own group (a fused group's members), forward and weight
 * gradient; lenet_sweep/cpu_kernels.py says why and uses them.
 *
 * float32 tensors; pointers come from Tensor.data_ptr(), strides in elements in (N, C, H, W)
 * order. The GIL is released while the loops run on `threads` OpenMP threads: torch's own
 * runtime, as this module is imported after torch. The hot loops are compiled for three x86-64
 * levels (AVX-512, AVX2, baseline) and picked at load; with contraction off (-ffp-contract=off)
 * each computes the same sums in the same order, so the bits do not depend on the CPU. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* ---- 2x2, stride-2 average pool; H and W even ------------------------------------------- */

static void pool_forward(const float *x, float *y, int64_t N, int64_t C, int64_t H, int64_t W,
                         const int64_t *sx, const int64_t *sy, int threads) {
    const int64_t OH = H / 2, OW = W / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < N * OH; r++) {
        const int64_t n = r / OH, oh = r % OH;
        for (int64_t c = 0; c < C; c++) {
            const float *a = x + n * sx[0] + c * sx[1] + 2 * oh * sx[2], *b = a + sx[2];
            float *out = y + n * sy[0] + c * sy[1] + oh * sy[2];
            for (int64_t ow = 0; ow < OW; ow++) {
                const int64_t i = 2 * ow * sx[3], j = i + sx[3];
                /* ATen: the window summed from zero in row order, then divided */
                out[ow * sy[3]] = ((((0.0f + a[i]) + a[j]) + b[i]) + b[j]) / 4.0f;
            }
        }
    }
}

static void pool_backward(const float *gy, float *gx, int64_t N, int64_t C, int64_t H,
                          int64_t W, const int64_t *sgy, const int64_t *sgx, int threads) {
    const int64_t OH = H / 2, OW = W / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < N * OH; r++) {
        const int64_t n = r / OH, oh = r % OH;
        for (int64_t c = 0; c < C; c++) {
            const float *g = gy + n * sgy[0] + c * sgy[1] + oh * sgy[2];
            float *a = gx + n * sgx[0] + c * sgx[1] + 2 * oh * sgx[2], *b = a + sgx[2];
            for (int64_t ow = 0; ow < OW; ow++) {
                const float v = 0.0f + g[ow * sgy[3]] / 4.0f; /* ATen: zeros plus g / 4 */
                const int64_t i = 2 * ow * sgx[3], j = i + sgx[3];
                a[i] = v, a[j] = v, b[i] = v, b[j] = v;
            }
        }
    }
}

/* ---- 5x5 convolution, one input channel per group, stride 1, zero padding P ------------- */
/* Each image is zero-padded into rows S floats apart (S: a multiple of V), and an output
 * channel is computed on the OH x S grid as V-float vectors: out[i] = bias + sum over the 25
 * taps, in row order, of xp[i + kh * S + kw] * w[kh][kw]; the columns past OW are dropped. */

#define K 5
#define T (K * K)
#define V 16
typedef float vec __attribute__((vector_size(V * sizeof(float)), aligned(sizeof(float))));
#define LD(p) (*(const vec *)(p))
#define ST(p, v) (*(vec *)(p) = (v))

static int64_t grid_stride(int64_t W, int64_t P) { return (W + 2 * P + V - 1) / V * V; }

/* One channel of an image (its rows sh, its columns sw apart) into the zero-padded grid. */
static void pad_image(const float *x, int64_t sh, int64_t sw, float *xp, int64_t H, int64_t W,
                      int64_t P, int64_t S) {
    memset(xp, 0, sizeof(float) * (H + 2 * P + 1) * S); /* a spare row: the last taps' reads */
    for (int64_t h = 0; h < H; h++) {
        float *row = xp + (h + P) * S + P;
        if (sw == 1)
            memcpy(row, x + h * sh, sizeof(float) * W);
        else
            for (int64_t w = 0; w < W; w++) row[w] = x[h * sh + w * sw];
    }
}

CLONES static void conv_channel(const float *xp, const float *w, float bias, float *out,
                                int64_t blocks, int64_t S) {
    vec wv[T];
    for (int t = 0; t < T; t++) wv[t] = (vec){0} + w[t];
    int64_t b = 0;
    for (; b + 4 <= blocks; b += 4) { /* four blocks at once: four independent sums */
        const float *x0 = xp + b * V;
        vec a0 = (vec){0} + bias, a1 = a0, a2 = a0, a3 = a0;
#pragma GCC unroll 25
        for (int t = 0; t < T; t++) {
            const float *xt = x0 + (t / K) * S + t % K;
            a0 += LD(xt) * wv[t], a1 += LD(xt + V) * wv[t];
            a2 += LD(xt + 2 * V) * wv[t], a3 += LD(xt + 3 * V) * wv[t];
        }
        ST(out + b * V, a0), ST(out + (b + 1) * V, a1);
        ST(out + (b + 2) * V, a2), ST(out + (b + 3) * V, a3);
    }
    for (; b < blocks; b++) {
        vec a = (vec){0} + bias;
#pragma GCC unroll 25
        for (int t = 0; t < T; t++) a += LD(xp + b * V + (t / K) * S + t % K) * wv[t];
        ST(out + b * V, a);
    }
}

/* y (N, G*M, OH, OW) contiguous from x (N, G, H, W) with strides sx, w (G*M, 1, 5, 5) and bias
 * (G*M) or NULL contiguous: output channel c reads input channel c / M. */
static void conv_forward(const float *x, const int64_t *sx, const float *w, const float *bias,
                         float *y, int64_t N, int64_t G, int64_t H, int64_t W, int64_t M,
                         int64_t P, int threads) {
    const int64_t S = grid_stride(W, P), OH = H + 2 * P - K + 1, OW = W + 2 * P - K + 1;
    const int64_t O = G * M;
#pragma omp parallel num_threads(threads)
    {
        float *xp = malloc(sizeof(float) * (H + 2 * P + 1) * S);
        float *out = malloc(sizeof(float) * OH * S);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < N * G; i++) { /* image n's channel g */
            const int64_t n = i / G, g = i % G;
            pad_image(x + n * sx[0] + g * sx[1], sx[2], sx[3], xp, H, W, P, S);
            for (int64_t c = g * M; c < (g + 1) * M; c++) {
                conv_channel(xp, w + c * T, bias ? bias[c] : 0.0f, out, OH * S / V, S);
                float *yc = y + (n * O + c) * OH * OW;
                for (int64_t r = 0; r < OH; r++)
                    memcpy(yc + r * OW, out + r * S, sizeof(float) * OW);
            }
        }
        free(xp), free(out);
    }
}

/* acc[t] += g * the tap's inputs, acc[T] += g, over one channel's gradient on the grid (zeros
 * past OW): 26 independent vector sums. */
CLONES static void wgrad_channel(const float *xp, const float *g, vec *acc, int64_t blocks,
                                 int64_t S) {
    vec a[T + 1];
    for (int t = 0; t <= T; t++) a[t] = acc[t];
    for (int64_t b = 0; b < blocks; b++) {
        const vec gv = LD(g + b * V);
        const float *x0 = xp + b * V;
#pragma GCC unroll 25
        for (int t = 0; t < T; t++) a[t] += gv * LD(x0 + (t / K) * S + t % K);
        a[T] += gv;
    }
    for (int t = 0; t <= T; t++) acc[t] = a[t];
}

/* dw (G*M, 1, 5, 5) and db (G*M) or NULL from x (N, G, H, W) with strides sx and gy (N, G*M,
 * OH, OW) contiguous. Each thread sums its (static) share of the images' channels; the threads'
 * sums and a vector's lanes are then added in a fixed order: the same bits for the same thread
 * count. */
static int conv_weight_grad(const float *x, const int64_t *sx, const float *gy, float *dw,
                            float *db, int64_t N, int64_t G, int64_t H, int64_t W, int64_t M,
                            int64_t P, int threads) {
    const int64_t S = grid_stride(W, P), OH = H + 2 * P - K + 1, OW = W + 2 * P - K + 1;
    const int64_t O = G * M;
    vec *acc = calloc((size_t)threads * O * (T + 1), sizeof(vec));
    if (!acc) return -1;
#pragma omp parallel num_threads(threads)
    {
        float *xp = malloc(sizeof(float) * (H + 2 * P + 1) * S);
        float *grid = calloc(OH * S, sizeof(float)); /* a channel's gradient, zeros past OW */
        vec *mine = acc + (int64_t)omp_get_thread_num() * O * (T + 1);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < N * G; i++) { /* image n's channel g */
            const int64_t n = i / G, g = i % G;
            pad_image(x + n * sx[0] + g * sx[1], sx[2], sx[3], xp, H, W, P, S);
            for (int64_t c = g * M; c < (g + 1) * M; c++) {
                const float *gc = gy + (n * O + c) * OH * OW;
                for (int64_t r = 0; r < OH; r++)
                    memcpy(grid + r * S, gc + r * OW, sizeof(float) * OW);
                wgrad_channel(xp, grid, mine + c * (T + 1), OH * S / V, S);
            }
        }
        free(xp), free(grid);
    }
    for (int64_t c = 0; c < O; c++)
        for (int t = 0; t <= T; t++) {
            float s = 0.0f;
            for (int th = 0; th < threads; th++)
                for (int l = 0; l < V; l++) s += acc[(th * O + c) * (T + 1) + t][l];
            if (t < T)
                dw[c * T + t] = s;
            else if (db)
                db[c] = s;
        }
    free(acc);
    return 0;
}

/* ---- Python ------------------------------------------------------------------------------ */

#define PTR(v) ((float *)(uintptr_t)(v))

static int parse_strides(PyObject *seq, int64_t *out) {
    if (!PyArg_ParseTuple(seq, "LLLL", &out[0], &out[1], &out[2], &out[3])) return -1;
    return 0;
}

/* pool_forward / pool_backward(src, dst, N, C, H, W, src_strides, dst_strides, threads) */
static PyObject *pool(PyObject *args, int backward) {
    unsigned long long src, dst;
    long long n, c, h, w;
    PyObject *ssrc, *sdst;
    int threads;
    int64_t s1[4], s2[4];
    if (!PyArg_ParseTuple(args, "KKLLLLO!O!i", &src, &dst, &n, &c, &h, &w, &PyTuple_Type, &ssrc,
                          &PyTuple_Type, &sdst, &threads) ||
        parse_strides(ssrc, s1) || parse_strides(sdst, s2))
        return NULL;
    if (n < 0 || c < 0 || h < 0 || w < 0 || h % 2 || w % 2 || threads < 1) {
        PyErr_SetString(PyExc_ValueError, "sizes must be >= 0, H and W even, threads >= 1");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (backward)
        pool_backward(PTR(src), PTR(dst), n, c, h, w, s1, s2, threads);
    else
        pool_forward(PTR(src), PTR(dst), n, c, h, w, s1, s2, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_pool_forward(PyObject *self, PyObject *args) { return pool(args, 0); }
static PyObject *py_pool_backward(PyObject *self, PyObject *args) { return pool(args, 1); }

static int conv_sizes_ok(long long n, long long g, long long h, long long w, long long m,
                         long long p, int threads) {
    if (n < 0 || g < 1 || m < 1 || p < 0 || h + 2 * p < K || w + 2 * p < K || threads < 1) {
        PyErr_SetString(PyExc_ValueError, "bad sizes for a 5x5 convolution");
        return 0;
    }
    return 1;
}

/* conv_forward(x, x_strides, w, bias or 0, y, N, G, H, W, M, P, threads) */
static PyObject *py_conv_forward(PyObject *self, PyObject *args) {
    unsigned long long x, w, b, y;
    long long n, g, h, wd, m, p;
    PyObject *strides;
    int64_t sx[4];
    int threads;
    if (!PyArg_ParseTuple(args, "KO!KKKLLLLLLi", &x, &PyTuple_Type, &strides, &w, &b, &y, &n, &g,
                          &h, &wd, &m, &p, &threads) ||
        parse_strides(strides, sx) || !conv_sizes_ok(n, g, h, wd, m, p, threads))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    conv_forward(PTR(x), sx, PTR(w), b ? PTR(b) : NULL, PTR(y), n, g, h, wd, m, p, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* conv_weight_grad(x, x_strides, gy, dw, db or 0, N, G, H, W, M, P, threads) */
static PyObject *py_conv_weight_grad(PyObject *self, PyObject *args) {
    unsigned long long x, gy, dw, db;
    long long n, g, h, wd, m, p;
    PyObject *strides;
    int64_t sx[4];
    int threads, status;
    if (!PyArg_ParseTuple(args, "KO!KKKLLLLLLi", &x, &PyTuple_Type, &strides, &gy, &dw, &db, &n,
                          &g, &h, &wd, &m, &p, &threads) ||
        parse_strides(strides, sx) || !conv_sizes_ok(n, g, h, wd, m, p, threads))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    status = conv_weight_grad(PTR(x), sx, PTR(gy), PTR(dw), db ? PTR(db) : NULL, n, g, h, wd, m,
                              p, threads);
    Py_END_ALLOW_THREADS
    if (status) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"pool_forward", py_pool_forward, METH_VARARGS,
     "pool_forward(x, y, N, C, H, W, x_strides, y_strides, threads): y = x's 2x2 average pool"},
    {"pool_backward", py_pool_backward, METH_VARARGS,
     "pool_backward(gy, gx, N, C, H, W, gy_strides, gx_strides, threads): the input gradient"},
    {"conv_forward", py_conv_forward, METH_VARARGS,
     "conv_forward(x, x_strides, w, bias, y, N, G, H, W, M, P, threads): a 5x5 convolution, "
     "M outputs from each of G input channels"},
    {"conv_weight_grad", py_conv_weight_grad, METH_VARARGS,
     "conv_weight_grad(x, x_strides, gy, dw, db, N, G, H, W, M, P, threads): its weight and "
     "bias gradients"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cpu_kernels(void) { return PyModule_Create(&module); }
