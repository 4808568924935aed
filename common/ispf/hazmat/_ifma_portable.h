/*
 * A portable stand-in for the AVX-512 IFMA intrinsics _native.c uses, on plain
 * 64-bit integers (eight lanes as an array), for the evidence builds only
 * (ISPF_PORTABLE_IFMA; see tests/native/): valgrind cannot execute AVX-512, so
 * the constant-time check runs the same ladder source over these. Every function
 * is branch-free in its data, like the instructions it stands in for: the blend
 * selects with masks, and the 52-bit multiplies are full 64 x 64 -> 128-bit ones.
 * Semantics as Intel documents them: vpmadd52luq / vpmadd52huq multiply the low
 * 52 bits of each lane and add the low / high 52 bits of the 104-bit product.
 */
#ifndef ISPF_IFMA_PORTABLE_H
#define ISPF_IFMA_PORTABLE_H
#include <stdint.h>
#include <string.h>

typedef struct { uint64_t v[8]; } __m512i;
typedef uint8_t __mmask8;

#define PORTABLE_M52 ((1ull << 52) - 1)
#define PORTABLE_LANES(expr)                            \
    __m512i r;                                          \
    for (int i = 0; i < 8; i++) r.v[i] = (expr);        \
    return r

static inline __m512i _mm512_set1_epi64(long long x) { PORTABLE_LANES((uint64_t)x); }
static inline __m512i _mm512_setzero_si512(void) { PORTABLE_LANES(0); }
static inline __m512i _mm512_add_epi64(__m512i a, __m512i b) { PORTABLE_LANES(a.v[i] + b.v[i]); }
static inline __m512i _mm512_sub_epi64(__m512i a, __m512i b) { PORTABLE_LANES(a.v[i] - b.v[i]); }
static inline __m512i _mm512_and_si512(__m512i a, __m512i b) { PORTABLE_LANES(a.v[i] & b.v[i]); }
static inline __m512i _mm512_srli_epi64(__m512i a, unsigned n) {
    PORTABLE_LANES(n > 63 ? 0 : a.v[i] >> n); /* n is a constant in _native.c */
}
static inline __m512i _mm512_madd52lo_epu64(__m512i a, __m512i b, __m512i c) {
    PORTABLE_LANES(a.v[i] + ((uint64_t)((unsigned __int128)(b.v[i] & PORTABLE_M52) *
                                        (c.v[i] & PORTABLE_M52)) & PORTABLE_M52));
}
static inline __m512i _mm512_madd52hi_epu64(__m512i a, __m512i b, __m512i c) {
    PORTABLE_LANES(a.v[i] + (uint64_t)(((unsigned __int128)(b.v[i] & PORTABLE_M52) *
                                        (c.v[i] & PORTABLE_M52)) >> 52));
}
/* Lane i from b where bit i of k is set, else from a: a mask, not a branch. */
static inline __m512i _mm512_mask_blend_epi64(__mmask8 k, __m512i a, __m512i b) {
    PORTABLE_LANES((a.v[i] & ~(0 - (uint64_t)((k >> i) & 1))) | (b.v[i] & (0 - (uint64_t)((k >> i) & 1))));
}
static inline __m512i _mm512_load_si512(const void *p) {
    __m512i r;
    memcpy(&r, p, sizeof r);
    return r;
}
static inline void _mm512_store_si512(void *p, __m512i a) { memcpy(p, &a, sizeof a); }

#undef PORTABLE_LANES
#endif
