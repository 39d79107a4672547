/* Pillow's affine transform of an 8-bit RGB image (Image.transform(size, AFFINE, data, BILINEAR or BICUBIC,
 * fillcolor=...), which Image.rotate also ends in), bit for bit: RandAugment's rotate, shear and translate,
 * about 5 ms a call on a 224 x 224 image with Pillow's generic per-pixel loop.
 *
 * The result is defined by Pillow's arithmetic (libImaging/Geometry.c), which this follows operation for
 * operation in double precision: output pixel (x, y) samples the input at
 * (a0 (x + .5) + a1 (y + .5) + a2, a3 (x + .5) + a4 (y + .5) + a5); a sample outside the input keeps the fill
 * colour; inside, the 2 x 2 (bilinear) or 4 x 4 (bicubic, a = -0.5, Pillow's edge rules) neighbourhood is
 * interpolated along rows, then down the column, and truncated to 8 bits. The AVX2 path does the same double
 * operations in the same order, so it gives the same bytes (tests/test_jpeg_region.py compares both builds
 * with Pillow): bicubic four output pixels at a time, one per lane, where their neighbourhoods lie inside
 * the image; elsewhere, and for bilinear, the three channels of one pixel in the lanes of a vector. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) && !defined(UNICL_NO_AVX2)
#define UNICL_AVX2 1
#include <immintrin.h>
#endif

#define AFFINE_OK 0
#define AFFINE_FALLBACK 1
#define PILLOW_BILINEAR 2
#define PILLOW_BICUBIC 3

static inline int floor_int(double v) { return v < 0.0 ? (int)floor(v) : (int)v; } /* Pillow's FLOOR */
static inline int clip_index(int v, int size) { return v < 0 ? 0 : v < size ? v : size - 1; }

/* Pillow's BICUBIC macro: the operands and their order matter (the results are compared bit for bit). */
static inline double cubic(double v1, double v2, double v3, double v4, double d) {
    double p1 = v2;
    double p2 = -v1 + v3;
    double p3 = 2 * (v1 - v2) + v3 - v4;
    double p4 = -v1 + v2 - v3 + v4;
    return p1 + d * (p2 + d * (p3 + d * p4));
}

static inline uint8_t cubic_to_byte(double v) { return v <= 0.0 ? 0 : v >= 255.0 ? 255 : (uint8_t)v; }

static void bilinear_pixel(const uint8_t *src, int w, int h, double xin, double yin, uint8_t *out) {
    xin -= 0.5;
    yin -= 0.5;
    int x = floor_int(xin), y = floor_int(yin);
    double dx = xin - x, dy = yin - y;
    const uint8_t *row0 = src + (size_t)clip_index(y, h) * w * 3;
    const uint8_t *row1 = y + 1 >= 0 && y + 1 < h ? src + (size_t)(y + 1) * w * 3 : NULL;
    int x0 = clip_index(x, w) * 3, x1 = clip_index(x + 1, w) * 3;
    for (int c = 0; c < 3; c++) {
        double v1 = row0[x0 + c] + (row0[x1 + c] - row0[x0 + c]) * dx;
        double v2 = row1 ? row1[x0 + c] + (row1[x1 + c] - row1[x0 + c]) * dx : v1;
        out[c] = (uint8_t)(v1 + (v2 - v1) * dy);
    }
}

static void bicubic_pixel(const uint8_t *src, int w, int h, double xin, double yin, uint8_t *out) {
    xin -= 0.5;
    yin -= 0.5;
    int x = floor_int(xin) - 1, y = floor_int(yin) - 1;
    double dx = xin - (x + 1), dy = yin - (y + 1);
    int xs[4] = {clip_index(x, w) * 3, clip_index(x + 1, w) * 3, clip_index(x + 2, w) * 3, clip_index(x + 3, w) * 3};
    /* The first row is clamped into the image; a later row outside it repeats the previous row's value. */
    const uint8_t *rows[4] = {src + (size_t)clip_index(y, h) * w * 3, NULL, NULL, NULL};
    for (int r = 1; r < 4; r++)
        rows[r] = y + r >= 0 && y + r < h ? src + (size_t)(y + r) * w * 3 : NULL;
    for (int c = 0; c < 3; c++) {
        double v[4];
        for (int r = 0; r < 4; r++) {
            const uint8_t *p = rows[r];
            v[r] = p ? cubic(p[xs[0] + c], p[xs[1] + c], p[xs[2] + c], p[xs[3] + c], dx) : v[r - 1];
        }
        out[c] = cubic_to_byte(cubic(v[0], v[1], v[2], v[3], dy));
    }
}

