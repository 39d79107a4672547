"""Image decoding under the bad-data policy: anything that does not give an RGB image is a BadSample.

Decoding is split in two so that a caller can look at the header before paying for the pixels
(data/crop_decode.py picks the training crop from the header size and decodes at a reduced scale):
`open_image` parses the header, `load_rgb` decodes; `decode_image` is both.
"""
from __future__ import annotations

import io
import warnings

from PIL import Image

from .sources.base import CORRUPT, EMPTY, TOO_LARGE, BadSample, Record

END_OF_IMAGE = b'\xff\xd9'  # JPEG's EOI marker


def open_image(record: Record) -> Image.Image:
    """The record's image opened lazily: size, mode and format known, pixels not decoded yet.

    PIL checks the pixel count against MAX_IMAGE_PIXELS when it opens an image and only warns between
    the limit and twice that; the warning is raised as an error here so every image over the limit is
    refused, not just the ones over twice the limit.
    """
    if not record.image:
        raise BadSample(EMPTY, record.where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(record.image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadSample(TOO_LARGE, record.where, str(exc)) from None
    except Exception as exc:  # an unknown format or a broken header means bad data
        raise BadSample(CORRUPT, record.where, f'{type(exc).__name__}: {exc}') from None


def ends_in_end_of_image(data: bytes) -> bool:
    """Whether a JPEG's bytes end in its end-of-image marker (zero padding after it is common): a truncated
    file does not. Decoders that skip part of the file use it to leave such files to Pillow's checks."""
    return data.rstrip(b'\0').endswith(END_OF_IMAGE)


def load_rgb(record: Record, image: Image.Image) -> Image.Image:
    """An image from `open_image` decoded as RGB, fully loaded (so truncation shows here, not in a
    transform)."""
    try:
        return image.convert('RGB')
    except Exception as exc:  # any decoder failure (truncation, allocation) means bad data
        raise BadSample(CORRUPT, record.where, f'{type(exc).__name__}: {exc}') from None


def decode_image(record: Record) -> Image.Image:
    """The record's image as RGB, fully loaded."""
    with open_image(record) as image:
        return load_rgb(record, image)
