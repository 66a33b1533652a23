"""Reading and writing round artifacts. Every write is atomic: a temporary name, then a rename."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rlhf.core.errors import UserError
from rlhf.core.ranks import is_main


def read_jsonl(path: str | Path, required: Iterable[str] = (), what: str = "") -> list[dict]:
    """Rows of a JSONL file, or of an s3://bucket/key object; a bad line is an error naming the file and line
    number (`what`: the params key)."""
    if str(path).startswith("s3://"):
        from rlhf.core.s3 import read_bytes

        data = read_bytes(str(path))
    else:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such file" + (f" ({what})" if what else ""))
        data = path.read_bytes()
    rows = []
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n}: expected a JSON object")
        missing = [k for k in required if k not in row]
        if missing:
            raise UserError(f"{path}:{n}: missing field {missing[0]!r}")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(path: Path) -> None:
    """Give a scratch file or folder (created private by mkstemp/mkdtemp) the usual permissions."""
    mask = _umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_text(path, text)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(path: str | Path, text: str) -> None:
    if not is_main():  # a rank of a several-process step (rlhf/orchestration/launch.py): rank 0 writes the artifact
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _publish(Path(tmp))
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if reason := write_failure(e):  # e.g. a full disk: name the file, not the scratch name
            raise UserError(f"{path}: cannot write ({reason})") from None
        raise


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a scratch folder beside `path`; on success it replaces `path` in one rename."""
    if (
        not is_main()
    ):  # a rank other than 0 (rlhf/orchestration/launch.py) writes into a folder that is then thrown away
        with tempfile.TemporaryDirectory() as scratch:
            yield Path(scratch)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        _publish(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except Exception as e:
        if reason := write_failure(e):  # e.g. a full disk, whichever library was saving: name the folder
            raise UserError(f"{path}: cannot write ({reason})") from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def disk_bytes(files: Iterable[Path]) -> int:
    """The bytes `files` take on disk: a file hard-linked under several names counts once."""
    sizes = {}
    for f in files:
        st = f.stat()
        sizes[st.st_dev, st.st_ino] = st.st_size
    return sum(sizes.values())


def link_tree(src: str | Path, dest: str | Path) -> None:
    """`dest` as a folder of hard links to the files of `src` (the same bytes, on disk once), replacing it
    atomically; a file is copied where a link cannot be made (another device)."""
    src = Path(src)
    with atomic_dir(dest) as tmp:
        for f in src.rglob("*"):
            target = tmp / f.relative_to(src)
            if f.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)


def write_failure(e: BaseException) -> str | None:
    """The operating system's reason when `e` is a failed write, whoever raised it: an OSError (or one in
    its chain), or a library's own error carrying one (safetensors' `No space left on device (os error 28)`)."""
    for _ in range(8):  # a chain, not a cycle
        if e is None:
            return None
        if isinstance(e, OSError):
            return e.strerror or str(e)
        if errno := re.search(r"\(os error (\d+)\)", str(e)):  # Rust's io::Error, as safetensors reports it
            return os.strerror(int(errno.group(1)))
        e = e.__cause__ or e.__context__
    return None


def remove_scratch(folder: str | Path) -> None:
    """Delete what a write killed half-way left behind in `folder` (the `.<name>.<random>.tmp` scratch of
    write_text and atomic_dir): never a real artifact, which only ever appears by a rename."""
    for p in Path(folder).glob(".*.tmp"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
