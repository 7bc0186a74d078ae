"""The one path layer: every file the package reads or writes outside orbax
and TFDS goes through here, on `etils.epath`, so local paths and object
stores (`gs://bucket/...`) work alike.

Local paths have `~` expanded and are made absolute; URLs are kept as given.
"""

from __future__ import annotations

import os

from etils import epath


def absolute(path: str) -> str:
  """`path` with `~` expanded, made absolute, unless it is a URL such as
  `gs://bucket/run`."""
  if '://' in path:
    return path
  return os.path.abspath(os.path.expanduser(path))


def expand(path: str | None) -> str | None:
  """`absolute(path)` for a non-empty path; '' and None stay as they are
  (they mean "the default")."""
  return absolute(path) if path else path


def is_remote(path: str) -> bool:
  return '://' in str(path)


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def isdir(path: str) -> bool:
  return epath.Path(path).is_dir()


def isfile(path: str) -> bool:
  return epath.Path(path).is_file()


def makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_text(path: str) -> str:
  return epath.Path(path).read_text()


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` via a temporary file and a rename (atomic on
  local disks), so a reader never sees a partial file."""
  tmp = epath.Path(path + '.tmp')
  tmp.write_text(text)
  tmp.replace(path)


def rmtree(path: str) -> None:
  """Removes a directory tree (local or remote); a missing one is fine."""
  p = epath.Path(path)
  if p.exists():
    p.rmtree()
