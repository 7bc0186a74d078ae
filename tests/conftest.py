"""pytest settings shared by the test files.

* With pytest-xdist (`pytest -n N`), each test class runs whole on one
  worker (as with `--dist loadscope`) unless `--dist` names a mode other
  than the default `load`. Several classes build an expensive shared object
  once per process (a trained teacher, one jitted step per stage); spreading
  a class over workers would build it on each.
* One XLA compilation cache serves the whole session: every worker and every
  `python -m gendd_jax...` the tests start reuse each other's compiled
  programs (many tests compile the same small digits programs). It lives in
  a temporary directory removed at the end; `GENDD_TEST_XLA_CACHE=<dir>`
  keeps one across sessions instead, and `GENDD_TEST_XLA_CACHE=off` turns it
  off.
* XLA compiles at `--xla_backend_optimization_level=0` (unless `XLA_FLAGS`
  already sets a level): the tests' programs are small, so compiling
  dominates running them. Tests compare runs made under the same flags, and
  recorded accuracies carry a tolerance.

* The longest test classes (`LONGEST_FIRST`, measured) are collected first,
  so the scheduler starts them first: left to the alphabet, several of them
  started last and ran alone at the end while the other worker idled.

The environment is set before any worker or JAX starts, so subprocesses
inherit it.
"""

import os
import shutil
import tempfile

import pytest

_OWNED_CACHE = None  # The directory this session made (and removes).

# Test classes by measured duration (a 2-worker run), longest first; the
# rest keep their collection order after them.
LONGEST_FIRST = (
    'test_pod.py::PodTest',
    'test_configs.py::TwoSteps_imagenet',
    'test_reliability.py::PreemptionTest',
    'test_notebook.py::NotebookTest',
    'test_packaging.py::InstalledTest',
    'test_zoo.py::ShardedForwardTest',
    'test_main.py::PipelineTest',
    'test_multihost.py::TwoProcessTest',
    'test_configs.py::TwoSteps_cifar',
    'test_bench.py::BenchTest',
    'test_export.py::ExportEvaluateTest',
    'test_main.py::UserErrorTest',
    'test_train.py::ShardingTest',
    'test_configs.py::TracedTest',
    'test_train.py::StageTest',
)


def pytest_configure(config):
  global _OWNED_CACHE
  if os.environ.get('PYTEST_XDIST_WORKER'):
    return  # A worker: the controller has set the environment up.
  flags = os.environ.get('XLA_FLAGS', '')
  if '--xla_backend_optimization_level' not in flags:
    os.environ['XLA_FLAGS'] = (
        flags + ' --xla_backend_optimization_level=0').strip()
  cache = os.environ.get('GENDD_TEST_XLA_CACHE', '')
  if cache == 'off':
    return
  if not cache:
    cache = _OWNED_CACHE = tempfile.mkdtemp(prefix='gendd_test_xla_cache_')
  os.environ.update(JAX_COMPILATION_CACHE_DIR=cache,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.05',
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')


def pytest_unconfigure(config):
  if _OWNED_CACHE is not None:
    shutil.rmtree(_OWNED_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

  def key(item):
    module_and_class = '::'.join(item.nodeid.split('/')[-1].split('::')[:2])
    return rank.get(module_and_class, len(rank))
  items.sort(key=key)  # Stable: each class stays in one piece, in order.


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  if config.getvalue('dist') != 'load':
    return None  # An explicit --dist other than the default: respect it.
  # Imported here: this hook only runs under pytest-xdist.
  from xdist.scheduler import LoadScopeScheduling
  # Keep the collection order (longest first, see above) rather than
  # xdist's default of classes with the most tests first.
  config.option.loadscopereorder = False
  return LoadScopeScheduling(config, log)
