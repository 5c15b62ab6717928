"""The one atomic writer: write beside the target, fsync the file, rename, fsync the folder.

After a crash (or a power cut) a reader sees either the old file or the complete new one, never a torn
one; every file and state folder of the project is written through :func:`atomic_file`.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


def fsync_path(path) -> None:
    """fsync a file or a folder (a folder's entry list: makes a rename in it durable)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` durably, on error it goes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, obj, **kw) -> None:
    write_text(path, json.dumps(obj, **kw))


def save_tensors(path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file
    with atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
