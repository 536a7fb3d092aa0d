"""Images: refused before anything large is allocated or anything outside the image root is read, then turned into
Gemma 4 patches exactly as the processor's image processor does.

- Paths are resolved against the image root (the dataset's directory unless configured) with symlinks followed;
  a path resolving outside the root, a URL, or a relative path without a root is refused without opening it.
- File / byte size is checked before reading; the header (read lazily by PIL, a few hundred bytes) is checked
  against ``max_pixels`` before any pixel buffer exists, so a 100k x 100k PNG header costs nothing.
- Pixels: PIL decode -> RGB exactly as transformers (alpha composited on white) -> the processor's
  aspect-ratio-preserving resize (torchvision, on uint8), kept as uint8 until collation (4x less memory and
  inter-process traffic than float32), where patchify + ``uint8 * rescale_factor`` write the processor's float
  values bit for bit, straight into the batch tensor.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from gemma4vl.data.errors import BadRowError

SUPPORTED_MAX_SOFT_TOKENS = (70, 140, 280, 560, 1120)


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """The processor's image settings used by the pipeline (read from the loaded processor)."""

    patch_size: int
    pooling_kernel_size: int
    max_soft_tokens: int
    rescale_factor: float
    resample: Any

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size**2

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size**2

    def num_soft_tokens(self, width: int, height: int) -> int:
        """Soft tokens of an image of this size (after the processor's resize)."""
        th, tw = self.target_size(width, height)
        return (th // self.patch_size) * (tw // self.patch_size) // self.pooling_kernel_size**2

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        from transformers.models.gemma4.processing_gemma4 import get_aspect_ratio_preserving_size

        try:
            return get_aspect_ratio_preserving_size(
                height=height, width=width, patch_size=self.patch_size, max_patches=self.max_patches,
                pooling_kernel_size=self.pooling_kernel_size,
            )
        except ValueError as e:  # degenerate aspect ratios
            raise BadRowError("unsupported_image", f"image of {width}x{height} cannot be resized for Gemma 4: {e}")


def image_settings(processor, max_soft_tokens: int | None = None) -> ImageSettings:
    """Settings of a loaded ``Gemma4Processor``; ``max_soft_tokens`` overrides its image budget."""
    ip = processor.image_processor
    budget = int(max_soft_tokens if max_soft_tokens is not None else ip.max_soft_tokens)
    if budget not in SUPPORTED_MAX_SOFT_TOKENS:
        raise ValueError(f"max_soft_tokens must be one of {SUPPORTED_MAX_SOFT_TOKENS}, got {budget}")
    if getattr(ip, "backend", None) != "torchvision":
        raise ValueError(f"the pipeline reproduces the torchvision Gemma4ImageProcessor; the processor has "
                         f"{type(ip).__name__} (install torchvision so AutoProcessor loads Gemma4ImageProcessor)")
    if ip.do_normalize and (list(ip.image_mean) != [0.0] * 3 or list(ip.image_std) != [1.0] * 3):
        raise ValueError(f"image processor normalises with mean {ip.image_mean} / std {ip.image_std}; Gemma 4 "
                         "processors do not, and this pipeline only reproduces the identity normalisation")
    if not ip.do_rescale or not ip.do_resize or not ip.do_convert_rgb:
        raise ValueError("image processor must rescale, resize and convert to RGB (Gemma 4's settings)")
    return ImageSettings(int(ip.patch_size), int(ip.pooling_kernel_size), budget, float(ip.rescale_factor),
                         ip.resample)


@dataclasses.dataclass
class ProcessedImage:
    """One image after the processor's resize (uint8), and its patch grid."""

    pixels: torch.Tensor  # [grid_h * p, grid_w * p, 3] uint8, resized
    grid: tuple[int, int]  # (grid_h, grid_w) in patches
    num_soft_tokens: int


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class ImageLoader:
    """Opens image values safely (see the module docstring)."""

    def __init__(self, root: str | os.PathLike | None, *, max_pixels: int, max_bytes: int):
        self.root = os.path.realpath(root) if root is not None else None
        self.max_pixels = int(max_pixels)
        self.max_bytes = int(max_bytes)

    # ---------------------------------------------------------------------------------------------- resolving
    def resolve(self, value: str) -> str:
        """The real path of a path value, refused if it leaves the root."""
        if "://" in value:
            raise BadRowError("unsupported_image", f"image {value!r:.120} is a URL; URLs are not fetched during "
                                                   "training (download the images and reference files)")
        if self.root is None:
            if not os.path.isabs(value):
                raise BadRowError("missing_image", f"relative image path {value!r} but the dataset has no image "
                                                   "directory (set image_root)")
            raise BadRowError("image_path_escapes_root", f"absolute image path {value!r} with no image_root set")
        candidate = value if os.path.isabs(value) else os.path.join(self.root, value)
        real = os.path.realpath(candidate)
        if not _under(real, self.root):
            raise BadRowError("image_path_escapes_root",
                              f"image path {value!r} resolves to {real}, outside the image root {self.root}")
        if not os.path.isfile(real):
            raise BadRowError("missing_image", f"image file {value!r} not found (looked for {real})")
        size = os.path.getsize(real)
        if size > self.max_bytes:
            raise BadRowError("image_too_large", f"image file {value!r} has {size} bytes > max_image_bytes "
                                                 f"{self.max_bytes}")
        return real

    def _source(self, value: Any) -> Any:
        """A path or a BytesIO for PIL (nothing decoded), or a PIL image."""
        from PIL import Image

        if isinstance(value, Image.Image):
            return value
        if isinstance(value, Mapping):  # datasets.Image storage: {"bytes": ..., "path": ...}
            if value.get("bytes") is not None:
                return self._bytes(value["bytes"])
            if value.get("path") is not None:
                return self.resolve(value["path"])
            raise BadRowError("unsupported_image", f"image struct without bytes or path: {dict(value)!r:.120}")
        if isinstance(value, (bytes, bytearray, memoryview)):
            return self._bytes(value)
        if isinstance(value, str):
            if value.startswith("data:"):
                head, _, payload = value.partition(",")
                if ";base64" not in head:
                    raise BadRowError("unsupported_image", "data: URI images must be base64-encoded")
                if len(payload) * 3 // 4 > self.max_bytes:
                    raise BadRowError("image_too_large", f"data: URI of {len(payload)} characters > max_image_bytes")
                try:
                    return self._bytes(base64.b64decode(payload, validate=True))
                except ValueError as e:
                    raise BadRowError("corrupt_image", f"data: URI is not valid base64 ({e})")
            return self.resolve(value)
        raise BadRowError("unsupported_image", f"image value of type {type(value).__name__} (expected a path, "
                                               "bytes, a datasets.Image struct or a PIL image)")

    def _bytes(self, data) -> io.BytesIO:
        if len(data) > self.max_bytes:
            raise BadRowError("image_too_large", f"image of {len(data)} bytes > max_image_bytes {self.max_bytes}")
        return io.BytesIO(bytes(data))

    # ---------------------------------------------------------------------------------------------- opening
    def open(self, value: Any):
        """A lazily decoded PIL image whose header passed the checks (the caller closes it)."""
        from PIL import Image, UnidentifiedImageError

        source = self._source(value)
        if isinstance(source, Image.Image):
            image = source
        else:
            try:
                image = Image.open(source)
            except Image.DecompressionBombError as e:
                raise BadRowError("image_too_large", f"refused by PIL's decompression-bomb check: {e}")
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                raise BadRowError("corrupt_image", f"not a readable image ({type(e).__name__}: {e})")
        width, height = image.size
        if width < 1 or height < 1 or width * height > self.max_pixels:
            image.close()
            raise BadRowError("image_too_large", f"image header says {width}x{height} = {width * height} pixels; "
                                                 f"max_image_pixels is {self.max_pixels}")
        return image

    def size(self, value: Any) -> tuple[int, int]:
        """(width, height) from the header only."""
        image = self.open(value)
        try:
            return image.size
        finally:
            if image is not value:
                image.close()

    def rgb(self, value: Any) -> np.ndarray:
        """Decoded pixels [h, w, 3] uint8, converted to RGB the way transformers' processors do."""
        from transformers.image_transforms import convert_to_rgb

        image = self.open(value)
        try:
            image.load()
            if image.mode == "RGB" and image.info.get("transparency") is None:
                return np.asarray(image)  # what convert_to_rgb returns, without its extra copy
            return convert_to_rgb(image, return_numpy=True)
        except BadRowError:
            raise
        except Exception as e:  # truncated data, bad compression stream, ...  # noqa: BLE001
            raise BadRowError("corrupt_image", f"image data does not decode ({type(e).__name__}: {e})")
        finally:
            if image is not value:
                image.close()


def process_pixels(rgb: np.ndarray, settings: ImageSettings) -> ProcessedImage:
    """Resize like ``Gemma4ImageProcessor`` (uint8; patchified and rescaled by :func:`to_pixel_values`)."""
    from torchvision.transforms.v2 import functional as tvF
    from transformers.image_utils import PILImageResampling, pil_torch_interpolation_mapping

    height, width = rgb.shape[:2]
    with warnings.catch_warnings():  # PIL's array is read-only; it is only read (resize / contiguous copy it)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        image = torch.from_numpy(np.ascontiguousarray(rgb))  # [h, w, 3]
    th, tw = settings.target_size(width, height)
    if (th, tw) != (height, width):
        resample = settings.resample
        if isinstance(resample, (PILImageResampling, int)):
            resample = pil_torch_interpolation_mapping[resample]
        # resized as [3, h, w] (the processor's layout) over channels-last memory: same values, and the output
        # stays channels-last, which makes patchifying it a cheap copy
        image = tvF.resize(image.permute(2, 0, 1), size=[th, tw], interpolation=resample, antialias=True)
        image = image.permute(1, 2, 0).contiguous()
    grid = (th // settings.patch_size, tw // settings.patch_size)
    return ProcessedImage(image, grid, grid[0] * grid[1] // settings.pooling_kernel_size**2)


def empty_for_transfer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty``, but in shared memory inside a DataLoader worker (as ``default_collate`` does), so the batch
    is written once instead of being copied into shared memory again when it is sent to the main process."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    elem = torch.empty(0, dtype=dtype)
    storage = elem._typed_storage()._new_shared(int(np.prod(shape)), device=elem.device)
    return elem.new(storage).view(shape)


def to_pixel_values(images: list[ProcessedImage] | list[tuple[torch.Tensor, tuple[int, int]]],
                    settings: ImageSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """``pixel_values`` [n, max_patches, p*p*3] float32 and ``image_position_ids`` [n, max_patches, 2] long, as the
    processor makes them: patches row-major, each flattened (ph, pw, c), ``uint8 * rescale_factor``, padded with
    zeros / (-1, -1). Each image is written once, straight from its uint8 pixels."""
    n, p = len(images), settings.patch_size
    pixel_values = empty_for_transfer((n, settings.max_patches, settings.patch_dim), torch.float32)
    positions = torch.full((n, settings.max_patches, 2), -1, dtype=torch.long)
    for i, item in enumerate(images):
        pixels, (gh, gw) = (item.pixels, item.grid) if isinstance(item, ProcessedImage) else item
        count = gh * gw
        patches = pixels.reshape(gh, p, gw, p, 3).permute(0, 2, 1, 3, 4)  # [gh, gw, p, p, c], a view
        torch.mul(patches, settings.rescale_factor, out=pixel_values[i, :count].view(gh, gw, p, p, 3))
        pixel_values[i, count:] = 0
        xs, ys = torch.meshgrid(torch.arange(gw), torch.arange(gh), indexing="xy")
        positions[i, :count] = torch.stack([xs, ys], dim=-1).reshape(count, 2)
    return pixel_values, positions


def resolve_root(path: str | os.PathLike | None) -> Path | None:
    return Path(path).expanduser().resolve() if path is not None else None
