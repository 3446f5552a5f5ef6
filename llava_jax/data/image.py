"""Images -> pixel values: loading, CLIP preprocessing, LLaVA-1.5 'pad', LLaVA-1.6 'anyres' tiling.

Pillow and numpy only. Each op is one small function on uint8 [H, W, 3] arrays, up to
`rescale_and_normalize`, which yields float32 [3, H, W]. Resizing goes through Pillow, and the
arithmetic follows transformers' PIL backend step by step (float64 rescale, float32 normalise), so the
output equals `CLIPImageProcessor` / `LlavaNextImageProcessor` / `LlavaImageProcessor(do_pad=True)`
(PIL backend) bit for bit, and the original LLaVA's `process_images` for original checkpoints.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from typing import Any, BinaryIO, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from llava_jax.errors import CheckpointError, ImageError, MissingInputError, UserError
from llava_jax.json_file import read_json_object
from llava_jax.model import anyres

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = int(Image.Resampling.BICUBIC)
ASPECT_RATIOS = ("square", "pad", "anyres")

ImageSource = Union[str, os.PathLike, bytes, bytearray, BinaryIO]
ImageLike = Union[Image.Image, np.ndarray]


class UnreadableImageError(ImageError):
    """An image file (or bytes) that Pillow cannot decode, or one larger than Pillow's decompression-bomb limit."""


class ImageNotFoundError(ImageError, FileNotFoundError):
    """An image path that does not exist."""


# -- loading ---------------------------------------------------------------------------------------


def load_image(source: ImageSource) -> Image.Image:
    """Opens an image file, path, file object or bytes as an upright RGB PIL image.

    The EXIF orientation is applied (as transformers' `load_image` does); the mode is converted by
    `to_rgb`, i.e. as transformers' processors convert what they are given. (transformers'
    `load_image` itself drops alpha with a plain `convert("RGB")`; its processors composite onto
    white, and that is what a llava-hf user passing a PIL image gets.)
    """
    if isinstance(source, (str, os.PathLike)):
        name = repr(os.fspath(source))
    else:  # a file object names its file; bytes have no name
        name = repr(getattr(source, "name", None) or f"<{type(source).__name__}>")
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        image.load()
        image = ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise ImageNotFoundError(f"image file not found: {name}; check the path") from None
    except Image.DecompressionBombError as err:
        raise UnreadableImageError(
            f"cannot read image {name}: {err}; downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS if it is trusted"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UnreadableImageError(
            f"cannot read image {name}: {err}; expected an image file Pillow can decode (PNG, JPEG, ...)"
        ) from err
    return to_rgb(image)


def _sixteen_bit_to_grey(image: Image.Image) -> Image.Image:
    """'I;16*' / 'I' -> 'L', mapping 0..65535 linearly onto 0..255 (v / 257, rounded).

    Pillow's own conversion clips at 255, which turns most 16-bit images white. 'I' (32-bit) is how
    Pillow opens some 16-bit files, so it is read as 16-bit data too; values outside are clipped.
    """
    values = np.clip(np.asarray(image).astype(np.float64), 0, 65535)
    return Image.fromarray(np.round(values / 257.0).astype(np.uint8))  # uint8 [H, W] -> "L"


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 'RGB'.

    Transparency (RGBA, LA, PA, P or L with a transparency key) is composited onto white, as
    transformers' `convert_to_rgb` does for what llava-hf processors are given (a plain
    `image.convert("RGB")` would instead show whatever colour hides under transparent pixels).
    16-bit greyscale is scaled to 8 bits (see `_sixteen_bit_to_grey`); CMYK, YCbCr, L, 1 and P use
    Pillow's conversion. Float ('F') images have no agreed range and are refused.
    """
    if image.mode.startswith("I"):
        image = _sixteen_bit_to_grey(image)
    elif image.mode == "F":
        raise ValueError("float ('F' mode) images have no agreed value range; convert them to 8-bit first")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    """A uint8 array [H, W], [H, W, C] or [C, H, W] (C in 1, 3, 4) -> uint8 [H, W, 3].

    The channel axis is found as transformers finds it (first axis wins when both could be it), and
    an alpha channel is blended onto white with the same arithmetic as its numpy path.
    """
    if array.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 in [0, 255], got {array.dtype}; or pass a PIL image")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"an image array is [H, W], [H, W, C] or [C, H, W], got shape {array.shape}")
    if array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    elif array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"cannot find a channel axis of size 1, 3 or 4 in image shape {array.shape}")
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4:
        alpha = array[..., 3:] / 255
        return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """A PIL image or uint8 array -> uint8 [H, W, 3]."""
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image))
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}; use load_image for files")


# -- ops on uint8 [H, W, 3] -------------------------------------------------------------------------


def resize(image: np.ndarray, size_hw: tuple[int, int], resample: int = BICUBIC) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [h, w, 3] with Pillow's filter `resample`."""
    height, width = size_hw
    if image.shape[:2] == (height, width):
        return image  # Pillow returns an identical copy
    return np.asarray(Image.fromarray(image).resize((width, height), resample=resample))


