/*
 * BLAKE3 of one block (keyed), shared by the two native modules: hash-to-curve in
 * ispf/hazmat/_native.c and the shuffles' keyed stream in ispf/_records.c. The
 * inputs they hash fit one 64-byte block, so a keyed hash is one compression with
 * CHUNK_START|CHUNK_END|ROOT|KEYED_HASH. Included by both (static: no symbols shared).
 */
#ifndef ISPF_BLAKE3_H
#define ISPF_BLAKE3_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>

static const uint32_t B3_IV[8] = {0x6A09E667u, 0xBB67AE85u, 0x3C6EF372u, 0xA54FF53Au,
                                  0x510E527Fu, 0x9B05688Cu, 0x1F83D9ABu, 0x5BE0CD19u};
static const uint8_t B3_SCHEDULE[7][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8},
    {3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1},
    {10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6},
    {12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4},
    {9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7},
    {11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13},
};
enum { B3_CHUNK_START = 1, B3_CHUNK_END = 2, B3_ROOT = 8, B3_KEYED_HASH = 16 };

static inline uint32_t rotr32(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
static inline uint32_t load32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline void store32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}

#define B3_G(a, b, c, d, x, y)                 \
    do {                                        \
        v[a] = v[a] + v[b] + (x);               \
        v[d] = rotr32(v[d] ^ v[a], 16);         \
        v[c] = v[c] + v[d];                     \
        v[b] = rotr32(v[b] ^ v[c], 12);         \
        v[a] = v[a] + v[b] + (y);               \
        v[d] = rotr32(v[d] ^ v[a], 8);          \
        v[c] = v[c] + v[d];                     \
        v[b] = rotr32(v[b] ^ v[c], 7);          \
    } while (0)

/* Keyed BLAKE3 of `len` <= 64 bytes: the 32-byte output into out. */
static void blake3_keyed_block(const uint32_t key[8], const uint8_t *msg, size_t len, uint8_t out[32]) {
    uint8_t block[64] = {0};
    uint32_t m[16], v[16];
    memcpy(block, msg, len);
    for (int i = 0; i < 16; i++) m[i] = load32(block + 4 * i);
    for (int i = 0; i < 8; i++) v[i] = key[i];
    v[8] = B3_IV[0]; v[9] = B3_IV[1]; v[10] = B3_IV[2]; v[11] = B3_IV[3];
    v[12] = 0; v[13] = 0; v[14] = (uint32_t)len;
    v[15] = B3_CHUNK_START | B3_CHUNK_END | B3_ROOT | B3_KEYED_HASH;
    for (int r = 0; r < 7; r++) {
        const uint8_t *s = B3_SCHEDULE[r];
        B3_G(0, 4, 8, 12, m[s[0]], m[s[1]]);
        B3_G(1, 5, 9, 13, m[s[2]], m[s[3]]);
        B3_G(2, 6, 10, 14, m[s[4]], m[s[5]]);
        B3_G(3, 7, 11, 15, m[s[6]], m[s[7]]);
        B3_G(0, 5, 10, 15, m[s[8]], m[s[9]]);
        B3_G(1, 6, 11, 12, m[s[10]], m[s[11]]);
        B3_G(2, 7, 8, 13, m[s[12]], m[s[13]]);
        B3_G(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++) store32(out + 4 * i, v[i] ^ v[i + 8]);
}
#endif /* ISPF_BLAKE3_H */
