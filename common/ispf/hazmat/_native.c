/*
 * Native hot loops of the curve for ISPF Match (optional: ispf.hazmat.curve falls
 * back to Python when this module is not built). Results are bit-identical to the
 * Python code; the tests compare them on the vectors and random inputs.
 *
 *   hash_to_curve_many(key, digits)     recipe ispf/nid/v1 (see curve.py); digits a
 *                                       list, or one buffer of fixed-width IDs
 *   x25519_many(scalar, packed, out)    X25519 (RFC 7748), eight lanes with AVX-512
 *                                       IFMA, four groups of eight in flight
 *   point_acceptable(u)                 hash-to-curve's test of one candidate (tests)
 *   vector_available()                  whether the CPU runs the eight-lane code
 *
 * (The record operations, sort, zip, merge, select and the shuffles, are the
 * separate module ispf._records, common/ispf/_records.c.)
 *
 * The hashing and X25519 calls release the GIL while they compute, so threads
 * scale across cores.
 *
 * BLAKE3 (../_blake3.h): the recipe's input (domain, digits, counter) fits one
 * 64-byte block, so a keyed hash is one compression.
 * Legendre symbol: binary Jacobi algorithm on 4x64-bit limbs, narrowing to
 * 128 and 64 bits as the values shrink. Like gmpy2's, it is not constant time;
 * the values it sees are keyed hashes, and only this process runs it.
 */
#define _GNU_SOURCE /* explicit_bzero */
/*
 * Compile-time switches (the evidence builds in tests/native/, never the module):
 *   ISPF_CORE_ONLY      the arithmetic without Python, for the C test harness
 *   ISPF_PORTABLE_IFMA  a portable, branch-free stand-in for the AVX-512 IFMA
 *                       intrinsics (_ifma_portable.h), so valgrind can run the ladder
 *   ISPF_CT_CHECK       memcheck client requests: the harness marks the scalar (and
 *                       a probe's input) undefined; only public verdicts are defined
 *   ISPF_CHECK_BOUNDS   assert every documented limb bound after every field op
 */
#ifdef ISPF_CORE_ONLY
#include <stddef.h>
typedef ptrdiff_t Py_ssize_t;
#else
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#ifdef ISPF_CT_CHECK
#include <valgrind/memcheck.h>
/* A value derived from secrets that the caller learns anyway (a refusal). */
#define DECLASSIFY(p, n) VALGRIND_MAKE_MEM_DEFINED((p), (n))
#else
#define DECLASSIFY(p, n) ((void)0)
#endif

/* Zero secrets in a way the compiler cannot drop as a dead store (memset before a
 * free or a return can be, and at -O3 is). tests/unit/test_native_evidence.py
 * checks the built module still calls it where the source does. */
static void secure_wipe(void *p, size_t n) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 25))
    explicit_bzero(p, n);
#else
    volatile uint8_t *v = (volatile uint8_t *)p;
    while (n--) *v++ = 0;
#endif
}

typedef unsigned __int128 u128;

/* ---------------------------------------------------------------- BLAKE3 */

#include "../_blake3.h"


/* ------------------------------------------------- arithmetic mod 2^255-19 */

typedef struct { uint64_t v[4]; } fe; /* little-endian limbs */

static const fe FE_P = {{0xFFFFFFFFFFFFFFEDull, 0xFFFFFFFFFFFFFFFFull, 0xFFFFFFFFFFFFFFFFull,
                         0x7FFFFFFFFFFFFFFFull}};
static const uint64_t CURVE_A = 486662;

static inline void fe_load(fe *r, const uint8_t b[32]) {
    for (int i = 0; i < 4; i++) {
        uint64_t x = 0;
        for (int j = 7; j >= 0; j--) x = (x << 8) | b[8 * i + j];
        r->v[i] = x;
    }
}

/* r = a - b (mod 2^256); returns the borrow out (1 if a < b). Branch-free: a
 * borrow leaves the 128-bit difference's top bit set. */
static inline uint64_t fe_sub_borrow(fe *r, const fe *a, const fe *b) {
    uint64_t borrow = 0;
    for (int i = 0; i < 4; i++) {
        u128 d = (u128)a->v[i] - b->v[i] - borrow;
        r->v[i] = (uint64_t)d;
        borrow = (uint64_t)(d >> 127);
    }
    return borrow;
}

/* 1 if a >= b, variable time (an early exit): only for hash-to-curve's screen and
 * Jacobi symbol, which are variable time anyway (see the top of this file); the
 * X25519 path uses fe_csub_p. */
static inline int fe_geq_vartime(const fe *a, const fe *b) {
    for (int i = 3; i >= 0; i--) {
        if (a->v[i] != b->v[i]) return a->v[i] > b->v[i];
    }
    return 1;
}

static inline void fe_sub_raw(fe *r, const fe *a, const fe *b) { /* r = a - b, a >= b */
    (void)fe_sub_borrow(r, a, b);
}

/* r = r - p where r >= p, else r unchanged: a masked select, no branch. */
static inline void fe_csub_p(fe *r) {
    fe t;
    const uint64_t keep = 0 - fe_sub_borrow(&t, r, &FE_P); /* all ones: r < p */
    for (int i = 0; i < 4; i++) r->v[i] = (r->v[i] & keep) | (t.v[i] & ~keep);
}

/* Fold bit 255 of a value below 2^256 back in: 2^255 = 19 (mod p). */
static inline void fe_fold255(fe *r) {
    uint64_t top = r->v[3] >> 63;
    r->v[3] &= 0x7FFFFFFFFFFFFFFFull;
    u128 c = (u128)r->v[0] + 19 * top;
    r->v[0] = (uint64_t)c;
    for (int i = 1; i < 4; i++) {
        c = (u128)r->v[i] + (uint64_t)(c >> 64);
        r->v[i] = (uint64_t)c;
    }
}

/* Reduce a value below 2^256 to its canonical form below p, branch-free (the
 * ladder's outputs and the Legendre lanes). */
static inline void fe_canon(fe *r) {
    fe_fold255(r);
    fe_csub_p(r);
}

/* The same with a branch: hash-to-curve's scalar arithmetic only (as fast as it was). */
static inline void fe_canon_vartime(fe *r) {
    fe_fold255(r);
    if (fe_geq_vartime(r, &FE_P)) fe_sub_raw(r, r, &FE_P);
}

