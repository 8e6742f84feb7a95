"""Decoding real files (PNG, JPEG, 16-bit PNG/TIFF, DICOM) with known pixels; windowing vs pydicom;
DICOM files from other writers (pydicom's bundled test files)."""
import io
import pathlib

import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image
from pydicom import uid as uids
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut, apply_windowing

from medfm_jax.data import decode, image_files, transforms

RNG = np.random.default_rng(0)
HU_STORED = RNG.integers(-1000, 2000, (32, 32)).astype(np.int16)


def _decode_file(path, frame=0):
  return decode.decode(decode.read_file(path), str(path), frame)


def test_png_jpeg_and_16bit_png_tiff_roundtrip(tmp_path):
  img8 = RNG.integers(0, 256, (20, 28, 1), dtype=np.uint8)
  rgb = RNG.integers(0, 256, (20, 28, 3), dtype=np.uint8)
  img16 = RNG.integers(0, 65536, (20, 28), dtype=np.uint16)
  for name, arr in (("a.png", img8), ("rgb.png", rgb), ("b16.png", img16), ("c16.tif", img16)):
    got = _decode_file(image_files.write_image(str(tmp_path / name), arr)).pixels
    assert got.dtype == arr.dtype
    np.testing.assert_array_equal(got, arr.reshape(got.shape))
  smooth = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))[..., None]
  got = _decode_file(image_files.write_image(str(tmp_path / "j.jpg"), smooth, quality=95)).pixels
  assert got.shape == (32, 32, 1) and np.abs(got.astype(int) - smooth).mean() < 2


def test_16bit_window_modes():
  x = np.array([[0, 1000, 3000, 65535]], np.uint16)[..., None]
  d = decode.Decoded(x)
  np.testing.assert_array_equal(decode.to_display(d, "full")[0, :, 0], [0, 4, 12, 255])
  np.testing.assert_array_equal(decode.to_display(d, "auto")[0, :, 0],
                                np.rint(x[0, :, 0] / 65535 * 255))   # min-max = full here
  np.testing.assert_array_equal(decode.to_display(d, "1500,1001")[0, :, 0], [0, 0, 255, 255])
  assert decode.to_display(d, "full", np.uint16).dtype == np.uint16
  np.testing.assert_array_equal(decode.to_display(d, "full", np.uint16), x)   # identity
  for bad in ("lungs", "10", (40, 0), "a,b"):
    with pytest.raises(ValueError, match="data.window"):
      decode.parse_window(bad)


def test_dicom_hounsfield_units_match_pydicom(tmp_path):
  path = image_files.write_dicom(str(tmp_path / "ct.dcm"), HU_STORED, slope=2.0, intercept=-1024.0,
                            window=(40.0, 400.0))
  d = _decode_file(path)
  ds = pydicom.dcmread(path)
  np.testing.assert_array_equal(d.pixels[..., 0], apply_modality_lut(ds.pixel_array, ds))
  np.testing.assert_array_equal(d.pixels[..., 0], HU_STORED.astype(np.float32) * 2 - 1024)
  assert d.window == (40.0, 400.0) and not d.invert


@pytest.mark.parametrize("preset", ["lung", "mediastinum", "soft_tissue", "bone", "brain", "file"])
def test_dicom_windows_match_pydicom_reference(tmp_path, preset):
  center, width = (10.0, 600.0) if preset == "file" else decode.WINDOW_PRESETS[preset]
  path = image_files.write_dicom(str(tmp_path / "ct.dcm"), HU_STORED, slope=2.0, intercept=-1024.0,
                            window=(center, width))
  ds = pydicom.dcmread(path)
  ds.WindowCenter, ds.WindowWidth = center, width
  ref = apply_windowing(apply_modality_lut(ds.pixel_array, ds).astype(np.float64), ds)
  ref = (ref - ref.min()) / (ref.max() - ref.min()) * 255   # pydicom's output range -> [0, 255]
  got = decode.to_display(_decode_file(path), "auto" if preset == "file" else preset)
  assert got.dtype == np.uint8
  np.testing.assert_allclose(got[..., 0], ref, atol=0.51)
  assert 0 < (got == 0).mean() < 1 and 0 < (got == 255).mean() < 1   # both ends saturate


def test_dicom_monochrome1_is_inverted_and_minmax_without_window(tmp_path):
  stored = np.arange(256, dtype=np.uint16).reshape(16, 16) * 8
  m2 = _decode_file(image_files.write_dicom(str(tmp_path / "m2.dcm"), stored))
  m1 = _decode_file(image_files.write_dicom(str(tmp_path / "m1.dcm"), stored, photometric="MONOCHROME1"))
  assert m1.invert and m2.window is None
  a, b = decode.to_display(m2, "auto"), decode.to_display(m1, "auto")
  assert a.min() == 0 and a.max() == 255
  np.testing.assert_array_equal(b, 255 - a)


