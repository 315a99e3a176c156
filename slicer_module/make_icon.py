"""Draws the module's 128x128 icon (Resources/Icons/SFRSegmentation.png), as Slicer's
Extensions Index asks for: a 3x3 grid of axial slices stitched into one image (the method's
first step) with a segmented structure in colour across them. Standard library only
(zlib + struct for the PNG); run it again to regenerate the file: `python3 make_icon.py`."""
import math
import struct
import zlib
from pathlib import Path

SIZE = 128
OUT = Path(__file__).resolve().parent / "SFRSegmentation" / "Resources" / "Icons" / "SFRSegmentation.png"


def pixel(x: int, y: int):
    """RGBA of one pixel."""
    margin, gap = 6, 4
    cell = (SIZE - 2 * margin - 2 * gap) // 3
    cx, cy = x - margin, y - margin
    col, row = cx // (cell + gap), cy // (cell + gap)
    inx, iny = cx - col * (cell + gap), cy - row * (cell + gap)
    if not (0 <= col < 3 and 0 <= row < 3 and 0 <= inx < cell and 0 <= iny < cell):
        return (0, 0, 0, 0)  # transparent around and between the tiles
    k = row * 3 + col  # slice index: the structure grows then shrinks through the stack
    u, v = (inx + 0.5) / cell - 0.5, (iny + 0.5) / cell - 0.5
    body = (u / 0.46) ** 2 + (v / 0.40) ** 2
    if body > 1:
        return (28, 32, 40, 255)  # air around the body
    r_organ = 0.08 + 0.22 * math.sin(math.pi * (k + 1) / 10)
    organ = ((u - 0.08) / r_organ) ** 2 + ((v + 0.02) / (0.85 * r_organ)) ** 2
    grey = int(95 + 40 * (1 - body))
    if organ <= 1:
        edge = organ > 0.72
        return (250, 190, 60, 255) if edge else (221, 130, 101, 255)  # Slicer's "organ" colour, outlined
    return (grey, grey, grey + 6, 255)


def png(width: int, height: int, rows) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes(v for px in row for v in px) for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


if __name__ == "__main__":
    OUT.write_bytes(png(SIZE, SIZE, [[pixel(x, y) for x in range(SIZE)] for y in range(SIZE)]))
    print(f"wrote {OUT}")
