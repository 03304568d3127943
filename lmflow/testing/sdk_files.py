"""LM Studio's `/files` namespace: the files a client attaches to chats (`prepare_image`, `prepare_file`).

Read from the `lmstudio` SDK and lmstudio-js (`FilesNamespace`, `FileHandle`, `parseFileIdentifier`):
`uploadFileBase64 {name, contentBase64}` answers `{identifier, fileType, sizeBytes}`; the client
puts that, with the name, in a chat message as a file part. An identifier is a file name in LM
Studio's user-files folder (lmstudio-js reads one without a `namespace:` prefix as `local:NAME`, and
refuses a local name with a `/`), and `getLocalFileAbsolutePath {fileName}` answers its `path`.
lmstudio-js says a prepared file "will be deleted when the client disconnects".

Inferred, not read anywhere (LM Studio's server is not open source):
- the identifier's form, `MILLISECONDS - N.EXT` (what LM Studio's user-files folder holds);
- how a file's type is told: images (PNG, JPEG, WebP, GIF, BMP) by their first bytes, whatever their
  name; then by extension (`.txt` is `text/plain`, `.pdf` `application/pdf`, `.doc`/`.docx`
  `application/word`); any other UTF-8 text is `text/other`; the rest `unknown`. The SDK's own
  suite asks `text/plain` for `example-file.txt` and `image` for a PNG.

The files live in a folder the server makes on the first upload and removes when it stops; a
client's files are removed when its `/files` connection closes.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: the first bytes of the image formats LM Studio takes (RIFF....WEBP is checked in full below)
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")
_BY_EXTENSION = {".txt": "text/plain", ".pdf": "application/pdf", ".doc": "application/word",
                 ".docx": "application/word"}


class FileRefused(Exception):
    """An upload or look-up the server refuses (answered as an rpcError titled with the message)."""


def file_type(name: str, data: bytes) -> str:
    """LM Studio's `fileType` of an uploaded file (see the module docstring: inferred)."""
    if data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return "image"
    known = _BY_EXTENSION.get(Path(name).suffix.lower())
    if known:
        return known
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown"
    return "text/other"


@dataclass
class UserFiles:
    """The user-files folder: what clients uploaded, by identifier, and which client owns each."""

    folder: Path | None = None
    owners: dict[str, int] = field(default_factory=dict)
    _numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def upload(self, owner: int, parameter: dict[str, Any]) -> dict[str, Any]:
        """Keep an uploaded file for `owner` (a connection's id); its handle's fields."""
        name = str(parameter.get("name") or "")
        try:
            data = base64.b64decode(str(parameter.get("contentBase64", "")), validate=True)
        except (binascii.Error, ValueError):
            raise FileRefused(f"uploadFileBase64: the content of {name!r} is not valid base64") from None
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="lmflow-user-files-"))
        suffix = Path(name).suffix if Path(name).suffix.isascii() else ""
        identifier = f"{int(time.time() * 1000)} - {next(self._numbers)}{suffix}"
        (self.folder / identifier).write_bytes(data)
        self.owners[identifier] = owner
        return {"identifier": identifier, "fileType": file_type(name, data), "sizeBytes": len(data)}

    def path(self, parameter: dict[str, Any]) -> dict[str, Any]:
        """`getLocalFileAbsolutePath`: where a file uploaded here is."""
        name = str(parameter.get("fileName", ""))
        if name not in self.owners or self.folder is None:
            raise FileRefused(f"No file {name!r} in the user files (a file prepared by a client is "
                              "removed when that client disconnects)")
        return {"path": str(self.folder / name)}

    def forget(self, owner: int) -> None:
        """Remove the files of a client that disconnected."""
        for identifier in [i for i, o in self.owners.items() if o == owner]:
            del self.owners[identifier]
            if self.folder is not None:
                (self.folder / identifier).unlink(missing_ok=True)

    def close(self) -> None:
        """Remove the folder (the server stops)."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None
        self.owners.clear()
