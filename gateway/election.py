"""Which gateway worker of a host reads the history stream: the holder of a file lock.

``fcntl.flock`` on a file of the gateway's private directory (``HISTORY_RELAY_DIR``): one
holder at a time, and the kernel releases the lock the moment its holder dies, however it
dies (a SIGKILL included), so the next worker to try takes it at once. A lock is held by an
open file description, so two locks of the same path in one process exclude each other too.
"""

from __future__ import annotations

import fcntl
import os


class ReaderLock:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock unless another holds it; whether this one holds it now."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor of the lock releases it
