"""Atomic file writes, the one place that renames files into place: each writer fills a temporary
file beside the target, flushes it to disk, gives it the usual permissions and renames it over the
target, so a crash leaves the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from typing import Callable


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str, fill: Callable[[str], None], suffix: str = "") -> None:
    """`fill(tmp_path)` writes the content; then fsync, chmod and rename over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix or os.path.basename(path))
    os.close(fd)
    try:
        fill(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """UTF-8 text (whatever the locale: tokenizer files hold non-ASCII tokens)."""
    def fill(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, fill)


def atomic_save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    # clone: expert slices and the MTP copies of embedding and head share storage in memory
    atomic_write(path, lambda tmp: save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, tmp,
                                             metadata=metadata or {"format": "pt"}), suffix=".safetensors")


def atomic_torch_save(obj, path: str) -> None:
    """torch.save (trainer and optimizer state; read back with weights_only=True)."""
    import torch
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
