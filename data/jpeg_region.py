"""The images' pixel work in C, with Pillow's pixels: only the training crop's rectangle of a JPEG decoded
(data/jpeg_region.c, libjpeg-turbo's partial decode), resized by Pillow's resize algorithm with SIMD
(data/resample.c; the evaluation Resize -> CenterCrop too), RandAugment's rotate / shear / translate by
Pillow's affine algorithm (data/affine.c), and a CPU batch's normalisation as one table lookup (data/lookup.c).

Pillow decodes whole images; the C helper skips the IDCT, upsampling and colour conversion of everything
outside the crop box and hands back the box's pixels exactly as Pillow's full decode has them; its resize
and affine transform give Pillow's bit for bit, about 3x faster (tests/test_jpeg_region.py). It is an
optional accelerator: built by `make` (or `python -m data.jpeg_region`) with the C compiler, and
libjpeg-turbo's headers for the decode, where they exist; without it, or for an input it declines, Pillow
does the work as before. `describe()` says which is in use (logged when training starts).

    python -m data.jpeg_region            # build data/_jpeg_region.so
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import os
import shutil
import subprocess
import sys
from functools import lru_cache
from typing import Callable, NamedTuple, Optional, Tuple, Union

import PIL
from PIL import Image

from .decode import ends_in_end_of_image

HERE = os.path.dirname(os.path.abspath(__file__))
PIXEL_SOURCES = [os.path.join(HERE, name) for name in ('resample.c', 'affine.c', 'lookup.c')]  # need no libjpeg
JPEG_SOURCE = os.path.join(HERE, 'jpeg_region.c')
LIBRARY = os.path.join(HERE, '_jpeg_region.so')
ABI_VERSION = 5  # HELPER_ABI_VERSION in resample.c
OK, FALLBACK, BAD_ARGUMENT = 0, 1, 2
READ_SLACK = 8  # bytes resample.c and affine.c may read past an image's last pixel
C_FILTERS = (Image.BILINEAR, Image.BICUBIC)  # the Pillow filters the C code reproduces


def pillow_libjpeg() -> Optional[str]:
    """The libjpeg-turbo that Pillow's wheel bundles (under a name of its own), if it bundles one."""
    bundled = glob.glob(os.path.join(os.path.dirname(os.path.dirname(PIL.__file__)), 'pillow.libs', 'libjpeg*.so*'))
    return sorted(bundled)[0] if bundled else None


def build(output: str = LIBRARY, compiler: Optional[str] = None, defines: Tuple[str, ...] = (),
          jpeg: bool = True) -> str:
    """Compile resample.c, affine.c, lookup.c and (`jpeg`) jpeg_region.c into `output`; raises RuntimeError
    with the compiler's message on failure. `defines` (e.g. UNICL_NO_AVX2, for the tests of the portable loops)
    become -D flags. Without `jpeg` the library needs no libjpeg: crops are then decoded by Pillow, resized in C.

    With `jpeg` it links Pillow's own libjpeg-turbo where Pillow's wheel bundles one: the decoder whose pixels it
    must reproduce, and a name no other library in the process has. A plain `-ljpeg` (soname libjpeg.so.62) would
    be satisfied by whichever libjpeg.so.62 the process loaded first: torchvision 0.19 bundles an older one
    without jpeg_skip_scanlines."""
    compiler = compiler or os.environ.get('CC') or shutil.which('cc') or shutil.which('gcc')
    if compiler is None:
        raise RuntimeError('no C compiler (cc or gcc) found')
    partial = f'{output}.{os.getpid()}.tmp'
    sources, libjpeg = PIXEL_SOURCES, []
    if jpeg:
        bundled = pillow_libjpeg()
        sources = sources + [JPEG_SOURCE]
        libjpeg = [bundled, f'-Wl,-rpath,{os.path.dirname(bundled)}'] if bundled else ['-ljpeg']
    # No contraction of a * b + c into FMAs: the results must round as Pillow's (x86-64 wheels) do.
    flags = ['-O2', '-shared', '-fPIC', '-ffp-contract=off'] + [f'-D{name}' for name in defines]
    command = [compiler] + flags + sources + ['-o', partial] + libjpeg
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f'{" ".join(command)} failed:\n{result.stderr.strip()}')
    os.replace(partial, output)  # atomic: a worker never loads a half-written library
    return output


class Helper(NamedTuple):
    library: Optional[ctypes.CDLL]  # None: not built, or not loadable
    decodes_jpeg: bool  # built with jpeg_region.c (it needs libjpeg-turbo's headers)
    description: str


