"""Which lmflow runs on this machine use a model on a model server, so that the run that loaded
an instance does not unload it under another run that uses it.

Every run that uses a model of a server it does not own (LM Studio, an OpenAI-compatible
server) holds a shared `flock` on one lease file per (server, model key) for as long as it
runs; the kernel drops it however the run ends. At its end, a run that loaded an instance
first writes a hand-over note for it, then tries to take the lease alone: whoever holds it
alone (this run now, or the last other user at its own end) unloads every instance a note
names and removes the notes. So the last run to use a model unloads what a run loaded, and
a run that finds the lease taken alone waits for that unload before it looks for an instance.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Callable
from typing import IO, Any

from .home import subdir


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


class Lease:
    """This run's use of model `key` on the server at `server_url` (held from creation to `close`)."""

    def __init__(self, server_url: str, key: str):
        self.server_url, self.key = server_url, key
        self._name = _digest(server_url, key)
        self.path = subdir("leases") / self._name
        self._file: IO[str] | None = open(self.path, "a")  # noqa: SIM115 - held until close()
        fcntl.flock(self._file, fcntl.LOCK_SH)  # waits while the last user unloads

    @property
    def held(self) -> bool:
        return self._file is not None

    def hand_over(self, instance: str, run_id: str) -> None:
        """Ask whoever ends last to unload `instance` (loaded by this run)."""
        note = self.path.parent / f"{self._name}-{_digest(instance)[:12]}.handover"
        partial = note.with_suffix(".partial")
        partial.write_text(json.dumps({"server": self.server_url, "key": self.key, "instance": instance,
                                       "loaded_by": run_id}))
        partial.replace(note)

    def release(self, unload: Callable[[dict[str, Any]], None]) -> bool:
        """End this run's use: when no other run holds the lease, call `unload(note)` for every
        hand-over note (their instances) and remove them. False when another run still uses it."""
        if self._file is None:
            return False
        try:
            try:  # a conversion that fails drops the shared lock too: this run is done with it
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            for note in sorted(self.path.parent.glob(f"{self._name}-*.handover")):
                try:
                    entry = json.loads(note.read_text())
                except (OSError, ValueError):
                    entry = None
                if isinstance(entry, dict) and isinstance(entry.get("instance"), str):
                    unload(entry)
                note.unlink(missing_ok=True)
            return True
        finally:
            self.close()

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
