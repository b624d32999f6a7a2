"""Hardened image decoding: bytes -> an RGB PIL image, or a quarantine reason."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipelines.vocab import Reason

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never a grey half-image


@dataclass(frozen=True)
class DecodeLimits:
    """What the decoder accepts."""

    max_bytes: int
    max_pixels: int
    formats: tuple[str, ...]


@dataclass(frozen=True)
class Decoded:
    """A decoded image, EXIF orientation applied, converted to 8-bit RGB."""

    image: Image.Image
    format: str
    width: int
    height: int


@dataclass(frozen=True)
class Rejected:
    """Why an image cannot be used."""

    reason: Reason
    detail: str


def decode_image(data: bytes | None, limits: DecodeLimits) -> Decoded | Rejected:
    """Decode untrusted bytes; every failure is a `Rejected` with a reason, never an exception."""
    if data is None:
        return Rejected(Reason.MISSING_FIELD, "the image bytes are missing")
    if len(data) == 0:
        return Rejected(Reason.EMPTY, "zero-byte file")
    if len(data) > limits.max_bytes:
        return Rejected(Reason.TOO_LARGE_BYTES, f"{len(data)} bytes > limit {limits.max_bytes}")
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return _decode(data, limits)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return Rejected(Reason.TOO_MANY_PIXELS, f"decompression bomb guard: {exc}")
        except UnidentifiedImageError:
            allowed = ", ".join(limits.formats)
            return Rejected(Reason.UNSUPPORTED_FORMAT, f"not an image in an allowed format ({allowed})")
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            return _classify_load_error(exc)
        except Exception as exc:  # noqa: BLE001 - a hostile file must never crash the job
            return Rejected(Reason.UNDECODABLE, f"{type(exc).__name__}: {exc}")


def _decode(data: bytes, limits: DecodeLimits) -> Decoded | Rejected:
    img: Image.Image = Image.open(io.BytesIO(data), formats=list(limits.formats))
    fmt = img.format or "UNKNOWN"
    width, height = img.size
    if width <= 0 or height <= 0:
        return Rejected(Reason.UNDECODABLE, f"invalid dimensions {width}x{height}")
    if width * height > limits.max_pixels:
        return Rejected(Reason.TOO_MANY_PIXELS, f"{width}x{height} > limit {limits.max_pixels} pixels")
    img.seek(0)  # first frame of multi-frame files
    img.load()  # Image.open is lazy: force the full decode so truncation surfaces here
    img = _apply_orientation(img)
    rgb = to_rgb(img)
    return Decoded(rgb, fmt, rgb.width, rgb.height)


def _apply_orientation(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - malformed EXIF: keep the pixels as stored
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; alpha is composited on white, deep images are rescaled."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _deep_to_rgb(img)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _deep_to_rgb(img: Image.Image) -> Image.Image:
    arr = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        scaled = arr / 257.0
    else:
        top = float(arr.max()) if arr.size else 0.0
        scaled = arr * (255.0 / top) if top > 255.0 else arr
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def _classify_load_error(exc: BaseException) -> Rejected:
    text = str(exc)
    lowered = text.lower()
    if "truncated" in lowered or "broken data stream" in lowered or isinstance(exc, EOFError):
        return Rejected(Reason.TRUNCATED, text or type(exc).__name__)
    if "cannot identify" in lowered:
        return Rejected(Reason.UNSUPPORTED_FORMAT, text)
    return Rejected(Reason.UNDECODABLE, f"{type(exc).__name__}: {text}")