def test_multiframe_dicom_frames_and_header(tmp_path):
  frames = RNG.integers(0, 4096, (3, 16, 12)).astype(np.uint16)
  path = image_files.write_dicom(str(tmp_path / "mf.dcm"), frames, patient_id="P7", modality="MR")
  assert decode.dicom_info(path) == decode.DicomInfo(3, "P7", "MR")
  for f in range(3):
    np.testing.assert_array_equal(_decode_file(path, f).pixels[..., 0], frames[f])
  with pytest.raises(decode.DataError, match="frame 3 out of range"):
    _decode_file(path, 3)


def _jpeg(img):
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


@pytest.mark.parametrize("syntax", [uids.RLELossless, uids.JPEG2000Lossless, uids.JPEGLSLossless,
                                    uids.DeflatedExplicitVRLittleEndian, uids.JPEGBaseline8Bit])
def test_compressed_transfer_syntaxes_decode(tmp_path, syntax):
  path = str(tmp_path / "c.dcm")
  if syntax == uids.JPEGBaseline8Bit:
    img = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))
    image_files.write_dicom_encapsulated(path, [_jpeg(img)], syntax, 32, 32)
    got = _decode_file(path).pixels[..., 0]
    assert np.abs(got - img).mean() < 2
    return
  image_files.write_dicom(path, HU_STORED, transfer_syntax=syntax, intercept=-1024.0)
  assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
  np.testing.assert_array_equal(_decode_file(path).pixels[..., 0], HU_STORED - 1024.0)


def test_unsupported_transfer_syntax_is_one_clear_line(tmp_path):
  path = image_files.write_dicom_encapsulated(str(tmp_path / "video.dcm"), [b"\0" * 64],
                                         uids.MPEG4HP41, 16, 16)
  with pytest.raises(decode.DataError) as e:
    _decode_file(path)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(path) and "MPEG-4 AVC/H.264" in msg
  support = {u: ok for u, _, ok in decode.dicom_syntax_support()}
  assert support[uids.RLELossless] and support[uids.JPEG2000Lossless] and not support[uids.MPEG4HP41]


def test_channels_and_resize_policies():
  gray = RNG.integers(0, 256, (20, 40, 1), dtype=np.uint8)
  rgb3 = decode.to_channels(gray, 3)
  assert rgb3.shape == (20, 40, 3) and (rgb3 == gray).all()
  np.testing.assert_array_equal(decode.to_channels(rgb3, 1), gray)     # luma of gray = gray
  assert decode.resize_policy(gray, "shortest_side", 10).shape == (10, 20, 1)
  np.testing.assert_array_equal(decode.resize_policy(gray, "center_crop", 20),
                                gray[:, 10:30])
  padded = decode.resize_policy(gray, "pad", 40)
  assert padded.shape == (40, 40, 1)
  np.testing.assert_array_equal(padded[10:30], gray)
  assert not padded[:10].any() and not padded[30:].any()
  np.testing.assert_array_equal(transforms.resize(gray, 20, 40), gray)
  p = decode.Preprocess(channels=3, window="minmax", resize="pad", size=16)
  out = p(decode.Decoded(np.linspace(-5, 5, 8 * 4, dtype=np.float32).reshape(8, 4, 1)))
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8 and out.max() > 200


@pytest.mark.parametrize("signed", [True, False])
def test_native_fast_path_masks_bits_above_high_bit_like_pydicom(tmp_path, signed):
  vals = RNG.integers(-2048 if signed else 0, 2048 if signed else 4096, (2, 8, 8))
  raw = (vals & 0xFFF) | (RNG.integers(0, 16, vals.shape) << 12)      # garbage in bits 12-15
  raw = raw.astype(np.uint16).view(np.int16 if signed else np.uint16)
  ds = image_files.dicom_dataset(raw)
  ds.BitsStored, ds.HighBit = 12, 11
  path = str(tmp_path / "b12.dcm")
  ds.save_as(path, enforce_file_format=True)
  for f in range(2):
    got = _decode_file(path, f).pixels[..., 0]
    np.testing.assert_array_equal(got, pydicom.pixels.pixel_array(path, index=f))
    np.testing.assert_array_equal(got, vals[f])


# pydicom's bundled test files: written by dcmtk, GDCM, vendor CT/MR/CR/RT systems and pydicom,
# with and without meta header, uncompressed (implicit/explicit VR, big endian) and compressed
# (RLE, JPEG, JPEG-LS, JPEG 2000, deflate). Read from the package folder (get_testdata_files would
# try to download pydicom-data).
FOREIGN = pathlib.Path(pydicom.data.__file__).parent / "test_files"
# The refused files, other than those without pixel data (DICOMDIR, SR, RT plan/struct, ECG, ...),
# and why (pydicom cannot decode them either).
FOREIGN_REFUSED = {
    "no_meta.dcm": "not a PNG/JPEG/TIFF/DICOM file",          # starts with 0x20: no element
    "JPEG-lossy.dcm": "libjpeg error code '-1038'",           # 12-bit JPEG Extended, damaged scan
    "JPEG2000-embedded-sequence-delimiter.dcm": "failed to read the header",
    "MR_truncated.dcm": "pixel data has 8130 bytes, expected 8192",
    "badVR.dcm": "invalid literal for int() with base 10: '1A'",   # NumberOfFrames (IS) = '1A'
    "meta_missing_tsyntax.dcm": "'Bits Allocated'",           # pixel data without image module
    "nested_priv_SQ.dcm": "'Bits Allocated'",
}


