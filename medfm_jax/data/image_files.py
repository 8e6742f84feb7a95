"""Writing image files: PNG/TIFF (8/16-bit) with Pillow, DICOM with pydicom, phantom folders.

Used by tests and the data benchmark to create real files with known pixels, and by anyone who
wants a folder dataset from arrays.
"""
from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
from PIL import Image

from medfm_jax import storage
from medfm_jax.data import phantoms


def encode_png(image: np.ndarray) -> bytes:
  """uint8 or uint16 ``[H, W]`` / ``[H, W, 1]`` (uint8 also ``[H, W, 3]``) -> PNG bytes."""
  buf = io.BytesIO()
  _pil(image).save(buf, format="PNG")
  return buf.getvalue()


def _pil(image: np.ndarray) -> Image.Image:
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.dtype == np.uint16:
    if image.ndim != 2:
      raise ValueError("16-bit images must be single-channel")
    return Image.fromarray(image, mode=None)
  if image.dtype != np.uint8:
    raise ValueError(f"cannot write {image.dtype} images; use uint8 or uint16")
  return Image.fromarray(image)


def write_image(path: str, image: np.ndarray, **save_kwargs) -> str:
  """Writes PNG/JPEG/TIFF by the extension of ``path`` (local or URL; folders created); returns
  ``path``."""
  fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
  if fmt is None:
    raise ValueError(f"{path!r}: unknown image file extension")
  buf = io.BytesIO()
  _pil(image).save(buf, format=fmt, **save_kwargs)
  storage.write_bytes(path, buf.getvalue())
  return path


def _save_dicom(path: str, ds) -> str:
  buf = io.BytesIO()
  ds.save_as(buf, enforce_file_format=True)
  storage.write_bytes(path, buf.getvalue())
  return path


def dicom_dataset(pixels: np.ndarray, *, slope: float = 1.0, intercept: float = 0.0,
                  window: tuple[float, float] | None = None,
                  photometric: str = "MONOCHROME2", patient_id: str = "", modality: str = "CT"):
  """A pydicom FileDataset (Explicit VR Little Endian) holding ``pixels``.

  ``pixels``: int16/uint16/uint8 ``[H, W]`` or ``[frames, H, W]`` stored values (modality
  value = stored * slope + intercept), or uint8 ``[H, W, 3]`` RGB.
  """
  from pydicom.dataset import FileDataset, FileMetaDataset  # optional: the 'dicom' extra; pylint: disable=g-import-not-at-top
  from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian,  # optional: the 'dicom' extra; pylint: disable=g-import-not-at-top
                           generate_uid)
  pixels = np.ascontiguousarray(pixels)
  rgb = pixels.ndim == 3 and pixels.shape[-1] == 3 and pixels.dtype == np.uint8
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = CTImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
  ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.PatientID = modality, patient_id
  ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
  frames = 1 if rgb or pixels.ndim == 2 else pixels.shape[0]
  ds.Rows, ds.Columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
  ds.SamplesPerPixel = 3 if rgb else 1
  ds.PhotometricInterpretation = "RGB" if rgb else photometric
  if rgb:
    ds.PlanarConfiguration = 0
  bits = pixels.dtype.itemsize * 8
  ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
  ds.PixelRepresentation = int(pixels.dtype.kind == "i")
  if frames > 1:
    ds.NumberOfFrames = frames
  if not rgb:
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
  if window is not None:
    ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
  ds.PixelData = pixels.tobytes()
  return ds


def write_dicom(path: str, pixels: np.ndarray, transfer_syntax: str | None = None, **kwargs) -> str:
  """Writes :func:`dicom_dataset` to ``path``, compressed with pydicom's encoders if
  ``transfer_syntax`` is given (e.g. RLE Lossless, JPEG 2000 Lossless, Deflated)."""
  from pydicom.uid import DeflatedExplicitVRLittleEndian  # optional: the 'dicom' extra; pylint: disable=g-import-not-at-top
  ds = dicom_dataset(pixels, **kwargs)
  if transfer_syntax == DeflatedExplicitVRLittleEndian:
    ds.file_meta.TransferSyntaxUID = transfer_syntax
  elif transfer_syntax is not None:
    ds.compress(transfer_syntax)
  return _save_dicom(path, ds)


def write_dicom_encapsulated(path: str, frames: Sequence[bytes], transfer_syntax: str,
                             rows: int, columns: int, bits: int = 8, **kwargs) -> str:
  """A DICOM whose pixel data are the given already-encoded ``frames`` (e.g. JPEG bytes)."""
  from pydicom.encaps import encapsulate  # optional: the 'dicom' extra; pylint: disable=g-import-not-at-top
  ds = dicom_dataset(np.zeros((rows, columns), np.uint8 if bits == 8 else np.uint16), **kwargs)
  ds.file_meta.TransferSyntaxUID = transfer_syntax
  ds.PixelData = encapsulate(list(frames))
  ds["PixelData"].VR = "OB"
  if len(frames) > 1:
    ds.NumberOfFrames = len(frames)
  return _save_dicom(path, ds)


def export_phantoms(root: str, num_examples: int, image_size: int = 32, fmt: str = "png",
                    split: str = "train") -> str:
  """Writes phantoms as ``root/<finding>/<i>.<ext>`` (png, or dicom: int16 HU-like values with
  slope 1 / intercept -1024, window 40/400). Patient ids ``p<i // 4>`` (DICOM tag); returns root."""
  source = phantoms.PhantomSource(split, image_size=image_size, channels=1,
                                  num_examples=num_examples)
  for i in range(num_examples):
    record = source[i]
    folder = os.path.join(root, phantoms.FINDINGS[int(record["finding"])])
    if fmt == "png":
      write_image(os.path.join(folder, f"{i:06d}.png"), record["image"])
    elif fmt == "dicom":
      stored = (record["image"][..., 0].astype(np.int16) * 4).astype(np.int16)
      write_dicom(os.path.join(folder, f"{i:06d}.dcm"), stored, intercept=-1024.0,
                  window=(-1024 + 512, 1024), patient_id=f"p{i // 4}")
    else:
      raise ValueError(f"fmt={fmt!r}: allowed 'png', 'dicom'")
  return root
