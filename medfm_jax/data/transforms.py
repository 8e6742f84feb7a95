"""Per-record numpy image transforms (run inside grain workers).

Images are ``[H, W, C]`` arrays (uint8 or float). Resizing is separable
bilinear interpolation with a triangle filter widened when downscaling
(antialiasing, as PIL's ``BILINEAR``), done as two small matmuls.

Photometric augmentations (``color_jitter``, ``random_grayscale``,
``gaussian_blur``, ``solarize``) and the DINO ``multicrop`` take uint8 images
and return uint8. Colour operations (saturation, hue, grayscale) only act on
3-channel images; 1-channel (and other non-RGB) images get brightness and
contrast only. Each random op draws the same numbers from ``rng`` whether or
not it fires, so changing a probability leaves the other draws unchanged.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import operator
from typing import Any, Mapping, Sequence

import numpy as np


def _resize_matrix(in_size: int, out_size: int, start: float = 0.0,
                   length: float | None = None) -> np.ndarray:
  """[out_size, in_size] weights resampling source window [start, start+length) (read-only).

  Small matrices (<= 16K entries, e.g. 32-128 px) are cached: crop boxes are integers, so a
  few hundred windows cover a dataset, and building them costs as much as the resampling.
  """
  if in_size * out_size <= 16384:
    return _cached_resize_matrix(in_size, out_size, start, length)
  return _build_resize_matrix(in_size, out_size, start, length)


@functools.lru_cache(maxsize=1024)
def _cached_resize_matrix(in_size: int, out_size: int, start: float,
                          length: float | None) -> np.ndarray:
  return _build_resize_matrix(in_size, out_size, start, length)


def _build_resize_matrix(in_size: int, out_size: int, start: float,
                         length: float | None) -> np.ndarray:
  length = float(in_size if length is None else length)
  step = length / out_size
  support = max(step, 1.0)  # widen the triangle filter when downscaling
  centres = start + (np.arange(out_size) + 0.5) * step - 0.5   # in source pixel units
  src = np.arange(in_size)
  w = np.maximum(0.0, 1.0 - np.abs(src[None, :] - centres[:, None]) / support)
  # Crop-then-resize semantics: never read pixels outside the window.
  w[:, (src < math.floor(start)) | (src >= math.ceil(start + length))] = 0.0
  total = w.sum(axis=1, keepdims=True)
  # Windows entirely outside the image (cannot happen for valid crops) fall
  # back to the nearest pixel.
  empty = total[:, 0] == 0
  if empty.any():
    w[empty, np.clip(np.rint(centres[empty]).astype(int), 0, in_size - 1)] = 1.0
    total = w.sum(axis=1, keepdims=True)
  w = (w / total).astype(np.float32)
  w.setflags(write=False)
  return w


def _apply(image: np.ndarray, wy: np.ndarray, wx: np.ndarray) -> np.ndarray:
  """``wy @ image @ wx.T`` per channel (same dtype; integers rounded and clipped)."""
  out = np.tensordot(wy, image.astype(np.float32), axes=(1, 0))     # [out_h, W, C]
  out = np.tensordot(wx, out, axes=(1, 1)).transpose(1, 0, 2)       # [out_h, out_w, C]
  if image.dtype.kind in "ui":
    info = np.iinfo(image.dtype)
    return np.clip(np.rint(out), info.min, info.max).astype(image.dtype)
  return out.astype(image.dtype, copy=False)


def _resample(image: np.ndarray, out_size: int,
              box: tuple[float, float, float, float]) -> np.ndarray:
  """Resizes the window ``box = (top, left, height, width)`` to ``out_size``^2."""
  top, left, h, w = box
  return _apply(image, _resize_matrix(image.shape[0], out_size, top, h),
                _resize_matrix(image.shape[1], out_size, left, w))


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Whole image resized to ``[height, width, C]`` (antialiased bilinear, same dtype)."""
  if image.shape[:2] == (height, width):
    return image
  return _apply(image, _resize_matrix(image.shape[0], height), _resize_matrix(image.shape[1], width))


