"""pytest settings shared by the test files.

With pytest-xdist (`pytest -n N`), each test class runs whole on one worker
(as with `--dist loadscope`) unless `--dist` names a mode other than the
default `load`. Several classes build an expensive shared object once per
process (a trained teacher, one jitted step per stage); spreading a class
over workers would build it on each.
"""

import pytest


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  if config.getvalue('dist') != 'load':
    return None  # An explicit --dist other than the default: respect it.
  # Imported here: this hook only runs under pytest-xdist.
  from xdist.scheduler import LoadScopeScheduling
  return LoadScopeScheduling(config, log)
