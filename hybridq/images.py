"""Images as model inputs: decode, convert, resize, normalise, lay out (and the same normalisation for arrays).

Image conversions, explicit and in this order:
1. Decode with pillow; EXIF orientation is not applied (pixels as stored).
2. Mode: 16-bit grayscale (`I;16*`, `I`) is divided by 257 into 0-255 and
   clipped; other 16-bit files (colour, gray with alpha) keep each value's
   high byte (pillow's decoding); `1`/`L`/`LA` become one gray channel (alpha
   dropped); `P`/`PA` go through RGBA to RGB; every other mode (`RGBA`,
   `CMYK`, `YCbCr`...) is converted to RGB, so alpha is dropped, never
   composited.
3. Channels: gray is replicated to 3 channels when the model wants 3; colour
   becomes one channel for a 1-channel model by ITU-R 601-2 luma
   (0.299 R + 0.587 G + 0.114 B), computed in float32.
4. Resize to the model's H, W: `none` (a mismatch is an error), `stretch`
   (pillow bilinear on float32 channels) or `letterbox` (keep aspect, center,
   pad with pixel value 0 before normalisation). A symbolic H or W takes the
   image's own size (`stretch`, `none`) or the aspect-kept size (`letterbox`).
5. Colour order: `bgr` reverses the channels; mean/std are given in the
   order fed to the model.
6. `(x - mean) / std` in float32, 0-255 pixel units (RKNN mean_values).
7. Layout `nchw` transposes HWC to CHW; a leading batch dim of 1 is added and
   the result cast to the input's dtype (integer inputs: rounded and clipped,
   noted when clipping changed a pixel, and only without mean/std).

Steps 2 and 3 change what the file holds (alpha dropped, gray copied to three
channels, colour to gray, 16 bits to 8, CMYK/YCbCr to RGB); `Dataset.notes()`
says which happened, once per kind of change, with a count and the first file.

:func:`normalize_input` applies the same mean/std and layout to an array that is
already pixels (the RKNN facade's ``inference`` on raw images).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import DatasetError, InputError
from .inputs import IMAGE_EXTENSIONS, Dim, InputSpec, Preprocess, fmt_shape

if TYPE_CHECKING:  # Pillow is imported when an image is read (a .npy dataset never loads it)
    from PIL import Image

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_GRAY_MODES = ("1", "L", "LA")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


@dataclass(frozen=True)
class ImagePlan:
    """How images become one input: layout, channel count, target size, mean and std."""

    layout: str
    channels: int
    height: int | None
    width: int | None
    mean: np.ndarray | None
    std: np.ndarray | None



def normalize(x: np.ndarray, mean: Any, std: Any, axis: int) -> np.ndarray:
    """``(x - mean) / std`` in float32, ``mean`` and ``std`` (1 or one value per channel, or None) along ``axis``."""
    for vals, op in ((mean, np.subtract), (std, np.divide)):
        if vals is not None:
            shape = [1] * x.ndim
            shape[axis] = len(vals)
            x = op(x, np.asarray(vals, np.float32).reshape(shape))
    return x


def image_plan(spec: InputSpec, pre: Preprocess) -> ImagePlan:
    """Work out how images feed `spec`, refusing inputs images cannot feed."""
    shape = spec.shape
    if len(shape) != 4:
        raise DatasetError(
            f"input {spec.name!r} has shape {fmt_shape(shape)}, but images can only feed 4-D inputs (NCHW or NHWC); "
            "feed it with .npy/.npz files or a preprocess hook."
        )
    if spec.dtype.kind not in "fiu":
        raise DatasetError(
            f"input {spec.name!r} has dtype {spec.dtype}, which images cannot feed;"
            " use .npy/.npz files or a preprocess hook."
        )
    layout = pre.layout or _infer_layout(spec)
    c_dim, height, width = (shape[1], shape[2], shape[3]) if layout == "nchw" else (shape[3], shape[1], shape[2])
    channels = c_dim if isinstance(c_dim, int) else 3
    if channels not in (1, 3):
        raise DatasetError(
            f"input {spec.name!r} (shape {fmt_shape(shape)}, layout {layout}) wants {channels} channels, but images give 1 or 3; "
            "check the layout option or feed .npy/.npz files."
        )
    mean = _per_channel(pre.mean, channels, "mean", spec)
    std = _per_channel(pre.std, channels, "std", spec)
    if spec.dtype.kind in "iu" and (mean is not None or std is not None):
        raise DatasetError(
            f"input {spec.name!r} is {spec.dtype}, but mean/std give fractional values; drop mean/std for this model "
            "(it normalises internally) or feed .npy files."
        )
    return ImagePlan(layout, channels, _fixed(height), _fixed(width), mean, std)


def _fixed(dim: Dim) -> int | None:
    """The size of a fixed dim, None for a symbolic one."""
    return dim if isinstance(dim, int) else None


def _infer_layout(spec: InputSpec) -> str:
    """NCHW when axis 1 has 1 or 3 channels, NHWC when axis 3 has, else ask the user."""
    if spec.shape[1] in (1, 3):
        return "nchw"
    if spec.shape[3] in (1, 3):
        return "nhwc"
    raise DatasetError(
        f"cannot infer the layout of input {spec.name!r} with shape {fmt_shape(spec.shape)}: neither axis 1 nor axis 3 "
        "has 1 or 3 channels; set layout to nchw or nhwc."
    )


def _per_channel(values: tuple[float, ...] | None, channels: int, what: str, spec: InputSpec) -> np.ndarray | None:
    """Broadcast one value to every channel, or check there is one value per channel."""
    if values is None:
        return None
    if len(values) not in (1, channels):
        raise DatasetError(
            f"{what} {list(values)} has {len(values)} values but input {spec.name!r} takes {channels}-channel images; "
            f"give 1 or {channels} values."
        )
    return np.broadcast_to(np.asarray(values, dtype=np.float32), (channels,)).copy()


def read_image(path: Path, spec: InputSpec, plan: ImagePlan, pre: Preprocess, where: str) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Decode, convert, resize, reorder, normalise and lay out one image for `spec`.

    Returns the array and the conversions that changed its content, each as (what, how) (see `Dataset.notes`).
    """
    from PIL import Image

    try:
        with Image.open(path) as image:
            deep = _sixteen_bit_raw(image)
            image.load()
            conversions = _mode_conversions(image) + deep
            pixels = _pixels(image)
    except Exception as exc:
        raise DatasetError(
            f"{where}: cannot read this image ({type(exc).__name__}: {exc}); check it is a valid "
            f"{'/'.join(e[1:].upper() for e in IMAGE_EXTENSIONS)} file or remove it from the dataset."
        ) from exc
    if plan.channels == 3 and pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
        conversions.append(("grayscale", f"the gray channel is copied to R, G and B for the 3-channel input {spec.name!r}"))
    elif plan.channels == 1 and pixels.shape[2] == 3:
        pixels = (pixels @ _LUMA)[..., np.newaxis]
        conversions.append(("colour", f"turned into one gray channel (0.299 R + 0.587 G + 0.114 B) for the 1-channel input {spec.name!r}"))
    pixels = _fit(pixels, plan, pre.resize, spec, where)
    if pre.color == "bgr":
        pixels = pixels[..., ::-1]
    pixels = normalize(pixels, plan.mean, plan.std, axis=2)
    if plan.layout == "nchw":
        pixels = pixels.transpose(2, 0, 1)
    batch = pixels[np.newaxis]
    if spec.dtype.kind in "iu":
        info = np.iinfo(spec.dtype)
        if batch.min() < info.min or batch.max() > info.max:
            conversions.append((f"pixels outside {spec.dtype} ({info.min}..{info.max})",
                                f"clipped to that range for the {spec.dtype} input {spec.name!r}; feed .npy samples holding "
                                "the values the model expects (an integer input takes no mean/std)"))
        batch = np.clip(np.rint(batch), info.min, info.max)
    return np.ascontiguousarray(batch, dtype=spec.dtype), conversions