#ifdef UNICL_AVX2
/* A pixel's R, G, B (and one byte more, unused) as four doubles. Reads 4 bytes. */
__attribute__((target("avx2"))) static inline __m256d rgb_lanes(const uint8_t *p) {
    int32_t word;
    memcpy(&word, p, 4);
    return _mm256_cvtepi32_pd(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(word)));
}

__attribute__((target("avx2"))) static inline __m256d cubic4(__m256d v1, __m256d v2, __m256d v3, __m256d v4,
                                                            __m256d d) {
    /* -a + b rounds exactly as b - a, and 2 * a as a + a: the same values as cubic() with fewer operations. */
    __m256d p2 = _mm256_sub_pd(v3, v1);
    __m256d twice = _mm256_sub_pd(v1, v2);
    __m256d p3 = _mm256_sub_pd(_mm256_add_pd(_mm256_add_pd(twice, twice), v3), v4);
    __m256d p4 = _mm256_add_pd(_mm256_sub_pd(_mm256_sub_pd(v2, v1), v3), v4);
    __m256d t = _mm256_add_pd(p3, _mm256_mul_pd(d, p4));
    t = _mm256_add_pd(p2, _mm256_mul_pd(d, t));
    return _mm256_add_pd(v2, _mm256_mul_pd(d, t));
}

/* Needs 1 readable byte after the image's last pixel (rgb_lanes reads 4 bytes for 3). */
__attribute__((target("avx2"), always_inline)) static inline void bicubic_pixel_avx2(const uint8_t *src, int w, int h,
                                                                                    double xin, double yin,
                                                                                    uint8_t *out) {
    xin -= 0.5;
    yin -= 0.5;
    int x = floor_int(xin) - 1, y = floor_int(yin) - 1;
    __m256d dx = _mm256_set1_pd(xin - (x + 1)), dy = _mm256_set1_pd(yin - (y + 1));
    int x0 = clip_index(x, w) * 3, x1 = clip_index(x + 1, w) * 3, x2 = clip_index(x + 2, w) * 3,
        x3 = clip_index(x + 3, w) * 3;
    /* Branch-free, so that the four rows (and neighbouring pixels) overlap: every row is read at a clamped
     * address, and a row outside the image is replaced by the previous row's value, as Pillow does. */
    __m256d v[4];
    for (int r = 0; r < 4; r++) {
        const uint8_t *p = src + (size_t)clip_index(y + r, h) * w * 3;
        __m256d row = cubic4(rgb_lanes(p + x0), rgb_lanes(p + x1), rgb_lanes(p + x2), rgb_lanes(p + x3), dx);
        int inside = r == 0 || (y + r >= 0 && y + r < h);
        __m256d keep = _mm256_castsi256_pd(_mm256_set1_epi64x(-(long long)inside));
        v[r] = r == 0 ? row : _mm256_blendv_pd(v[r - 1], row, keep);
    }
    __m256d s = cubic4(v[0], v[1], v[2], v[3], dy);
    /* v <= 0 -> 0, v >= 255 -> 255, else truncation: max/min then truncate gives the same bytes. */
    s = _mm256_min_pd(_mm256_max_pd(s, _mm256_setzero_pd()), _mm256_set1_pd(255.0));
    __m128i bytes = _mm256_cvttpd_epi32(s);
    bytes = _mm_packus_epi16(_mm_packs_epi32(bytes, bytes), bytes);
    int32_t word = _mm_cvtsi128_si32(bytes);
    memcpy(out, &word, 3);
}

