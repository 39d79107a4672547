/* Pillow's resize of an 8-bit RGB image (Image.resize with a float box, BILINEAR or BICUBIC), bit for bit,
 * with SIMD: the training crop's resize to IMG_SIZE, a fifth of a loader worker's time with Pillow's own loops.
 *
 * The result is defined by Pillow's arithmetic (libImaging/Resample.c), which this follows step by step:
 * the box arrives as C floats; per output pixel the filter's taps are computed in double, normalised by
 * their sum and rounded to 22-bit fixed point; a horizontal pass over the rows the vertical filter will
 * need writes 8-bit intermediates (rounded and clamped), then a vertical pass does the same over them.
 * Every sum is of the same int32 products in the same order as Pillow's, so vectorising changes nothing;
 * tests/test_jpeg_region.py compares the two on random images, boxes and sizes.
 *
 * Pillow resizes very tall images (height > 100 x width, shrinking) in the other order; that case, like
 * any other filter, returns RESAMPLE_FALLBACK and the caller uses Pillow. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) && !defined(UNICL_NO_AVX2)
#define UNICL_AVX2 1
#include <immintrin.h>
#endif

/* The interface of the helper library (this file, affine.c, lookup.c and jpeg_region.c): data/jpeg_region.py
 * refuses a library of another version. Bump it whenever a C function's signature or meaning changes. */
#define HELPER_ABI_VERSION 5
int unicl_helper_abi(void) { return HELPER_ABI_VERSION; }

#define RESAMPLE_OK 0
#define RESAMPLE_FALLBACK 1
#define PRECISION_BITS 22 /* Pillow's: 32 bits minus 8 for the pixel and 2 for filter overshoot */
#define HALF (1 << (PRECISION_BITS - 1))
#define PILLOW_BILINEAR 2
#define PILLOW_BICUBIC 3

static double bilinear_filter(double x) {
    if (x < 0.0) x = -x;
    return x < 1.0 ? 1.0 - x : 0.0;
}

static double bicubic_filter(double x) { /* Keys' cubic with a = -0.5, in Pillow's operation order */
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * -0.5;
    return 0.0;
}

struct taps {
    int size;     /* taps stored per output pixel: even, so the SIMD loop can take them in pairs */
    int *first;   /* per output pixel: its first input pixel */
    int *count;   /* per output pixel: how many taps are used; the rest of its `size` are 0 */
    int32_t *weights;
};

static void free_taps(struct taps *taps) {
    free(taps->first);
    free(taps->count);
    free(taps->weights);
}

