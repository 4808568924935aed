"""The forum's deny list of certificate serial numbers, re-read when it changes."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from ispf.errors import ConfigError

log = logging.getLogger(__name__)


def parse_serials(text: str, where: str) -> frozenset[int]:
    serials: set[int] = set()
    for n, line in enumerate(text.splitlines(), start=1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        try:
            serials.add(int(item, 16))
        except ValueError as exc:
            raise ConfigError(f"{where} line {n}: not a hex serial number") from exc
    return frozenset(serials)


class RevocationList:
    """Serials refused by this node. A missing or unreadable update keeps the last list."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._serials: frozenset[int] = frozenset()
        if path is not None:
            if not path.exists():
                raise ConfigError(f"revocation list {path} does not exist")
            self._refresh()

    def _refresh(self) -> frozenset[int]:
        if self.path is None:
            return self._serials
        with self._lock:
            try:
                st = self.path.stat()
            except FileNotFoundError:
                log.error("revocation list %s vanished; keeping the last one", self.path)
                return self._serials
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                try:
                    serials = parse_serials(self.path.read_text(encoding="utf-8"), str(self.path))
                except (ConfigError, UnicodeDecodeError) as exc:
                    log.error("revocation list update refused, keeping the last one: %s", exc)
                    return self._serials
                if serials != self._serials:
                    log.info("revocation list: %d certificates revoked", len(serials))
                self._serials, self._stamp = serials, stamp
            return self._serials

    def is_revoked(self, serial: int) -> bool:
        return serial in self._refresh()