__attribute__((target("avx2"), always_inline)) static inline void bilinear_pixel_avx2(const uint8_t *src, int w,
                                                                                     int h, double xin,
                                                                                     double yin, uint8_t *out) {
    xin -= 0.5;
    yin -= 0.5;
    int x = floor_int(xin), y = floor_int(yin);
    __m256d dx = _mm256_set1_pd(xin - x), dy = _mm256_set1_pd(yin - y);
    int x0 = clip_index(x, w) * 3, x1 = clip_index(x + 1, w) * 3;
    const uint8_t *row = src + (size_t)clip_index(y, h) * w * 3;
    __m256d a = rgb_lanes(row + x0);
    __m256d v1 = _mm256_add_pd(a, _mm256_mul_pd(_mm256_sub_pd(rgb_lanes(row + x1), a), dx));
    __m256d v2 = v1;
    if (y + 1 >= 0 && y + 1 < h) {
        row = src + (size_t)(y + 1) * w * 3;
        a = rgb_lanes(row + x0);
        v2 = _mm256_add_pd(a, _mm256_mul_pd(_mm256_sub_pd(rgb_lanes(row + x1), a), dx));
    }
    __m256d s = _mm256_add_pd(v1, _mm256_mul_pd(_mm256_sub_pd(v2, v1), dy));
    __m128i bytes = _mm256_cvttpd_epi32(s);
    bytes = _mm_packus_epi16(_mm_packs_epi32(bytes, bytes), bytes);
    int32_t word = _mm_cvtsi128_si32(bytes);
    memcpy(out, &word, 3);
}
#endif

/* One output pixel: its sample position, then the fill colour or the pixel function's interpolation. */
#define AFFINE_PIXEL(name, pixel, attributes)                                                                 \
    attributes static inline void name(const uint8_t *src, int src_w, int src_h, const double *a, int x,    \
                                       int y, const uint8_t *fill, uint8_t *o) {                            \
        double xo = x + 0.5, yo = y + 0.5;                                                                  \
        double xin = a[0] * xo + a[1] * yo + a[2];                                                          \
        double yin = a[3] * xo + a[4] * yo + a[5];                                                          \
        if (xin < 0.0 || xin >= src_w || yin < 0.0 || yin >= src_h)                                         \
            memcpy(o, fill, 3);                                                                             \
        else                                                                                                \
            pixel(src, src_w, src_h, xin, yin, o);                                                          \
    }

/* The output loop, pixel by pixel. */
#define AFFINE_ROWS(name, pixel, attributes)                                                                  \
    attributes static void name(const uint8_t *src, int src_w, int src_h, const double *a, int out_w,       \
                                int out_h, const uint8_t *fill, uint8_t *out) {                             \
        for (int y = 0; y < out_h; y++) {                                                                   \
            uint8_t *o = out + (size_t)y * out_w * 3;                                                       \
            for (int x = 0; x < out_w; x++, o += 3) pixel(src, src_w, src_h, a, x, y, fill, o);             \
        }                                                                                                   \
    }

AFFINE_PIXEL(bilinear_sample, bilinear_pixel, )
AFFINE_PIXEL(bicubic_sample, bicubic_pixel, )
AFFINE_ROWS(bilinear_rows, bilinear_sample, )
AFFINE_ROWS(bicubic_rows, bicubic_sample, )
#ifdef UNICL_AVX2
AFFINE_PIXEL(bilinear_sample_avx2, bilinear_pixel_avx2, __attribute__((target("avx2"))))
AFFINE_PIXEL(bicubic_sample_avx2, bicubic_pixel_avx2, __attribute__((target("avx2"))))
AFFINE_ROWS(bilinear_rows_avx2, bilinear_sample_avx2, __attribute__((target("avx2"))))
/* Bicubic for four output pixels at once, one pixel per lane: the same double operations per pixel as
 * bicubic_pixel_avx2, but twelve independent interpolations in flight instead of one pixel's dependent chain.
 * Only for pixels whose whole 4 x 4 neighbourhood lies inside the image (no edge rules); the caller checks.
 * xm, ym: the sample positions minus 0.5. Reads 16 bytes from each neighbourhood row's first pixel. */
