"""Every command the documentation shows is checked against the real flags
and config keys, without running it.

The fenced shell blocks of `README.md`, `docs/*.md` and `launch/README.md`
are read; each command that runs the project (`python -m gendd_jax...`,
`python -m benchmarks...`, `python -m tools...` or a `gendd-<name>` console
script) is checked (`python tools/x.py` is refused: from a checkout, a file
run by path cannot import the package):

* every `--name`, `--noname` (booleans) and `--name value` is a flag that
  the command defines: the absl `DEFINE_*` calls of its module and of every
  project module it imports (read from their source, so that commands whose
  flags clash, such as two benchmarks, are each checked alone), plus absl's
  own;
* `--config=path[:arg]` and the `--config.a.b=value` overrides are parsed by
  ml_collections exactly as the command line parses them: the file must
  exist, `get_config(arg)` must accept the argument, each key must exist and
  each value must fit its type.

Placeholders (`<workdir>`, `...`) are accepted as values. A failure names the
file, the line and the flag.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import tomllib
from unittest import mock

from absl import app  # noqa: F401  (defines absl's own flags)
from absl import flags
from absl import logging  # noqa: F401  (defines absl's own flags)
from absl.testing import absltest
from ml_collections import config_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PACKAGES = ('gendd_jax', 'benchmarks', 'tools')
_SHELL = ('', 'bash', 'sh', 'shell', 'console')
_PLACEHOLDER = re.compile(r'<[^<>\n]*>')
_SEPARATORS = ('&&', '||', ';', '|')
_AS_FILE = 'file:'  # A module run as `python path/to/module.py`.


def config_docstrings() -> dict[str, str]:
  """`{configs/x.py: the file's text up to the end of its docstring}`: each
  config's docstring gives its launch command."""
  out = {}
  for path in sorted(glob.glob(os.path.join(_ROOT, 'configs', '*.py'))):
    with open(path) as f:
      text = f.read()
    first = ast.parse(text).body[0]
    lines = text.splitlines()[:first.end_lineno]
    out[os.path.relpath(path, _ROOT)] = '\n'.join(lines)
  return out


def documents() -> list[str]:
  """The files whose commands are checked (paths relative to the root)."""
  docs = sorted(glob.glob(os.path.join(_ROOT, 'docs', '*.md')))
  return ['README.md', 'launch/README.md'] + [
      os.path.relpath(p, _ROOT) for p in docs]


@dataclasses.dataclass(frozen=True)
class Command:
  source: str  # File name.
  line: int  # 1-based line of the command's first word.
  words: tuple[str, ...]

  def where(self) -> str:
    return f'{self.source}:{self.line}'


def shell_commands(text: str, source: str, fenced: bool = True
                   ) -> list[Command]:
  """The commands of `text`'s fenced shell blocks (or of all of `text`,
  read as one unlabelled block, if not `fenced`): continuation lines
  joined, comments dropped, `&&`/`;`/`|` chains split."""
  out, block, start, pending = [], None if fenced else '', 0, ''
  for number, line in enumerate(text.splitlines(), 1):
    fence = re.match(r'^\s*```(\S*)', line)
    if fence and fenced:
      block = None if block is not None else fence.group(1).lower()
      continue
    if block is None or block not in _SHELL:
      continue
    if not pending:
      start = number
      # An unlabelled block may hold output or a file tree: only lines that
      # start like a project command are read there.
      if not block and not re.match(r'\s*!?((\S*/)?python[\d.]*\s|gendd-)',
                                    line):
        continue
    if line.rstrip().endswith('\\'):
      pending += line.rstrip()[:-1] + ' '
      continue
    line, pending = pending + line, ''
    # A placeholder may hold spaces (`<teacher export>`): one word.
    line = _PLACEHOLDER.sub(lambda m: m.group(0).replace(' ', '_'), line)
    lex = shlex.shlex(line, posix=True, punctuation_chars=';&|')
    lex.whitespace_split = True
    try:
      words = list(lex)
    except ValueError as e:
      out.append(Command(source, start, ('<unparsable>', str(e), line)))
      continue
    current = []
    for w in words + [';']:
      if w in _SEPARATORS:
        if current:
          out.append(Command(source, start, tuple(current)))
        current = []
      else:
        current.append(w)
  return out


