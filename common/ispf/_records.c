/*
 * Record operations for ISPF Match (optional: ispf_server.records uses its
 * pure-Python code when this module is not built, same results, slower). Packed
 * fixed-width records (tags, IDs, label-set numbers), never a key or a salt.
 *
 *   shuffle(list, seed)                 Fisher-Yates from a keyed-BLAKE3 stream
 *   shuffle_records(buf, width, seed)   the same on fixed-width records in place
 *   sort_records(data, width)           fixed-width records sorted bytewise
 *   sort_inplace(buf, width)            the same in place, without scratch memory
 *   zip_records(n, (buf, w), ...)       fixed-width columns interleaved into records
 *   zip_into(dst, at, n, (buf, w), ...) the same, written into a buffer in place
 *   split_unique(data, width[, cb])     sorted key+code records: unique keys by code,
 *                                       and the records of repeated keys
 *   xor_fold(data, width)               the XOR of fixed-width records
 *   merge_join(a, wa, b, wb, key)       two sorted runs joined on their keys (many to one)
 *   merge_sorted(pieces, width)         sorted runs merged in order
 *   has_repeat(data, width, key)        neighbouring records of a sorted run share a key
 *   select_fields(data, width, fields)  each record remade from some of its fields
 *
 * The long loops release the GIL, so threads scale across cores.
 */
#define _GNU_SOURCE /* qsort_r */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_blake3.h"

typedef unsigned __int128 u128;

/* --------------------------------------------------------------- shuffle */

/* Random words from keyed BLAKE3 in counter mode (a PRF under a fresh 32-byte seed). */
typedef struct { uint32_t key[8]; uint64_t counter; uint64_t buf[4]; int left; } prf_stream;

static uint64_t prf_next(prf_stream *st) {
    if (st->left == 0) {
        uint8_t msg[8], out[32];
        for (int i = 0; i < 8; i++) msg[i] = (uint8_t)(st->counter >> (8 * i));
        st->counter++;
        blake3_keyed_block(st->key, msg, 8, out);
        for (int w = 0; w < 4; w++) {
            uint64_t x = 0;
            for (int j = 7; j >= 0; j--) x = (x << 8) | out[8 * w + j];
            st->buf[w] = x;
        }
        st->left = 4;
    }
    return st->buf[--st->left];
}

static void prf_init(prf_stream *st, const uint8_t seed[32]) {
    for (int i = 0; i < 8; i++) st->key[i] = load32(seed + 4 * i);
    st->counter = 0;
    st->left = 0;
}

/* Uniform in [0, n), n > 0 (Lemire's multiply-and-reject: no modulo bias). */
static uint64_t prf_below(prf_stream *st, uint64_t n) {
    u128 m = (u128)prf_next(st) * n;
    uint64_t low = (uint64_t)m;
    if (low < n) {
        uint64_t floor = (0 - n) % n;
        while (low < floor) {
            m = (u128)prf_next(st) * n;
            low = (uint64_t)m;
        }
    }
    return (uint64_t)(m >> 64);
}

/* shuffle(list, seed): Fisher-Yates in place, the randomness from the 32-byte seed. */
static PyObject *py_shuffle(PyObject *self, PyObject *args) {
    PyObject *list;
    Py_buffer seed;
    if (!PyArg_ParseTuple(args, "O!y*", &PyList_Type, &list, &seed)) return NULL;
    if (seed.len != 32) {
        PyBuffer_Release(&seed);
        PyErr_SetString(PyExc_ValueError, "the seed must be 32 bytes");
        return NULL;
    }
    prf_stream st;
    prf_init(&st, seed.buf);
    PyBuffer_Release(&seed);
    PyObject **items = ((PyListObject *)list)->ob_item;
    for (Py_ssize_t i = PyList_GET_SIZE(list) - 1; i > 0; i--) {
        Py_ssize_t j = (Py_ssize_t)prf_below(&st, (uint64_t)i + 1);
        PyObject *tmp = items[i];
        items[i] = items[j];
        items[j] = tmp;
    }
    memset(&st, 0, sizeof st);
    Py_RETURN_NONE;
}