__attribute__((target("avx2"))) static inline void bicubic_four_inside(const uint8_t *src, int w, __m256d xm,
                                                                      __m256d ym, uint8_t *out) {
    __m256d xf = _mm256_floor_pd(xm), yf = _mm256_floor_pd(ym);
    __m256d dx = _mm256_sub_pd(xm, xf), dy = _mm256_sub_pd(ym, yf);
    int32_t xs[4], ys[4];
    _mm_storeu_si128((__m128i *)xs, _mm256_cvttpd_epi32(xf));
    _mm_storeu_si128((__m128i *)ys, _mm256_cvttpd_epi32(yf));
    const uint8_t *first[4];
    for (int i = 0; i < 4; i++) first[i] = src + ((size_t)(ys[i] - 1) * w + (xs[i] - 1)) * 3;
    __m256d v[3][4]; /* [channel][row]: the row's interpolation */
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++) {
        size_t step = (size_t)r * w * 3;
        /* Four pixels' 12-byte neighbourhood rows, transposed: byte k of each pixel side by side. */
        __m128i a = _mm_loadu_si128((const __m128i *)(first[0] + step));
        __m128i b = _mm_loadu_si128((const __m128i *)(first[1] + step));
        __m128i c = _mm_loadu_si128((const __m128i *)(first[2] + step));
        __m128i d = _mm_loadu_si128((const __m128i *)(first[3] + step));
        __m128i ab_lo = _mm_unpacklo_epi8(a, b), cd_lo = _mm_unpacklo_epi8(c, d);
        __m128i ab_hi = _mm_unpackhi_epi8(a, b), cd_hi = _mm_unpackhi_epi8(c, d);
        __m128i bytes[3] = {_mm_unpacklo_epi16(ab_lo, cd_lo), _mm_unpackhi_epi16(ab_lo, cd_lo),
                            _mm_unpacklo_epi16(ab_hi, cd_hi)}; /* bytes k = 4 * j + i in bytes[j], dword i */
        __m256d tap[12];
#pragma GCC unroll 3
        for (int j = 0; j < 3; j++) {
            tap[4 * j] = _mm256_cvtepi32_pd(_mm_cvtepu8_epi32(bytes[j]));
            tap[4 * j + 1] = _mm256_cvtepi32_pd(_mm_cvtepu8_epi32(_mm_srli_si128(bytes[j], 4)));
            tap[4 * j + 2] = _mm256_cvtepi32_pd(_mm_cvtepu8_epi32(_mm_srli_si128(bytes[j], 8)));
            tap[4 * j + 3] = _mm256_cvtepi32_pd(_mm_cvtepu8_epi32(_mm_srli_si128(bytes[j], 12)));
        }
#pragma GCC unroll 3
        for (int ch = 0; ch < 3; ch++) v[ch][r] = cubic4(tap[ch], tap[3 + ch], tap[6 + ch], tap[9 + ch], dx);
    }
    __m128i channel[3];
#pragma GCC unroll 3
    for (int ch = 0; ch < 3; ch++) {
        __m256d s = cubic4(v[ch][0], v[ch][1], v[ch][2], v[ch][3], dy);
        s = _mm256_min_pd(_mm256_max_pd(s, _mm256_setzero_pd()), _mm256_set1_pd(255.0));
        channel[ch] = _mm256_cvttpd_epi32(s);
    }
    /* R0..R3 G0..G3 B0..B3 -> R0 G0 B0 R1 G1 B1 ... */
    __m128i planar = _mm_packus_epi16(_mm_packs_epi32(channel[0], channel[1]),
                                      _mm_packs_epi32(channel[2], channel[2]));
    __m128i packed = _mm_shuffle_epi8(planar, _mm_setr_epi8(0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11, -1, -1, -1, -1));
    uint8_t twelve[16];
    _mm_storeu_si128((__m128i *)twelve, packed);
    memcpy(out, twelve, 12);
}

