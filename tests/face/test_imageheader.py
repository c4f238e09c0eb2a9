"""Header probing and decoding limits: bad input is refused with a reason, bombs before decoding."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from edge_agent.face.errors import BadImage
from edge_agent.face.imageheader import probe

pytestmark = pytest.mark.face


def png_bytes(width: int, height: int, idat: bytes) -> bytes:
    """A PNG with the given IHDR size and IDAT payload (8-bit grey)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_bomb(side: int) -> bytes:
    """A real, decodable grey PNG of side×side zeros: tiny on the wire, huge once decoded."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    parts = [comp.compress(row) for _ in range(side)]
    return png_bytes(side, side, b"".join(parts) + comp.flush())


def test_probe_reads_jpeg_and_png_sizes(frames: object) -> None:
    from tests.face.frames import png

    head = probe(frames.obama_live)  # type: ignore[attr-defined]
    assert (head.format, head.width, head.height) == ("jpeg", 640, 480)
    small = np.zeros((30, 40, 3), dtype=np.uint8)
    head = probe(png(small))
    assert (head.format, head.width, head.height) == ("png", 40, 30)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_image"),
        (b"name,amount\nzhang,1200\n", "not_an_image"),
        (b"GIF89a\x01\x00\x01\x00", "not_an_image"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "image_truncated"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "image_truncated"),
    ],
)
def test_probe_refuses_what_is_not_a_whole_image(data: bytes, reason: str) -> None:
    with pytest.raises(BadImage) as err:
        probe(data)
    assert err.value.reason == reason


def test_truncated_jpeg_is_refused_even_though_opencv_would_decode_half_of_it(
    frames: object,
) -> None:
    data = frames.obama_live  # type: ignore[attr-defined]
    with pytest.raises(BadImage) as err:
        probe(data[: len(data) // 2])
    assert err.value.reason == "image_truncated"


def test_png_bomb_is_refused_from_its_header_before_any_decode() -> None:
    from edge_agent.face.decode import ImageLimits, decode_image

    limits = ImageLimits(max_bytes=4 << 20, max_pixels=16_000_000, max_side=8192)
    # Header claims 50 000² pixels over garbage data: had it been decoded, the reason would be
    # "image_corrupt"; "image_too_large" proves the header check ran first.
    fake = png_bytes(50_000, 50_000, b"not really deflate data")
    with pytest.raises(BadImage) as err:
        decode_image(fake, limits)
    assert (err.value.reason, err.value.status) == ("image_too_large", 413)
    real = png_bomb(6000)  # 36 Mpx, ~35 KB compressed
    assert len(real) < 64 * 1024
    with pytest.raises(BadImage) as err:
        decode_image(real, limits)
    assert err.value.reason == "image_too_large"


def test_decode_refuses_too_many_bytes_and_accepts_a_normal_frame(frames: object) -> None:
    from edge_agent.face.decode import ImageLimits, decode_image

    data = frames.obama_live  # type: ignore[attr-defined]
    with pytest.raises(BadImage) as err:
        decode_image(data, ImageLimits(max_bytes=len(data) - 1, max_pixels=10**7, max_side=8192))
    assert err.value.reason == "image_too_large"
    rgb = decode_image(data, ImageLimits(max_bytes=len(data), max_pixels=640 * 480, max_side=640))
    assert rgb.shape == (480, 640, 3) and rgb.dtype == np.uint8