/* r = a * b mod p (inputs below 2^256, output canonical). */
static void fe_mul(fe *r, const fe *a, const fe *b) {
    uint64_t t[8] = {0};
    for (int i = 0; i < 4; i++) {
        u128 carry = 0;
        for (int j = 0; j < 4; j++) {
            u128 x = (u128)a->v[i] * b->v[j] + t[i + j] + (uint64_t)carry;
            t[i + j] = (uint64_t)x;
            carry = x >> 64;
        }
        t[i + 4] = (uint64_t)carry;
    }
    /* 2^256 = 38 (mod p): fold the high half twice, then canonicalise. */
    u128 c = 0;
    for (int i = 0; i < 4; i++) {
        c = (u128)t[i] + (u128)t[i + 4] * 38 + (uint64_t)(c >> 64);
        t[i] = (uint64_t)c;
    }
    uint64_t hi = (uint64_t)(c >> 64);
    c = (u128)t[0] + (u128)hi * 38;
    r->v[0] = (uint64_t)c;
    for (int i = 1; i < 4; i++) {
        c = (u128)t[i] + (uint64_t)(c >> 64);
        r->v[i] = (uint64_t)c;
    }
    if (c >> 64) { /* wrapped past 2^256 once more: add 38 (tiny, cannot wrap again) */
        c = (u128)r->v[0] + 38;
        r->v[0] = (uint64_t)c;
        for (int i = 1; i < 4 && (c >> 64); i++) {
            c = (u128)r->v[i] + 1;
            r->v[i] = (uint64_t)c;
        }
    }
    fe_canon_vartime(r);
}

static void fe_add_small(fe *r, const fe *a, uint64_t s) {
    u128 c = (u128)a->v[0] + s;
    r->v[0] = (uint64_t)c;
    for (int i = 1; i < 4; i++) {
        c = (u128)a->v[i] + (uint64_t)(c >> 64);
        r->v[i] = (uint64_t)c;
    }
    fe_canon_vartime(r); /* a < p, so a + s < 2^256 */
}

/* ------------------------------------------------------ Jacobi symbol */

static inline int jacobi64(uint64_t a, uint64_t n, int t) {
    while (a) {
        int z = __builtin_ctzll(a);
        a >>= z;
        if ((z & 1) && (((n & 7) == 3) || ((n & 7) == 5))) t ^= 1;
        if (a < n) {
            uint64_t s = a; a = n; n = s;
            if ((a & n & 3) == 3) t ^= 1;
        }
        a -= n;
    }
    return n == 1 ? (t ? -1 : 1) : 0;
}

static inline int ctz128(u128 x) {
    uint64_t lo = (uint64_t)x;
    return lo ? __builtin_ctzll(lo) : 64 + __builtin_ctzll((uint64_t)(x >> 64));
}

static inline int jacobi128(u128 a, u128 n, int t) {
    while (a) {
        if ((a >> 64) == 0 && (n >> 64) == 0) return jacobi64((uint64_t)a, (uint64_t)n, t);
        int z = ctz128(a);
        a >>= z;
        if ((z & 1) && (((n & 7) == 3) || ((n & 7) == 5))) t ^= 1;
        if (a < n) {
            u128 s = a; a = n; n = s;
            if ((a & n & 3) == 3) t ^= 1;
        }
        a -= n;
    }
    return n == 1 ? (t ? -1 : 1) : 0;
}

static inline int fe_is_zero(const fe *a) { return (a->v[0] | a->v[1] | a->v[2] | a->v[3]) == 0; }

static inline void fe_shr(fe *a, int z) { /* 0 < z < 64 */
    a->v[0] = (a->v[0] >> z) | (a->v[1] << (64 - z));
    a->v[1] = (a->v[1] >> z) | (a->v[2] << (64 - z));
    a->v[2] = (a->v[2] >> z) | (a->v[3] << (64 - z));
    a->v[3] >>= z;
}

/* Jacobi symbol (a / n) for odd n, both below 2^256. */
static int jacobi256(fe a, fe n) {
    int t = 0;
    while (!fe_is_zero(&a)) {
        if ((a.v[2] | a.v[3] | n.v[2] | n.v[3]) == 0) {
            return jacobi128(((u128)a.v[1] << 64) | a.v[0], ((u128)n.v[1] << 64) | n.v[0], t);
        }
        while (a.v[0] == 0) { /* whole zero limbs: 64 halvings, an even count */
            a.v[0] = a.v[1]; a.v[1] = a.v[2]; a.v[2] = a.v[3]; a.v[3] = 0;
        }
        int z = __builtin_ctzll(a.v[0]);
        if (z) {
            fe_shr(&a, z);
            if ((z & 1) && (((n.v[0] & 7) == 3) || ((n.v[0] & 7) == 5))) t ^= 1;
        }
        if (!fe_geq_vartime(&a, &n)) {
            fe s = a; a = n; n = s;
            if ((a.v[0] & n.v[0] & 3) == 3) t ^= 1;
        }
        fe_sub_raw(&a, &a, &n);
    }
    int one = n.v[0] == 1 && (n.v[1] | n.v[2] | n.v[3]) == 0;
    return one ? (t ? -1 : 1) : 0;
}

/* ------------------------------------- Legendre symbol, 8 lanes with IFMA */
/*
 * On CPUs with AVX-512 IFMA the Legendre symbol is computed as f^((p-1)/2) for
 * eight values at once, in radix 2^52 (five limbs per value, one lane each; the
 * top limb holds 47 bits). vpmadd52{l,h}uq multiply the low 52 bits of their
 * inputs, so every limb that enters a multiplication is kept below 2^52. This
 * path is constant time.
 *
 * Two forms of a value appear below, both below 2^256 (so one conditional
 * subtraction of p makes either canonical):
 *   normal: limbs 0-3 below 2^52, limb 4 below 2^47 + 2^16. What a multiply
 *           takes; a multiply or square can end in this form.
 *   loose:  limbs 0-3 below 2^57, limb 4 below 2^47 + 2^16. A multiply or square
 *           without the final carry chain; only fe8_add and fe8_sub take it.
 * The vector units issue a multiply-add as fast as an add here, so the cost of
 * every routine is its instruction count, and the ladder skips each carry chain
 * whose result is only ever added or subtracted.
 */
#if defined(ISPF_PORTABLE_IFMA)
#define ISPF_IFMA 1
#include "_ifma_portable.h" /* the same operations on plain integers, branch-free */
#define IFMA_TARGET
#elif defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ISPF_IFMA 1
#include <immintrin.h>
#define IFMA_TARGET __attribute__((target("avx512f,avx512ifma")))
#endif

#ifdef ISPF_IFMA
#if defined(ISPF_PORTABLE_IFMA) /* (inlining left to the compiler: builds in seconds) */
#define IFMA_INLINE static inline
#else
#define IFMA_INLINE IFMA_TARGET __attribute__((always_inline)) static inline
#endif
#define NB 4 /* independent 8-lane groups in flight: hides the multiply latency */
#define M52 ((1ull << 52) - 1)
#define M47 ((1ull << 47) - 1)

