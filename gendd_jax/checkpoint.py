"""Orbax checkpointing: resumable training state and exported weights.

Everything orbax-specific lives here, so a move to another checkpoint API
touches one file. Training checkpoints hold `{step, params, batch_stats,
opt_state}`, a JSON `meta` item and the data iterator's state (one JSON file
per process, through grain's handler); an export (`save_export`, one
format for every producer and reader) holds only the weights a later stage
or an evaluation needs, plus JSON metadata.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from etils import epath
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from gendd_jax import errors as errors_lib
from gendd_jax import paths
from gendd_jax import sharding
from gendd_jax.errors import CheckpointError
from gendd_jax.errors import IncompatibleCheckpointError


def publish(files: dict[str, str], name: str) -> None:
  """Process 0 writes `files` (`{path: text}`, each atomically); every
  process then waits at a barrier, so no host reads (or moves on past) a
  file before it is complete."""
  if jax.process_index() == 0:
    for path, text in files.items():
      paths.write_text(path, text)
  sharding.barrier(f'gendd_publish_{name}')


def abstract_like(tree: Any, sharding: Any = None) -> Any:
  """ShapeDtypeStructs (optionally with a sharding) mirroring `tree`."""
  def fn(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(fn, tree)


class _StateSnapshot:
  """A data-iterator state captured when the save is requested (the save
  itself may finish in the background while training goes on)."""

  def __init__(self, state: dict[str, Any] | None = None):
    self.state = state

  def get_state(self) -> bytes:
    return json.dumps(self.state).encode()

  def set_state(self, raw: bytes) -> None:
    self.state = json.loads(raw)

  def start_prefetch(self) -> None:
    pass


class Checkpointer:
  """A `CheckpointManager` for one run directory (async, keeps the last N)."""

  def __init__(self, directory: str, max_to_keep: int = 2,
               async_save: bool = True):
    self.directory = paths.absolute(directory)
    self._options = dict(max_to_keep=max_to_keep, async_save=async_save)
    self._mngr = self._manager()

  def _manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=self._options['max_to_keep'], create=True,
            enable_async_checkpointing=self._options['async_save']),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler()})

  def restore_latest_valid(self, abstract_state: Any, check=None, log=None
                           ) -> tuple[Any, dict[str, Any]] | None:
    """`restore` of the newest checkpoint that can be read (None: there is
    no checkpoint).

    Checkpoints are tried newest first, the same list on every process
    (process 0's listing). For each one:

    1. its JSON `meta` is read: a checkpoint written by another number of
       processes raises `IncompatibleCheckpointError`, and otherwise the
       meta goes to `check(step, meta)`, which may refuse the resume by
       raising (e.g. a changed config); either error propagates and nothing
       is renamed;
    2. its state tree is compared with `abstract_state`: a difference raises
       `IncompatibleCheckpointError` naming it, and nothing is renamed;
    3. its arrays are restored, with one retry (a transient read error).

    A checkpoint whose meta, tree or arrays cannot be read on some process
    (corrupt or partially written) is renamed to `<step>.corrupt` by process
    0 (kept for inspection, ignored from then on) and the previous one is
    tried, with a message through `log`. Running out of memory is reported
    as it is, never taken for corruption.
    """
    errors = []
    steps = _agreed(sorted(self.all_steps(), reverse=True))
    if not steps:
      return None
    for step in steps:
      try:
        out = self._restore_checked(abstract_state, step, check)
      except _Unreadable as e:
        errors.append(str(e))
        aside = self._move_aside(step)
        if log:
          log(f'warning: {e}; moved it to {aside} and trying the previous '
              'checkpoint')
        continue
      if errors and log:
        log(f'resuming from checkpoint {step} (the newer one(s) could not be '
            'read)')
      return out
    raise CheckpointError(f'no readable checkpoint in {self.directory}: '
                          + '; '.join(errors))

  def _restore_checked(self, abstract_state, step, check):
    """Steps 1-3 of `restore_latest_valid` for one checkpoint; raises
    `_Unreadable` (agreed by every process) for a corrupt one."""
    meta = _read_everywhere(step, self._raw_meta)
    count = meta.pop(_PROCESS_COUNT, None)
    if count is not None and count != jax.process_count():
      raise IncompatibleCheckpointError(
          f'checkpoint {step} in {self.directory} was written by {count} '
          f'process(es), this run has {jax.process_count()}: each process '
          'saved its own data-iterator position. Resume with '
          f'{count} process(es), or start over in a new --workdir')
    if check is not None:
      check(step, meta)
    stored = _read_everywhere(step, self._state_shapes)
    differences = tree_differences(stored, _shapes(abstract_state))
    if differences:
      raise IncompatibleCheckpointError(
          f'checkpoint {self.directory}/{step} does not fit this run\'s '
          f'state ({"; ".join(differences[:8])}'
          f'{"; ..." if len(differences) > 8 else ""}): was it written with '
          'another model or optimiser? It was left in place')
    out = None
    for attempt in range(2):
      try:
        out = self.restore(abstract_state, step)
        failure = ''
      except CheckpointError as e:
        if _out_of_memory(e):
          raise
        failure = str(e)
      if not sharding.any_process(bool(failure)):
        return out
      if attempt == 0:
        time.sleep(1.0)  # Then once more: a transient error passes.
    raise _Unreadable(failure or f'checkpoint {step} could not be restored '
                      'on another process')

  def _state_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    try:
      md = self._mngr.metadata(step).item_metadata['state']
      return _shapes(getattr(md, 'tree', md))
    except Exception as e:  # orbax raises many types; report one clearly.
      raise CheckpointError(
          f'checkpoint {self.directory}/{step} state metadata could not be '
          f'read ({type(e).__name__}: {errors_lib.first_line(e)})') from e

  def _move_aside(self, step: int) -> str:
    src = epath.Path(self.directory) / str(step)
    dest = epath.Path(self.directory) / f'{step}.corrupt'
    n = 1
    while dest.exists():
      dest = epath.Path(self.directory) / f'{step}.corrupt{n}'
      n += 1
    if jax.process_index() == 0:
      src.rename(dest)
    # Nobody rescans before the rename.
    sharding.barrier(f'gendd_move_aside_{step}')
    self._mngr.close()
    self._mngr = self._manager()  # Forget the moved step.
    return str(dest)

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def metadata(self, step: int) -> dict[str, Any]:
    """The JSON `meta` item of checkpoint `step` (no arrays are read), as it
    was given to `save`."""
    meta = self._raw_meta(step)
    meta.pop(_PROCESS_COUNT, None)
    return meta

  def _raw_meta(self, step: int) -> dict[str, Any]:
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types; report one clearly.
      raise CheckpointError(
          f'checkpoint {self.directory}/{step} metadata could not be read '
          f'({type(e).__name__}: {errors_lib.first_line(e)})') from e
    return dict(out['meta'])

  def save(self, step: int, state: Any, meta: dict[str, Any],
           data_state: dict[str, Any] | None = None) -> None:
    """Saves `state`, `meta` and (per process) the data iterator's state.

    The number of processes is recorded with `meta`: a checkpoint written
    by another number is refused on restore (each process's data-iterator
    position is its own)."""
    items = dict(state=ocp.args.StandardSave(state),
                 meta=ocp.args.JsonSave(dict(
                     meta, **{_PROCESS_COUNT: jax.process_count()})))
    if data_state is not None:
      items['data'] = grain.checkpoint.CheckpointSave(
          _StateSnapshot(data_state))
    try:
      self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(self._save_failure(step, e)) from e

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, dict[str, Any]]:
    """`(state, meta)`; `meta['data_state']` holds this process's data
    iterator state when the checkpoint has one."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    items = dict(state=ocp.args.StandardRestore(abstract_state),
                 meta=ocp.args.JsonRestore())
    has_data = paths.isdir(os.path.join(self.directory, str(step), 'data'))
    snapshot = _StateSnapshot()
    if has_data:
      items['data'] = grain.checkpoint.CheckpointRestore(snapshot)
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types; report one clearly.
      raise CheckpointError(
          f'checkpoint {self.directory}/{step} could not be restored '
          f'({type(e).__name__}: {errors_lib.first_line(e)})') from e
    meta = dict(out['meta'])
    meta.pop(_PROCESS_COUNT, None)
    if has_data:
      meta['data_state'] = snapshot.state
    return out['state'], meta

  def _save_failure(self, step: int, e: BaseException) -> str:
    cause = e
    while cause is not None and not isinstance(cause, OSError):
      cause = cause.__cause__ or cause.__context__
    reason = (cause.strerror or str(cause)) if cause is not None else (
        f'{type(e).__name__}: {errors_lib.first_line(e)}')
    return (f'could not save checkpoint {step} in {self.directory}: '
            f'{reason}; the earlier checkpoints are intact')

  def wait(self) -> None:
    """Blocks until pending saves are written (raises if one failed)."""
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(self._save_failure(
          self._mngr.latest_step() or 0, e)) from e

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._mngr.close()