/* shuffle_records(buf, width, seed): the same shuffle on fixed-width records of a
 * writable buffer (packed IDs: no Python object per record). */
static PyObject *py_shuffle_records(PyObject *self, PyObject *args) {
    Py_buffer buf, seed;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "w*ny*", &buf, &width, &seed)) return NULL;
    PyObject *ret = NULL;
    if (seed.len != 32 || width < 1 || width > 64 || buf.len % width) {
        PyErr_SetString(PyExc_ValueError, "seed must be 32 bytes, width 1..64 dividing the buffer");
        goto done;
    }
    prf_stream st;
    prf_init(&st, seed.buf);
    uint8_t *a = buf.buf, tmp[64];
    size_t w = (size_t)width;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = buf.len / width - 1; i > 0; i--) {
        Py_ssize_t j = (Py_ssize_t)prf_below(&st, (uint64_t)i + 1);
        memcpy(tmp, a + w * (size_t)i, w);
        memcpy(a + w * (size_t)i, a + w * (size_t)j, w);
        memcpy(a + w * (size_t)j, tmp, w);
    }
    Py_END_ALLOW_THREADS
    memset(&st, 0, sizeof st);
    memset(tmp, 0, sizeof tmp);
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&buf);
    PyBuffer_Release(&seed);
    return ret;
}

/* ---------------------------------------------------------- sorted runs */

static int cmp_records(const void *a, const void *b, void *width) {
    return memcmp(a, b, *(const size_t *)width);
}

/* Records of width w sorted bytewise from byte d on, in place, without scratch
 * (American flag sort, an MSD radix sort): each pass counts the byte at depth d,
 * then moves every record straight into its bucket by swaps; small buckets are
 * finished with qsort. Uniform tags split at the first byte, digit IDs (few
 * values per byte) over a few more levels. The memory a sort needs is the
 * records' own. */
static void flag_sort(unsigned char *a, size_t n, size_t w, size_t d) {
    if (n < 48 || d >= w) {
        qsort_r(a, n, w, cmp_records, &w);
        return;
    }
    size_t count[257] = {0};
    for (size_t i = 0; i < n; i++) count[(size_t)a[i * w + d] + 1]++;
    for (size_t b = 1; b <= 256; b++) count[b] += count[b - 1];
    size_t next[256];
    memcpy(next, count, sizeof next);
    unsigned char tmp[256];
    for (size_t b = 0; b < 256; b++) {
        while (next[b] < count[b + 1]) {
            unsigned char *rec = a + next[b] * w;
            size_t c = rec[d];
            if (c == b) {
                next[b]++;
            } else { /* send it to its bucket, take that bucket's next record back */
                unsigned char *dst = a + next[c]++ * w;
                memcpy(tmp, dst, w);
                memcpy(dst, rec, w);
                memcpy(rec, tmp, w);
            }
        }
    }
    for (size_t b = 0; b < 256; b++) {
        size_t from = count[b], size = count[b + 1] - from;
        if (size > 1) flag_sort(a + from * w, size, w, d + 1);
    }
}

/* sort_inplace(buf, width) -> None: the records of a writable buffer sorted in place. */
static PyObject *py_sort_inplace(PyObject *self, PyObject *args) {
    Py_buffer data;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "w*n", &data, &width)) return NULL;
    if (width < 1 || width > 256 || data.len % width) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "data must be whole records of a width from 1 to 256");
        return NULL;
    }
    size_t w = (size_t)width, n = (size_t)(data.len / width);
    Py_BEGIN_ALLOW_THREADS
    flag_sort(data.buf, n, w, 0);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    Py_RETURN_NONE;
}

/* sort_records(data, width) -> bytes: fixed-width records in byte order (a sorted
 * copy; sort_inplace sorts without one). */