typedef struct { __m512i l[5]; } fe8;

/* The documented limb bounds (exclusive), asserted after every field operation in
 * the bound-checking build (ISPF_CHECK_BOUNDS); nothing in the module itself. */
#define B52 (1ull << 52)
#define B57 (1ull << 57)
#define B4_NORMAL ((1ull << 47) + (1ull << 16))
#ifdef ISPF_CHECK_BOUNDS
/* Abort, naming the operation, limb and lane, if limb k of any lane of r is not
 * below bound[k]. */
IFMA_TARGET static void check_limbs(const char *op, const __m512i *r, int n, const uint64_t *bound) {
    uint64_t lane[8] __attribute__((aligned(64)));
    for (int k = 0; k < n; k++) {
        _mm512_store_si512((void *)lane, r[k]);
        for (int j = 0; j < 8; j++) {
            if (lane[j] >= bound[k]) {
                fprintf(stderr, "limb bound broken after %s: limb %d of lane %d is %#llx, bound %#llx\n",
                        op, k, j, (unsigned long long)lane[j], (unsigned long long)bound[k]);
                abort();
            }
        }
    }
}
#define CHECK5(op, r, b03, b4)                                                  \
    do {                                                                        \
        const uint64_t bound_[5] = {(b03), (b03), (b03), (b03), (b4)};          \
        check_limbs((op), (r), 5, bound_);                                      \
    } while (0)
#define CHECK_NORMAL(op, x) CHECK5(op, (x)->l, B52, B4_NORMAL)
#define CHECK_LOOSE(op, x) CHECK5(op, (x)->l, B57, B4_NORMAL)
#else
#define CHECK5(op, r, b03, b4) ((void)0)
#define CHECK_NORMAL(op, x) ((void)0)
#define CHECK_LOOSE(op, x) ((void)0)
#endif

/* Carry limbs 0-3 into the next (limb 4 keeps what reaches it). */
IFMA_INLINE void fe8_chain(__m512i r[5]) {
    const __m512i m52 = _mm512_set1_epi64((long long)M52);
    for (int k = 0; k < 4; k++) {
        r[k + 1] = _mm512_add_epi64(r[k + 1], _mm512_srli_epi64(r[k], 52));
        r[k] = _mm512_and_si512(r[k], m52);
    }
}

/* Limb 4's bits from 47 up are multiples of 2^255 = 19 (mod p): move them to limb 0
 * (limb 4 below 2^64, so the count is below 2^17 and the multiply exact). */
IFMA_INLINE void fe8_fold_top(__m512i r[5]) {
    const __m512i m47 = _mm512_set1_epi64((long long)M47), k19 = _mm512_set1_epi64(19);
    r[0] = _mm512_madd52lo_epu64(r[0], _mm512_srli_epi64(r[4], 47), k19);
    r[4] = _mm512_and_si512(r[4], m47);
}

/* Fold the ten columns of a product (each below 2^57) into five limbs, loose:
 * 2^260 = 608 (mod p). Column 9 is below 2^43 (limb 4 of each factor is below
 * 2^47 + 2^16), so 608 times it fits the low half. Column k + 5 then splits into
 * its low 52 bits times 608 (low half to limb k, high half, below 2^10, to limb
 * k + 1) and its bits from 52 up (below 2^5) times 608, to limb k + 1. Limb 4 is
 * folded before columns 8's share reaches it, so it ends below 2^47 + 2^15. */
IFMA_INLINE void fe8_fold(fe8 *r, __m512i c[10]) {
    const __m512i k608 = _mm512_set1_epi64(608);
#ifdef ISPF_CHECK_BOUNDS
    const uint64_t columns[10] = {B57, B57, B57, B57, B57, B57, B57, B57, B57, 1ull << 43};
    check_limbs("a product's columns", c, 10, columns);
#endif
    c[4] = _mm512_madd52lo_epu64(c[4], c[9], k608);
    fe8_fold_top(c);
    for (int k = 0; k < 4; k++) {
        c[k] = _mm512_madd52lo_epu64(c[k], c[k + 5], k608);
        c[k + 1] = _mm512_madd52hi_epu64(c[k + 1], c[k + 5], k608);
        c[k + 1] = _mm512_madd52lo_epu64(c[k + 1], _mm512_srli_epi64(c[k + 5], 52), k608);
    }
    for (int k = 0; k < 5; k++) r->l[k] = c[k];
    CHECK5("fe8_fold", r->l, B57, (1ull << 47) + (1ull << 15));
}

/* r = a * b (mod p), loose; inputs normal. Each column collects at most nine
 * halves below 2^52 (< 2^56). */
IFMA_INLINE void fe8_mul_loose(fe8 *r, const fe8 *a, const fe8 *b) {
    __m512i c[10];
    CHECK_NORMAL("a multiply's first input", a);
    CHECK_NORMAL("a multiply's second input", b);
    for (int k = 0; k < 10; k++) c[k] = _mm512_setzero_si512();
    for (int i = 0; i < 5; i++) {
        for (int j = 0; j < 5; j++) {
            c[i + j] = _mm512_madd52lo_epu64(c[i + j], a->l[i], b->l[j]);
            c[i + j + 1] = _mm512_madd52hi_epu64(c[i + j + 1], a->l[i], b->l[j]);
        }
    }
    fe8_fold(r, c);
}

/* r = a^2 (mod p), loose; input normal. The mixed products once each, the columns
 * doubled, then the squares (each column again below 2^56). */
IFMA_INLINE void fe8_sq_loose(fe8 *r, const fe8 *a) {
    __m512i c[10];
    CHECK_NORMAL("a square's input", a);
    for (int k = 0; k < 10; k++) c[k] = _mm512_setzero_si512();
    for (int i = 0; i < 5; i++) {
        for (int j = i + 1; j < 5; j++) {
            c[i + j] = _mm512_madd52lo_epu64(c[i + j], a->l[i], a->l[j]);
            c[i + j + 1] = _mm512_madd52hi_epu64(c[i + j + 1], a->l[i], a->l[j]);
        }
    }
    for (int k = 1; k < 9; k++) c[k] = _mm512_add_epi64(c[k], c[k]);
    for (int i = 0; i < 5; i++) {
        c[2 * i] = _mm512_madd52lo_epu64(c[2 * i], a->l[i], a->l[i]);
        c[2 * i + 1] = _mm512_madd52hi_epu64(c[2 * i + 1], a->l[i], a->l[i]);
    }
    fe8_fold(r, c);
}

/* The same, normal: the carry chain leaves limbs 0-3 below 2^52 and adds below
 * 2^6 to limb 4. */
