"""Reader for IDX files (the MNIST / Fashion-MNIST format), gzipped or not.

Format: two zero bytes, a type code, the number of dimensions, then one
big-endian uint32 per dimension, then the values in C order.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from consortia.common.errors import DataError

_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file into a NumPy array; raise `DataError` if it is not one."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: broken gzip stream ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header_end], dtype=">u4"))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header_end != expected:
        raise DataError(
            f"{path}: IDX header promises shape {shape} ({expected} bytes of data) "
            f"but the file holds {len(raw) - header_end}; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header_end).reshape(shape)


def find_idx_pair(folder: Path, split: str) -> tuple[Path, Path] | None:
    """Locate (images, labels) of `split` ('train' or 't10k') under their usual names."""
    for stem_images, stem_labels in (
        (f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"),
        (f"{split}-images.idx3-ubyte", f"{split}-labels.idx1-ubyte"),
    ):
        for suffix in (".gz", ""):
            images, labels = folder / (stem_images + suffix), folder / (stem_labels + suffix)
            if images.is_file() and labels.is_file():
                return images, labels
    return None