def _pydicom_reference(path):
  """pydicom's frame 0 (modality values for grayscale), or None if pydicom cannot decode it."""
  try:
    ds = pydicom.dcmread(path, force=True)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    ref = pydicom.pixels.pixel_array(ds, index=0 if frames > 1 else None)
    return apply_modality_lut(ref, ds)[..., None] if ref.ndim == 2 else ref
  except Exception:  # pylint: disable=broad-except
    return None


def test_foreign_dicom_files_decode_like_pydicom_or_refuse_in_one_line():
  files = sorted(p for p in FOREIGN.rglob("*") if p.is_file() and p.suffix in ("", ".dcm"))
  decoded, refused = [], {}
  for p in files:
    ref = _pydicom_reference(p)
    try:
      got = _decode_file(p).pixels
    except decode.DataError as e:
      msg = str(e)
      assert msg.startswith(f"{p}: ") and "\n" not in msg, msg
      assert ref is None, f"pydicom decodes {p.name} but it was refused: {msg}"
      if "no pixel data" not in msg and p.name != "README":
        refused[p.name] = e.reason
      continue
    assert ref is not None and got.shape == ref.shape, p.name
    np.testing.assert_allclose(got, ref, rtol=1e-6, err_msg=p.name)
    decoded.append(p.relative_to(FOREIGN).as_posix())
  assert sorted(refused) == sorted(FOREIGN_REFUSED)
  for name, reason in refused.items():
    assert FOREIGN_REFUSED[name] in reason, (name, reason)
  # TIFF header in the preamble (dual-format files), big endian, implicit VR, vendor CR/CT/MR.
  assert {"CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
          "examples_rgb_color.dcm", "SC_rgb_dcmtk_+eb+cr.dcm", "SC_rgb_gdcm_KY.dcm",
          "dicomdirtests/77654033/CR1/6154"} <= set(decoded)
  assert len(decoded) >= 80


@pytest.mark.parametrize("layout", ["implicit_le", "explicit_le", "explicit_be", "meta_no_preamble"])
def test_dicom_without_preamble_or_meta_reads_with_force(layout):
  """CT_small.dcm rewritten as a bare dataset (no preamble, no meta header) or a meta header
  without preamble, as older writers and some PACS exports store them."""
  ds = pydicom.dcmread(FOREIGN / "CT_small.dcm")
  want = _decode_file(FOREIGN / "CT_small.dcm").pixels
  buf = io.BytesIO()
  if layout == "meta_no_preamble":
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()[132:]
  else:
    implicit, little = {"implicit_le": (True, True), "explicit_le": (False, True),
                        "explicit_be": (False, False)}[layout]
    if not little:
      ds.PixelData = ds.pixel_array.astype(ds.pixel_array.dtype.newbyteorder(">")).tobytes()
    ds.preamble, ds.file_meta = None, FileMetaDataset()
    pydicom.dcmwrite(buf, ds, implicit_vr=implicit, little_endian=little, enforce_file_format=False)
    data = buf.getvalue()
  assert data[128:132] != b"DICM"
  np.testing.assert_array_equal(decode.decode(data, "1.2.840.99").pixels, want)   # no extension
  np.testing.assert_array_equal(decode.decode(data, "ct.dcm").pixels, want)


def test_dicom_marker_wins_over_tiff_preamble_and_bare_data_is_refused_in_one_line():
  data = (FOREIGN / "CT_small.dcm").read_bytes()
  assert data[:4] == b"II*\x00" and decode.sniff(data[:132]) == "dicom"
  with pytest.raises(decode.DataError, match="content is DICOM but the extension '.tif'"):
    decode.decode(data, "ct.tif")
  ds = pydicom.dcmread(FOREIGN / "CT_small.dcm")
  ds.preamble, ds.file_meta = None, FileMetaDataset()
  ds.PixelData = encapsulate([b"\0" * 64])      # compressed pixels but no syntax to name the codec
  ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
  buf = io.BytesIO()
  pydicom.dcmwrite(buf, ds, implicit_vr=False, little_endian=True, enforce_file_format=False)
  with pytest.raises(decode.DataError, match="no transfer syntax") as e:
    decode.decode(buf.getvalue(), "c.dcm")
  assert str(e.value).startswith("c.dcm: ") and "\n" not in str(e.value)