IFMA_INLINE void fe8_mul(fe8 *r, const fe8 *a, const fe8 *b) {
    fe8_mul_loose(r, a, b);
    fe8_chain(r->l);
    CHECK_NORMAL("fe8_mul", r);
}

IFMA_INLINE void fe8_sq(fe8 *r, const fe8 *a) {
    fe8_sq_loose(r, a);
    fe8_chain(r->l);
    CHECK_NORMAL("fe8_sq", r);
}

/* The same step on NB independent groups, so their multiplies overlap. */
IFMA_INLINE void sqn(fe8 r[NB], const fe8 a[NB], int n) {
    for (int b = 0; b < NB; b++) fe8_sq(&r[b], &a[b]);
    for (int i = 1; i < n; i++) {
        for (int b = 0; b < NB; b++) fe8_sq(&r[b], &r[b]);
    }
}

IFMA_INLINE void mul(fe8 r[NB], const fe8 a[NB], const fe8 c[NB]) {
    for (int b = 0; b < NB; b++) fe8_mul(&r[b], &a[b], &c[b]);
}

/* t = z^(2^250 - 1), the common start of both exponentiations below; also
 * z3 = z^3 and z11 = z^11, which they finish with. */
IFMA_TARGET static void pow_2_250_1(fe8 t[NB], fe8 z3[NB], fe8 z11[NB], const fe8 z[NB]) {
    fe8 z2[NB], z9[NB], a5[NB], a10[NB], a20[NB], a50[NB], a100[NB];
    sqn(z2, z, 1);              /* 2 */
    mul(z3, z2, z);             /* 3 */
    sqn(t, z2, 2);              /* 8 */
    mul(z9, t, z);              /* 9 */
    mul(z11, z9, z2);           /* 11 */
    sqn(t, z11, 1);             /* 22 */
    mul(a5, t, z9);             /* 2^5 - 1 */
    sqn(t, a5, 5);
    mul(a10, t, a5);            /* 2^10 - 1 */
    sqn(t, a10, 10);
    mul(a20, t, a10);           /* 2^20 - 1 */
    sqn(t, a20, 20);
    mul(t, t, a20);             /* 2^40 - 1 */
    sqn(t, t, 10);
    mul(a50, t, a10);           /* 2^50 - 1 */
    sqn(t, a50, 50);
    mul(a100, t, a50);          /* 2^100 - 1 */
    sqn(t, a100, 100);
    mul(t, t, a100);            /* 2^200 - 1 */
    sqn(t, t, 50);
    mul(t, t, a50);             /* 2^250 - 1 */
}

/* r = z^((p-1)/2) = z^(2^254 - 10): the Legendre symbol. */
IFMA_TARGET static void pow_legendre(fe8 r[NB], const fe8 z[NB]) {
    fe8 t[NB], z3[NB], z11[NB];
    pow_2_250_1(t, z3, z11, z);
    sqn(t, t, 3);               /* 2^253 - 8 */
    mul(t, t, z3);              /* 2^253 - 5 */
    sqn(r, t, 1);               /* 2^254 - 10 */
}

/* r = z^(p-2) = z^(2^255 - 21): the inverse (0 for 0). */
IFMA_TARGET static void pow_inverse(fe8 r[NB], const fe8 z[NB]) {
    fe8 t[NB], z3[NB], z11[NB];
    pow_2_250_1(t, z3, z11, z);
    sqn(t, t, 5);               /* 2^255 - 32 */
    mul(r, t, z11);             /* 2^255 - 21 */
}

#define LANES (8 * NB)

/* Lane j of a group's limbs from a value below 2^255 (normal form). */
static inline void limbs_put(uint64_t l[5][8], int j, const fe *x) {
    const uint64_t *v = x->v;
    l[0][j] = v[0] & M52;
    l[1][j] = ((v[0] >> 52) | (v[1] << 12)) & M52;
    l[2][j] = ((v[1] >> 40) | (v[2] << 24)) & M52;
    l[3][j] = ((v[2] >> 28) | (v[3] << 36)) & M52;
    l[4][j] = v[3] >> 16;
}

/* The canonical value of lane j (normal form: below 2^256). */
static inline void limbs_get(fe *x, uint64_t l[5][8], int j) {
    u128 acc = 0;
    int shift = 0, limb = 0;
    for (int k = 0; k < 5; k++) {
        acc += (u128)l[k][j] << shift;
        shift += 52;
        while (shift >= 64 && limb < 4) {
            x->v[limb++] = (uint64_t)acc;
            acc >>= 64;
            shift -= 64;
        }
    }
    while (limb < 4) { x->v[limb++] = (uint64_t)acc; acc >>= 64; }
    fe_canon(x);
}

IFMA_TARGET static inline void groups_load(fe8 z[NB], uint64_t limbs[NB][5][8]) {
    for (int b = 0; b < NB; b++) {
        for (int k = 0; k < 5; k++) z[b].l[k] = _mm512_load_si512((const void *)limbs[b][k]);
    }
}

IFMA_TARGET static inline void groups_store(uint64_t limbs[NB][5][8], const fe8 r[NB]) {
    for (int b = 0; b < NB; b++) {
        for (int k = 0; k < 5; k++) _mm512_store_si512((void *)limbs[b][k], r[b].l[k]);
    }
}

/* Legendre symbols of LANES canonical values (0 for zero, 1, or -1). */
IFMA_TARGET static void legendre_lanes(const fe in[LANES], int out[LANES]) {
    uint64_t limbs[NB][5][8] __attribute__((aligned(64)));
    for (int j = 0; j < LANES; j++) limbs_put(limbs[j / 8], j % 8, &in[j]);
    fe8 z[NB], r[NB];
    groups_load(z, limbs);
    pow_legendre(r, z);
    groups_store(limbs, r);
    for (int j = 0; j < LANES; j++) {
        fe x;
        limbs_get(&x, limbs[j / 8], j % 8);
        if (fe_is_zero(&x)) out[j] = 0;
        else out[j] = (x.v[0] == 1 && (x.v[1] | x.v[2] | x.v[3]) == 0) ? 1 : -1;
    }
}

/* ------------------------------------------------- X25519, 8 lanes with IFMA */
/*
 * RFC 7748's Montgomery ladder on LANES u-coordinates at once, all under the same
 * scalar (a node blinds a whole batch with one key). The conditional swaps are
 * blends under a mask register, not branches, and every lane runs the same 255
 * steps: constant time in the scalar. Sums and differences are carried back below
 * 2^52 before they are multiplied, since vpmadd52 reads only the low 52 bits of a
 * limb.
 */

/* r = a + b, normal. Inputs loose or normal, or one from fe8_mul_a24 (whose limb 4
 * is larger): the sum's limbs 0-3 are below 2^58. Folding limb 4 first (any size
 * below 2^64) and then one carry chain leaves limbs 0-3 below 2^52 and limb 4
 * below 2^47 + 2^7. */