_SIGNATURES = {  # C function -> argument types; all return an int status
    'unicl_jpeg_region': [ctypes.c_char_p, ctypes.c_ulong] + [ctypes.c_int] * 5 + [ctypes.c_char_p],
    'unicl_resample_rgb': ([ctypes.c_char_p] + [ctypes.c_int] * 2 + [ctypes.c_float] * 4 + [ctypes.c_int] * 7
                           + [ctypes.c_char_p]),
    'unicl_affine_rgb': ([ctypes.c_char_p] + [ctypes.c_int] * 2 + [ctypes.POINTER(ctypes.c_double)]
                         + [ctypes.c_int] * 3 + [ctypes.c_char_p] * 2),
    'unicl_lookup_planes': [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int,
                            ctypes.c_void_p],
}


@lru_cache(maxsize=None)
def _library() -> Helper:
    """The helper at LIBRARY, loaded, with a one-line description of what decodes and resizes the crops."""
    path = LIBRARY
    if not os.path.exists(path):
        return Helper(None, False, f'decoded whole by Pillow ({os.path.relpath(path)} not built: '
                                   'python -m data.jpeg_region)')
    try:
        library = ctypes.CDLL(path)
        abi = library.unicl_helper_abi()
    except (OSError, AttributeError) as exc:
        return Helper(None, False, f'decoded whole by Pillow ({path} does not load: {exc})')
    if abi != ABI_VERSION:
        return Helper(None, False, f'decoded whole by Pillow ({path} is ABI {abi}, not {ABI_VERSION}: rebuild it)')
    for name, argtypes in _SIGNATURES.items():
        if hasattr(library, name):  # unicl_jpeg_region only where libjpeg's headers were there
            getattr(library, name).restype = ctypes.c_int
            getattr(library, name).argtypes = argtypes
    decodes_jpeg = hasattr(library, 'unicl_jpeg_region')
    decoded = ("only the crop's rectangle decoded, by libjpeg-turbo" if decodes_jpeg else
               'decoded whole by Pillow (the helper was built without libjpeg-turbo\'s headers)')
    return Helper(library, decodes_jpeg, f"{decoded}; the crop's resize and RandAugment's affine ops in C, and a "
                                         f"CPU batch's normalisation ({path})")


def available() -> bool:
    return _library().library is not None


def describe() -> str:
    return _library().description


class RawRGB(NamedTuple):
    """Packed 8-bit RGB rows in a buffer with READ_SLACK bytes after them: what the C functions take."""
    buffer: Union[bytes, ctypes.Array]
    width: int
    height: int

    @classmethod
    def of(cls, image: Image.Image) -> 'RawRGB':
        rgb = image if image.mode == 'RGB' else image.convert('RGB')
        return cls(rgb.tobytes() + bytes(READ_SLACK), *image.size)  # read, never written, by the C code

    def image(self) -> Image.Image:
        return Image.frombuffer('RGB', (self.width, self.height), self.buffer, 'raw', 'RGB', 0, 1)


def decode_raw_region(data: bytes, scale: int, left: int, top: int, width: int, height: int) -> Optional[RawRGB]:
    """Pixels [top, top+height) x [left, left+width) of the 1/scale decode of JPEG `data`, or None where the
    helper is missing or declines (not YCbCr or greyscale, a libjpeg warning, no end-of-image marker last):
    the caller then decodes with Pillow, so bad data meets Pillow's checks.

    Rows below the box are never decoded, so damage there would go unseen; a file must end in the
    end-of-image marker, which a truncated file lacks."""
    helper = _library()
    if not helper.decodes_jpeg or not ends_in_end_of_image(data):
        return None
    out = ctypes.create_string_buffer(width * height * 3 + READ_SLACK)
    status = helper.library.unicl_jpeg_region(data, len(data), scale, left, top, width, height, out)
    if status == BAD_ARGUMENT:
        raise ValueError(f'box {(left, top, width, height)} at 1/{scale} lies outside the image')
    if status != OK:
        return None
    return RawRGB(out, width, height)


def decode_region(data: bytes, scale: int, left: int, top: int, width: int, height: int) -> Optional[Image.Image]:
    """decode_raw_region as an RGB image."""
    raw = decode_raw_region(data, scale, left, top, width, height)
    return None if raw is None else raw.image()