static PyObject *py_sort_records(PyObject *self, PyObject *args) {
    Py_buffer data;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "y*n", &data, &width)) return NULL;
    PyObject *out = NULL;
    if (width < 1 || width > 256 || data.len % width) {
        PyErr_SetString(PyExc_ValueError, "data must be whole records of a width from 1 to 256");
        goto done;
    }
    out = PyBytes_FromStringAndSize(data.buf, data.len);
    if (!out) goto done;
    unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
    size_t w = (size_t)width, n = (size_t)(data.len / width);
    Py_BEGIN_ALLOW_THREADS
    flag_sort(dst, n, w, 0);
    Py_END_ALLOW_THREADS
done:
    PyBuffer_Release(&data);
    return out;
}

/* The columns (buf, width) of args[skip:], each n records of width bytes or one
 * (the same in every record). Fills bufs/widths; returns the record width, or -1
 * with an exception set (*got: how many buffers to release). */
static Py_ssize_t zip_parse(PyObject *args, Py_ssize_t skip, Py_ssize_t n, Py_buffer *bufs,
                            Py_ssize_t *widths, Py_ssize_t *got) {
    Py_ssize_t parts = PyTuple_GET_SIZE(args) - skip, total = 0;
    for (*got = 0; *got < parts; (*got)++) {
        Py_ssize_t j = *got;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(args, j + skip), "y*n", &bufs[j], &widths[j])) return -1;
        Py_ssize_t w = widths[j];
        if (w < 1 || (bufs[j].len != w * n && bufs[j].len != w)) {
            PyErr_Format(PyExc_ValueError, "part %zd: %zd bytes is neither %zd records of %zd "
                         "nor one", j, bufs[j].len, n, w);
            (*got)++;
            return -1;
        }
        total += w;
    }
    return total;
}

static void zip_fill(char *dst, Py_ssize_t n, Py_ssize_t parts, const Py_buffer *bufs,
                     const Py_ssize_t *widths) {
    for (Py_ssize_t i = 0; i < n; i++) {
        for (Py_ssize_t j = 0; j < parts; j++) {
            Py_ssize_t w = widths[j];
            const char *src = (const char *)bufs[j].buf + (bufs[j].len == w ? 0 : i * w);
            memcpy(dst, src, (size_t)w);
            dst += w;
        }
    }
}

/* zip_records(n, (buf, width), ...) -> bytes: record i is the i-th width-byte slice
 * of each buf in turn; a buf of exactly width bytes is the same in every record.
 * zip_into(dst, at, n, (buf, width), ...) -> None: the same records written into
 * the writable buffer dst from byte at (no intermediate copy). */
static PyObject *zip_impl(PyObject *args, int into) {
    Py_ssize_t skip = into ? 3 : 1, nargs = PyTuple_GET_SIZE(args);
    if (nargs < skip + 1) {
        PyErr_SetString(PyExc_TypeError, into ? "zip_into(dst, at, n, (buf, width), ...)"
                                              : "zip_records(n, (buf, width), ...)");
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(PyTuple_GET_ITEM(args, skip - 1));
    if (n < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "n must not be negative");
        return NULL;
    }
    Py_ssize_t parts = nargs - skip, got = 0;
    Py_buffer *bufs = PyMem_Calloc((size_t)parts, sizeof(Py_buffer));
    Py_ssize_t *widths = PyMem_Calloc((size_t)parts, sizeof(Py_ssize_t));
    Py_buffer dst = {0};
    PyObject *out = NULL;
    if (!bufs || !widths) { PyErr_NoMemory(); goto done; }
    Py_ssize_t total = zip_parse(args, skip, n, bufs, widths, &got);
    if (total < 0) goto done;
    char *at;
    if (into) {
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(args, 0), &dst, PyBUF_WRITABLE) < 0) goto done;
        Py_ssize_t off = PyLong_AsSsize_t(PyTuple_GET_ITEM(args, 1));
        if (off < 0 && PyErr_Occurred()) goto done;
        if (off < 0 || off > dst.len || dst.len - off < n * total) {
            PyErr_SetString(PyExc_ValueError, "the records do not fit in dst at that offset");
            goto done;
        }
        at = (char *)dst.buf + off;
    } else {
        out = PyBytes_FromStringAndSize(NULL, n * total);
        if (!out) goto done;
        at = PyBytes_AS_STRING(out);
    }
    Py_BEGIN_ALLOW_THREADS
    zip_fill(at, n, parts, bufs, widths);
    Py_END_ALLOW_THREADS
    if (into) {
        out = Py_None;
        Py_INCREF(out);
    }