IFMA_INLINE void fe8_add(fe8 *r, const fe8 *a, const fe8 *b) {
    for (int k = 0; k < 5; k++) r->l[k] = _mm512_add_epi64(a->l[k], b->l[k]);
    CHECK5("fe8_add's sum", r->l, 1ull << 58, ~0ull);
    fe8_fold_top(r->l);
    fe8_chain(r->l);
    CHECK5("fe8_add", r->l, B52, (1ull << 47) + (1ull << 7));
}

/* r = a - b + 64p, normal; inputs loose or normal. 64p's limbs (2^58 - 1216,
 * 2^58 - 64 three times, 2^53 - 64) exceed any loose limb, so none goes
 * negative; the result's limbs are below 2^59 and limb 4 below 2^54. */
IFMA_INLINE void fe8_sub(fe8 *r, const fe8 *a, const fe8 *b) {
    const __m512i p0 = _mm512_set1_epi64((long long)((1ull << 58) - 1216));
    const __m512i pk = _mm512_set1_epi64((long long)((1ull << 58) - 64));
    const __m512i p4 = _mm512_set1_epi64((long long)((1ull << 53) - 64));
    CHECK_LOOSE("fe8_sub's first input", a);
    CHECK5("fe8_sub's second input (below 64p's limbs)", b->l, (1ull << 58) - 1216, (1ull << 53) - 64);
    for (int k = 0; k < 5; k++) {
        const __m512i bias = k == 0 ? p0 : k == 4 ? p4 : pk;
        r->l[k] = _mm512_sub_epi64(_mm512_add_epi64(a->l[k], bias), b->l[k]);
    }
    CHECK5("fe8_sub's difference", r->l, 1ull << 59, 1ull << 54);
    fe8_fold_top(r->l);
    fe8_chain(r->l);
    CHECK5("fe8_sub", r->l, B52, (1ull << 47) + (1ull << 8));
}

/* r = 121665 * a, loose (only ever added to): the curve's (A - 2) / 4. Input
 * normal: the products' high halves are below 2^17, and limb 5's (below 2^13)
 * times 608 folds exactly into limb 0; limb 4 stays below 2^53. */
IFMA_INLINE void fe8_mul_a24(fe8 *r, const fe8 *a) {
    const __m512i k = _mm512_set1_epi64(121665), k608 = _mm512_set1_epi64(608);
    const __m512i zero = _mm512_setzero_si512();
    __m512i c[6];
    for (int i = 0; i < 6; i++) c[i] = zero;
    for (int i = 0; i < 5; i++) {
        c[i] = _mm512_madd52lo_epu64(c[i], a->l[i], k);
        c[i + 1] = _mm512_madd52hi_epu64(c[i + 1], a->l[i], k);
    }
    c[0] = _mm512_madd52lo_epu64(c[0], c[5], k608);
    for (int i = 0; i < 5; i++) r->l[i] = c[i];
    CHECK5("fe8_mul_a24", r->l, 1ull << 53, 1ull << 53);
}

/* Swap a and b in the lanes of mask (all or none: the same bit in every lane). */
IFMA_INLINE void fe8_cswap(fe8 *a, fe8 *b, __mmask8 mask) {
    for (int k = 0; k < 5; k++) {
        __m512i t = _mm512_mask_blend_epi64(mask, a->l[k], b->l[k]);
        b->l[k] = _mm512_mask_blend_epi64(mask, b->l[k], a->l[k]);
        a->l[k] = t;
    }
}

#define EACH for (int b = 0; b < NB; b++)

/* The ladder for LANES u-coordinates (32 bytes each, RFC 7748 decoding: top bit
 * ignored, values >= p accepted) under the clamped scalar e: X25519 is x / z of
 * the results (normal form), left to ladder_finish. */
IFMA_TARGET __attribute__((noinline)) static void ladder_lanes(const uint8_t e[32], const uint8_t *in,
                                                               fe8 x[NB], fe8 z[NB]) {
    uint64_t limbs[NB][5][8] __attribute__((aligned(64)));
    for (int j = 0; j < LANES; j++) {
        uint8_t u[32];
        fe v;
        memcpy(u, in + 32 * j, 32);
        u[31] &= 0x7F;
        fe_load(&v, u);
        limbs_put(limbs[j / 8], j % 8, &v);
    }
    fe8 x1[NB], x2[NB], z2[NB], x3[NB], z3[NB];
    const __m512i one = _mm512_set1_epi64(1), zero = _mm512_setzero_si512();
    groups_load(x1, limbs);
    EACH {
        x3[b] = x1[b];
        for (int k = 0; k < 5; k++) x2[b].l[k] = z3[b].l[k] = z2[b].l[k] = zero;
        x2[b].l[0] = z3[b].l[0] = one;
    }
    uint64_t swap = 0;
    for (int t = 254; t >= 0; t--) {
        uint64_t bit = (e[t >> 3] >> (t & 7)) & 1;
        swap ^= bit;
        const __mmask8 mask = (__mmask8)(0 - swap);
        EACH { fe8_cswap(&x2[b], &x3[b], mask); fe8_cswap(&z2[b], &z3[b], mask); }
        swap = bit;
        /* x2, z2, x3, z3 are loose here: every use is an addition or subtraction. */
        fe8 A[NB], B[NB], C[NB], D[NB], AA[NB], BB[NB], E[NB];
        EACH { fe8_add(&A[b], &x2[b], &z2[b]); fe8_sub(&B[b], &x2[b], &z2[b]); }
        EACH { fe8_add(&C[b], &x3[b], &z3[b]); fe8_sub(&D[b], &x3[b], &z3[b]); }
        EACH fe8_sq(&AA[b], &A[b]);
        EACH fe8_sq(&BB[b], &B[b]);
        EACH fe8_mul_loose(&D[b], &D[b], &A[b]);      /* DA */
        EACH fe8_mul_loose(&C[b], &C[b], &B[b]);      /* CB */
        EACH { fe8_add(&A[b], &D[b], &C[b]); fe8_sub(&B[b], &D[b], &C[b]); }
        EACH fe8_sq_loose(&x3[b], &A[b]);             /* (DA + CB)^2 */
        EACH fe8_sq(&B[b], &B[b]);
        EACH fe8_mul_loose(&z3[b], &x1[b], &B[b]);    /* x1 (DA - CB)^2 */
        EACH fe8_mul_loose(&x2[b], &AA[b], &BB[b]);
        EACH fe8_sub(&E[b], &AA[b], &BB[b]);
        EACH { fe8_mul_a24(&A[b], &E[b]); fe8_add(&A[b], &A[b], &AA[b]); }
        EACH fe8_mul_loose(&z2[b], &E[b], &A[b]);
    }
    const __mmask8 mask = (__mmask8)(0 - swap);
    EACH { fe8_cswap(&x2[b], &x3[b], mask); fe8_cswap(&z2[b], &z3[b], mask); }
    EACH { /* loose to normal */
        fe8_chain(x2[b].l);
        fe8_chain(z2[b].l);
        x[b] = x2[b];
        z[b] = z2[b];
    }
    secure_wipe(limbs, sizeof limbs);
}

