"""Image file decoding (PNG, JPEG, 8/16-bit TIFF, DICOM) and intensity mapping to uint8.

``decode(data, path, frame)`` -> :class:`Decoded` pixels ``[H, W, C]`` in their native range
(uint8, uint16, or float32 modality values such as Hounsfield units for DICOM), then
:class:`Preprocess` maps them to the uint8 ``[H, W, channels]`` records every source returns:
intensity window -> MONOCHROME1 inversion -> channels (1, or replicated/luma to 3) -> resize.

The file content decides the decoder and must agree with the extension (a ``.png`` holding JPEG
bytes is an error, never silently reinterpreted). DICOM is recognised first, by the ``DICM``
marker at offset 128 (the preamble before it may hold a TIFF header: a legal dual-format file);
a file without preamble/meta header (it starts with a group 0002/0008 element) is read with
pydicom's ``force``. Every failure, whatever raised it, is a :class:`DataError` with one line
``PATH: reason``.

DICOM (pydicom): stored values -> modality values with RescaleSlope/RescaleIntercept (per frame
for enhanced multi-frame files), VOI window from ``data.window`` (a preset, ``center,width``, the
file's own WindowCenter/WindowWidth with ``auto``, or min-max), linear windowing as DICOM PS3.3
C.11.2.1.2.1, MONOCHROME1 inverted after windowing. Compressed transfer syntaxes decode through
pydicom's handlers (see :func:`dicom_syntax_support`); the rest raise a one-line error naming the
file and the syntax.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import os
from typing import Sequence

import numpy as np
from etils import epath
from PIL import Image

from medfm_jax.data import transforms

# name -> (center, width), in modality units (HU for CT).
WINDOW_PRESETS = {"lung": (-600.0, 1500.0), "mediastinum": (50.0, 350.0),
                  "soft_tissue": (50.0, 350.0), "bone": (400.0, 1800.0), "brain": (40.0, 80.0)}
WINDOW_MODES = ("auto", "minmax", "full")
RESIZE_POLICIES = ("none", "shortest_side", "center_crop", "pad")
# extension -> content format
EXTENSIONS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff",
              ".dcm": "dicom", ".dicom": "dicom", "": "dicom"}


class DataError(ValueError):
  """A data file (or record) cannot be read; the message is ``PATH: reason`` on one line."""

  def __init__(self, path: str, reason: str):
    self.path, self.reason = str(path), " ".join(str(reason).split())
    super().__init__(f"{self.path}: {self.reason}")

  def __reduce__(self):   # picklable, so grain worker processes re-raise it intact
    return type(self), (self.path, self.reason)


@dataclasses.dataclass
class Decoded:
  """Native-range pixels ``[H, W, C]`` and the file's display hints."""
  pixels: np.ndarray                            # uint8 | uint16 | float32
  window: tuple[float, float] | None = None     # the file's own (center, width), DICOM
  invert: bool = False                          # DICOM MONOCHROME1


# First 2 bytes of a DICOM dataset without the 128-byte preamble: group 0002 (meta header) or
# 0008 (identifying elements), little or big endian.
_BARE_DICOM_GROUPS = (b"\x02\x00", b"\x00\x02", b"\x08\x00", b"\x00\x08")


def has_preamble(head: bytes) -> bool:
  """Whether the bytes carry the DICOM ``DICM`` marker at offset 128."""
  return head[128:132] == b"DICM"


def sniff(head: bytes) -> str | None:
  """Format of a file from its first 132 bytes: png | jpeg | tiff | dicom | None.

  The DICOM marker wins over the other signatures (a DICOM preamble may be a TIFF header).
  """
  if has_preamble(head):
    return "dicom"
  if head.startswith(b"\x89PNG\r\n\x1a\n"):
    return "png"
  if head.startswith(b"\xff\xd8\xff"):
    return "jpeg"
  if head[:4] in (b"II*\x00", b"MM\x00*"):
    return "tiff"
  if head[:2] in _BARE_DICOM_GROUPS:
    return "dicom"
  return None


def extension(path: str) -> str:
  """Lower-case extension; numeric suffixes (DICOM UID file names like ``1.2.840.5``) -> ''."""
  ext = os.path.splitext(str(path))[1].lower()
  return "" if ext[1:].isdigit() else ext


