"""Read an image's format and pixel size from its header, without decoding it (pure, no I/O).

Checking the header first lets a decompression bomb (a small PNG claiming 50 000 × 50 000 pixels)
be refused before any pixel buffer is allocated.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from edge_agent.face.errors import BadImage

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
# SOF markers carry the frame size; C4 (DHT), C8 (JPG extension) and CC (DAC) share the range.
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """What the header says: format and size in pixels."""

    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        """Number of pixels the full decode would produce."""
        return self.width * self.height


def probe(data: bytes) -> ImageHeader:
    """Return the header of a JPEG or PNG, or raise BadImage saying what is wrong."""
    if not data:
        raise BadImage("empty_image", "the image is empty")
    if data.startswith(PNG_MAGIC):
        return _probe_png(data)
    if data.startswith(JPEG_SOI):
        return _probe_jpeg(data)
    raise BadImage("not_an_image", "not a JPEG or PNG image", status=415)


def _probe_png(data: bytes) -> ImageHeader:
    # IHDR must be the first chunk: length(4) "IHDR" width(4) height(4) …
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise BadImage("image_truncated", "PNG header is incomplete")
    width, height = struct.unpack(">II", data[16:24])
    if width == 0 or height == 0:
        raise BadImage("not_an_image", "PNG declares zero size")
    if b"IEND" not in data[-12:]:
        raise BadImage("image_truncated", "PNG ends before its IEND chunk (truncated upload?)")
    return ImageHeader("png", width, height)


def _probe_jpeg(data: bytes) -> ImageHeader:
    pos, size, end = 2, None, len(data)
    while pos < end:
        if data[pos] != 0xFF:
            raise BadImage("not_an_image", f"JPEG marker expected at byte {pos}")
        while pos < end and data[pos] == 0xFF:  # fill bytes may precede a marker
            pos += 1
        if pos >= end:
            break
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE:
            continue
        if pos + 2 > end:
            break
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if length < 2:
            raise BadImage("not_an_image", "JPEG segment with impossible length")
        if marker in _SOF_MARKERS and pos + 7 <= end:
            height, width = struct.unpack(">HH", data[pos + 3 : pos + 7])
            size = (width, height)
        if marker == 0xDA:  # start of scan: entropy-coded data follows, header is over
            if size is None:
                raise BadImage("not_an_image", "JPEG has no frame header before its scan")
            # 0xFFD9 cannot occur inside entropy-coded data (0xFF is stuffed as FF00), so an EOI
            # after the scan start means the file was received to its end.
            if data.rfind(JPEG_EOI) < pos:
                raise BadImage("image_truncated", "JPEG ends before its end marker (truncated upload?)")
            width, height = size
            if width == 0 or height == 0:
                raise BadImage("not_an_image", "JPEG declares zero size")
            return ImageHeader("jpeg", width, height)
        pos += length
    raise BadImage("image_truncated", "JPEG ends inside its header")