done:
    for (Py_ssize_t j = 0; j < got; j++) PyBuffer_Release(&bufs[j]);
    if (dst.obj) PyBuffer_Release(&dst);
    PyMem_Free(bufs);
    PyMem_Free(widths);
    return out;
}

static PyObject *py_zip_records(PyObject *self, PyObject *args) { return zip_impl(args, 0); }
static PyObject *py_zip_into(PyObject *self, PyObject *args) { return zip_impl(args, 1); }

/* split_unique(data, width[, code_bytes=1]) -> (dict code -> bytes, bytes): records
 * sorted by their first width-code_bytes bytes (the key), each ending in a code of
 * one or two bytes (big-endian). Keys that occur once go to their code's bytes (the
 * keys alone, back to back); records whose key occurs more than once come back
 * whole, in order. */
static PyObject *py_split_unique(PyObject *self, PyObject *args) {
    Py_buffer data;
    Py_ssize_t width, code_bytes = 1;
    if (!PyArg_ParseTuple(args, "y*n|n", &data, &width, &code_bytes)) return NULL;
    PyObject *ret = NULL, *groups = NULL, *multi = NULL, **parts = NULL;
    size_t *count = NULL;
    char **at = NULL;
    size_t ncodes = code_bytes == 2 ? 65536 : 256;
    if ((code_bytes != 1 && code_bytes != 2) || width <= code_bytes || data.len % width) {
        PyErr_SetString(PyExc_ValueError,
                        "data must be whole records, each a key and a code of 1 or 2 bytes");
        goto done;
    }
    parts = PyMem_Calloc(ncodes, sizeof *parts);
    count = PyMem_Calloc(ncodes, sizeof *count);
    at = PyMem_Calloc(ncodes, sizeof *at);
    if (!parts || !count || !at) { PyErr_NoMemory(); goto done; }
    const unsigned char *a = data.buf;
    size_t w = (size_t)width, k = w - (size_t)code_bytes, n = (size_t)(data.len / width);
    size_t nmulti = 0;
    #define SAME(i, j) (memcmp(a + (i) * w, a + (j) * w, k) == 0)
    #define UNIQUE(i) (!((i) > 0 && SAME(i, (i) - 1)) && !((i) + 1 < n && SAME(i, (i) + 1)))
    #define CODE(r) (code_bytes == 2 ? ((size_t)(r)[k] << 8) | (r)[k + 1] : (size_t)(r)[k])
    for (size_t i = 0; i < n; i++) {
        if (UNIQUE(i)) count[CODE(a + i * w)]++;
        else nmulti++;
    }
    for (size_t c = 0; c < ncodes; c++) {
        if (!count[c]) continue;
        parts[c] = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(count[c] * k));
        if (!parts[c]) goto done;
        at[c] = PyBytes_AS_STRING(parts[c]);
    }
    multi = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(nmulti * w));
    if (!multi) goto done;
    char *m = PyBytes_AS_STRING(multi);
    for (size_t i = 0; i < n; i++) {
        const unsigned char *r = a + i * w;
        if (UNIQUE(i)) { size_t c = CODE(r); memcpy(at[c], r, k); at[c] += k; }
        else { memcpy(m, r, w); m += w; }
    }
    #undef CODE
    #undef UNIQUE
    #undef SAME
    groups = PyDict_New();
    if (!groups) goto done;
    for (size_t c = 0; c < ncodes; c++) {
        if (!parts[c]) continue;
        PyObject *key = PyLong_FromSize_t(c);
        if (!key || PyDict_SetItem(groups, key, parts[c]) < 0) { Py_XDECREF(key); goto done; }
        Py_DECREF(key);
    }
    ret = PyTuple_Pack(2, groups, multi);
