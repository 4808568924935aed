"""The forum salts this node holds: every ``epoch-<N>.salt`` in its salt folder.

The folder is re-read when it changes, so a new epoch's salt can be added for
a roll-over, and a retired one removed, without a restart. `retire` destroys
an epoch's salt file (overwritten, then unlinked).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path

from ispf.errors import ConfigError, PreconditionFailed
from ispf.keys import SALT_BYTES, ForumSalt, salt_path

log = logging.getLogger(__name__)
_SALT_FILE = re.compile(r"^epoch-(\d+)\.salt$")


class SaltRing:
    def __init__(self, folder: Path) -> None:
        if not folder.is_dir():
            raise ConfigError(f"salt folder {folder} does not exist")
        self.folder = folder
        self._lock = threading.Lock()
        self._stamp = -1
        self._salts: dict[int, ForumSalt] = {}
        self._refresh()

    def _refresh(self) -> dict[int, ForumSalt]:
        with self._lock:
            stamp = self.folder.stat().st_mtime_ns
            if stamp != self._stamp:
                salts: dict[int, ForumSalt] = {}
                for f in sorted(self.folder.iterdir()):
                    m = _SALT_FILE.match(f.name)
                    if m:
                        salts[int(m.group(1))] = ForumSalt.from_file(f, int(m.group(1)))
                if salts.keys() != self._salts.keys():
                    log.info("salt epochs held: %s", ", ".join(map(str, sorted(salts))) or "none")
                self._salts, self._stamp = salts, stamp
            return self._salts

    def get(self, epoch: int) -> ForumSalt | None:
        return self._refresh().get(epoch)

    def epochs(self) -> list[int]:
        return sorted(self._refresh())

    def retire(self, epoch: int, current: int) -> None:
        """Destroy an epoch's salt file; the epoch is refused from then on."""
        if epoch == current:
            raise PreconditionFailed(
                f"epoch {epoch} is the current epoch: move every node to the next epoch first"
            )
        path = salt_path(self.folder, epoch)
        if not path.exists():
            raise PreconditionFailed(f"no salt for epoch {epoch} in {self.folder}")
        # Overwrite before unlinking, so the bytes do not linger in the file's blocks.
        with path.open("r+b") as fh:
            fh.write(b"0" * (2 * SALT_BYTES + 1))
            fh.flush()
            os.fsync(fh.fileno())
        path.unlink()
        self._refresh()
