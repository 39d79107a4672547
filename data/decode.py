"""Image decoding under the bad-data policy: anything that does not give an RGB image is a BadSample."""
from __future__ import annotations

import io
import warnings

from PIL import Image

from .sources.base import CORRUPT, EMPTY, TOO_LARGE, BadSample, Record


def decode_image(record: Record) -> Image.Image:
    """The record's image as RGB, fully loaded (so truncation shows here, not in a transform).

    PIL only warns between MAX_IMAGE_PIXELS and twice that; the warning is raised as an error here so
    every image over the limit is refused, not just the ones over twice the limit.
    """
    if not record.image:
        raise BadSample(EMPTY, record.where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(record.image)) as image:
                return image.convert('RGB')
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadSample(TOO_LARGE, record.where, str(exc)) from None
    except Exception as exc:  # any decoder failure (format, truncation, allocation) means bad data
        raise BadSample(CORRUPT, record.where, f'{type(exc).__name__}: {exc}') from None