def crop_box(height: int, width: int, rng: np.random.Generator,
             scale: Sequence[float] = (0.2, 1.0),
             ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """torchvision ``RandomResizedCrop.get_params``: (top, left, h, w)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: central crop with the aspect ratio clamped into ``ratio``.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, out_size: int,
                        scale: Sequence[float] = (0.2, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Random area/aspect crop resized to ``[out_size, out_size, C]`` (same dtype)."""
  box = crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
  return _resample(image, out_size, box)


def random_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
  """Horizontal flip with probability ``p`` (note: swaps caption left/right)."""
  return image[:, ::-1] if rng.random() < p else image


def center_resize(image: np.ndarray, out_size: int) -> np.ndarray:
  """Central square crop resized to ``[out_size, out_size, C]`` (eval transform)."""
  h, w = image.shape[:2]
  side = min(h, w)
  if h == w == out_size:
    return image
  return _resample(image, out_size, ((h - side) / 2, (w - side) / 2, side, side))


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 [..., C] -> float32 ``(x / 255 - mean) / std``; mean/std of length 1 or C."""
  channels = image.shape[-1]
  mean = np.asarray(mean, np.float32).reshape(-1)
  std = np.asarray(std, np.float32).reshape(-1)
  for name, v in (("mean", mean), ("std", std)):
    if v.size not in (1, channels):
      raise ValueError(f"data.{name} has {v.size} values; expected 1 or {channels} "
                       "(one per channel)")
  scale = 1.0 / (255.0 * std)
  return image.astype(np.float32) * scale - mean / std


# ----------------------------------------------------------------------------
# Photometric augmentations (uint8 in/out).

_LUMA = np.array([0.2989, 0.587, 0.114], np.float32)   # torchvision rgb_to_grayscale
# RGB <-> YIQ; a hue shift is approximated by rotating the IQ chroma plane.
_RGB2YIQ = np.array([[0.299, 0.587, 0.114],
                     [0.596, -0.274, -0.322],
                     [0.211, -0.523, 0.312]], np.float64)
_YIQ2RGB = np.linalg.inv(_RGB2YIQ)


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _hue_matrix(shift: float) -> np.ndarray:
  """[3, 3] RGB->RGB matrix rotating hue by ``shift`` turns (YIQ approximation)."""
  c, s = math.cos(2 * math.pi * shift), math.sin(2 * math.pi * shift)
  rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]], np.float64)
  return (_YIQ2RGB @ rot @ _RGB2YIQ).astype(np.float32)


def color_jitter(image: np.ndarray, rng: np.random.Generator, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.2, hue: float = 0.1,
                 p: float = 0.8) -> np.ndarray:
  """torchvision ``RandomApply([ColorJitter(...)], p)``: the four ops in random order.

  Factors: brightness/contrast/saturation in ``[max(0, 1-v), 1+v]``, hue shift in
  ``[-hue, hue]`` turns; values are clamped to [0, 255] after each op. The hue
  shift is a YIQ chroma rotation (cheap approximation of the HSV shift). On
  images that are not 3-channel only brightness and contrast are applied
  (saturation and hue are meaningless for grayscale).
  """
  apply = rng.random() < p
  order = rng.permutation(4)
  factors = [rng.uniform(max(0.0, 1 - v), 1 + v) for v in (brightness, contrast, saturation)]
  factors.append(rng.uniform(-hue, hue))
  if not apply:
    return image
  rgb = image.shape[-1] == 3
  x = image.astype(np.float32)
  for op in order:
    f = factors[op]
    if op == 0:
      x = np.clip(x * f, 0, 255)
    elif op == 1:
      mean = float((x @ _LUMA).mean()) if rgb else float(x.mean())
      x = np.clip(f * x + (1 - f) * mean, 0, 255)
    elif op == 2 and rgb:
      gray = (x @ _LUMA)[..., None]
      x = np.clip(f * x + (1 - f) * gray, 0, 255)
    elif op == 3 and rgb and f != 0:
      x = np.clip(x @ _hue_matrix(f).T, 0, 255)
  return _to_uint8(x)


def random_grayscale(image: np.ndarray, rng: np.random.Generator, p: float = 0.2) -> np.ndarray:
  """RGB -> luminance replicated to 3 channels with probability ``p``; no-op unless 3-channel."""
  if rng.random() >= p or image.shape[-1] != 3:
    return image
  gray = _to_uint8(image.astype(np.float32) @ _LUMA)
  return np.repeat(gray[..., None], 3, axis=-1)


def _blur_matrix(size: int, sigma: float) -> np.ndarray:
  """[size, size] gaussian filter (radius ceil(3 sigma), edge pixels replicated)."""
  radius = max(1, math.ceil(3 * sigma))
  taps = np.arange(-radius, radius + 1)
  k = np.exp(-0.5 * (taps / sigma) ** 2)
  k /= k.sum()
  rows = np.repeat(np.arange(size), taps.size)
  cols = np.clip(rows + np.tile(taps, size), 0, size - 1)
  w = np.bincount(rows * size + cols, weights=np.tile(k, size), minlength=size * size)
  return w.reshape(size, size).astype(np.float32)


def gaussian_blur(image: np.ndarray, rng: np.random.Generator, p: float = 0.5,
                  sigma: Sequence[float] = (0.1, 2.0),
                  sigma_scale: float | None = None) -> np.ndarray:
  """Separable gaussian blur with probability ``p``, sigma ~ U(sigma) * ``sigma_scale``.

  DINO blurs with PIL ``GaussianBlur(radius ~ U[0.1, 2.0])`` at 224 px; the sigma
  range is in 224-px units and scaled by ``sigma_scale`` (default
  ``min(H, W) / 224``) so that small crops are not wiped out. Borders replicate
  the edge pixels, so a constant image stays constant.
  """
  apply = rng.random() < p
  s = rng.uniform(sigma[0], sigma[1])
  if not apply:
    return image
  s *= min(image.shape[:2]) / DINO_GLOBAL_SIZE if sigma_scale is None else sigma_scale
  if s <= 0:
    return image
  wy = _blur_matrix(image.shape[0], s)
  wx = wy if image.shape[1] == image.shape[0] else _blur_matrix(image.shape[1], s)
  h, w, c = image.shape
  out = (wy @ image.astype(np.float32).reshape(h, w * c)).reshape(h, w, c)
  out = np.matmul(wx, out)                       # [W, W] @ [H, W, C] -> [H, W, C]
  return _to_uint8(out) if image.dtype == np.uint8 else out.astype(image.dtype, copy=False)


def solarize(image: np.ndarray, rng: np.random.Generator, p: float = 0.2,
             threshold: int = 128) -> np.ndarray:
  """With probability ``p``, pixels ``>= threshold`` become ``255 - pixel``."""
  if rng.random() >= p:
    return image
  return np.where(image >= threshold, 255 - image, image).astype(image.dtype, copy=False)


# ----------------------------------------------------------------------------
# DINO multi-crop.

DINO_GLOBAL_SIZE = 224   # resolution DINO's blur radii refer to


def _pair(name: str, value: Any) -> tuple[float, float]:
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(f"data.multicrop.{name}={value!r} must be a pair (min, max)") from None
  return lo, hi


def _count(name: str, value: Any) -> int:
  try:
    return operator.index(value)
  except TypeError:
    raise ValueError(f"data.multicrop.{name}={value!r} must be an integer") from None


@dataclasses.dataclass(frozen=True)
class ViewPolicy:
  """How one view is made: crop size and scale range, blur and solarize probabilities."""
  size: int
  scale: tuple[float, float]
  blur_p: float
  solarize_p: float


@dataclasses.dataclass(frozen=True)
class MultiCropSpec:
  """DINO multi-crop: ``num_global`` global and ``num_local`` local crops.

  Validated on construction (``ValueError`` naming ``data.multicrop.<field>``).
  """
  num_global: int = 2
  global_size: int = 224
  global_scale: tuple[float, float] = (0.4, 1.0)
  num_local: int = 8
  local_size: int = 96
  local_scale: tuple[float, float] = (0.05, 0.4)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)

  def __post_init__(self):
    fields = {}
    for name in ("num_global", "global_size", "num_local", "local_size"):
      fields[name] = _count(name, getattr(self, name))
    for name in ("global_scale", "local_scale", "ratio"):
      fields[name] = _pair(name, getattr(self, name))
    for name, v in fields.items():
      object.__setattr__(self, name, v)
    for name in ("global_size", "local_size"):
      if fields[name] <= 0:
        raise ValueError(f"data.multicrop.{name}={fields[name]} must be > 0")
    if fields["num_global"] < 1:
      raise ValueError(f"data.multicrop.num_global={fields['num_global']} must be >= 1")
    if fields["num_local"] < 0:
      raise ValueError(f"data.multicrop.num_local={fields['num_local']} must be >= 0")
    for name in ("global_scale", "local_scale"):
      lo, hi = fields[name]
      if not 0 < lo <= hi <= 1:
        raise ValueError(f"data.multicrop.{name}={fields[name]} must satisfy "
                         "0 < min <= max <= 1")
    lo, hi = fields["ratio"]
    if not 0 < lo <= hi:
      raise ValueError(f"data.multicrop.ratio={fields['ratio']} must satisfy 0 < min <= max")

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any] | Any) -> "MultiCropSpec":
    """From a dict or ``ConfigDict`` with (a subset of) the spec's fields."""
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in cfg:
      if key not in allowed:
        raise ValueError(f"data.multicrop.{key} is not a multi-crop field; "
                         f"allowed: {', '.join(allowed)}")
    return cls(**cfg)

  def views(self) -> list[ViewPolicy]:
    """DINO policies: global 1 blur p=1; other globals blur p=0.1, solarize p=0.2;
    locals blur p=0.5."""
    g = [ViewPolicy(self.global_size, self.global_scale, 1.0 if i == 0 else 0.1,
                    0.0 if i == 0 else 0.2) for i in range(self.num_global)]
    return g + [ViewPolicy(self.local_size, self.local_scale, 0.5, 0.0)] * self.num_local


def augment_view(image: np.ndarray, rng: np.random.Generator, policy: ViewPolicy,
                 ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = True,
                 sigma_scale: float = 1.0) -> np.ndarray:
  """One DINO view: random resized crop, flip, colour jitter (p=0.8), grayscale (p=0.2),
  blur (``policy.blur_p``), solarize (``policy.solarize_p``)."""
  x = random_resized_crop(image, rng, policy.size, policy.scale, ratio)
  if flip:
    x = random_flip(x, rng)
  x = color_jitter(x, rng)
  x = random_grayscale(x, rng)
  x = gaussian_blur(x, rng, policy.blur_p, sigma_scale=sigma_scale)
  return solarize(x, rng, policy.solarize_p)


def multicrop(image: np.ndarray, rng: np.random.Generator, spec: MultiCropSpec,
              flip: bool = True) -> dict[str, np.ndarray]:
  """DINO views of a uint8 ``[H, W, C]`` image, drawn in order from ``rng``.

  Returns ``{"global": uint8 [num_global, G, G, C], "local": uint8 [num_local, L, L, C]}``.
  Blur sigmas are scaled by ``global_size / 224`` for every view (locals keep
  DINO's global-to-local blur ratio).
  """
  sigma_scale = spec.global_size / DINO_GLOBAL_SIZE
  views = [augment_view(image, rng, v, spec.ratio, flip, sigma_scale) for v in spec.views()]
  channels = image.shape[-1]
  local = (np.stack(views[spec.num_global:]) if spec.num_local else
           np.zeros((0, spec.local_size, spec.local_size, channels), image.dtype))
  return {"global": np.stack(views[:spec.num_global]), "local": local}