/* Affine results of count ladder calls with one inversion (Montgomery's trick,
 * lane by lane): three multiplies a call instead of an exponentiation. No z is
 * zero: ifma_run refuses low-order inputs first, and for any other u the clamped
 * scalar (8 times a number below 2^252) is a multiple of neither the curve's
 * prime order l nor the twist's l' (both above 2^252), so the ladder never ends
 * at infinity. pre holds count groups of scratch; x is overwritten. */
IFMA_TARGET __attribute__((noinline)) static void ladder_finish(fe8 (*x)[NB], const fe8 (*z)[NB],
                                                                fe8 (*pre)[NB], int count,
                                                                uint8_t *out) {
    EACH pre[0][b] = z[0][b];
    for (int c = 1; c < count; c++) mul(pre[c], pre[c - 1], z[c]);
    fe8 inv[NB], zinv[NB];
    pow_inverse(inv, pre[count - 1]); /* 1 / (z_0 ... z_last) */
    for (int c = count - 1; c > 0; c--) {
        mul(zinv, inv, pre[c - 1]);   /* 1 / z_c */
        mul(inv, inv, z[c]);          /* 1 / (z_0 ... z_(c-1)) */
        mul(x[c], x[c], zinv);
    }
    mul(x[0], x[0], inv);
    uint64_t limbs[NB][5][8] __attribute__((aligned(64)));
    for (int c = 0; c < count; c++) {
        groups_store(limbs, x[c]);
        for (int j = 0; j < LANES; j++) {
            fe v;
            limbs_get(&v, limbs[j / 8], j % 8);
            uint8_t *o = out + (size_t)32 * (LANES * c + j);
            for (int i = 0; i < 4; i++) {
                for (int k = 0; k < 8; k++) o[8 * i + k] = (uint8_t)(v.v[i] >> (8 * k));
            }
        }
    }
    secure_wipe(limbs, sizeof limbs);
}

#undef EACH

#if defined(ISPF_PORTABLE_IFMA)
static int have_ifma(void) { return 1; } /* the stand-in runs anywhere */
#else
static int have_ifma(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512ifma");
}
#endif
#else
static int have_ifma(void) { return 0; }
#endif

/* -------------------------------------------------------- hash to curve */

/* u-coordinates of the low-order points of Curve25519 and its twist (canonical). */
static const fe low_order[5] = {
    {{0x0000000000000000ull, 0x0000000000000000ull, 0x0000000000000000ull, 0x0000000000000000ull}},
    {{0x0000000000000001ull, 0x0000000000000000ull, 0x0000000000000000ull, 0x0000000000000000ull}},
    {{0xAEB8413B7C7AEBE0ull, 0x6AC49FF1FAE35616ull, 0xFDB1329CEB8D09DAull, 0x00B8495F16056286ull}},
    {{0x248C50A3BC959C5Full, 0x5BEF839C55B1D0B1ull, 0x868E1C58C45C4404ull, 0x57119FD0DD4E22D8ull}},
    {{0xFFFFFFFFFFFFFFECull, 0xFFFFFFFFFFFFFFFFull, 0xFFFFFFFFFFFFFFFFull, 0x7FFFFFFFFFFFFFFFull}},
};

static int fe_eq(const fe *a, const fe *b) {
    return ((a->v[0] ^ b->v[0]) | (a->v[1] ^ b->v[1]) | (a->v[2] ^ b->v[2]) | (a->v[3] ^ b->v[3])) == 0;
}

/* The checks before the Legendre symbol: u < p and not low-order. On success,
 * f = u^3 + A u^2 + u, whose symbol decides. */
static int screen(const uint8_t h[32], fe *f) {
    fe u;
    fe_load(&u, h);
    if (fe_geq_vartime(&u, &FE_P)) return 0;
    for (int i = 0; i < 5; i++) {
        if (fe_eq(&u, &low_order[i])) return 0;
    }
    fe_add_small(f, &u, CURVE_A); /* u + A */
    fe_mul(f, f, &u);             /* u^2 + A u */
    fe_add_small(f, f, 1);        /* u^2 + A u + 1 */
    fe_mul(f, f, &u);             /* u^3 + A u^2 + u */
    return 1;
}

/* 1 if the 32-byte value (top bit already clear) is an acceptable point. */
static int acceptable(const uint8_t h[32]) {
    fe f;
    return screen(h, &f) && jacobi256(f, FE_P) >= 0;
}

#define DOMAIN "ispf/nid/v1"
#define DOMAIN_LEN 11
#define MAX_COUNTER 1024
#define MAX_DIGITS (64 - DOMAIN_LEN - 4)

/* One ID: writes the point to out; returns 0, or -1 if no counter worked. */
static int h2c_one(const uint32_t key[8], const uint8_t *digits, size_t n, uint8_t out[32]) {
    uint8_t msg[64];
    memcpy(msg, DOMAIN, DOMAIN_LEN);
    memcpy(msg + DOMAIN_LEN, digits, n);
    size_t len = DOMAIN_LEN + n + 4;
    for (uint32_t counter = 0; counter < MAX_COUNTER; counter++) {
        store32(msg + DOMAIN_LEN + n, counter);
        blake3_keyed_block(key, msg, len, out);
        out[31] &= 0x7F;
        if (acceptable(out)) return 0;
    }
    return -1;
}


#ifdef ISPF_IFMA
/* Hash-to-curve for count IDs, eight Legendre symbols at a time. Candidates that
 * fail go back with the next counter; each ID ends with its first acceptable
 * counter, exactly as one at a time. Returns -1, or the first ID that ran out. */
