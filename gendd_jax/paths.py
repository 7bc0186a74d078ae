"""The one path layer: every file the package reads or writes outside orbax
and TFDS goes through here, on `etils.epath`, so local paths and object
stores (`gs://bucket/...`) work alike.

Local paths have `~` expanded and are made absolute; URLs are kept as given.

Clients. `gs://` paths go through `gcsfs` (epath's fsspec backend; importing
this module sets `EPATH_USE_TF=false` unless it is set already) and orbax's
arrays through TensorStore. Both honour the standard `STORAGE_EMULATOR_HOST`
(TensorStore through `TENSORSTORE_GCS_HTTP_URL`, which is derived from it
here), so one variable points the whole package at a local GCS emulator.
TensorBoard event files go through the same layer (`events`), so they too
reach a bucket or an emulator.

array_record opens local files only. A remote dataset or features directory
is therefore read through a copy on local disk (`local_copy`, once per host,
under `GENDD_CACHE_DIR`, default `~/.cache/gendd_jax`), and remote outputs are
written locally and uploaded (`upload`). For datasets too large for local
disk, mount the bucket with gcsfuse and pass the mount path instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from typing import Callable

from etils import epath
import fsspec

os.environ.setdefault('EPATH_USE_TF', 'false')
if os.environ.get('STORAGE_EMULATOR_HOST'):
  os.environ.setdefault('TENSORSTORE_GCS_HTTP_URL',
                        os.environ['STORAGE_EMULATOR_HOST'])
  # Emulators serve the JSON API but not the storage-layout API that gcsfs's
  # zonal-bucket support asks first (it warns on every call otherwise).
  os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')


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


def read_bytes(path: str) -> bytes:
  return epath.Path(path).read_bytes()


def write_bytes(path: str, data: bytes) -> None:
  """Writes a whole file or object (no rename: see `write_text`)."""
  epath.Path(path).write_bytes(data)


def append_bytes(path: str, data: bytes) -> None:
  """Appends to a local file and flushes it (object stores cannot append:
  write a new object instead)."""
  if is_remote(path):
    raise ValueError(f'cannot append to an object: {path}')
  with open(path, 'ab') as f:
    f.write(data)
    f.flush()


def join(path: str, *parts: str) -> str:
  return os.fspath(epath.Path(path).joinpath(*parts))


def listdir(path: str) -> list[str]:
  """Names in directory `path`, sorted."""
  return sorted(p.name for p in epath.Path(path).iterdir())


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` so that a reader never sees a partial file: an
  object store publishes an object only once it is uploaded, and a local
  file is written aside and renamed."""
  if is_remote(path):
    epath.Path(path).write_text(text)
    return
  tmp = epath.Path(path + '.tmp')
  tmp.write_text(text)
  tmp.replace(path)


def create_exclusive(path: str, text: str) -> bool:
  """Creates `path` holding `text` unless it exists; whether it did. Atomic
  on local disks (O_EXCL) and on GCS (a generation-0 precondition)."""
  if is_remote(path):
    fs, _ = fsspec.core.url_to_fs(path)
    try:
      fs.pipe(path, text.encode(), mode='create')
    except FileExistsError:
      return False
    return True
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'w') as f:
    f.write(text)
  return True


def rmtree(path: str) -> None:
  """Removes a directory tree (local or remote); a missing one is fine."""
  p = epath.Path(path)
  if p.exists():
    p.rmtree()


def files(root: str) -> dict[str, list[int]]:
  """`{relative path: [size, mtime]}` of every file under `root`."""
  root = root.rstrip('/')
  scheme = root.split('://')[0] + '://' if is_remote(root) else ''
  out = {}
  for dirpath, _, names in epath.Path(root).walk():
    d = str(dirpath)
    if scheme and not d.startswith(scheme):
      d = scheme + d  # fsspec's walk drops the scheme.
    for name in names:
      f = f'{d}/{name}'
      st = epath.Path(f).stat()
      out[f[len(root) + 1:]] = [st.length, st.mtime]
  return out


def copy_file(src: str, dst: str) -> None:
  """Copies one file between any two places (local or remote), streaming."""
  with epath.Path(src).open('rb') as r, epath.Path(dst).open('wb') as w:
    shutil.copyfileobj(r, w, 16 << 20)


def move_file(src: str, dst: str) -> None:
  """Moves one file within one filesystem (on an object store, a
  server-side copy and delete: no bytes pass through this host)."""
  if not is_remote(src):
    os.replace(src, dst)
    return
  fs, _ = fsspec.core.url_to_fs(src)
  fs.mv(src, dst)


def cache_root() -> str:
  return absolute(os.environ.get('GENDD_CACHE_DIR', '~/.cache/gendd_jax'))


def local_copy(root: str, sub: str = '',
               log: Callable[[str], object] = print) -> str:
  """A local root holding `root/sub`: `root` itself when it is local; for a
  remote `root`, a copy of `root/sub` on local disk (array_record reads local
  files only) at `<returned root>/sub`.

  The copy is reused while the remote listing (names, sizes, times) is
  unchanged. Processes of one host take turns (a file lock), so the first
  copies and the others reuse its copy.
  """
  if not is_remote(root):
    return absolute(root)
  src = '/'.join(p.strip('/') for p in (root, sub) if p)
  listing = files(src)
  if not listing:
    raise FileNotFoundError(f'{src} is empty or does not exist')
  home = os.path.join(cache_root(),
                      hashlib.sha1(src.encode()).hexdigest()[:16])
  target = os.path.join(home, sub) if sub else home
  stamp = os.path.join(cache_root(), os.path.basename(home) + '.json')
  want = json.dumps(dict(source=src, files=listing), sort_keys=True)
  os.makedirs(cache_root(), exist_ok=True)
  with open(stamp + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.isfile(stamp) and open(stamp).read() == want:
      return home
    log(f'copying {src} ({len(listing)} files, '
        f'{sum(v[0] for v in listing.values()) / 2**20:.1f} MiB) to {target}: '
        'array_record reads local files only (for data larger than local '
        'disk, mount the bucket with gcsfuse and pass the mount path)')
    if os.path.exists(stamp):
      os.remove(stamp)
    shutil.rmtree(home, ignore_errors=True)
    for rel in listing:
      dst = os.path.join(target, rel)
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      copy_file(f'{src}/{rel}', dst)
    with open(stamp, 'w') as f:
      f.write(want)
  return home


def upload(local_dir: str, remote_dir: str, last: tuple[str, ...] = (),
           skip=()) -> None:
  """Copies every file under `local_dir` to `remote_dir` but those in
  `skip`; the files named in `last` (relative paths) go after all others, so
  a reader that waits for them sees a complete directory."""
  listing = sorted(files(local_dir), key=lambda r: (r in last, r))
  for rel in listing:
    if rel in skip:
      continue
    dst = epath.Path(f'{remote_dir.rstrip("/")}/{rel}')
    copy_file(os.path.join(local_dir, rel), str(dst))
