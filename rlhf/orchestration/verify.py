"""`rlhf verify`: every output dvc.lock records, hashed again from its bytes.

DVC decides a file is unchanged when its size and modification time are (its state database under .dvc/tmp
remembers the hash it computed then), so a file changed in place with both kept — a bit flip on disk, a
tool that restores mtimes, a hand edit undone with `touch -r` — passes `dvc status`. This reads every byte
and hashes it as DVC does: a file's md5 is that of its content; a folder's is the md5 of its manifest (a
JSON list of each file's md5 and relative path, sorted by path) followed by `.dir`. The manifest DVC stored
in its cache for the recorded hash names the files that differ; without it the folder is named. Files a
.dvcignore names are left out of a folder's manifest, as DVC leaves them out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import yaml

from rlhf.core.errors import UserError

LOCK = Path("dvc.lock")
CACHE = Path(".dvc/cache/files/md5")


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def dvcignore(root: Path) -> Callable[[Path], bool]:
    """Whether DVC leaves a path (relative to the project at `root`) out of what it tracks: a pattern of the
    .dvcignore in the project's root or in any folder above the path (gitignore syntax, as DVC reads it)."""
    import pathspec

    specs: dict[Path, pathspec.PathSpec | None] = {}

    def spec(folder: Path) -> pathspec.PathSpec | None:
        if folder not in specs:
            f = root / folder / ".dvcignore"
            specs[folder] = (
                pathspec.PathSpec.from_lines("gitwildmatch", f.read_text().splitlines()) if f.is_file() else None
            )
        return specs[folder]

    def ignored(path: Path) -> bool:
        return any((s := spec(p)) and s.match_file(path.relative_to(p).as_posix()) for p in path.parents)

    return ignored


def manifest(folder: Path, ignored: Callable[[Path], bool] = lambda p: False) -> list[dict]:
    """A folder as DVC lists it: each file's md5 and path relative to the folder, sorted by path; files
    `ignored` (.dvcignore) left out as DVC leaves them out."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not ignored(p))
    return sorted(({"md5": md5_file(p), "relpath": p.relative_to(folder).as_posix()} for p in files), key=_relpath)


def _relpath(entry: dict) -> str:
    return entry["relpath"]


def dir_md5(entries: list[dict]) -> str:
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def check_output(out: dict, ignored: Callable[[Path], bool] = lambda p: False) -> list[str]:
    """What differs between one dvc.lock `outs` entry and the workspace: paths with the reason, none if equal."""
    path, recorded = Path(out["path"]), out.get("md5", "")
    if not path.exists():
        return [f"{path}: missing"]
    if not recorded.endswith(".dir"):
        return [] if path.is_file() and md5_file(path) == recorded else [f"{path}: content differs"]
    if not path.is_dir():
        return [f"{path}: not a folder"]
    entries = manifest(path, ignored)
    if dir_md5(entries) == recorded:
        return []
    stored = CACHE / recorded[:2] / recorded[2:]
    try:
        expected = {e["relpath"]: e["md5"] for e in json.loads(stored.read_text())}
    except (OSError, ValueError, KeyError, TypeError):  # not in the cache (e.g. pulled without it): name the folder
        return [f"{path}/: content differs"]
    found = {e["relpath"]: e["md5"] for e in entries}
    differ = [
        f"{path / rel}: content differs" for rel in sorted(expected) if found.get(rel, expected[rel]) != expected[rel]
    ]
    missing = [f"{path / rel}: missing" for rel in sorted(expected) if rel not in found]
    extra = [f"{path / rel}: not in dvc.lock" for rel in sorted(found) if rel not in expected]
    return differ + missing + extra or [f"{path}/: content differs"]


def verify(lock: Path = LOCK) -> tuple[int, list[str]]:
    """Check every output of every stage dvc.lock records; (outputs checked, one line per difference naming the
    path and the stage that wrote it)."""
    try:
        stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    except FileNotFoundError:
        raise UserError(f"{lock}: no such file: no stage has run here yet (`rlhf run` runs them)") from None
    except yaml.YAMLError as e:
        raise UserError(f"{lock}: not valid YAML ({str(e).splitlines()[0]})") from None
    checked, problems, ignored = 0, [], dvcignore(Path("."))
    for name, entry in stages.items():
        for out in entry.get("outs", []):
            checked += 1
            if out.get("hash") != "md5":  # recorded by DVC 2 (md5 of text with dos2unix line ends): not comparable
                problems.append(f"{out['path']}: recorded by DVC 2, not checked (`dvc commit -f` records it anew)")
                continue
            problems += [f"{line} ({name})" for line in check_output(out, ignored)]
    return checked, problems