/* Pillow's precompute_coeffs + normalize_coeffs_8bpc for one axis. Returns 0 when out of memory. */
static int compute_taps(int in_size, float in0, float in1, int out_size, double (*filter)(double), double support,
                        struct taps *taps) {
    double scale = (double)(in1 - in0) / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    support *= filterscale;
    double inv_filterscale = 1.0 / filterscale;
    taps->size = (int)ceil(support) * 2 + 2;
    taps->first = malloc(sizeof(int) * out_size);
    taps->count = malloc(sizeof(int) * out_size);
    taps->weights = calloc((size_t)out_size * taps->size, sizeof(int32_t));
    double *w = malloc(sizeof(double) * taps->size);
    if (!taps->first || !taps->count || !taps->weights || !w) {
        free(w);
        free_taps(taps);
        return 0;
    }
    for (int xx = 0; xx < out_size; xx++) {
        double center = in0 + (xx + 0.5) * scale, sum = 0.0;
        int xmin = (int)(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = (int)(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        for (int x = 0; x < xmax; x++) {
            w[x] = filter((x + xmin - center + 0.5) * inv_filterscale);
            sum += w[x];
        }
        int32_t *k = taps->weights + (size_t)xx * taps->size;
        for (int x = 0; x < xmax; x++) {
            double v = sum != 0.0 ? w[x] / sum : w[x];
            k[x] = v < 0 ? (int)(-0.5 + v * (1 << PRECISION_BITS)) : (int)(0.5 + v * (1 << PRECISION_BITS));
        }
        taps->first[xx] = xmin;
        taps->count[xx] = xmax;
    }
    free(w);
    return 1;
}

static inline uint8_t clip8(int32_t v) {
    v >>= PRECISION_BITS;
    return v < 0 ? 0 : v > 255 ? 255 : (uint8_t)v;
}

static void horizontal_row(const uint8_t *in, uint8_t *out, int out_w, const struct taps *t) {
    for (int xx = 0; xx < out_w; xx++) {
        const uint8_t *p = in + t->first[xx] * 3;
        const int32_t *k = t->weights + (size_t)xx * t->size;
        int32_t r = HALF, g = HALF, b = HALF;
        for (int x = 0; x < t->count[xx]; x++) {
            r += p[3 * x] * k[x];
            g += p[3 * x + 1] * k[x];
            b += p[3 * x + 2] * k[x];
        }
        out[3 * xx] = clip8(r);
        out[3 * xx + 1] = clip8(g);
        out[3 * xx + 2] = clip8(b);
    }
}

static void vertical_rows(const uint8_t *in, uint8_t *out, int row_bytes, int out_h, int first_row,
                          const struct taps *t) {
    for (int yy = 0; yy < out_h; yy++) {
        const uint8_t *top = in + (size_t)(t->first[yy] - first_row) * row_bytes;
        const int32_t *k = t->weights + (size_t)yy * t->size;
        for (int i = 0; i < row_bytes; i++) {
            int32_t s = HALF;
            for (int y = 0; y < t->count[yy]; y++) s += top[(size_t)y * row_bytes + i] * k[y];
            out[(size_t)yy * row_bytes + i] = clip8(s);
        }
    }
}

#ifdef UNICL_AVX2
/* Two taps of one row: bytes R0 G0 B0 R1 G1 B1 -> int32 lanes [R0 G0 B0 0 | R1 G1 B1 0] times
 * [k0 k0 k0 k0 | k1 k1 k1 k1]. Reads 8 bytes from p. */
__attribute__((target("avx2"))) static inline __m256i two_taps(const uint8_t *p, __m128i spread, __m256i k) {
    __m128i bytes = _mm_shuffle_epi8(_mm_loadl_epi64((const __m128i *)p), spread);
    return _mm256_mullo_epi32(_mm256_cvtepu8_epi32(bytes), k);
}

/* The 4 lanes of each half summed, rounded, shifted and clamped (packs + packus clamp as clip8 does). */
__attribute__((target("avx2"))) static inline void store_rgb(uint8_t *out, __m256i sum) {
    __m128i v = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    v = _mm_srai_epi32(_mm_add_epi32(v, _mm_set1_epi32(HALF)), PRECISION_BITS);
    v = _mm_packus_epi16(_mm_packs_epi32(v, v), v);
    int32_t rgbx = _mm_cvtsi128_si32(v);
    memcpy(out, &rgbx, 3);
}

/* Two rows at once, sharing each output pixel's weights. Reads up to 8 bytes past a row's last pixel. */
__attribute__((target("avx2"))) static void horizontal_rows_avx2(const uint8_t *in0, const uint8_t *in1,
                                                                 uint8_t *out0, uint8_t *out1, int out_w,
                                                                 const struct taps *t) {
    const __m128i spread = _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    for (int xx = 0; xx < out_w; xx++) {
        const int32_t *k = t->weights + (size_t)xx * t->size;
        const uint8_t *p0 = in0 + t->first[xx] * 3, *p1 = in1 + t->first[xx] * 3;
        __m256i sum0 = _mm256_setzero_si256(), sum1 = _mm256_setzero_si256();
        for (int x = 0; x < t->count[xx]; x += 2) { /* an odd count's last pair has a zero weight */
            __m256i pair = _mm256_setr_m128i(_mm_set1_epi32(k[x]), _mm_set1_epi32(k[x + 1]));
            sum0 = _mm256_add_epi32(sum0, two_taps(p0 + 3 * x, spread, pair));
            sum1 = _mm256_add_epi32(sum1, two_taps(p1 + 3 * x, spread, pair));
        }
        store_rgb(out0 + 3 * xx, sum0);
        store_rgb(out1 + 3 * xx, sum1);
    }
}

/* 8 bytes of a row at a time, the taps' rows summed in registers. */
__attribute__((target("avx2"))) static void vertical_rows_avx2(const uint8_t *in, uint8_t *out, int row_bytes,
                                                               int out_h, int first_row, const struct taps *t) {
    int vector_end = row_bytes - row_bytes % 8;
    for (int yy = 0; yy < out_h; yy++) {
        const uint8_t *top = in + (size_t)(t->first[yy] - first_row) * row_bytes;
        const int32_t *k = t->weights + (size_t)yy * t->size;
        uint8_t *o = out + (size_t)yy * row_bytes;
        for (int i = 0; i < vector_end; i += 8) {
            __m256i s = _mm256_set1_epi32(HALF);
            for (int y = 0; y < t->count[yy]; y++) {
                __m256i px = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(top + (size_t)y * row_bytes + i)));
                s = _mm256_add_epi32(s, _mm256_mullo_epi32(px, _mm256_set1_epi32(k[y])));
            }
            s = _mm256_srai_epi32(s, PRECISION_BITS);
            __m128i v = _mm_packs_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            _mm_storel_epi64((__m128i *)(o + i), _mm_packus_epi16(v, v));
        }
        for (int i = vector_end; i < row_bytes; i++) {
            int32_t s = HALF;
            for (int y = 0; y < t->count[yy]; y++) s += top[(size_t)y * row_bytes + i] * k[y];
            o[i] = clip8(s);
        }
    }
}
#endif

