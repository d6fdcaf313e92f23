/* 2x2, stride-2 average pooling of channels-last float32 tensors on the CPU, forward and
 * backward, with the same arithmetic as ATen's channels-last avg_pool2d kernels (so the same
 * bits) in one pass over memory; lenet_sweep/cpu_pool.py says why and uses it.
 *
 * Tensors are (N, H, W, C) in memory, contiguous, H and W even. Pointers come from
 * Tensor.data_ptr(); the GIL is released while the loops run on `threads` OpenMP threads
 * (torch's own runtime: this module is imported after torch). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static void forward(const float *x, float *y, int64_t N, int64_t H, int64_t W, int64_t C,
                    int threads) {
    const int64_t OH = H / 2, OW = W / 2, row = W * C;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < N * OH; r++) {
        const float *a = x + 2 * r * row, *b = a + row; /* the window's two input rows */
        float *out = y + r * OW * C;
        for (int64_t ow = 0; ow < OW; ow++, a += 2 * C, b += 2 * C, out += C)
            for (int64_t c = 0; c < C; c++) /* ATen: sum from 0 in window order, then divide */
                out[c] = ((((0.0f + a[c]) + a[C + c]) + b[c]) + b[C + c]) / 4.0f;
    }
}

static void backward(const float *gy, float *gx, int64_t N, int64_t H, int64_t W, int64_t C,
                     int threads) {
    const int64_t OH = H / 2, OW = W / 2, row = W * C;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < N * OH; r++) {
        float *a = gx + 2 * r * row, *b = a + row;
        const float *g = gy + r * OW * C;
        for (int64_t ow = 0; ow < OW; ow++, a += 2 * C, b += 2 * C, g += C)
            for (int64_t c = 0; c < C; c++) { /* ATen: a zeroed gradient plus g / 4 */
                const float v = 0.0f + g[c] / 4.0f;
                a[c] = v, a[C + c] = v, b[c] = v, b[C + c] = v;
            }
    }
}

typedef void (*kernel)(const float *, float *, int64_t, int64_t, int64_t, int64_t, int);

static PyObject *call(kernel k, PyObject *args) {
    unsigned long long src, dst;
    long long n, h, w, c;
    int threads;
    if (!PyArg_ParseTuple(args, "KKLLLLi", &src, &dst, &n, &h, &w, &c, &threads))
        return NULL;
    if (n < 0 || h < 0 || w < 0 || c < 0 || h % 2 || w % 2 || threads < 1) {
        PyErr_SetString(PyExc_ValueError, "sizes must be >= 0, H and W even, threads >= 1");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    k((const float *)(uintptr_t)src, (float *)(uintptr_t)dst, n, h, w, c, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_forward(PyObject *self, PyObject *args) { return call(forward, args); }
static PyObject *py_backward(PyObject *self, PyObject *args) { return call(backward, args); }

static PyMethodDef methods[] = {
    {"forward", py_forward, METH_VARARGS,
     "forward(x_ptr, y_ptr, N, H, W, C, threads): y = the 2x2 average pool of x"},
    {"backward", py_backward, METH_VARARGS,
     "backward(gy_ptr, gx_ptr, N, H, W, C, threads): gx = the gradient of the pool's input"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_pool2x2", NULL, -1, methods};

PyMODINIT_FUNC PyInit__pool2x2(void) { return PyModule_Create(&module); }