done:
    if (parts) for (size_t c = 0; c < ncodes; c++) Py_XDECREF(parts[c]);
    PyMem_Free(parts);
    PyMem_Free(count);
    PyMem_Free(at);
    Py_XDECREF(groups);
    Py_XDECREF(multi);
    PyBuffer_Release(&data);
    return ret;
}

/* xor_fold(data, width) -> bytes: the XOR of all width-byte records. */
static PyObject *py_xor_fold(PyObject *self, PyObject *args) {
    Py_buffer data;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "y*n", &data, &width)) return NULL;
    PyObject *out = NULL;
    if (width < 1 || data.len % width) {
        PyErr_SetString(PyExc_ValueError, "data must be whole records of a positive width");
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, width);
    if (!out) goto done;
    unsigned char *acc = (unsigned char *)PyBytes_AS_STRING(out);
    memset(acc, 0, (size_t)width);
    const unsigned char *src = data.buf;
    for (Py_ssize_t at = 0; at < data.len; at += width) {
        for (Py_ssize_t k = 0; k < width; k++) acc[k] ^= src[at + k];
    }
done:
    PyBuffer_Release(&data);
    return out;
}

/* merge_join(a, wa, b, wb, key) -> bytes or None: both runs sorted by their first
 * `key` bytes; for each record of a whose key b holds, a_i + b_j[key:]. Records
 * of a may share a key (many to one: each is joined to b's record of it); None
 * if b holds a key twice. */
static PyObject *py_merge_join(PyObject *self, PyObject *args) {
    Py_buffer a, b;
    Py_ssize_t wa, wb, key;
    if (!PyArg_ParseTuple(args, "y*ny*nn", &a, &wa, &b, &wb, &key)) return NULL;
    PyObject *out = NULL;
    unsigned char *buf = NULL;
    if (wa < 1 || wb < 1 || key < 1 || key > wa || key > wb || a.len % wa || b.len % wb) {
        PyErr_SetString(PyExc_ValueError, "runs must be whole records; key within both widths");
        goto done;
    }
    size_t na = (size_t)(a.len / wa), nb = (size_t)(b.len / wb), k = (size_t)key;
    size_t wo = (size_t)(wa + wb - key), cap = nb ? na : 0, got = 0;
    buf = PyMem_Malloc(cap * wo + 1);
    if (!buf) { PyErr_NoMemory(); goto done; }
    const unsigned char *pa = a.buf, *pb = b.buf;
    int dup = 0;
    Py_BEGIN_ALLOW_THREADS
    for (size_t j = 1; j < nb && !dup; j++) dup = memcmp(pb + (j - 1) * wb, pb + j * wb, k) == 0;
    size_t i = 0, j = 0;
    while (!dup && i < na && j < nb) {
        int c = memcmp(pa + i * wa, pb + j * wb, k);
        if (c < 0) i++;
        else if (c > 0) j++;
        else {
            memcpy(buf + got * wo, pa + i * wa, (size_t)wa);
            memcpy(buf + got * wo + wa, pb + j * wb + k, (size_t)wb - k);
            got++; i++; /* (the next record of a may share this key) */
        }
    }
    Py_END_ALLOW_THREADS
    if (dup) { out = Py_None; Py_INCREF(out); }
    else out = PyBytes_FromStringAndSize((const char *)buf, (Py_ssize_t)(got * wo));
done:
    PyMem_Free(buf);
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return out;
}

/* merge_sorted(pieces, width) -> bytes: sorted runs of width-byte records (a
 * sequence of buffers, each sorted bytewise) merged into one sorted run. The
 * k-way merge of an external sort: a binary heap of the runs' heads, ties taken
 * from the earlier run. */