def check_format(data: bytes, path: str, check_extension: bool = True) -> str:
  """The content format of ``data``; DataError if empty, unknown or (``check_extension``) not
  matching the extension of ``path``."""
  ext = extension(path)
  if check_extension and ext not in EXTENSIONS:
    raise DataError(path, f"unsupported file extension {ext!r}; allowed: "
                    f"{', '.join(e or '(none, DICOM)' for e in EXTENSIONS)}")
  if not data:
    raise DataError(path, "empty file (0 bytes)")
  fmt = sniff(data[:132])
  if fmt is None:
    raise DataError(path, f"not a PNG/JPEG/TIFF/DICOM file (starts with {data[:8]!r})")
  if check_extension and fmt != EXTENSIONS[ext]:
    raise DataError(path, f"content is {fmt.upper()} but the extension {ext or '(none)'!r} "
                    f"means {EXTENSIONS[ext].upper()}; rename the file")
  return fmt


def decode(data: bytes, path: str = "<bytes>", frame: int = 0,
           check_extension: bool = True) -> Decoded:
  """Decodes one image (or DICOM ``frame``) from file bytes; DataError on any failure.

  ``path`` names the data in errors (and gives the extension checked against the content).
  """
  fmt = check_format(data, path, check_extension)
  try:
    if fmt == "dicom":
      return _decode_dicom(data, path, frame)
    if frame:
      raise DataError(path, f"frame {frame} requested from a single-frame {fmt.upper()} file")
    return Decoded(_decode_pillow(data, path, fmt))
  except DataError:
    raise
  except Exception as e:  # pydicom raises ValueError (malformed values), AttributeError, ...
    raise DataError(path, f"cannot decode {fmt.upper()} ({type(e).__name__}: {e})") from None


def _open(path: str):
  if "://" in str(path):
    return epath.Path(path).open("rb")
  return open(path, "rb")


def read_file(path: str) -> bytes:
  """File bytes (local path or any URL etils.epath understands); DataError if unreadable."""
  try:
    with _open(path) as f:
      return f.read()
  except OSError as e:
    raise DataError(path, f"cannot read: {e.strerror or e}") from None


# ----------------------------------------------------------------------------
# PNG / JPEG / TIFF via Pillow.

_PIL_NATIVE = {"L": np.uint8, "RGB": np.uint8, "I;16": np.uint16, "I;16B": np.uint16,
               "I;16L": np.uint16, "F": np.float32}


def _decode_pillow(data: bytes, path: str, fmt: str) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(data), formats=[fmt.upper()]) as img:
      img.load()
      mode = img.mode
      if mode in ("1", "P", "LA", "PA"):
        img = img.convert("L" if mode in ("1", "LA") else "RGB")
      elif mode in ("RGBA", "CMYK", "YCbCr", "RGBX", "LAB", "HSV"):
        img = img.convert("RGB")
      elif mode == "I":      # 32-bit integer (some 16-bit PNG/TIFF readers): keep the values
        arr = np.asarray(img)
        if arr.min() < 0 or arr.max() > 65535:
          raise DataError(path, "32-bit integer image with values outside [0, 65535]")
        return arr.astype(np.uint16)[..., None]
      if img.mode not in _PIL_NATIVE:
        raise DataError(path, f"unsupported image mode {img.mode!r}")
      arr = np.asarray(img, dtype=_PIL_NATIVE[img.mode])
  except DataError:
    raise
  except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ...
    raise DataError(path, f"cannot decode image ({type(e).__name__}: {e})") from None
  return arr[..., None] if arr.ndim == 2 else arr


# ----------------------------------------------------------------------------
# DICOM via pydicom.


def _first(value) -> float:
  """First value of a (possibly multi-valued) DICOM number."""
  if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
    value = value[0]
  return float(value)


def _frame_item(ds, sequence: str, frame: int):
  """The item of ``sequence`` for ``frame`` (per-frame functional group, else shared)."""
  for groups, i in (("PerFrameFunctionalGroupsSequence", frame),
                    ("SharedFunctionalGroupsSequence", 0)):
    seq = ds.get(groups)
    if seq is not None and len(seq) > i and sequence in seq[i]:
      return seq[i][sequence][0]
  return None


def dicom_rescale(ds, frame: int = 0) -> tuple[float, float]:
  """(slope, intercept) of ``frame``: per-frame/shared functional groups, else top level."""
  item = _frame_item(ds, "PixelValueTransformationSequence", frame)
  src = item if item is not None and "RescaleSlope" in item else ds
  return float(src.get("RescaleSlope", 1.0) or 1.0), float(src.get("RescaleIntercept", 0.0) or 0.0)