def _console_scripts() -> dict[str, str]:
  """`pyproject.toml`'s `[project.scripts]`: name -> module."""
  with open(os.path.join(_ROOT, 'pyproject.toml'), 'rb') as f:
    scripts = tomllib.load(f).get('project', {}).get('scripts', {})
  return {k: v.split(':')[0] for k, v in scripts.items()}


def project_module(words: tuple[str, ...]) -> tuple[str | None, list[str]]:
  """`(module, arguments)` of a command that runs the project, else
  `(None, [])`. Leading `VAR=value` words, `env`, `time` and a notebook's
  `!` are skipped."""
  words = list(words)
  while words and (re.match(r'^[A-Za-z_][A-Za-z0-9_]*=', words[0])
                   or words[0] in ('env', 'time', '!')):
    words.pop(0)
  if words and words[0].startswith('!'):
    words[0] = words[0][1:]
  if not words:
    return None, []
  head = words[0]
  if re.fullmatch(r'(.*/)?python(3(\.\d+)?)?', head) and len(words) > 1:
    if words[1] == '-m' and len(words) > 2:
      module, args = words[2], words[3:]
    elif words[1].endswith('.py'):
      module, args = words[1][:-3].replace('/', '.'), words[2:]
      if module.split('.')[0] in _PACKAGES:
        # Run as a file, it cannot import the package unless installed.
        return f'{_AS_FILE}{module}', args
    else:
      return None, []
    return (module, args) if module.split('.')[0] in _PACKAGES else (None,
                                                                      [])
  if head.startswith('gendd-'):
    scripts = _console_scripts()
    if head in scripts:
      return scripts[head], words[1:]
    name = head[len('gendd-'):].replace('-', '_')
    return ('gendd_jax.main' if name == 'train' else
            f'gendd_jax.cli.{name}'), words[1:]
  return None, []


def _module_file(module: str) -> str | None:
  base = os.path.join(_ROOT, *module.split('.'))
  for path in (base + '.py', os.path.join(base, '__init__.py')):
    if os.path.isfile(path):
      return path
  return None


def _imported(tree: ast.AST) -> set[str]:
  """Every module a module imports (and `pkg.name` for `from pkg import
  name`, which may be a module), with their parent packages."""
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f'{node.module}.{a.name}' for a in node.names)
  return names | {'.'.join(n.split('.')[:i]) for n in names
                  for i in range(1, n.count('.') + 1)}


def _defined(tree: ast.AST) -> dict[str, bool]:
  """`{flag name: is boolean}` of the module's `DEFINE_*('name', ...)`."""
  out = {}
  for node in ast.walk(tree):
    if not isinstance(node, ast.Call):
      continue
    func = node.func
    name = getattr(func, 'attr', getattr(func, 'id', ''))
    if (name.startswith('DEFINE_') and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)):
      out[node.args[0].value] = name in ('DEFINE_bool', 'DEFINE_boolean')
  return out


def _absl_flags() -> dict[str, bool]:
  """absl's own flags (`--verbosity`, `--helpfull`, ...)."""
  out = {}
  for module, fl in flags.FLAGS.flags_by_module_dict().items():
    if module.startswith('absl.'):
      out.update((f.name, bool(f.boolean)) for f in fl)
  return out


_FLAGS_CACHE: dict[str, dict[str, bool] | None] = {}


def module_flags(module: str) -> dict[str, bool] | None:
  """`{flag: is boolean}` a command accepts; None if no such module. A
  module that defines no absl flag and reads `sys.argv` itself (the recipe
  tool) accepts the `--x` strings it compares against."""
  if module in _FLAGS_CACHE:
    return _FLAGS_CACHE[module]
  if _module_file(module) is None:
    _FLAGS_CACHE[module] = None
    return None
  seen, todo, out = set(), [module], {}
  uses_absl = False
  while todo:
    name = todo.pop()
    path = _module_file(name)
    if name in seen or path is None:
      continue
    seen.add(name)
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    out.update(_defined(tree))
    imported = _imported(tree)
    uses_absl |= 'absl' in imported
    todo.extend(n for n in imported - seen if n.split('.')[0] in _PACKAGES)
  if uses_absl:
    out.update(_absl_flags())
  else:
    with open(_module_file(module)) as f:
      text = f.read()
    out.update((m, True) for m in re.findall(r"'--([a-z_]+)'", text))
  _FLAGS_CACHE[module] = out
  return out


def _is_placeholder(value: str) -> bool:
  return value in ('...', '…') or bool(_PLACEHOLDER.fullmatch(value))