static PyObject *py_merge_sorted(PyObject *self, PyObject *args) {
    PyObject *seq_in;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "On", &seq_in, &width)) return NULL;
    if (width < 1 || width > 256) {
        PyErr_SetString(PyExc_ValueError, "width must be from 1 to 256");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(seq_in, "pieces must be a sequence of buffers");
    if (!seq) return NULL;
    Py_ssize_t k = PySequence_Fast_GET_SIZE(seq), got = 0, total = 0;
    Py_buffer *bufs = PyMem_Calloc((size_t)(k ? k : 1), sizeof(Py_buffer));
    size_t *pos = PyMem_Calloc((size_t)(k ? k : 1), sizeof(size_t));
    Py_ssize_t *heap = PyMem_Calloc((size_t)(k ? k : 1), sizeof(Py_ssize_t));
    PyObject *out = NULL;
    if (!bufs || !pos || !heap) { PyErr_NoMemory(); goto done; }
    for (; got < k; got++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, got), &bufs[got], PyBUF_SIMPLE) < 0)
            goto done;
        if (bufs[got].len % width) {
            got++;
            PyErr_Format(PyExc_ValueError, "piece %zd is not whole %zd-byte records", got - 1, width);
            goto done;
        }
        total += bufs[got].len;
    }
    out = PyBytes_FromStringAndSize(NULL, total);
    if (!out) goto done;
    unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
    size_t w = (size_t)width;
    Py_BEGIN_ALLOW_THREADS
    /* heap of run numbers, ordered by (head record, run number) */
    #define HEAD(r) ((const unsigned char *)bufs[r].buf + pos[r])
    #define LESS(r, s) ({ int c_ = memcmp(HEAD(r), HEAD(s), w); c_ < 0 || (c_ == 0 && (r) < (s)); })
    Py_ssize_t n = 0;
    for (Py_ssize_t r = 0; r < k; r++) {
        if (!bufs[r].len) continue;
        Py_ssize_t i = n++;
        heap[i] = r;
        while (i > 0 && LESS(heap[i], heap[(i - 1) / 2])) {
            Py_ssize_t up = (i - 1) / 2, t = heap[up];
            heap[up] = heap[i]; heap[i] = t; i = up;
        }
    }
    while (n > 0) {
        Py_ssize_t r = heap[0];
        memcpy(dst, HEAD(r), w);
        dst += w;
        pos[r] += w;
        if (pos[r] == (size_t)bufs[r].len) heap[0] = heap[--n];
        for (Py_ssize_t i = 0;;) { /* sift down */
            Py_ssize_t l = 2 * i + 1, m = i;
            if (l < n && LESS(heap[l], heap[m])) m = l;
            if (l + 1 < n && LESS(heap[l + 1], heap[m])) m = l + 1;
            if (m == i) break;
            Py_ssize_t t = heap[m]; heap[m] = heap[i]; heap[i] = t; i = m;
        }
    }
    #undef LESS
    #undef HEAD
    Py_END_ALLOW_THREADS
done:
    for (Py_ssize_t j = 0; j < got; j++) PyBuffer_Release(&bufs[j]);
    PyMem_Free(bufs);
    PyMem_Free(pos);
    PyMem_Free(heap);
    Py_DECREF(seq);
    return out;
}

/* has_repeat(data, width, key) -> bool: two neighbouring records of a sorted run
 * with the same first `key` bytes. */
static PyObject *py_has_repeat(PyObject *self, PyObject *args) {
    Py_buffer data;
    Py_ssize_t width, key;
    if (!PyArg_ParseTuple(args, "y*nn", &data, &width, &key)) return NULL;
    if (width < 1 || key < 1 || key > width || data.len % width) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "data must be whole records; key within the width");
        return NULL;
    }
    const unsigned char *a = data.buf;
    size_t w = (size_t)width, n = (size_t)(data.len / width);
    int rep = 0;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 1; i < n && !rep; i++) rep = memcmp(a + (i - 1) * w, a + i * w, (size_t)key) == 0;
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return PyBool_FromLong(rep);
}

/* select_fields(data, width, ((offset, length), ...)) -> bytes: each width-byte
 * record of data remade from its fields, in the order given (a run re-keyed:
 * tag | nid | ... into nid | tag | ...). */