def dicom_window(ds, frame: int = 0) -> tuple[float, float] | None:
  """The file's own (center, width) for ``frame``, or None."""
  item = _frame_item(ds, "FrameVOILUTSequence", frame)
  src = item if item is not None and "WindowCenter" in item else ds
  if "WindowCenter" in src and "WindowWidth" in src:
    return _first(src.WindowCenter), _first(src.WindowWidth)
  return None


@functools.lru_cache(maxsize=64)
def _syntax_problem(uid: str) -> str | None:
  """Why pixel data in transfer syntax ``uid`` cannot be decoded here, or None."""
  from pydicom.pixels import get_decoder  # optional: the 'dicom' extra; pylint: disable=g-import-not-at-top
  from pydicom.uid import UID  # optional: the 'dicom' extra; pylint: disable=g-import-not-at-top
  uid = UID(uid)
  try:
    decoder = get_decoder(uid)
  except NotImplementedError:
    return (f"transfer syntax {uid.name} ({uid}) is not supported by pydicom; "
            "convert the file (e.g. gdcmconv --raw)")
  if not decoder.is_available:
    return (f"transfer syntax {uid.name} ({uid}) needs a pixel-data plugin; "
            "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg")
  return None


# (implicit VR, little endian) -> the transfer syntax of uncompressed data in that encoding.
_ENCODING_SYNTAX = {(True, True): "1.2.840.10008.1.2", (False, True): "1.2.840.10008.1.2.1",
                    (False, False): "1.2.840.10008.1.2.2"}


def _read_dataset(data: bytes, path: str, stop_before_pixels: bool = False):
  """The pydicom dataset of ``data``: files without preamble/meta header are read with ``force``
  (pydicom guesses the encoding from the first element)."""
  import pydicom  # optional: the 'dicom' extra; pylint: disable=g-import-not-at-top
  try:
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels,
                           force=not has_preamble(data))
  except Exception as e:
    raise DataError(path, f"cannot parse DICOM ({type(e).__name__}: {e})") from None


def _transfer_syntax(ds, path: str) -> str:
  """The file's transfer syntax; without a meta header, the one of the encoding pydicom read
  (uncompressed data only: compressed pixel data without a syntax names no codec)."""
  from pydicom.dataset import FileMetaDataset  # optional: the 'dicom' extra; pylint: disable=g-import-not-at-top
  meta = getattr(ds, "file_meta", None)
  uid = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
  if uid:
    return uid
  if ds["PixelData"].is_undefined_length:
    raise DataError(path, "compressed (encapsulated) pixel data but no transfer syntax (the file "
                    "has no meta header), so the codec is unknown; rewrite it with a meta header "
                    "(e.g. dcmconv or gdcmconv)")
  uid = _ENCODING_SYNTAX.get(tuple(ds.original_encoding))
  if uid is None:
    raise DataError(path, "no transfer syntax and an unknown encoding; rewrite the file with a "
                    "meta header")
  if meta is None:
    ds.file_meta = meta = FileMetaDataset()
  meta.TransferSyntaxUID = uid
  return uid


_NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99")


def _native_frame(ds, frame: int, frames: int) -> np.ndarray | None:
  """One grayscale frame of uncompressed little-endian pixel data, read straight from the
  buffer (as pydicom's ``pixel_array``: bits above HighBit masked or sign-extended); None for
  anything else (pydicom decodes those)."""
  bits, stored = int(ds.get("BitsAllocated", 0)), int(ds.get("BitsStored", 0))
  if (int(ds.get("SamplesPerPixel", 1)) != 1 or bits not in (8, 16) or not 0 < stored <= bits
      or int(ds.get("HighBit", stored - 1)) != stored - 1):
    return None
  signed = int(ds.get("PixelRepresentation", 0)) == 1
  rows, cols = int(ds.Rows), int(ds.Columns)
  dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
  size = rows * cols
  buf = ds.PixelData
  if len(buf) < frames * size * dtype.itemsize:
    raise ValueError(f"pixel data has {len(buf)} bytes, expected {frames * size * dtype.itemsize}")
  arr = np.frombuffer(buf, dtype, size, frame * size * dtype.itemsize).reshape(rows, cols)
  if stored < bits:
    shift = bits - stored
    arr = (arr << shift) >> shift if signed else arr & ((1 << stored) - 1)
  return arr