/* The bicubic output loop, four pixels at a time where all four neighbourhoods are inside the image. */
__attribute__((target("avx2"))) static void bicubic_rows_avx2_by_four(const uint8_t *src, int src_w, int src_h,
                                                                     const double *a, int out_w, int out_h,
                                                                     const uint8_t *fill, uint8_t *out) {
    const __m256d a0 = _mm256_set1_pd(a[0]), a3 = _mm256_set1_pd(a[3]), half = _mm256_set1_pd(0.5);
    const __m256d lowest = _mm256_set1_pd(1.0);
    const __m256d x_highest = _mm256_set1_pd(src_w - 3.0), y_highest = _mm256_set1_pd(src_h - 3.0);
    for (int y = 0; y < out_h; y++) {
        uint8_t *o = out + (size_t)y * out_w * 3;
        double yo = y + 0.5;
        __m256d a1yo = _mm256_set1_pd(a[1] * yo), a4yo = _mm256_set1_pd(a[4] * yo);
        __m256d a2 = _mm256_set1_pd(a[2]), a5 = _mm256_set1_pd(a[5]);
        int x = 0;
        for (; x + 4 <= out_w; x += 4, o += 12) {
            __m256d xo = _mm256_add_pd(_mm256_setr_pd(x, x + 1, x + 2, x + 3), half);
            /* a0 * xo + a1 * yo + a2, in C's order, then the pixel function's - 0.5 */
            __m256d xm = _mm256_sub_pd(_mm256_add_pd(_mm256_add_pd(_mm256_mul_pd(a0, xo), a1yo), a2), half);
            __m256d ym = _mm256_sub_pd(_mm256_add_pd(_mm256_add_pd(_mm256_mul_pd(a3, xo), a4yo), a5), half);
            __m256d xf = _mm256_floor_pd(xm), yf = _mm256_floor_pd(ym);
            __m256d ok = _mm256_and_pd(_mm256_and_pd(_mm256_cmp_pd(xf, lowest, _CMP_GE_OQ),
                                                     _mm256_cmp_pd(xf, x_highest, _CMP_LE_OQ)),
                                       _mm256_and_pd(_mm256_cmp_pd(yf, lowest, _CMP_GE_OQ),
                                                     _mm256_cmp_pd(yf, y_highest, _CMP_LE_OQ)));
            if (_mm256_movemask_pd(ok) == 0xF) {
                bicubic_four_inside(src, src_w, xm, ym, o);
                continue;
            }
            for (int i = 0; i < 4; i++) /* near an edge or outside */
                bicubic_sample_avx2(src, src_w, src_h, a, x + i, y, fill, o + 3 * i);
        }
        for (; x < out_w; x++, o += 3) bicubic_sample_avx2(src, src_w, src_h, a, x, y, fill, o);
    }
}
#endif

/* src: src_h rows of src_w packed RGB pixels, readable for 4 bytes past its last pixel. a: Pillow's AFFINE
 * data (output -> input). fill: the colour of output pixels whose sample lies outside the input. */
int unicl_affine_rgb(const uint8_t *src, int src_w, int src_h, const double *a, int pillow_filter, int out_w,
                     int out_h, const uint8_t *fill, uint8_t *out) {
    void (*rows)(const uint8_t *, int, int, const double *, int, int, const uint8_t *, uint8_t *);
    if (pillow_filter == PILLOW_BICUBIC)
        rows = bicubic_rows;
    else if (pillow_filter == PILLOW_BILINEAR)
        rows = bilinear_rows;
    else
        return AFFINE_FALLBACK;
#ifdef UNICL_AVX2
    if (__builtin_cpu_supports("avx2"))
        rows = pillow_filter == PILLOW_BICUBIC ? bicubic_rows_avx2_by_four : bilinear_rows_avx2;
#endif
    if (src_w <= 0 || src_h <= 0 || out_w < 0 || out_h < 0) return AFFINE_FALLBACK;
    rows(src, src_w, src_h, a, out_w, out_h, fill, out);
    return AFFINE_OK;
}