static PyObject *py_select_fields(PyObject *self, PyObject *args) {
    Py_buffer data;
    Py_ssize_t width;
    PyObject *fields_in;
    if (!PyArg_ParseTuple(args, "y*nO", &data, &width, &fields_in)) return NULL;
    PyObject *out = NULL, *fields = NULL;
    Py_ssize_t offs[32], lens[32], nf = 0, wo = 0;
    if (width < 1 || data.len % width) {
        PyErr_SetString(PyExc_ValueError, "data must be whole records of a positive width");
        goto done;
    }
    fields = PySequence_Fast(fields_in, "fields must be a sequence of (offset, length)");
    if (!fields) goto done;
    nf = PySequence_Fast_GET_SIZE(fields);
    if (nf < 1 || nf > 32) {
        PyErr_SetString(PyExc_ValueError, "from 1 to 32 fields");
        goto done;
    }
    for (Py_ssize_t f = 0; f < nf; f++) {
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fields, f), "nn", &offs[f], &lens[f]))
            goto done;
        if (offs[f] < 0 || lens[f] < 1 || offs[f] + lens[f] > width) {
            PyErr_Format(PyExc_ValueError, "field %zd is not within the %zd-byte record", f, width);
            goto done;
        }
        wo += lens[f];
    }
    Py_ssize_t n = data.len / width;
    out = PyBytes_FromStringAndSize(NULL, n * wo);
    if (!out) goto done;
    unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
    const unsigned char *src = data.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++, src += width) {
        for (Py_ssize_t f = 0; f < nf; f++) {
            memcpy(dst, src + offs[f], (size_t)lens[f]);
            dst += lens[f];
        }
    }
    Py_END_ALLOW_THREADS
done:
    Py_XDECREF(fields);
    PyBuffer_Release(&data);
    return out;
}

static PyMethodDef methods[] = {
    {"shuffle", py_shuffle, METH_VARARGS,
     "shuffle(list, seed) -> None: Fisher-Yates in place, driven by keyed BLAKE3 under seed."},
    {"shuffle_records", py_shuffle_records, METH_VARARGS,
     "shuffle_records(buf, width, seed) -> None: the same on the fixed-width records of buf."},
    {"sort_records", py_sort_records, METH_VARARGS,
     "sort_records(data, width) -> bytes: fixed-width records sorted bytewise."},
    {"sort_inplace", py_sort_inplace, METH_VARARGS,
     "sort_inplace(buf, width) -> None: the fixed-width records of buf sorted bytewise, in place."},
    {"zip_records", py_zip_records, METH_VARARGS,
     "zip_records(n, (buf, width), ...) -> bytes: n records, each the next slice of every buf."},
    {"zip_into", py_zip_into, METH_VARARGS,
     "zip_into(dst, at, n, (buf, width), ...) -> None: zip_records written into dst at byte at."},
    {"split_unique", py_split_unique, METH_VARARGS,
     "split_unique(data, width[, code_bytes=1]) -> (dict code -> keys, bytes): sorted key+code\n"
     "records (a code of 1 or 2 bytes) split\n"
     "into keys that occur once (by code) and the records of keys that occur more than once."},
    {"xor_fold", py_xor_fold, METH_VARARGS,
     "xor_fold(data, width) -> bytes: the XOR of all width-byte records."},
    {"merge_join", py_merge_join, METH_VARARGS,
     "merge_join(a, wa, b, wb, key) -> bytes | None: records of a joined to b's on their keys."},
    {"merge_sorted", py_merge_sorted, METH_VARARGS,
     "merge_sorted(pieces, width) -> bytes: sorted runs of fixed-width records merged in order."},
    {"has_repeat", py_has_repeat, METH_VARARGS,
     "has_repeat(data, width, key) -> bool: neighbouring records of a sorted run share a key."},
    {"select_fields", py_select_fields, METH_VARARGS,
     "select_fields(data, width, ((offset, length), ...)) -> bytes: each record remade from fields."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_records", "Record operations for ISPF Match (optional).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__records(void) { return PyModule_Create(&module); }