def _check_config(config_words: list[str]) -> str | None:
  """Parses `--config=...` and its overrides as the command line does;
  the first error, or None."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv,
                                  lock_config=True)
  argv = ['prog']
  for w in config_words:
    if w.startswith('--config='):
      path, _, arg = w[len('--config='):].partition(':')
      if not os.path.isfile(os.path.join(_ROOT, path)):
        return f'config file {path} does not exist'
      w = '--config=' + os.path.join(_ROOT, path) + (f':{arg}' if arg else '')
    argv.append(w)
  try:
    # ml_collections reads the overrides from sys.argv.
    with mock.patch.object(sys, 'argv', argv):
      fv(argv)
      fv.config.get('stage')  # A file that failed to load raises here.
  except (AttributeError, KeyError) as e:
    return f'unknown config key {str(e).strip(chr(34) + chr(39))!r}'
  except Exception as e:  # pylint: disable=broad-except
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f'{type(e).__name__}: {lines[-1] if lines else e}'
  return None


def check(command: Command) -> list[str]:
  """The problems of one command, each `file:line: message`."""
  if command.words[:1] == ('<unparsable>',):
    return [f'{command.where()}: cannot split the command '
            f'({command.words[1]}): {command.words[2]}']
  module, args = project_module(command.words)
  if module is None:
    return []
  text = ' '.join(command.words)
  if module.startswith(_AS_FILE):
    module = module[len(_AS_FILE):]
    return [f'{command.where()}: run it as python -m {module} (a file run '
            'by path cannot import the package from a checkout): {text}']
  known = module_flags(module)
  if known is None:
    return [f'{command.where()}: no module {module!r}: {text}']
  errors, config_words, i = [], [], 0
  has_config = placeholder_config = False
  while i < len(args):
    word = args[i].lstrip('[').rstrip(']')
    i += 1
    if word == '--':
      break
    if not word.startswith('-') or word == '-' or _is_placeholder(word):
      continue
    name, eq, value = word.lstrip('-').partition('=')
    if name == 'config' or name.startswith('config.'):
      if not eq and i < len(args) and not args[i].startswith('-'):
        value, i = args[i], i + 1  # `--config file` / `--config.x value`.
      if name == 'config':
        has_config = True
        placeholder_config = _is_placeholder(value) or value.isupper()
      if 'config' not in known:
        errors.append(f'--{name}: the command takes no --config')
      elif not (name != 'config' and _is_placeholder(value)):
        config_words.append(f'--{name}={value}')
      continue
    if name in known:
      if not known[name] and not eq and i < len(args):
        i += 1  # `--name value`.
      continue
    if name.startswith('no') and known.get(name[2:]):
      continue
    errors.append(f'unknown flag --{name}')
  if config_words and not placeholder_config:
    if not has_config:
      errors.append('--config.* overrides without --config')
    else:
      problem = _check_config(config_words)
      if problem:
        errors.append(problem)
  return [f'{command.where()}: {e} in: {text}' for e in errors]


def check_text(text: str, source: str) -> list[str]:
  return [e for c in shell_commands(text, source) for e in check(c)]


class CheckerTest(absltest.TestCase):
  """The checker itself, on snippets with known mistakes."""

  def test_good_commands_pass(self):
    text = textwrap.dedent("""\
        Text.

        ```bash
        # A comment.
        pip install -r requirements.txt && python -m gendd_jax.main \\
            --config=configs/digits.py:quick --workdir=<workdir> \\
            --config.gendd.smooth=0.7 --config.pipeline.seeds="(0,1)"
        python -m gendd_jax.cli.convert --arch resnet32x4 \\
            --checkpoint <teacher file> --out teachers/r
        python -m gendd_jax.cli.evaluate --checkpoint=e --nodistributed \\
            --config=configs/digits.py --config.teacher.checkpoint=<teacher x>
        gendd-train --config=configs/r50_600ep.py:tiny --workdir=w
        gendd-build-dataset npz --src=a.npz --data_dir=$HOME/tfds
        python -m tools.recipes --check
        python -m pytest -n 2 --no-such-pytest-flag tests
        ```
        """)
    self.assertEqual(check_text(text, 'snippet.md'), [])

  def test_mistakes_are_named_with_file_and_line(self):
    text = textwrap.dedent("""\
        ```bash
        python -m gendd_jax.main --config=configs/digits.py --workdir=w \\
            --config.teacher.remat=True
        python -m gendd_jax.main --config=configs/digits.py --workdir=w --nope
        ```

        ```sh
        python -m gendd_jax.main --config=configs/nosuch.py --workdir=w
        python -m gendd_jax.main --config=configs/cifar100_gendd.py:a-b
        python -m gendd_jax.main --config=configs/digits.py \\
            --config.gendd.token_dim=0.5
        python -m gendd_jax.cli.nosuch --x=1
        gendd-evaluate --checkpoint=e --clip_x0=data --x0_clip=data
        python -m gendd_jax.main --config.seed=1
        python -m gendd_jax.main --config.seed=1 --config=configs/digits.py
        python tools/recipes.py --check
        ```

        ```python
        python -m gendd_jax.main --not-checked-in-a-python-block
        ```
        """)
    errors = check_text(text, 'bad.md')
    expected = [
        ('bad.md:2:', "unknown config key 'remat'"),
        ('bad.md:4:', 'unknown flag --nope'),
        ('bad.md:8:', 'config file configs/nosuch.py does not exist'),
        ('bad.md:9:', 'a-b'),
        ('bad.md:10:', "invalid literal for int() with base 10: '0.5'"),
        ('bad.md:12:', "no module 'gendd_jax.cli.nosuch'"),
        ('bad.md:13:', 'unknown flag --x0_clip'),
        ('bad.md:14:', 'overrides without --config'),
        ('bad.md:15:', 'before a value for --config'),
        ('bad.md:16:', 'run it as python -m tools.recipes'),
    ]
    self.assertLen(errors, len(expected), '\n'.join(errors))
    for error, (where, what) in zip(errors, expected):
      self.assertStartsWith(error, where)
      self.assertIn(what, error)

  def test_static_flags_match_the_imported_ones(self):
    """The flags read from the source are the ones absl registers when the
    commands are imported (all but the benchmarks fit in one process)."""
    modules = ['gendd_jax.main'] + [
        f'gendd_jax.cli.{os.path.basename(p)[:-3]}'
        for p in sorted(glob.glob(os.path.join(_ROOT, 'gendd_jax', 'cli',
                                               '*.py')))
        if not p.endswith(('__init__.py', 'common.py'))]
    script = textwrap.dedent(f"""\
        import importlib, json
        from absl import flags
        for m in {modules!r}:
          importlib.import_module(m)
        print(json.dumps(sorted(
            f.name for mod, fl in flags.FLAGS.flags_by_module_dict().items()
            if mod.split('.')[0] in {_PACKAGES!r} for f in fl)))
        """)
    proc = subprocess.run([sys.executable, '-c', script], cwd=_ROOT,
                          capture_output=True, text=True, timeout=300,
                          check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    imported = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    absl_own = set(_absl_flags())
    static = set()
    for m in modules:
      static |= set(module_flags(m)) - absl_own
    self.assertEqual(static, imported)


class DocsCommandsTest(absltest.TestCase):
  """The commands of the real documentation."""

  def test_every_command_fits_the_real_flags_and_keys(self):
    commands = []
    for source in documents():
      with open(os.path.join(_ROOT, source)) as f:
        commands += shell_commands(f.read(), source)
    for source, text in config_docstrings().items():
      commands += shell_commands(text, source, fenced=False)
    errors = [e for c in commands for e in check(c)]
    self.assertEmpty(errors, '\n' + '\n'.join(errors))
    checked = {c.source for c in commands
               if project_module(c.words)[0] is not None}
    self.assertContainsSubset(
        {'README.md', 'docs/data.md', 'configs/r50_600ep.py'}, checked)

  def test_readme_opens_with_the_two_commands(self):
    with open(os.path.join(_ROOT, 'README.md')) as f:
      commands = shell_commands(f.read(), 'README.md')
    self.assertEqual(
        [' '.join(c.words) for c in commands[:4]],
        ['pip install -r requirements.txt',
         'python -m gendd_jax.main --config=configs/digits.py '
         '--workdir=runs/digits',
         'pip install -r requirements-test.txt',
         'python -m pytest -n 2 --durations=20 tests'])

  def test_readme_stays_a_front_page(self):
    # The README is the front page; details belong in docs/ (at most 150
    # lines, as agreed for the front door).
    with open(os.path.join(_ROOT, 'README.md')) as f:
      lines = f.read().splitlines()
    self.assertLessEqual(
        len(lines), 150,
        f'README.md has {len(lines)} lines; move details to docs/')


if __name__ == '__main__':
  absltest.main()
