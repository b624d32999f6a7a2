"""Hardened decoding against a hostile-input corpus the tests make themselves."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines import samples
from pipelines.decode import Decoded, DecodeLimits, Rejected, decode_image
from pipelines.settings import DEFAULT_FORMATS
from pipelines.vocab import Reason

LIMITS = DecodeLimits(max_bytes=20 * 1024 * 1024, max_pixels=40_000_000, formats=DEFAULT_FORMATS)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("truncated.jpg", Reason.TRUNCATED),
        ("page.jpg", Reason.UNSUPPORTED_FORMAT),
        ("empty.jpg", Reason.EMPTY),
        ("bomb.png", Reason.TOO_MANY_PIXELS),
    ],
)
def test_bad_inputs_are_rejected_with_a_reason(name: str, reason: Reason) -> None:
    result = decode_image(samples.BAD_INPUTS[name](), LIMITS)
    assert isinstance(result, Rejected)
    assert result.reason is reason
    assert result.detail


def test_missing_bytes_and_byte_cap() -> None:
    missing = decode_image(None, LIMITS)
    assert isinstance(missing, Rejected) and missing.reason is Reason.MISSING_FIELD
    small = DecodeLimits(max_bytes=100, max_pixels=LIMITS.max_pixels, formats=LIMITS.formats)
    big = decode_image(samples.encode(samples.astronaut(), "PNG"), small)
    assert isinstance(big, Rejected) and big.reason is Reason.TOO_LARGE_BYTES


@pytest.mark.parametrize("factor", [1.5, 3.0, 0.9])
def test_pixel_cap_between_warning_and_error(factor: float) -> None:
    """PIL warns between 1x and 2x its limit and raises above 2x; both must become a rejection."""
    limits = DecodeLimits(LIMITS.max_bytes, max_pixels=int(400 * 400 / factor), formats=LIMITS.formats)
    data = samples.encode(Image.new("RGB", (400, 400), (10, 20, 30)), "PNG")
    result = decode_image(data, limits)
    if factor < 1:
        assert isinstance(result, Decoded)
    else:
        assert isinstance(result, Rejected) and result.reason is Reason.TOO_MANY_PIXELS


def test_huge_dimensions_refused_before_decoding() -> None:
    result = decode_image(samples.png_bomb(30000, 30000), LIMITS)
    assert isinstance(result, Rejected) and result.reason is Reason.TOO_MANY_PIXELS


def test_format_allow_list() -> None:
    bmp = samples.encode(Image.new("RGB", (32, 32)), "BMP")
    only_jpeg = DecodeLimits(LIMITS.max_bytes, LIMITS.max_pixels, ("JPEG",))
    assert isinstance(decode_image(bmp, LIMITS), Decoded)
    rejected = decode_image(bmp, only_jpeg)
    assert isinstance(rejected, Rejected) and rejected.reason is Reason.UNSUPPORTED_FORMAT


@pytest.mark.parametrize("name", sorted(samples.tricky_inputs()))
def test_awkward_files_become_8bit_rgb(name: str) -> None:
    original = np.asarray(samples.astronaut(), dtype=np.float64)
    result = decode_image(samples.tricky_inputs()[name], LIMITS)
    assert isinstance(result, Decoded), result
    assert result.image.mode == "RGB"
    assert (result.width, result.height) == (512, 512)
    pixels = np.asarray(result.image, dtype=np.float64)
    grey_original = original.mean(axis=2)
    # upright and not mangled: close to the original in brightness (16-bit scaled, not clipped to white)
    assert np.abs(pixels.mean(axis=2) - grey_original).mean() < 20


def test_exif_orientation_is_applied() -> None:
    upright = samples.astronaut()
    result = decode_image(samples.exif_rotated(upright), LIMITS)
    assert isinstance(result, Decoded)
    diff_upright = np.abs(np.asarray(result.image, float) - np.asarray(upright, float)).mean()
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    diff_stored = np.abs(np.asarray(result.image, float) - np.asarray(stored, float)).mean()
    assert diff_upright < 5 < diff_stored


def test_first_frame_of_animation() -> None:
    face = samples.astronaut()
    result = decode_image(samples.animated_gif(face), LIMITS)
    assert isinstance(result, Decoded)
    first = np.asarray(face, float)
    mirrored = np.asarray(face.transpose(Image.Transpose.FLIP_LEFT_RIGHT), float)
    got = np.asarray(result.image, float)
    assert np.abs(got - first).mean() < np.abs(got - mirrored).mean()


def test_sixteen_bit_is_rescaled_not_clipped() -> None:
    ramp = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)
    result = decode_image(samples.encode(Image.fromarray(ramp), "PNG"), LIMITS)
    assert isinstance(result, Decoded)
    grey = np.asarray(result.image)[:, :, 0]
    assert grey.min() == 0 and grey.max() == 255
    assert len(np.unique(grey)) > 200
