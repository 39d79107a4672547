/* Pillow's affine transform of an 8-bit RGB image (Image.transform(size, AFFINE, data, BILINEAR or BICUBIC,
 * fillcolor=...), which Image.rotate also ends in), bit for bit: RandAugment's rotate, shear and translate,
 * about 5 ms a call on a 224 x 224 image with Pillow's generic per-pixel loop.
 *
 * The result is defined by Pillow's arithmetic (libImaging/Geometry.c), which this follows operation for
 * operation in double precision: output pixel (x, y) samples the input at
 * (a0 (x + .5) + a1 (y + .5) + a2, a3 (x + .5) + a4 (y + .5) + a5); a sample outside the input keeps the fill
 * colour; inside, the 2 x 2 (bilinear) or 4 x 4 (bicubic, a = -0.5, Pillow's edge rules) neighbourhood is
 * interpolated along rows, then down the column, and truncated to 8 bits. The AVX2 path carries the three
 * channels of a pixel in the lanes of one vector and does the same double operations in the same order,
 * so it gives the same bytes (tests/test_jpeg_region.py compares both builds with Pillow). */
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

/* The output loop, once per pixel function so that the compiler inlines it. */
#define AFFINE_ROWS(name, pixel, attributes)                                                                  \
    attributes static void name(const uint8_t *src, int src_w, int src_h, const double *a, int out_w,       \
                                int out_h, const uint8_t *fill, uint8_t *out) {                             \
        for (int y = 0; y < out_h; y++) {                                                                   \
            uint8_t *o = out + (size_t)y * out_w * 3;                                                       \
            for (int x = 0; x < out_w; x++, o += 3) {                                                       \
                double xo = x + 0.5, yo = y + 0.5;                                                          \
                double xin = a[0] * xo + a[1] * yo + a[2];                                                  \
                double yin = a[3] * xo + a[4] * yo + a[5];                                                  \
                if (xin < 0.0 || xin >= src_w || yin < 0.0 || yin >= src_h)                                 \
                    memcpy(o, fill, 3);                                                                     \
                else                                                                                        \
                    pixel(src, src_w, src_h, xin, yin, o);                                                  \
            }                                                                                               \
        }                                                                                                   \
    }

AFFINE_ROWS(bilinear_rows, bilinear_pixel, )
AFFINE_ROWS(bicubic_rows, bicubic_pixel, )
#ifdef UNICL_AVX2
AFFINE_ROWS(bilinear_rows_avx2, bilinear_pixel_avx2, __attribute__((target("avx2"))))
AFFINE_ROWS(bicubic_rows_avx2, bicubic_pixel_avx2, __attribute__((target("avx2"))))
#endif

/* src: src_h rows of src_w packed RGB pixels, readable for 1 byte past its last pixel. a: Pillow's AFFINE
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
    if (__builtin_cpu_supports("avx2")) rows = pillow_filter == PILLOW_BICUBIC ? bicubic_rows_avx2 : bilinear_rows_avx2;
#endif
    if (src_w <= 0 || src_h <= 0 || out_w < 0 || out_h < 0) return AFFINE_FALLBACK;
    rows(src, src_w, src_h, a, out_w, out_h, fill, out);
    return AFFINE_OK;
}