IFMA_TARGET static Py_ssize_t h2c_batch_ifma(const uint32_t key[8], const uint8_t *ids,
                                              const size_t *lens, Py_ssize_t count, uint8_t *out) {
    Py_ssize_t next = 0;        /* next ID not yet started */
    Py_ssize_t retry_id[LANES];     /* IDs whose last candidate was a non-square */
    uint32_t retry_ctr[LANES];
    int nretry = 0;
    Py_ssize_t lane_id[LANES];
    uint32_t lane_ctr[LANES];
    uint8_t lane_u[LANES][32];
    fe lane_f[LANES];
    uint8_t msg[64];
    memcpy(msg, DOMAIN, DOMAIN_LEN);
    for (;;) {
        int lanes = 0;
        while (lanes < LANES) {
            Py_ssize_t id;
            uint32_t ctr;
            if (nretry) {
                nretry--;
                id = retry_id[nretry];
                ctr = retry_ctr[nretry];
            } else if (next < count) {
                id = next++;
                ctr = 0;
            } else {
                break;
            }
            size_t n = lens[id];
            memcpy(msg + DOMAIN_LEN, ids + (size_t)id * MAX_DIGITS, n);
            for (;; ctr++) { /* the cheap checks, one candidate at a time */
                if (ctr >= MAX_COUNTER) return id;
                store32(msg + DOMAIN_LEN + n, ctr);
                blake3_keyed_block(key, msg, DOMAIN_LEN + n + 4, lane_u[lanes]);
                lane_u[lanes][31] &= 0x7F;
                if (screen(lane_u[lanes], &lane_f[lanes])) break;
            }
            lane_id[lanes] = id;
            lane_ctr[lanes] = ctr;
            lanes++;
        }
        if (lanes == 0) return -1;
        for (int l = lanes; l < LANES; l++) lane_f[l] = lane_f[0]; /* padding, ignored */
        int sym[LANES];
        legendre_lanes(lane_f, sym);
        for (int l = 0; l < lanes; l++) {
            if (sym[l] >= 0) {
                memcpy(out + 32 * lane_id[l], lane_u[l], 32);
            } else {
                retry_id[nretry] = lane_id[l];
                retry_ctr[nretry] = lane_ctr[l] + 1;
                nretry++;
            }
        }
    }
}
#endif

#ifndef ISPF_CORE_ONLY
static int use_vector = -1; /* -1: not decided yet */

static PyObject *py_hash_to_curve_many(PyObject *self, PyObject *args) {
    Py_buffer key;
    PyObject *seq;
    int vector = -1;
    Py_ssize_t width = 0;
    if (!PyArg_ParseTuple(args, "y*O|in", &key, &seq, &vector, &width)) return NULL;
    if (use_vector < 0) use_vector = have_ifma();
    vector = vector < 0 ? use_vector : (vector && use_vector);
    PyObject *result = NULL, *fast = NULL;
    Py_buffer packed = {0};
    Py_ssize_t count = 0;
    uint8_t *ids = NULL;
    size_t *lens = NULL;
    if (key.len != 32) {
        PyErr_SetString(PyExc_ValueError, "the hashing key must be 32 bytes");
        goto done;
    }
    if (width > 0) { /* digits packed back to back, width bytes each */
        if (width > MAX_DIGITS) {
            PyErr_Format(PyExc_ValueError, "IDs of %zd bytes (at most %d)", width, MAX_DIGITS);
            goto done;
        }
        if (PyObject_GetBuffer(seq, &packed, PyBUF_SIMPLE) < 0) goto done;
        if (packed.len % width) {
            PyErr_SetString(PyExc_ValueError, "packed IDs are not a whole number of records");
            goto done;
        }
        count = packed.len / width;
    } else {
        fast = PySequence_Fast(seq, "digits must be a sequence of bytes");
        if (!fast) goto done;
        count = PySequence_Fast_GET_SIZE(fast);
    }
    ids = PyMem_Malloc(count ? (size_t)count * MAX_DIGITS : 1);
    lens = PyMem_Malloc(count ? (size_t)count * sizeof(size_t) : 1);
    if (!ids || !lens) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t i = 0; i < count; i++) {
        char *buf;
        Py_ssize_t n;
        if (fast) {
            if (PyBytes_AsStringAndSize(PySequence_Fast_GET_ITEM(fast, i), &buf, &n) < 0) goto done;
            if (n > MAX_DIGITS) {
                PyErr_Format(PyExc_ValueError, "ID %zd is %zd bytes (at most %d)", i, n, MAX_DIGITS);
                goto done;
            }
        } else {
            buf = (char *)packed.buf + i * width;
            n = width;
        }
        memcpy(ids + (size_t)i * MAX_DIGITS, buf, (size_t)n);
        lens[i] = (size_t)n;
    }
    result = PyBytes_FromStringAndSize(NULL, count * 32);
    if (!result) goto done;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(result);
    uint32_t kw[8];
    for (int i = 0; i < 8; i++) kw[i] = load32((const uint8_t *)key.buf + 4 * i);
    Py_ssize_t failed = -1;
    Py_BEGIN_ALLOW_THREADS
#ifdef ISPF_IFMA
    if (vector) failed = h2c_batch_ifma(kw, ids, lens, count, out);
    else