def resize(raw: RawRGB, size: Tuple[int, int], resample: int, box: Tuple[float, float, float, float],
           window: Optional[Tuple[int, int, int, int]] = None) -> Optional[Image.Image]:
    """`raw.image().resize(size, resample, box=box)`, the same pixels, computed by data/resample.c, or with
    `window` (left, top, width, height) only that part of it, `.crop(...)` of the resized image without the
    rest; None where the helper is missing or does not do it (filters other than Pillow's BILINEAR and
    BICUBIC, a window outside the result)."""
    library = _library().library
    if library is None:
        return None
    left, top, width, height = window or (0, 0, *size)
    out = ctypes.create_string_buffer(width * height * 3)
    if library.unicl_resample_rgb(raw.buffer, raw.width, raw.height, *box, int(resample), *size, left, top, width,
                                  height, out) != OK:
        return None
    return Image.frombuffer('RGB', (width, height), out, 'raw', 'RGB', 0, 1)


def lookup_planes(source: int, destination: int, planes: int, plane_size: int, channels: int, table: int) -> bool:
    """destination[i] = table[c][source[i]] over `planes` planes of `plane_size` uint8 values at address
    `source`, float32 out at `destination`, plane p through row c = p % channels of the float32 [channels,
    256] `table` (data/lookup.c); False where the helper is missing (the caller computes it otherwise)."""
    library = _library().library
    if library is None:
        return False
    if library.unicl_lookup_planes(source, destination, planes, plane_size, channels, table) != OK:
        raise ValueError(f'lookup_planes: bad shape ({planes} planes of {plane_size}, {channels} channels)')
    return True


def _rgb_fill(fillcolor) -> Optional[bytes]:
    """The fill colour as 3 bytes where it is None (black) or an RGB triple, else None (left to Pillow)."""
    if fillcolor is None:
        return bytes(3)
    if isinstance(fillcolor, (tuple, list)) and len(fillcolor) == 3 and all(
            isinstance(v, int) and 0 <= v <= 255 for v in fillcolor):
        return bytes(fillcolor)
    return None


def affine(image: Image.Image, size: Tuple[int, int], data, resample: int, fillcolor=None) -> Optional[Image.Image]:
    """`image.transform(size, Image.AFFINE, data, resample, fillcolor=fillcolor)`, the same pixels, computed by
    data/affine.c; None where the helper is missing or does not do it (modes other than RGB, filters other than
    BILINEAR and BICUBIC, fill colours other than None or an RGB triple)."""
    library, fill = _library().library, _rgb_fill(fillcolor)
    if library is None or fill is None or image.mode != 'RGB' or resample not in C_FILTERS or len(data) < 6:
        return None
    raw = RawRGB.of(image)
    out = ctypes.create_string_buffer(size[0] * size[1] * 3)
    matrix = (ctypes.c_double * 6)(*data[:6])
    if library.unicl_affine_rgb(raw.buffer, raw.width, raw.height, matrix, int(resample), *size, fill, out) != OK:
        return None
    result = Image.frombuffer('RGB', size, out, 'raw', 'RGB', 0, 1)
    result.info = image.info.copy()
    return result


class CAffineImage(Image.Image):
    """A PIL image whose AFFINE transform (and so `rotate`) runs in data/affine.c where it can, with the same
    pixels; everything else is Pillow's. `with_c_affine` gives timm's augment ops such images."""

    def transform(self, size, method, data=None, resample=Image.NEAREST, fill=1, fillcolor=None):
        if method == Image.AFFINE and data is not None:
            result = affine(self, tuple(size), data, resample, fillcolor)
            if result is not None:
                return result
        return super().transform(size, method, data, resample, fill, fillcolor)


def with_c_affine(operation: Callable, image: Image.Image, *args, **kwargs):
    """operation(image, ...) with `image` turned into a CAffineImage: timm's rotate, shear and translate ops
    compute their matrices as before and end in its `transform`. (The class of a plain Image can be swapped:
    it has no slots, and CAffineImage adds no state.)"""
    if type(image) is Image.Image and image.mode == 'RGB':
        image.__class__ = CAffineImage
    return operation(image, *args, **kwargs)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description='Build the optional C helper (crop decode, resize, affine ops).')
    parser.add_argument('--output', default=LIBRARY)
    parser.add_argument('--quiet-failure', action='store_true',
                        help='exit 0 when it cannot be built (Pillow then does the work)')
    args = parser.parse_args(argv)
    try:
        print(f'built {build(args.output)}')
        return
    except RuntimeError as exc:
        print(f'data.jpeg_region: the JPEG region decoder cannot be built, JPEGs will be decoded by Pillow: {exc}',
              file=sys.stderr)
    try:
        print(f'built {build(args.output, jpeg=False)} (resize, affine ops and normalisation only)')
    except RuntimeError as exc:
        print(f'data.jpeg_region: not built, Pillow will decode and resize: {exc}', file=sys.stderr)
        sys.exit(0 if args.quiet_failure else 1)


if __name__ == '__main__':
    main()