/* The taps of output pixels [start, start + count) only. */
static struct taps window_of(const struct taps *t, int start) {
    struct taps view = {t->size, t->first + start, t->count + start, t->weights + (size_t)start * t->size};
    return view;
}

/* src: src_h rows of src_w packed RGB pixels, readable for 8 bytes past its last pixel. (x0, y0, x1, y1):
 * the box in src's pixel coordinates, as Pillow's resize takes it, to a full_w x full_h result, of which
 * only the out_w x out_h window at (win_x, win_y) is computed, into out: each of its pixels the one the
 * full resize has there (a resize then a crop, as torchvision's Resize -> CenterCrop, without the rest). */
int unicl_resample_rgb(const uint8_t *src, int src_w, int src_h, float x0, float y0, float x1, float y1,
                       int pillow_filter, int full_w, int full_h, int win_x, int win_y, int out_w, int out_h,
                       uint8_t *out) {
    double (*filter)(double);
    double support;
    if (pillow_filter == PILLOW_BICUBIC) {
        filter = bicubic_filter, support = 2.0;
    } else if (pillow_filter == PILLOW_BILINEAR) {
        filter = bilinear_filter, support = 1.0;
    } else {
        return RESAMPLE_FALLBACK;
    }
    if ((src_h > src_w * 100 && full_h < src_h) || src_w <= 0 || src_h <= 0 || out_w <= 0 || out_h <= 0 ||
        win_x < 0 || win_y < 0 || win_x + out_w > full_w || win_y + out_h > full_h)
        return RESAMPLE_FALLBACK;

    struct taps all_across, all_down;
    if (!compute_taps(src_h, y0, y1, full_h, filter, support, &all_down)) return RESAMPLE_FALLBACK;
    if (!compute_taps(src_w, x0, x1, full_w, filter, support, &all_across)) {
        free_taps(&all_down);
        return RESAMPLE_FALLBACK;
    }
    struct taps across = window_of(&all_across, win_x), down = window_of(&all_down, win_y);
    int first_row = down.first[0], last_row = down.first[out_h - 1] + down.count[out_h - 1];
    int rows = last_row - first_row, row_bytes = out_w * 3;
    uint8_t *middle = malloc((size_t)rows * row_bytes + 8);
    if (!middle) {
        free_taps(&all_across);
        free_taps(&all_down);
        return RESAMPLE_FALLBACK;
    }
#ifdef UNICL_AVX2
    int avx2 = __builtin_cpu_supports("avx2");
#endif
    /* Pillow skips a pass whose axis keeps its size and box; at scale 1 with a whole-pixel box a pass is the
     * identity (weights 1 and 0), so running it anyway changes nothing. */
    for (int y = 0; y < rows; y++) {
        const uint8_t *in = src + (size_t)(first_row + y) * src_w * 3;
        uint8_t *o = middle + (size_t)y * row_bytes;
#ifdef UNICL_AVX2
        if (avx2 && y + 1 < rows) {
            horizontal_rows_avx2(in, in + (size_t)src_w * 3, o, o + row_bytes, out_w, &across);
            y++;
            continue;
        }
#endif
        horizontal_row(in, o, out_w, &across);
    }
#ifdef UNICL_AVX2
    if (avx2)
        vertical_rows_avx2(middle, out, row_bytes, out_h, first_row, &down);
    else
#endif
        vertical_rows(middle, out, row_bytes, out_h, first_row, &down);
    free(middle);
    free_taps(&all_across);
    free_taps(&all_down);
    return RESAMPLE_OK;
}