def shortest_edge_size(image_hw: tuple[int, int], shortest_edge: int) -> tuple[int, int]:
    """(height, width) with the short side `shortest_edge` and the long side scaled (truncated)."""
    height, width = image_hw
    if width <= height:
        return int(shortest_edge * height / width), shortest_edge
    return shortest_edge, int(shortest_edge * width / height)


def center_crop(image: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> [crop_h, crop_w, 3], centred (top/left rounded down).

    An image smaller than the crop is first zero-padded around, rounding the top/left pad up.
    """
    crop_h, crop_w = crop_hw
    height, width = image.shape[:2]
    pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
    if pad_h or pad_w:
        top, left = math.ceil(pad_h / 2), math.ceil(pad_w / 2)
        image = np.pad(image, ((top, pad_h - top), (left, pad_w - left), (0, 0)))
        height, width = image.shape[:2]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return image[top : top + crop_h, left : left + crop_w]


def expand_to_square(image: np.ndarray, fill_rgb: tuple[int, int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> [S, S, 3], S = max(H, W): the image centred (rounded down) on `fill_rgb`."""
    height, width = image.shape[:2]
    side = max(height, width)
    if height == width:
        return image
    out = np.empty((side, side, 3), np.uint8)
    out[:] = np.asarray(fill_rgb, np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    out[top : top + height, left : left + width] = image
    return out


def resize_and_pad(image: np.ndarray, target_hw: tuple[int, int], resample: int = BICUBIC) -> np.ndarray:
    """uint8 [H, W, 3] -> [target_h, target_w, 3]: fit inside keeping the aspect, centred on black."""
    new_h, new_w = anyres.fit_within(image.shape[:2], target_hw)
    resized = resize(image, (new_h, new_w), resample)
    target_h, target_w = target_hw
    top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    return np.pad(resized, ((top, target_h - new_h - top), (left, target_w - new_w - left), (0, 0)))


def split_tiles(image: np.ndarray, tile_size: int) -> np.ndarray:
    """uint8 [rows * T, cols * T, 3] -> [rows * cols, T, T, 3], row-major."""
    height, width = image.shape[:2]
    rows, cols = height // tile_size, width // tile_size
    tiles = image.reshape(rows, tile_size, cols, tile_size, 3).transpose(0, 2, 1, 3, 4)
    return tiles.reshape(rows * cols, tile_size, tile_size, 3)


def rescale_and_normalize(
    image: np.ndarray,
    rescale_factor: float | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W]: x * rescale_factor, then (x - mean) / std.

    Rescaling runs in float64 and normalising in float32, as transformers does (results are then
    bitwise equal to it). Pass None to skip a step.
    """
    pixels = np.moveaxis(image, -1, 0)
    if rescale_factor is not None:
        pixels = pixels.astype(np.float64) * rescale_factor
    pixels = pixels.astype(np.float32)
    if mean is not None:
        mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        pixels = (pixels - mean32[:, None, None]) / std32[:, None, None]
    return pixels


# -- the processor ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """Images -> {"pixel_values", "image_sizes"} as llava-hf / original LLaVA processors make them.

    `aspect_ratio`: "square" (plain CLIP: shortest-edge resize, centre crop), "pad" (LLaVA-1.5:
    expand to a square of the mean colour first), "anyres" (LLaVA-1.6 tiles). Build one with
    `from_config` or `from_pretrained`; it is picklable, for data-loader workers.
    """

    aspect_ratio: str = "square"
    shortest_edge: int | None = 336  # resize so the short side is this ...
    size_hw: tuple[int, int] | None = None  # ... or to exactly this (height, width)
    crop_hw: tuple[int, int] | None = (336, 336)
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = BICUBIC
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    semantics: str = "hf"

    def __post_init__(self):
        if self.aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"aspect_ratio must be one of {ASPECT_RATIOS}, got {self.aspect_ratio!r}")
        if (self.shortest_edge is None) == (self.size_hw is None):
            raise ValueError("set exactly one of shortest_edge and size_hw (how images are resized)")
        if self.do_center_crop and self.crop_hw is None:
            raise ValueError("do_center_crop needs crop_hw")
        if (self.aspect_ratio == "anyres") != (self.image_grid_pinpoints is not None):
            raise ValueError("image_grid_pinpoints must be given exactly when aspect_ratio='anyres'")
        if self.image_grid_pinpoints is not None:
            anyres.pinpoints_hw(self.image_grid_pinpoints, self.semantics)
            anyres.check_pinpoints(self.image_grid_pinpoints, self.tile_size)
        elif self.semantics not in anyres.SEMANTICS:
            raise ValueError(f"semantics must be one of {anyres.SEMANTICS}, got {self.semantics!r}")

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config, preprocessor_config: dict[str, Any] | None = None) -> "ImageProcessor":
        """For a LlavaConfig, optionally overridden by a `preprocessor_config.json` dict."""
        side = config.vision.image_size
        fields: dict[str, Any] = dict(
            aspect_ratio=config.image_aspect_ratio,
            shortest_edge=side,
            crop_hw=(side, side),
            image_grid_pinpoints=config.image_grid_pinpoints,
            semantics=config.semantics,
        )
        if preprocessor_config:
            fields.update(_fields_from_preprocessor_config(preprocessor_config, config))
        processor = cls(**fields)
        out_hw = processor.output_hw
        if out_hw != (side, side):
            raise ValueError(
                f"the image processor makes {out_hw} (height, width) images but the vision tower takes "
                f"{side}x{side}; fix crop_size/size in preprocessor_config.json or vision.image_size"
            )
        return processor

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, config) -> "ImageProcessor":
        """From `preprocessor_config.json` in `directory` (a llava-hf checkpoint, or the CLIP vision
        tower's directory for an original LLaVA checkpoint) and the model's LlavaConfig."""
        path = os.path.join(directory, "preprocessor_config.json") if os.path.isdir(directory) else directory
        if not os.path.isfile(path):
            raise MissingInputError(
                f"no preprocessor_config.json at {os.fspath(path)!r}; for an original LLaVA checkpoint pass "
                f"its CLIP vision tower directory, or use ImageProcessor.from_config(config)"
            )
        preprocessor_config = read_json_object(os.fspath(path), CheckpointError)
        try:
            return cls.from_config(config, preprocessor_config)
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:  # fields of the wrong type
            if isinstance(e, UserError):
                raise
            raise CheckpointError(f"{os.fspath(path)}: a field is malformed ({type(e).__name__}: {e}); "
                                  "fix it or take the file from the checkpoint's release") from e  # fmt: skip

    # -- derived sizes ---------------------------------------------------------------------------

    @property
    def tile_size(self) -> int:
        """Side of one anyres tile (transformers: crop height, else resize height/shortest edge)."""
        if self.crop_hw is not None:
            return self.crop_hw[0]
        return self.size_hw[0] if self.size_hw is not None else self.shortest_edge

    @property
    def base_hw(self) -> tuple[int, int]:
        """(height, width) the whole image is resized to as the first anyres tile."""
        return self.size_hw if self.size_hw is not None else (self.shortest_edge, self.shortest_edge)

    @property
    def output_hw(self) -> tuple[int, int] | None:
        """(height, width) of every output tile, or None when it depends on the image."""
        if self.do_center_crop:
            return tuple(self.crop_hw)
        if self.do_resize and self.size_hw is not None:
            return tuple(self.size_hw)
        return None

    @property
    def pad_fill(self) -> tuple[int, int, int]:
        """The 'pad' background: the mean colour truncated to ints, as the original LLaVA fills it."""
        return tuple(int(m * 255) for m in self.image_mean)

    # -- processing ------------------------------------------------------------------------------

    def clip(self, image: np.ndarray) -> np.ndarray:
        """CLIP preprocessing: uint8 [H, W, 3] -> float32 [3, h, w]."""
        if self.do_resize:
            size = self.size_hw or shortest_edge_size(image.shape[:2], self.shortest_edge)
            image = resize(image, size, self.resample)
        if self.do_center_crop:
            image = center_crop(image, self.crop_hw)
        return rescale_and_normalize(
            image,
            self.rescale_factor if self.do_rescale else None,
            self.image_mean if self.do_normalize else None,
            self.image_std if self.do_normalize else None,
        )

    def anyres_tiles(self, image: np.ndarray) -> list[np.ndarray]:
        """uint8 [H, W, 3] -> [base, tile_0, ..., tile_{rows*cols-1}], uint8 tiles, row-major."""
        best_hw = anyres.select_best_resolution(image.shape[:2], self.image_grid_pinpoints, self.semantics)
        # The original resizes with Pillow's default filter (bicubic), whatever the processor's resample.
        resample = self.resample if self.semantics == "hf" else BICUBIC
        padded = resize_and_pad(image, best_hw, resample)
        base = resize(image, self.base_hw, resample)
        return [base, *split_tiles(padded, self.tile_size)]

    def process_one(self, image: ImageLike) -> tuple[np.ndarray, tuple[int, int]]:
        """One image -> (pixel values, its (height, width)).

        Pixel values are float32 [P, 3, h, w] (P = 1 + rows * cols) for anyres, else [3, h, w].
        """
        rgb = to_rgb_array(image)
        size_hw = (int(rgb.shape[0]), int(rgb.shape[1]))
        if self.aspect_ratio == "anyres":
            return np.stack([self.clip(tile) for tile in self.anyres_tiles(rgb)]), size_hw
        if self.aspect_ratio == "pad":
            rgb = expand_to_square(rgb, self.pad_fill)
        return self.clip(rgb), size_hw

    def __call__(self, images: ImageLike | Sequence[ImageLike]) -> dict[str, np.ndarray]:
        """Images -> {"pixel_values": float32, "image_sizes": int64 [N, 2] (height, width)}.

        pixel_values: [N, P_max, 3, h, w] for anyres, each image's tiles zero-padded to the most tiles
        in the batch (as LlavaNextImageProcessor pads); [N, 3, h, w] otherwise.
        """
        if isinstance(images, (Image.Image, np.ndarray)):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images given")
        processed = [self.process_one(image) for image in images]
        pixels = [p for p, _ in processed]
        if self.aspect_ratio == "anyres":
            most = max(len(p) for p in pixels)
            pixels = [np.pad(p, ((0, most - len(p)), (0, 0), (0, 0), (0, 0))) for p in pixels]
        elif len({p.shape for p in pixels}) > 1:
            raise ValueError(
                f"images processed to different shapes {sorted({p.shape for p in pixels})}; "
                "enable do_center_crop or an exact resize size to batch them"
            )
        return {
            "pixel_values": np.stack(pixels).astype(np.float32, copy=False),
            "image_sizes": np.asarray([s for _, s in processed], dtype=np.int64),
        }


def _pair(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    raise ValueError(f"preprocessor_config {what} must be an int or {{'height', 'width'}}, got {value!r}")


def _fields_from_preprocessor_config(pre: dict[str, Any], config) -> dict[str, Any]:
    """ImageProcessor fields from a llava-hf / CLIP `preprocessor_config.json` dict."""
    fields: dict[str, Any] = {}
    size = pre.get("size")
    if isinstance(size, int):  # old CLIP configs: an int is the shortest edge
        fields.update(shortest_edge=size, size_hw=None)
    elif isinstance(size, dict) and set(size) == {"shortest_edge"}:
        fields.update(shortest_edge=int(size["shortest_edge"]), size_hw=None)
    elif isinstance(size, dict) and set(size) == {"height", "width"}:
        fields.update(shortest_edge=None, size_hw=_pair(size, "size"))
    elif size is not None:
        raise ValueError(f"preprocessor_config size {size!r} is not supported (shortest_edge, or height and width)")
    if "crop_size" in pre:
        fields["crop_hw"] = _pair(pre["crop_size"], "crop_size")
    for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        if flag in pre:
            fields[flag] = bool(pre[flag])
    if "rescale_factor" in pre:
        fields["rescale_factor"] = float(pre["rescale_factor"])
    for key in ("image_mean", "image_std"):
        if key in pre:
            value = pre[key]
            fields[key] = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3))
    if "resample" in pre:
        fields["resample"] = int(pre["resample"])
    # transformers' LlavaImageProcessor(do_pad=True) is LLaVA-1.5's expand-to-square.
    if pre.get("image_processor_type", "").startswith("LlavaImageProcessor") and pre.get("do_pad"):
        fields["aspect_ratio"] = "pad"
    pinpoints = pre.get("image_grid_pinpoints")
    if pinpoints is not None and config.image_grid_pinpoints is not None:
        if tuple(map(tuple, pinpoints)) != tuple(map(tuple, config.image_grid_pinpoints)):
            raise ValueError(
                f"preprocessor_config image_grid_pinpoints {pinpoints} differ from the model config's "
                f"{[list(p) for p in config.image_grid_pinpoints]}; the image token counts would not match"
            )
    return fields
