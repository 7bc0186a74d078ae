"""The package's shape, read from its source with `ast` (nothing imported).

* No import cycle among the modules of `gendd_jax/` (imports inside
  functions count: a cycle hidden in a function body is still a cycle).
* Imports run one way: a module imports only from its own layer or lower
  ones (`LAYERS`; math and models <- stages/settings/teacher <- train <-
  pipeline <- cli/main). A module with no layer fails: add it here.
* No `gendd_jax` import inside a function. Any other import inside a
  function (an optional heavy dependency: torch, tensorflow)
  carries a comment on its line or the line above saying why (a bare
  `pylint: disable=...` does not count).
* Every module opens with a docstring; `benchmarks/` lives outside the
  package; no test module imports another test module (shared helpers are
  in `tests/testing.py`).
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re

from absl.testing import absltest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PACKAGE = 'gendd_jax'
_PKG_DIR = os.path.join(_ROOT, _PACKAGE)

# First component under gendd_jax -> layer. A module may import from modules
# of a lower or equal layer only.
LAYERS = {
    '': 0,  # gendd_jax/__init__.py: imports nothing from the package.
    'errors': 0,
    # Math and parts.
    'diffusion': 1, 'precision': 1, 'sharding': 1, 'optim': 1, 'flops': 1,
    'walltime': 1, 'events': 1,
    'paths': 0,  # The one path layer (etils.epath).
    'models': 1, 'checkpoint': 1, 'data': 1,
    'gendd': 1.5,  # The objective: diffusion + the denoiser.
    # One record per concern, built from the parts.
    'stages': 2, 'settings': 2, 'teacher': 2, 'config_lib': 2,
    'train': 3, 'reporting': 3, 'reliability': 3,
    'pipeline': 4,
    'cli': 5, 'main': 5,
}


@dataclasses.dataclass
class Import:
  target: str   # A module of the package (dotted), or an outside module.
  line: int
  in_function: bool
  commented: bool  # A comment (not only a pylint directive) on the line or
                   # the line above.


def module_name(path: str) -> str:
  rel = os.path.relpath(path, _ROOT)[:-len('.py')].split(os.sep)
  if rel[-1] == '__init__':
    rel = rel[:-1]
  return '.'.join(rel)


def package_modules() -> dict[str, str]:
  """Dotted name -> path of every module of the package."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(_PKG_DIR):
    dirnames[:] = sorted(d for d in dirnames if d != '__pycache__')
    for f in sorted(filenames):
      if f.endswith('.py'):
        path = os.path.join(dirpath, f)
        out[module_name(path)] = path
  return out


def _has_reason(line: str) -> bool:
  if '#' not in line:
    return False
  comment = line.split('#', 1)[1]
  comment = re.sub(r'pylint:\s*disable=[\w,\- ]*', '', comment)
  comment = re.sub(r'type:\s*ignore\S*|noqa\S*', '', comment)
  return bool(re.search(r'[A-Za-z]{3}', comment))