_PROCESS_COUNT = 'process_count'  # Recorded by `save`, checked on restore.


class _Unreadable(Exception):
  """A checkpoint that cannot be read (on some process): moved aside."""


def _read_everywhere(step: int, read):
  """`read(step)`, or `_Unreadable` on every process if it raised a
  `CheckpointError` on any."""
  failure, out = '', None
  try:
    out = read(step)
  except CheckpointError as e:
    failure = str(e)
  if sharding.any_process(bool(failure)):
    raise _Unreadable(failure or f'checkpoint {step} is unreadable on '
                      'another process')
  return out


def _agreed(steps: list[int]) -> list[int]:
  """Process 0's list of steps (its newest 64), on every process."""
  raw = np.full(64, -1, np.int64)
  raw[:min(len(steps), 64)] = steps[:64]
  return [int(v) for v in sharding.from_process0(raw) if v >= 0]


def _out_of_memory(e: BaseException) -> bool:
  text = f'{e} {e.__cause__}'
  return (isinstance(e.__cause__, MemoryError) or 'RESOURCE_EXHAUSTED' in text
          or 'out of memory' in text.lower())


def tree_differences(have: dict[str, tuple[int, ...]],
                     want: dict[str, tuple[int, ...]]) -> list[str]:
  """What differs between two `{path: shape}` maps (stored vs expected)."""
  out = []
  for key in sorted(set(have) | set(want)):
    if key not in have:
      out.append(f'{key} is missing')
    elif key not in want:
      out.append(f'{key} is stored but not expected')
    elif have[key] != want[key]:
      out.append(f'{key} has shape {have[key]} stored, {want[key]} '
                 'expected')
  return out