#endif
    for (Py_ssize_t i = 0; i < count; i++) {
        if (h2c_one(kw, ids + (size_t)i * MAX_DIGITS, lens[i], out + 32 * i) < 0) {
            failed = i;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    secure_wipe(kw, sizeof kw);
    if (failed >= 0) {
        Py_CLEAR(result);
        PyErr_Format(PyExc_ArithmeticError, "hash-to-curve found no point for ID %zd", failed);
    }
done:
    if (ids) {
        secure_wipe(ids, (size_t)count * MAX_DIGITS); /* raw IDs do not linger in freed memory */
        PyMem_Free(ids);
    }
    PyMem_Free(lens);
    Py_XDECREF(fast);
    if (packed.obj) PyBuffer_Release(&packed);
    PyBuffer_Release(&key);
    return result;
}

#endif /* ISPF_CORE_ONLY */

/* ------------------------------------------------ X25519 refusals and batches */

static const uint8_t BASEPOINT[32] = {9};

/* All ones if a == b, else 0; no branch. */
static inline uint64_t fe_eq_mask(const fe *a, const fe *b) {
    const uint64_t d = (a->v[0] ^ b->v[0]) | (a->v[1] ^ b->v[1]) | (a->v[2] ^ b->v[2]) | (a->v[3] ^ b->v[3]);
    return ((d | (0 - d)) >> 63) - 1;
}

/* All ones if the encoding is a low-order point (top bit ignored, values >= p
 * reduced), else 0. Branch-free: a probe's input is secret. */
static uint64_t low_order_encoding(const uint8_t in[32]) {
    uint8_t b[32];
    fe u;
    memcpy(b, in, 32);
    b[31] &= 0x7F;
    fe_load(&u, b);
    fe_csub_p(&u);
    uint64_t hit = 0;
    for (int i = 0; i < 5; i++) hit |= fe_eq_mask(&u, &low_order[i]);
    return hit;
}

/* 1 if the 32 bytes are all zero, else 0; no branch. */
static uint64_t all_zero(const uint8_t *p) {
    uint64_t acc = 0;
    for (int i = 0; i < 32; i++) acc |= p[i];
    return (acc - 1) >> 63;
}

#ifdef ISPF_IFMA
#define CALLS 16 /* ladder calls (LANES values each) sharing one inversion */

/* X25519(scalar, pub[i]) for n values on the eight-lane ladder above, outputs cut
 * to out_bytes: up to CALLS * LANES values at a time, one inversion among them.
 * Returns the position of the first low-order input (the only secret-derived
 * value that decides a branch: the caller reports it), -1, or -2 without memory.
 * Runs without the GIL. */
__attribute__((noinline)) static Py_ssize_t ifma_run(const uint8_t scalar[32], const uint8_t *pub,
                                                     Py_ssize_t n, uint8_t *out, Py_ssize_t out_bytes) {
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t bad = low_order_encoding(pub + 32 * i);
        DECLASSIFY(&bad, sizeof bad);
        if (bad) return i;
    }
    uint8_t e[32];
    memcpy(e, scalar, 32);
    e[0] &= 248;
    e[31] &= 127;
    e[31] |= 64;
    /* x, z and the running products of CALLS calls, then the affine bytes. */
    size_t state = 3 * (size_t)CALLS * sizeof(fe8[NB]), bytes = (size_t)CALLS * LANES * 32;
    uint8_t *mem = aligned_alloc(64, state + bytes);
    if (!mem) {
        secure_wipe(e, sizeof e);
        return -2;
    }
    fe8 (*x)[NB] = (fe8 (*)[NB])mem, (*z)[NB] = x + CALLS, (*pre)[NB] = z + CALLS;
    uint8_t *res = mem + state, src[LANES][32];
    Py_ssize_t bad = -1;
    for (Py_ssize_t base = 0; base < n && bad < 0; base += (Py_ssize_t)CALLS * LANES) {
        const Py_ssize_t most = (Py_ssize_t)CALLS * LANES;
        Py_ssize_t todo = n - base < most ? n - base : most;
        int calls = (int)((todo + LANES - 1) / LANES);
        for (int c = 0; c < calls; c++) {
            Py_ssize_t first = base + (Py_ssize_t)LANES * c;
            const uint8_t *batch = pub + 32 * first;
            if (n - first < LANES) { /* pad the last call with the base point */
                for (int l = 0; l < LANES; l++) {
                    memcpy(src[l], first + l < n ? batch + 32 * l : BASEPOINT, 32);
                }
                batch = (const uint8_t *)src;
            }
            ladder_lanes(e, batch, x[c], z[c]);
        }
        ladder_finish(x, (const fe8 (*)[NB])z, pre, calls, res);
        for (Py_ssize_t i = 0; i < todo; i++) {
            uint64_t zero = all_zero(res + 32 * i);
            DECLASSIFY(&zero, sizeof zero);
            if (zero) { bad = base + i; break; }
            memcpy(out + out_bytes * (base + i), res + 32 * i, (size_t)out_bytes);
        }
    }
    secure_wipe(e, sizeof e);
    secure_wipe(mem, state + bytes);
    free(mem);
    return bad;
}
#endif

#ifndef ISPF_CORE_ONLY
/* x25519_many(scalar, packed, out_bytes) -> (bytes, bad position or -1): the
 * eight-lane ladder; ValueError where the CPU lacks AVX-512 IFMA. */
static PyObject *py_x25519_many(PyObject *self, PyObject *args) {
    Py_buffer scalar, packed;
    Py_ssize_t out_bytes;
    if (!PyArg_ParseTuple(args, "y*y*n", &scalar, &packed, &out_bytes)) return NULL;
    PyObject *result = NULL, *ret = NULL;
    if (use_vector < 0) use_vector = have_ifma();
    if (!use_vector) {
        PyErr_SetString(PyExc_ValueError, "the CPU lacks AVX-512 IFMA");
        goto done;
    }
    if (scalar.len != 32 || packed.len % 32 || out_bytes < 1 || out_bytes > 32) {
        PyErr_SetString(PyExc_ValueError, "scalar must be 32 bytes, values a multiple of 32, out_bytes 1..32");
        goto done;
    }
#ifdef ISPF_IFMA
    Py_ssize_t n = packed.len / 32;
    result = PyBytes_FromStringAndSize(NULL, n * out_bytes);
    if (!result) goto done;
    Py_ssize_t bad;
    Py_BEGIN_ALLOW_THREADS
    bad = ifma_run(scalar.buf, packed.buf, n, (uint8_t *)PyBytes_AS_STRING(result), out_bytes);
    Py_END_ALLOW_THREADS
    if (bad == -2) PyErr_NoMemory();
    else ret = Py_BuildValue("(On)", result, bad);
#endif
done:
    Py_XDECREF(result);
    PyBuffer_Release(&scalar);
    PyBuffer_Release(&packed);
    return ret;
}


static PyObject *py_point_acceptable(PyObject *self, PyObject *args) {
    Py_buffer u;
    if (!PyArg_ParseTuple(args, "y*", &u)) return NULL;
    PyObject *ret = NULL;
    if (u.len != 32 || (((const uint8_t *)u.buf)[31] & 0x80)) {
        PyErr_SetString(PyExc_ValueError, "a candidate is 32 bytes with the top bit clear");
    } else {
        ret = PyBool_FromLong(acceptable(u.buf));
    }
    PyBuffer_Release(&u);
    return ret;
}

static PyObject *py_vector_available(PyObject *self, PyObject *unused) {
    if (use_vector < 0) use_vector = have_ifma();
    return PyBool_FromLong(use_vector);
}

static PyMethodDef methods[] = {
    {"hash_to_curve_many", py_hash_to_curve_many, METH_VARARGS,
     "hash_to_curve_many(key, digits, vector=-1, width=0) -> packed 32-byte points (recipe\n"
     "ispf/nid/v1); vector: 1 uses AVX-512 IFMA where the CPU has it, 0 never, -1 decides;\n"
     "width > 0: digits is one buffer of IDs packed back to back, width bytes each."},
    {"vector_available", py_vector_available, METH_NOARGS,
     "True if the CPU runs the eight-lane (AVX-512 IFMA) Legendre symbol."},
    {"x25519_many", py_x25519_many, METH_VARARGS,
     "x25519_many(scalar, packed, out_bytes) -> (bytes, first low-order position or -1):\n"
     "RFC 7748 X25519 on eight lanes with AVX-512 IFMA (ValueError without it)."},
    {"point_acceptable", py_point_acceptable, METH_VARARGS,
     "point_acceptable(u) -> bool: hash-to-curve's test of a 32-byte candidate (top bit clear):\n"
     "u < p, not low-order, on the curve (scalar Jacobi symbol)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native", "Native curve loops for ISPF Match (optional).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
#endif /* ISPF_CORE_ONLY */