def imports_of(name: str, source: str, known: set[str]) -> list[Import]:
  """The imports in `source` (module `name`), package targets resolved to
  the most specific module of `known`."""
  tree = ast.parse(source)
  lines = source.splitlines()
  is_pkg = name in known and any(k.startswith(name + '.') for k in known)
  out = []

  def resolve(mod: str, names: list[str]) -> list[str]:
    if mod != _PACKAGE and not mod.startswith(_PACKAGE + '.'):
      return [mod]
    targets = []
    for n in names:
      sub = f'{mod}.{n}'
      targets.append(sub if sub in known else mod)
    return targets or [mod]

  def visit(node, in_function: bool):
    for child in ast.iter_child_nodes(node):
      inside = in_function or isinstance(
          child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, (ast.Import, ast.ImportFrom)):
        line = child.lineno
        text = lines[line - 1] + (
            '' if child.end_lineno == line else lines[child.end_lineno - 1])
        above = lines[line - 2] if line > 1 else ''
        commented = _has_reason(text) or (
            above.strip().startswith('#') and _has_reason(above))
        if isinstance(child, ast.Import):
          targets = [a.name for a in child.names]
        else:
          mod = child.module or ''
          if child.level:  # Relative: resolve against this module.
            base = name.split('.')
            base = base if is_pkg else base[:-1]
            base = base[:len(base) - (child.level - 1)]
            mod = '.'.join(base + ([mod] if mod else []))
          targets = resolve(mod, [a.name for a in child.names])
        for t in dict.fromkeys(targets):
          out.append(Import(t, line, in_function, commented))
      visit(child, inside)

  visit(tree, False)
  return out


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with a cycle (Tarjan), each sorted."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []
  counter = [0]

  def strongconnect(v):
    # Iterative: deep import chains must not hit the recursion limit.
    work = [(v, iter(sorted(graph.get(v, ()))))]
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on_stack.add(v)
    while work:
      node, children = work[-1]
      for w in children:
        if w not in index:
          index[w] = low[w] = counter[0]
          counter[0] += 1
          stack.append(w)
          on_stack.add(w)
          work.append((w, iter(sorted(graph.get(w, ())))))
          break
        if w in on_stack:
          low[node] = min(low[node], index[w])
      else:
        work.pop()
        if work:
          parent = work[-1][0]
          low[parent] = min(low[parent], low[node])
        if low[node] == index[node]:
          comp = []
          while True:
            w = stack.pop()
            on_stack.discard(w)
            comp.append(w)
            if w == node:
              break
          if len(comp) > 1 or node in graph.get(node, ()):
            out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      strongconnect(v)
  return sorted(out)


def layer_of(name: str) -> float | None:
  rest = name[len(_PACKAGE):].lstrip('.')
  return LAYERS.get(rest.split('.')[0])


def package_graph():
  modules = package_modules()
  known = set(modules)
  found = {}
  for name, path in modules.items():
    with open(path) as f:
      found[name] = imports_of(name, f.read(), known)
  return modules, found


class CycleDetectorTest(absltest.TestCase):
  """The detector itself, on graphs whose answer is known."""

  def test_finds_cycles_and_only_cycles(self):
    graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a', 'd'}, 'd': {'e'}, 'e': set(),
             'f': {'f'}, 'g': {'h'}, 'h': {'d'}}
    self.assertEqual(find_cycles(graph), [['a', 'b', 'c'], ['f']])

  def test_acyclic_and_two_cycles(self):
    self.assertEqual(find_cycles({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}),
                     [])
    graph = {'x': {'y'}, 'y': {'x', 'z'}, 'z': {'w'}, 'w': {'z'}}
    self.assertEqual(find_cycles(graph), [['w', 'z'], ['x', 'y']])

  def test_long_chain(self):
    n = 5000
    graph = {i: {i + 1} for i in range(n)}
    self.assertEqual(find_cycles(graph), [])
    graph[n] = {0}
    self.assertEqual(find_cycles(graph), [list(range(n + 1))])


class ImportParserTest(absltest.TestCase):
  """What counts as an import, where it is, and its comment."""

  def test_resolution_and_placement(self):
    known = {'gendd_jax', 'gendd_jax.data', 'gendd_jax.data.memory',
             'gendd_jax.data.augment', 'gendd_jax.errors', 'gendd_jax.train'}
    source = '\n'.join([
        '"""Doc."""',
        'import os',
        'from gendd_jax import errors, __version__',
        'from gendd_jax.data import memory',
        'from . import augment',
        'def f():',
        '  from gendd_jax import train',
        '  import torch  # Optional: only the converter needs it.',
        '  # TensorFlow is heavy and only needed here.',
        '  import tensorflow as tf',
        '  import sklearn  # pylint: disable=g-import-not-at-top',
    ])
    got = [(i.target, i.line, i.in_function, i.commented)
           for i in imports_of('gendd_jax.data.memory', source, known)]
    self.assertEqual(got, [
        ('os', 2, False, False),
        ('gendd_jax.errors', 3, False, False),
        ('gendd_jax', 3, False, False),
        ('gendd_jax.data.memory', 4, False, False),
        ('gendd_jax.data.augment', 5, False, False),
        ('gendd_jax.train', 7, True, False),
        ('torch', 8, True, True),
        ('tensorflow', 10, True, True),
        ('sklearn', 11, True, False),
    ])

  def test_layers_of_names(self):
    self.assertEqual(layer_of('gendd_jax.errors'), 0)
    self.assertEqual(layer_of('gendd_jax.data.memory'), 1)
    self.assertEqual(layer_of('gendd_jax.cli.evaluate'), 5)
    self.assertEqual(layer_of('gendd_jax'), 0)
    self.assertIsNone(layer_of('gendd_jax.bench'))


class LayoutTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.modules, cls.imports = package_graph()

  def test_no_import_cycles(self):
    graph = {name: {i.target for i in imps if i.target in self.modules
                    and i.target != name}
             for name, imps in self.imports.items()}
    self.assertEqual(find_cycles(graph), [], 'import cycles in the package')

  def test_every_module_has_a_layer(self):
    missing = sorted(n for n in self.modules if layer_of(n) is None)
    self.assertEqual(missing, [], 'modules without a layer (add them to '
                     'LAYERS in tests/test_layout.py, or move them out)')

  def test_imports_run_downwards(self):
    bad = []
    for name, imps in sorted(self.imports.items()):
      mine = layer_of(name)
      for i in imps:
        theirs = layer_of(i.target) if i.target in self.modules else None
        if mine is not None and theirs is not None and theirs > mine:
          bad.append(f'{name} (layer {mine}) imports {i.target} '
                     f'(layer {theirs}) at line {i.line}')
    self.assertEqual(bad, [], 'imports against the layering')

  def test_no_package_import_inside_functions(self):
    bad = [f'{name}:{i.line} imports {i.target} inside a function'
           for name, imps in sorted(self.imports.items()) for i in imps
           if i.in_function and (i.target == _PACKAGE or
                                 i.target.startswith(_PACKAGE + '.'))]
    self.assertEqual(bad, [])

  def test_other_imports_inside_functions_say_why(self):
    bad = [f'{name}:{i.line} imports {i.target} inside a function with no '
           'comment saying why'
           for name, imps in sorted(self.imports.items()) for i in imps
           if i.in_function and not i.commented and not
           (i.target == _PACKAGE or i.target.startswith(_PACKAGE + '.'))]
    self.assertEqual(bad, [])

  def test_every_module_opens_with_a_docstring(self):
    bad = []
    for name, path in sorted(self.modules.items()):
      with open(path) as f:
        tree = ast.parse(f.read())
      doc = ast.get_docstring(tree)
      if not doc or not doc.strip():
        bad.append(name)
    self.assertEqual(bad, [], 'modules without an opening docstring')

  def test_benchmarks_outside_the_package(self):
    inside = sorted(n for n in self.modules
                    if n.split('.')[-1].startswith('bench'))
    self.assertEqual(inside, [], 'benchmarks belong in benchmarks/')
    self.assertTrue(os.path.isdir(os.path.join(_ROOT, 'benchmarks')),
                    'benchmarks/ at the repository root')


class TestModulesTest(absltest.TestCase):

  def test_no_test_module_imports_another(self):
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    bad = []
    for f in sorted(os.listdir(tests_dir)):
      if not f.endswith('.py'):
        continue
      with open(os.path.join(tests_dir, f)) as fh:
        source = fh.read()
      for i in imports_of(f[:-3], source, set()):
        top = i.target.split('.')
        if any(part.startswith('test_') for part in top):
          bad.append(f'tests/{f}:{i.line} imports {i.target}')
    self.assertEqual(bad, [], 'shared helpers belong in tests/testing.py')


if __name__ == '__main__':
  absltest.main()