def save_export(directory: str, model: Any, meta: dict[str, Any],
                classifier: tuple[Any, Any] | None = None,
                target_stats: dict[str, Any] | None = None) -> None:
  """Writes an export: the one format every stage, `cli.export`,
  `cli.convert` and `cli.evaluate` share.

  Weights `{'model': model, 'classifier': {'weight', 'bias'},
  'target_stats': {'mean', 'std'}}` (the last two only when given: the
  frozen teacher classifier that classifies generated features, and the
  statistics of standardised targets) and JSON metadata, which lists the
  parts. Call it on every process (orbax coordinates the array writes);
  only process 0 writes the metadata, last, so a complete `meta.json` marks
  a complete export, and every process returns once it is written.
  """
  tree = dict(model=model)
  if classifier is not None:
    tree['classifier'] = dict(weight=classifier[0], bias=classifier[1])
  if target_stats is not None:
    tree['target_stats'] = dict(target_stats)
  directory = paths.absolute(directory)
  paths.makedirs(directory)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, 'weights'), tree, force=True)
  ckptr.wait_until_finished()
  publish({os.path.join(directory, 'meta.json'): json.dumps(
      dict(meta, parts=sorted(tree)), indent=1, sort_keys=True)},
          'export')


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """`{'a/b/0': shape}` for arrays, metadata or ShapeDtypeStructs."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = []
    for p in path:
      names.append(str(getattr(p, 'key', getattr(p, 'idx',
                                                 getattr(p, 'name', p)))))
    if names and names[-1] == 'value':  # An NNX Variable's value.
      names.pop()
    out['/'.join(names)] = tuple(leaf.shape)
  return out


def load_export_meta(directory: str) -> dict[str, Any]:
  path = os.path.join(paths.absolute(directory), 'meta.json')
  if not paths.exists(path):
    raise CheckpointError(f'no exported model at {directory} (missing '
                          'meta.json)')
  try:
    return json.loads(paths.read_text(path))
  except (OSError, ValueError) as e:
    raise CheckpointError(f'corrupt export metadata {path}: {e}') from e


def load_export(directory: str, abstract_model: Any
                ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Restores an export; the model into the structure of `abstract_model`.

  Returns:
    `(tree, meta)`: `tree['model']`, plus `tree['classifier']` and
    `tree['target_stats']` where the export has them.
  """
  meta = load_export_meta(directory)
  path = os.path.join(paths.absolute(directory), 'weights')
  ckptr = ocp.StandardCheckpointer()
  try:
    stored = ckptr.metadata(path).item_metadata.tree
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f'exported weights at {directory} are missing or unreadable '
        f'({type(e).__name__}: {errors_lib.first_line(e)})') from e
  if 'model' not in stored:
    raise CheckpointError(f'{directory} is not an export of this version '
                          '(its weights have no model part)')
  # Compare shapes first: a mismatched restore fails deep inside orbax.
  differences = tree_differences(_shapes(stored['model']),
                                 _shapes(abstract_model))
  if differences:
    more = '; ...' if len(differences) > 5 else ''
    raise CheckpointError(
        f'export {directory} does not fit the configured model '
        f'({"; ".join(differences[:5])}{more}): built for another '
        'architecture?')
  # The other parts go where the model goes (e.g. replicated over a mesh).
  where = next((getattr(leaf, 'sharding', None)
                for leaf in jax.tree.leaves(abstract_model)), None)
  abstract = {k: jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=where), v)
              for k, v in stored.items() if k != 'model'}
  abstract['model'] = abstract_model
  try:
    tree = ckptr.restore(path, abstract)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(
        f'exported weights at {directory} could not be restored '
        f'({type(e).__name__}: {errors_lib.first_line(e)})') from e
  return tree, meta