def _decode_dicom(data: bytes, path: str, frame: int) -> Decoded:
  from pydicom.pixels import pixel_array  # optional: the 'dicom' extra; pylint: disable=g-import-not-at-top
  ds = _read_dataset(data, path)
  if "PixelData" not in ds:
    how = "" if has_preamble(data) else " (no 'DICM' marker at offset 128; read without one)"
    raise DataError(path, f"DICOM file has no pixel data{how}")
  uid = _transfer_syntax(ds, path)
  problem = _syntax_problem(uid) if uid not in _NATIVE_LE else None
  if problem:
    raise DataError(path, problem)
  frames = int(ds.get("NumberOfFrames", 1) or 1)
  if not 0 <= frame < frames:
    raise DataError(path, f"frame {frame} out of range [0, {frames})")
  try:
    arr = _native_frame(ds, frame, frames) if uid in _NATIVE_LE else None
    if arr is None:
      arr = pixel_array(ds, index=frame if frames > 1 else None)
  except Exception as e:
    raise DataError(path, f"cannot decode DICOM pixel data ({type(e).__name__}: {e})") from None
  if arr.ndim == 2:
    arr = arr[..., None]
  photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
  if arr.shape[-1] == 3:   # colour: display values already (pydicom converts YBR to RGB)
    if arr.dtype != np.uint8:
      arr = arr.astype(np.float32)
    return Decoded(arr)
  slope, intercept = dicom_rescale(ds, frame)
  values = arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)
  return Decoded(values, dicom_window(ds, frame), photometric == "MONOCHROME1")


@dataclasses.dataclass(frozen=True)
class DicomInfo:
  frames: int
  patient_id: str
  modality: str


def dicom_info(path: str) -> DicomInfo:
  """Frame count, PatientID and Modality from the header (pixel data not read)."""
  import pydicom  # optional: the 'dicom' extra; pylint: disable=g-import-not-at-top
  try:
    with _open(path) as f:
      head = f.read(132)
      check_format(head, path)
      f.seek(0)
      ds = pydicom.dcmread(f, stop_before_pixels=True, force=not has_preamble(head))
      return DicomInfo(int(ds.get("NumberOfFrames", 1) or 1), str(ds.get("PatientID", "") or ""),
                       str(ds.get("Modality", "") or ""))
  except DataError:
    raise
  except Exception as e:  # OSError, pydicom's InvalidDicomError, ValueError of a malformed value
    raise DataError(path, f"cannot parse DICOM header ({type(e).__name__}: {e})") from None


def dicom_syntax_support() -> list[tuple[str, str, bool]]:
  """(uid, name, decodes here) for every transfer syntax pydicom knows."""
  from pydicom import uid as uids  # optional: the 'dicom' extra; pylint: disable=g-import-not-at-top
  from pydicom.pixels import get_decoder  # optional: the 'dicom' extra; pylint: disable=g-import-not-at-top
  out = []
  for uid in uids.AllTransferSyntaxes:
    try:
      ok = get_decoder(uid).is_available
    except NotImplementedError:
      ok = False
    out.append((str(uid), uid.name, ok))
  return out


# ----------------------------------------------------------------------------
# Intensity mapping.


def parse_window(window) -> str | tuple[float, float]:
  """``data.window``: 'auto' | 'minmax' | 'full' | a preset name | (center, width) / 'c,w'."""
  if isinstance(window, str):
    w = window.strip().lower()
    if w in WINDOW_MODES:
      return w
    if w in WINDOW_PRESETS:
      return WINDOW_PRESETS[w]
    parts = w.split(",")
    if len(parts) == 2:
      try:
        window = tuple(float(p) for p in parts)
      except ValueError:
        pass
  if isinstance(window, Sequence) and not isinstance(window, str) and len(window) == 2:
    center, width = (float(v) for v in window)
    if width >= 1:
      return center, width
  raise ValueError(f"data.window={window!r}: allowed {', '.join(WINDOW_MODES)}, a preset "
                   f"({', '.join(WINDOW_PRESETS)}) or 'center,width' with width >= 1")


def apply_window(values: np.ndarray, center: float, width: float, out_max: float = 255.0) -> np.ndarray:
  """DICOM linear VOI window (PS3.3 C.11.2.1.2.1) -> float32 in ``[0, out_max]``."""
  if width <= 1:   # the standard's width-1 case: a threshold at center - 0.5
    return np.where(values > center - 0.5, np.float32(out_max), np.float32(0))
  y = ((values.astype(np.float32) - (center - 0.5)) / (width - 1) + 0.5)
  return np.clip(y, 0.0, 1.0) * np.float32(out_max)


