"""Run outputs on local disk or in a bucket (``gs://``, ``s3://``, ...), all through etils.epath.

A URL is never turned into a local path (``os.path.abspath("gs://b/run")`` is ``./gs:/b/run``):
URLs pass through unchanged, local paths are made absolute (orbax needs that). Object stores have
no append, so appending to a URL object rewrites it whole: fine for one writer (the metrics of a
run, its skip log), not for several writing the same object at once.

gcsfs (epath's ``gs://`` backend) caches directory listings, but orbax writes checkpoints through
TensorStore and other processes write too, so a cached listing would miss new steps: listings are
not cached (``fsspec.config.conf['gcs']``, set here unless the user set it).
"""
from __future__ import annotations

import contextlib
import os
import threading

import fsspec
from etils import epath

SCHEMES = ("gs", "s3", "az", "hf")   # the URL schemes etils.epath serves
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)


class StorageError(ValueError):
  """A path a user supplied cannot be used (an unsupported URL scheme)."""


def is_url(path: str | os.PathLike) -> bool:
  return "://" in os.fspath(path)


def path(p: str | os.PathLike) -> epath.Path:
  """``p`` as an ``epath.Path``: a URL unchanged, a local path made absolute.

  Raises StorageError for a URL scheme epath does not serve (epath would take ``memory://x`` for
  the local directory ``./memory:/x``).
  """
  s = os.fspath(p)
  if is_url(s):
    scheme = s.split("://", 1)[0]
    if scheme not in SCHEMES:
      raise StorageError(f"{s!r}: URL scheme {scheme + '://'!r} is not supported (allowed: "
                         f"{', '.join(x + '://' for x in SCHEMES)} or a local path)")
    return epath.Path(s)
  return epath.Path(os.path.abspath(s))


def write_text(p: str | os.PathLike, text: str) -> epath.Path:
  """Writes ``text`` (UTF-8) to ``p`` (parent directories created); returns the path."""
  return write_bytes(p, text.encode("utf-8"))


def read_text(p: str | os.PathLike) -> str:
  """The UTF-8 text of the file ``p``."""
  return path(p).read_bytes().decode("utf-8")


def write_bytes(p: str | os.PathLike, data: bytes) -> epath.Path:
  """Writes ``data`` to ``p`` (parent directories created); returns the path."""
  out = path(p)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_bytes(data)
  return out


class AppendFile:
  """A text file that grows by appends and is current after each: a local file stays open in
  append mode; a URL object is rewritten whole on every write (object stores have no append)."""

  def __init__(self, p: str | os.PathLike):
    self.path = path(p)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if is_url(self.path):
      self._file, self._text = None, (read_text(self.path) if self.path.exists() else "")
    else:
      self._file = open(self.path, "a", encoding="utf-8")  # pylint: disable=consider-using-with

  def write(self, text: str) -> None:
    if self._file is None:
      self._text += text
      self.path.write_bytes(self._text.encode("utf-8"))
    else:
      self._file.write(text)
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


_URL_APPENDS = threading.Lock()


def append_text(p: str | os.PathLike, text: str) -> None:
  """Appends ``text`` to the file ``p`` (created with its parents if missing). A URL object is
  read and rewritten under a lock, so that threads of this process (the input's readers) do not
  drop each other's lines; a local file is appended with one write."""
  with _URL_APPENDS if is_url(path(p)) else contextlib.nullcontext():
    f = AppendFile(p)
    try:
      f.write(text)
    finally:
      f.close()
