/* Decode one rectangle of a JPEG with libjpeg-turbo's partial decompression (jpeg_crop_scanline and
 * jpeg_skip_scanlines, libjpeg-turbo >= 1.5): the training crop of data/crop_decode.py without the IDCT,
 * upsampling and colour conversion of the pixels outside it.
 *
 * The rectangle's pixels are the ones a full decode with Pillow's settings (JCS_RGB output, the ISLOW IDCT,
 * fancy upsampling) gives: the decoded band is widened by MARGIN pixels on every side, so the upsampling
 * filter sees the same neighbours at the rectangle's edges as it does in a full decode (tested against
 * Pillow in tests/test_jpeg_region.py). Anything else (a colour space other than YCbCr or greyscale, a
 * libjpeg warning such as corrupt or truncated data) returns REGION_FALLBACK, and the caller decodes the
 * whole file with Pillow, whose bad-data behaviour then applies unchanged.
 *
 * Built with resample.c, affine.c and lookup.c by `python -m data.jpeg_region` (the Makefile does it): cc -O2
 * -shared -fPIC, linked against the libjpeg-turbo in Pillow's wheel (else -ljpeg). Bump HELPER_ABI_VERSION
 * (resample.c) whenever its interface changes. */
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

#define REGION_OK 0
#define REGION_FALLBACK 1
#define REGION_BAD_ARGUMENT 2
#define MARGIN 16

struct region_error {
    struct jpeg_error_mgr mgr;
    jmp_buf escape;
};

static void on_error(j_common_ptr cinfo) {
    longjmp(((struct region_error *)cinfo->err)->escape, 1);
}

/* Warnings are counted (the caller falls back on any), never printed. */
static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) cinfo->err->num_warnings++;
}

/* Writes rows top..top+height-1, columns left..left+width-1 of the 1/scale_denom decode as packed RGB
 * (width * height * 3 bytes) into out. Coordinates are in the scaled image. */
int unicl_jpeg_region(const unsigned char *data, unsigned long size, int scale_denom, int left, int top,
                      int width, int height, unsigned char *out) {
    struct jpeg_decompress_struct cinfo;
    struct region_error error;
    unsigned char *volatile row = NULL;
    volatile int status = REGION_OK;

    cinfo.err = jpeg_std_error(&error.mgr);
    error.mgr.error_exit = on_error;
    error.mgr.emit_message = on_message;
    if (setjmp(error.escape)) {
        free(row);
        jpeg_destroy_decompress(&cinfo);
        return REGION_FALLBACK;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, size);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space != JCS_YCbCr && cinfo.jpeg_color_space != JCS_GRAYSCALE) {
        jpeg_destroy_decompress(&cinfo);
        return REGION_FALLBACK;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = scale_denom;
    jpeg_start_decompress(&cinfo);

    int image_width = (int)cinfo.output_width, image_height = (int)cinfo.output_height;
    if (left < 0 || top < 0 || width <= 0 || height <= 0 || left + width > image_width ||
        top + height > image_height) {
        jpeg_destroy_decompress(&cinfo);
        return REGION_BAD_ARGUMENT;
    }
    int band_left = left > MARGIN ? left - MARGIN : 0;
    int band_right = left + width + MARGIN < image_width ? left + width + MARGIN : image_width;
    JDIMENSION x = band_left, band_width = band_right - band_left;
    if (band_width < (JDIMENSION)image_width)
        jpeg_crop_scanline(&cinfo, &x, &band_width); /* widens the band to whole iMCUs */
    int first_row = top > MARGIN ? top - MARGIN : 0;
    if (first_row > 0) jpeg_skip_scanlines(&cinfo, first_row);

    row = malloc((size_t)band_width * 3);
    if (row == NULL) {
        jpeg_destroy_decompress(&cinfo);
        return REGION_FALLBACK;
    }
    JSAMPROW rows[1] = {row};
    for (int y = first_row; y < top + height; y++) {
        jpeg_read_scanlines(&cinfo, rows, 1);
        if (y >= top)
            memcpy(out + (size_t)(y - top) * width * 3, row + (size_t)(left - (int)x) * 3, (size_t)width * 3);
    }
    if (cinfo.err->num_warnings > 0) status = REGION_FALLBACK;
    free(row);
    jpeg_abort_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return status;
}
