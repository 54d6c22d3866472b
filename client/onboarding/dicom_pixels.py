"""From one decoded DICOM frame to an image on [0, 1] of the schema's size and colour mode.

Monochrome frames go through the DICOM display pipeline as far as it is
defined by the file: the modality LUT (Rescale Slope / Intercept, or a
Modality LUT Sequence), then a window: the schema's `[source.window]`
when given (one window for every node's images: the same tissue gets the
same value everywhere), else the file's VOI LUT Sequence, else its first
Window Center / Width pair, else the image's own minimum and maximum.
MONOCHROME1 frames (low values bright) are inverted after windowing, so
that bright is 1 for every file. Colour frames (RGB, YBR decoded to RGB by
pydicom, PALETTE COLOR through its palette) take no window: their values
are divided by their largest possible value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from consortia.client.onboarding.dicom_summary import Photometric, Unusable, Windowing
from consortia.client.onboarding.schema import ColourMode, DicomWindow

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# ITU-R 601-2 luma, the weights Pillow's "L" conversion uses for image folders.
_LUMA = np.array([0.299, 0.587, 0.114])
_VOI_LUT_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


class UnusableImageError(Exception):
    """A file or frame that gives no image.

    `kind` says why; `reason`, where the kind alone does not, what is wrong
    and what to do (it never quotes a header value).
    """

    def __init__(self, kind: Unusable, reason: str = "") -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def frame_image(
    ds: Dataset, frame: np.ndarray, photometric: Photometric, window: DicomWindow | None
) -> tuple[np.ndarray, Windowing]:
    """The frame on [0, 1] (float64, (rows, columns) or (rows, columns, 3)) and its windowing."""
    from pydicom.pixels.processing import apply_color_lut, apply_modality_lut

    if photometric.monochrome:
        values = np.asarray(apply_modality_lut(frame, ds), dtype=np.float64)
        image, windowing = _windowed(values, ds, window)
        if photometric == Photometric.MONOCHROME1:
            image = 1.0 - image
    elif photometric == Photometric.PALETTE_COLOR:
        try:
            rgb = np.asarray(apply_color_lut(frame, ds))
        except Exception:  # untrusted header: pydicom raises many types on a broken palette
            raise UnusableImageError(
                Unusable.UNSUPPORTED,
                "its colour palette cannot be applied (missing or damaged palette tables); "
                "export the image as RGB or remove it",
            ) from None
        image = rgb[..., :3].astype(np.float64) / float(np.iinfo(rgb.dtype).max)
        windowing = Windowing.COLOUR
    else:
        image = frame.astype(np.float64) / float(2 ** _bits_stored(ds, frame) - 1)
        windowing = Windowing.COLOUR
    return np.clip(image, 0.0, 1.0), windowing


def fit(image: np.ndarray, mode: ColourMode, size: tuple[int, int]) -> np.ndarray:
    """`image` on [0, 1] in the schema's colour mode, resized (bilinear) to `size`: float32."""
    from PIL import Image

    if mode == "grayscale" and image.ndim == 3:
        image = image @ _LUMA
    elif mode == "rgb" and image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    height, width = size
    planes = [image] if image.ndim == 2 else [image[..., c] for c in range(image.shape[2])]
    resized = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32)).resize(
                (width, height), Image.Resampling.BILINEAR
            )
        )
        for plane in planes
    ]
    out = resized[0] if len(resized) == 1 else np.stack(resized, axis=-1)
    fitted: np.ndarray = np.clip(out, 0.0, 1.0).astype(np.float32)
    return fitted


# ------------------------------------------------------------------ windowing


def _windowed(
    values: np.ndarray, ds: Dataset, window: DicomWindow | None
) -> tuple[np.ndarray, Windowing]:
    if window is not None:
        return linear_window(values, window.center, window.width), Windowing.SCHEMA
    if ds.get("VOILUTSequence"):
        return _voi_lut(values, ds), Windowing.VOI_LUT
    file_window = _file_window(ds)
    if file_window is not None:
        center, width, function = file_window
        if function == "LINEAR":
            return linear_window(values, center, width), Windowing.FILE_WINDOW
        if function == "LINEAR_EXACT":
            return np.clip((values - center) / width + 0.5, 0.0, 1.0), Windowing.FILE_WINDOW
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width)), Windowing.FILE_WINDOW
    low, high = float(values.min()), float(values.max())
    if high <= low:  # a blank image: every pixel the same
        return np.zeros_like(values), Windowing.IMAGE_RANGE
    return (values - low) / (high - low), Windowing.IMAGE_RANGE


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's LINEAR window onto [0, 1] (PS3.3 C.11.2.1.2.1); `width` >= 1."""
    if width <= 1.0:  # the standard's limit: a threshold at center - 0.5
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _file_window(ds: Dataset) -> tuple[float, float, str] | None:
    """The file's first Window Center / Width and its function, or None if none is usable.

    A window the standard does not allow (LINEAR narrower than 1, a width
    of 0, an unknown function) counts as none: the image's range is used,
    and the quality report's windowing counts show it.
    """
    try:
        center, width = _first_number(ds.get("WindowCenter")), _first_number(ds.get("WindowWidth"))
        function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    except (TypeError, ValueError):
        return None
    if center is None or width is None or function not in _VOI_LUT_FUNCTIONS:
        return None
    if not (np.isfinite(center) and np.isfinite(width)):
        return None
    if width < (1.0 if function == "LINEAR" else np.finfo(float).tiny):
        return None
    return center, width, function


def _first_number(value: object) -> float | None:
    """A DS value as a number: the first of several (pydicom's MultiValue is a Sequence)."""
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        if not value:
            return None
        value = value[0]
    text = "" if value is None else str(value).strip()
    return float(text) if text else None


def _voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """The file's first VOI LUT onto [0, 1]: entries divided by the largest the LUT can hold."""
    from pydicom.pixels.processing import apply_voi

    try:
        entries, first, bits = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor)
        entries = entries or 2**16
        # pydicom's apply_voi indexes with unsigned 16-bit offsets: clip to the
        # LUT's input range first, so that no offset wraps around.
        inputs = np.clip(np.rint(values), first, first + entries - 1).astype(np.int64)
        mapped = np.asarray(apply_voi(inputs, ds, 0), dtype=np.float64)
    except Exception:  # untrusted header: a broken LUT raises many types in pydicom
        raise UnusableImageError(
            Unusable.UNSUPPORTED,
            "its VOI LUT cannot be applied (damaged, or of a depth pydicom does not support); "
            "set a window for every image in the schema ([source] window = { center = …, "
            "width = … }) or remove the file",
        ) from None
    return mapped / float(2**bits - 1)


def _bits_stored(ds: Dataset, frame: np.ndarray) -> int:
    try:
        bits = int(ds.get("BitsStored") or 0)
    except (TypeError, ValueError):
        bits = 0
    if bits <= 0:  # fall back on the decoded array's own width
        bits = 8 * frame.dtype.itemsize
    return bits
