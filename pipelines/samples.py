"""Sample galleries made locally: public-domain scikit-image photos and a hostile-input corpus."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image


def _skimage(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def astronaut(size: int | None = None) -> Image.Image:
    """NASA portrait (public domain): MTCNN finds exactly one face."""
    img = _skimage("astronaut")
    return img.resize((size, size), Image.Resampling.BILINEAR) if size else img


def no_face_images() -> dict[str, Image.Image]:
    """Public-domain scikit-image photos in which MTCNN finds no face."""
    return {name: _skimage(name) for name in ("coffee", "chelsea", "rocket")}


def composite(count: int, tile: int = 256) -> Image.Image:
    """`count` astronaut portraits side by side: an image with several faces."""
    canvas = Image.new("RGB", (tile * count, tile), (255, 255, 255))
    face = astronaut(tile)
    for i in range(count):
        canvas.paste(face.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 2 else face, (i * tile, 0))
    return canvas


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny PNG that claims a huge greyscale canvas (a decompression bomb)."""
    raw = zlib.compress(b"\x00" * (width + 1) * 64, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def exif_rotated(img: Image.Image) -> bytes:
    """JPEG stored rotated with EXIF orientation 6: decoders must rotate it back upright."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif.tobytes(), quality=95)


def animated_gif(img: Image.Image) -> bytes:
    frames = [img.convert("P"), img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("P")]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def png16(img: Image.Image) -> bytes:
    grey = np.asarray(img.convert("L"), dtype=np.uint16) * 257
    return encode(Image.fromarray(grey), "PNG")


def palette_alpha(img: Image.Image) -> bytes:
    rgba = img.convert("RGBA")
    return encode(rgba.convert("P", palette=Image.Palette.ADAPTIVE), "PNG", transparency=0)


BAD_INPUTS: dict[str, Callable[[], bytes]] = {
    "truncated.jpg": lambda: encode(astronaut(), "JPEG", quality=90)[:4000],
    "page.jpg": lambda: b"<!doctype html><html><body>not a photo</body></html>",
    "empty.jpg": lambda: b"",
    "bomb.png": png_bomb,
}


def tricky_inputs() -> dict[str, bytes]:
    """Valid but awkward files that must decode to RGB (the astronaut face survives each)."""
    face = astronaut()
    return {
        "cmyk.jpg": encode(face.convert("CMYK"), "JPEG", quality=95),
        "deep16.png": png16(face),
        "rotated.jpg": exif_rotated(face),
        "animated.gif": animated_gif(face),
        "palette_alpha.png": palette_alpha(face),
        "grey.png": encode(face.convert("L"), "PNG"),
        "rgba.png": encode(face.convert("RGBA"), "PNG"),
    }


def write_sample_gallery(folder: Path, with_bad_inputs: bool = True) -> dict[str, int]:
    """The demo gallery: faces, no-face photos, a composite, a duplicate, awkward and hostile files."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {
        "people/astronaut.jpg": encode(astronaut(), "JPEG", quality=92),
        "people/astronaut-copy.jpg": encode(astronaut(), "JPEG", quality=92),
        "people/camera.png": encode(_skimage("camera"), "PNG"),
        "people/group-of-three.jpg": encode(composite(3), "JPEG", quality=92),
    }
    files |= {f"scenes/{name}.jpg": encode(img, "JPEG", quality=90) for name, img in no_face_images().items()}
    files |= {f"awkward/{name}": data for name, data in tricky_inputs().items()}
    if with_bad_inputs:
        files |= {f"bad/{name}": make() for name, make in BAD_INPUTS.items()}
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return {"files": len(files)}


def face_variants(img: Image.Image) -> dict[str, bytes]:
    """The same face photographed again, roughly: as taken, mirrored, rescaled, JPEG-recompressed."""
    w, h = img.size
    return {
        "as-taken.png": encode(img, "PNG"),
        "mirrored.png": encode(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "PNG"),
        "rescaled.png": encode(img.resize((int(w * 0.6), int(h * 0.6))).resize((w, h)), "PNG"),
        "jpeg-q40.jpg": encode(img, "JPEG", quality=40),
    }


def write_labelled_set(folder: Path) -> dict[str, int]:
    """A labelled folder for `gallerymatch evaluate`: one sub-folder per identity, the two public-domain faces
    scikit-image ships (NASA's astronaut, the cameraman) in variants, and one photo without a face."""
    identities = {"person-a": astronaut(), "person-b": _skimage("camera")}
    files = 0
    for name, img in identities.items():
        for rel, data in face_variants(img).items():
            (folder / name).mkdir(parents=True, exist_ok=True)
            (folder / name / rel).write_bytes(data)
            files += 1
    (folder / "person-a" / "no-face.jpg").write_bytes(encode(_skimage("coffee"), "JPEG", quality=90))
    return {"identities": len(identities), "files": files + 1}