def _minmax(values: np.ndarray, out_max: float) -> np.ndarray:
  lo, hi = float(values.min()), float(values.max())
  if hi <= lo:
    return np.zeros(values.shape, np.float32)
  return (values.astype(np.float32) - lo) * np.float32(out_max / (hi - lo))


def to_display(decoded: Decoded, window, out_dtype=np.uint8) -> np.ndarray:
  """Native pixels -> ``out_dtype`` (uint8 or uint16) display values.

  ``window`` (see :func:`parse_window`): ``auto`` keeps uint8 as is, uses a DICOM file's own
  window, else min-max; ``minmax`` stretches each image; ``full`` maps the dtype's range (uint16
  / 257 -> uint8); a preset or (center, width) applies the DICOM linear window. MONOCHROME1 is
  inverted after the window.
  """
  out_max = float(np.iinfo(out_dtype).max)
  x = decoded.pixels
  mode = parse_window(window)
  if mode == "auto":
    mode = (decoded.window if decoded.window is not None else
            "full" if x.dtype == np.uint8 else "minmax")
  if mode == "full":
    if x.dtype.kind not in "ui":
      mode = "minmax"
    else:
      in_max = float(np.iinfo(x.dtype).max)
      y = x if in_max == out_max else x.astype(np.float32) * np.float32(out_max / in_max)
  if mode == "minmax":
    y = _minmax(x, out_max)
  elif isinstance(mode, tuple):
    y = apply_window(x, mode[0], mode[1], out_max)
  if decoded.invert:
    y = out_max - np.asarray(y, np.float32)
  if y.dtype == out_dtype:
    return y
  return np.rint(y).astype(out_dtype)


_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """[H, W, C] -> [H, W, channels]: gray replicated to 3, RGB to luma for 1 (same dtype)."""
  c = image.shape[-1]
  if c == channels:
    return image
  if c == 1 and channels == 3:
    return np.repeat(image, 3, axis=-1)
  if c == 3 and channels == 1:
    y = image.astype(np.float32) @ _LUMA
    return np.rint(y)[..., None].astype(image.dtype) if image.dtype.kind in "ui" else y[..., None]
  raise ValueError(f"cannot map {c} channels to {channels}")


def resize_policy(image: np.ndarray, policy: str, size: int) -> np.ndarray:
  """Aspect-preserving resize: ``shortest_side`` (shortest side -> size), ``center_crop``
  (then the central size x size), ``pad`` (zero-pad to a centred square, then size x size)."""
  if policy == "none":
    return image
  h, w = image.shape[:2]
  if policy == "pad":
    side = max(h, w)
    if h != w:
      out = np.zeros((side, side, image.shape[2]), image.dtype)
      top, left = (side - h) // 2, (side - w) // 2
      out[top:top + h, left:left + w] = image
      image = out
    return transforms.resize(image, size, size)
  if policy == "center_crop":
    return transforms.center_resize(image, size)
  if policy == "shortest_side":
    scale = size / min(h, w)
    return transforms.resize(image, max(1, round(h * scale)), max(1, round(w * scale)))
  raise ValueError(f"data.resize={policy!r}: allowed {', '.join(RESIZE_POLICIES)}")


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Decoded pixels -> the uint8 (or uint16) ``[H, W, channels]`` record image (picklable)."""
  channels: int = 1
  window: str | tuple[float, float] = "auto"
  resize: str = "none"
  size: int = 0
  bit_depth: int = 8        # 16: uint16 records (dataset building)

  def __post_init__(self):
    if self.bit_depth not in (8, 16):
      raise ValueError(f"bit_depth={self.bit_depth}: allowed 8 or 16")
    parse_window(self.window)
    if self.resize not in RESIZE_POLICIES:
      raise ValueError(f"data.resize={self.resize!r}: allowed {', '.join(RESIZE_POLICIES)}")
    if self.channels not in (1, 3):
      raise ValueError(f"data.channels={self.channels}: allowed 1 or 3")

  def __call__(self, decoded: Decoded) -> np.ndarray:
    dtype = np.uint8 if self.bit_depth == 8 else np.uint16
    image = to_channels(to_display(decoded, self.window, dtype), self.channels)
    return np.ascontiguousarray(resize_policy(image, self.resize, self.size))
