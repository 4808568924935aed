/*
 * Test harness for the X25519 ladder of common/ispf/hazmat/_native.c, built from
 * that same source (ISPF_CORE_ONLY: no Python) by tests/unit/test_native_evidence.py
 * in a temporary directory, with the switches the test names:
 *
 *   harness run              stdin: 32-byte scalar, then 32-byte u values; stdout:
 *                            the 32-byte results (exit 3 and the position on
 *                            stderr for a low-order input). With ISPF_CHECK_BOUNDS
 *                            every limb bound is asserted (abort on a breach).
 *   harness blind | probe    (ISPF_CT_CHECK, under valgrind memcheck) the scalar,
 *                            and for probe also the input, marked undefined: any
 *                            branch or memory index that depends on them is a
 *                            memcheck error.
 *   harness control-branch | control-index
 *                            the same marking, then a deliberately secret-dependent
 *                            branch / table index: memcheck must report it, or the
 *                            check above proves nothing.
 */
#define ISPF_CORE_ONLY 1
#include "_native.c"

#include <errno.h>

static size_t read_all(uint8_t **buf) {
    size_t cap = 1 << 16, len = 0;
    *buf = malloc(cap);
    for (;;) {
        if (len == cap) *buf = realloc(*buf, cap *= 2);
        size_t got = fread(*buf + len, 1, cap - len, stdin);
        if (got == 0) break;
        len += got;
    }
    return len;
}

static int run(void) {
    uint8_t *in;
    size_t len = read_all(&in);
    if (len < 32 || len % 32) {
        fprintf(stderr, "input: a 32-byte scalar, then 32-byte values\n");
        return 2;
    }
    Py_ssize_t n = (Py_ssize_t)(len / 32) - 1;
    uint8_t *out = malloc((size_t)n * 32 + 1);
    Py_ssize_t bad = ifma_run(in, in + 32, n, out, 32);
    if (bad >= 0) {
        fprintf(stderr, "low-order input at %td\n", bad);
        return 3;
    }
    if (bad == -2) return 4;
    fwrite(out, 32, (size_t)n, stdout);
    return 0;
}

#ifdef ISPF_CT_CHECK
/* 40 values: one full call of 32 lanes and a padded one; none low-order. */
#define CT_VALUES 40

static int ct(const char *mode) {
    uint8_t scalar[32], values[32 * CT_VALUES], out[32 * CT_VALUES];
    for (int i = 0; i < 32; i++) scalar[i] = (uint8_t)(7 * i + 3);
    for (int i = 0; i < 32 * CT_VALUES; i++) values[i] = (uint8_t)(i * 131 + 17);
    VALGRIND_MAKE_MEM_UNDEFINED(scalar, sizeof scalar); /* the secret */
    if (strcmp(mode, "probe") == 0) VALGRIND_MAKE_MEM_UNDEFINED(values, sizeof values);
    if (strcmp(mode, "control-branch") == 0) {
        volatile int sink = 0;
        if (scalar[1] & 4) sink = 1; /* deliberately secret-dependent: must be caught */
        return sink * 0;
    }
    if (strcmp(mode, "control-index") == 0) {
        static const uint8_t table[256] = {1};
        volatile uint8_t sink = table[scalar[2]]; /* deliberately secret index */
        return sink * 0;
    }
    Py_ssize_t bad = ifma_run(scalar, values, CT_VALUES, out, 32);
    VALGRIND_MAKE_MEM_DEFINED(out, sizeof out); /* the outputs are the caller's */
    VALGRIND_MAKE_MEM_DEFINED(&bad, sizeof bad);
    if (bad != -1) return 5;
    uint8_t acc = 0;
    for (size_t i = 0; i < sizeof out; i++) acc ^= out[i];
    printf("%s: %d values, xor of outputs %02x\n", mode, CT_VALUES, acc);
    return 0;
}
#endif

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "run") == 0) return run();
#ifdef ISPF_CT_CHECK
    if (argc == 2) return ct(argv[1]);
#endif
    fprintf(stderr, "usage: harness run | blind | probe | control-branch | control-index\n");
    return 2;
}