def _mode_conversions(image: Image.Image) -> list[tuple[str, str]]:
    """The content changes `_pixels` makes to an image of this mode, as (what, how)."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        return [(f"16-bit pixels (mode {mode})", "divided by 257 into 0-255")]
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        return [("an alpha channel", "dropped, not composited over a background")]
    if mode not in _GRAY_MODES + ("RGB", "P"):
        return [(f"mode {mode}", "converted to RGB by pillow")]
    return []


def _sixteen_bit_raw(image: Image.Image) -> list[tuple[str, str]]:
    """A 16-bit file pillow decodes to 8 bits (colour, gray with alpha: each value's high byte), as a conversion; read before
    ``load()``, which drops the decoder's raw mode."""
    raw = [t[3] for t in getattr(image, "tile", None) or () if len(t) > 3 and isinstance(t[3], str)]
    if image.mode not in _SIXTEEN_BIT_MODES and any(";16" in r for r in raw):
        return [(f"16-bit pixels (raw mode {raw[0]})", "read as 8 bits (each value's high byte, about value / 257) by pillow")]
    return []


def _pixels(image: Image.Image) -> np.ndarray:
    """HxWxC float32 in 0-255 with C = 1 (gray) or 3 (RGB), per the module docstring."""
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = np.clip(np.asarray(image).astype(np.float32) / 257.0, 0.0, 255.0)
        return gray[..., np.newaxis]
    if image.mode in _GRAY_MODES:
        return np.asarray(image.convert("L"), dtype=np.float32)[..., np.newaxis]
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _fit(pixels: np.ndarray, plan: ImagePlan, mode: str, spec: InputSpec, where: str) -> np.ndarray:
    """Bring an image to the input's H, W per `mode`; symbolic dims follow the image."""
    height, width = pixels.shape[:2]
    target_h = plan.height if plan.height is not None else height
    target_w = plan.width if plan.width is not None else width
    if (height, width) == (target_h, target_w):
        return pixels
    if mode == "none":
        raise DatasetError(
            f"{where}: image is {width}x{height} (width x height) but input {spec.name!r} expects {target_w}x{target_h}; "
            "set resize to stretch or letterbox, or resize the files beforehand."
        )
    if mode == "stretch":
        return _resize(pixels, target_w, target_h)
    scale = min(t / s for t, s in ((plan.height, height), (plan.width, width)) if t is not None)
    new_h, new_w = max(1, math.floor(height * scale + 0.5)), max(1, math.floor(width * scale + 0.5))
    box_h = plan.height if plan.height is not None else new_h
    box_w = plan.width if plan.width is not None else new_w
    new_h, new_w = min(new_h, box_h), min(new_w, box_w)
    canvas = np.zeros((box_h, box_w, pixels.shape[2]), dtype=np.float32)
    top, left = (box_h - new_h) // 2, (box_w - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = _resize(pixels, new_w, new_h)
    return canvas


def _resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pillow bilinear resize of each float32 channel to width x height."""
    from PIL import Image

    planes = [Image.fromarray(np.ascontiguousarray(pixels[..., c], dtype=np.float32)) for c in range(pixels.shape[2])]
    resized = [np.asarray(p.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32) for p in planes]
    return np.stack(resized, axis=2)


def normalize_input(arr: np.ndarray, meta: Any, data_format: str, mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> np.ndarray:
    """One inference input from raw pixels: batch dim added, mean/std on the channel axis, laid out like the model input.

    ``meta`` is the ONNX Runtime input (``name``, ``shape``, ``type``); ``data_format`` the array's
    layout (``nhwc`` or ``nchw``). Normalisation is the images' own: ``(x - mean) / std`` in float32.
    """
    fmt = str(data_format).lower()
    if fmt not in ("nhwc", "nchw"):
        raise InputError(f"data_format {data_format!r} is not valid; use 'nhwc' or 'nchw'.")
    shape = list(meta.shape)
    dtype = np.dtype({"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
                      "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(int32)": np.int32,
                      "tensor(int64)": np.int64, "tensor(bool)": np.bool_}.get(meta.type, np.float32))
    if arr.ndim == len(shape) - 1:
        arr = arr[np.newaxis]
    if len(shape) == 4 and arr.ndim == 4:
        model_nchw = shape[1] in (1, 3) or not (shape[3] in (1, 3))
        x = arr.astype(np.float32) if (mean is not None or std is not None) else arr
        c_axis = 1 if fmt == "nchw" else 3
        for vals in (mean, std):
            if vals is not None and len(vals) not in (1, x.shape[c_axis]):
                raise InputError(f"input '{meta.name}': {len(vals)} mean/std values for {x.shape[c_axis]} channels (data_format {fmt}); check data_format.")
        x = normalize(x, mean, std, axis=c_axis)
        if fmt == "nhwc" and model_nchw:
            x = x.transpose(0, 3, 1, 2)
        elif fmt == "nchw" and not model_nchw:
            x = x.transpose(0, 2, 3, 1)
        arr = x
    want = [d if isinstance(d, int) else None for d in shape]
    if arr.ndim != len(want) or any(w is not None and w != a for w, a in zip(want, arr.shape)):
        raise InputError(f"input '{meta.name}' wants shape {shape} but got {list(arr.shape)} after layout conversion; "
                         "check data_format ('nhwc' for HxWxC images) and the image size.")
    return np.ascontiguousarray(arr, dtype=dtype)
