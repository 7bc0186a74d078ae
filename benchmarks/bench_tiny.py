r"""Wall time of every config's `:tiny` run on this machine, as JSON and a
Markdown table.

  python -m benchmarks.bench_tiny [--configs=digits,r50_600ep,...] \
      [--out=docs/results/tiny_cpu2]

Each config file in `configs/` (its default variant, unless the entry names
one: `cc3m_unsup:mbv1_kl`) runs as a user runs it, in a fresh process:

  python -m gendd_jax.main --config=configs/<stem>.py:<variant>,tiny \
      --workdir=<fresh temporary folder>

The time is the process's whole wall time: Python and JAX start-up, every
stage's set-up, compilation, two training steps, evaluation and export.
`:tiny` (`config_lib.tiny`) turns on `fast_compile`; `--fast_compile=false`
times the same runs with XLA's default optimisation. The load average at
the start and end of each run is recorded: on a shared machine it says how
much of the time was someone else's.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_CONFIGS = _OUT = _FAST_COMPILE = _LIMIT = _NOTE = None


def _define_flags() -> None:
  """The command's flags, defined only when it runs as a program: the
  tests import this module beside the package's commands, which define
  `--out` too."""
  global _CONFIGS, _OUT, _FAST_COMPILE, _LIMIT, _NOTE
  _CONFIGS = flags.DEFINE_list(
      'configs', [], 'Config stems (optionally `stem:variant`); default: '
      'every file in configs/.')
  _OUT = flags.DEFINE_string('out', 'docs/results/tiny_cpu2',
                             'Writes <out>.json and <out>.md.')
  _FAST_COMPILE = flags.DEFINE_bool(
      'fast_compile', True, "Keep `:tiny`'s fast_compile (false: XLA's "
      'default optimisation).')
  _LIMIT = flags.DEFINE_float('limit_seconds', 60.0,
                              'The target each run is compared with.')
  _NOTE = flags.DEFINE_string('note', '', 'What else ran on the machine, '
                              'for the record (appended to the table).')

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_entries() -> list[str]:
  return sorted(f[:-3] for f in os.listdir(os.path.join(_ROOT, 'configs'))
                if f.endswith('.py') and not f.startswith('_'))


def run_one(entry: str, fast_compile: bool) -> dict:
  """Runs `entry`'s `:tiny` form once; its wall time and outcome."""
  with tempfile.TemporaryDirectory(prefix='bench_tiny_') as tmp:
    cmd = [sys.executable, '-m', 'gendd_jax.main',
           f'--config={config_arg(entry)}',
           f'--workdir={os.path.join(tmp, "run")}']
    if not fast_compile:
      cmd.append('--config.fast_compile=False')
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True,
                          check=False)
    seconds = time.perf_counter() - t0
    load1 = os.getloadavg()[0]
  tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
  return dict(config=entry, command=' '.join(cmd[1:3] + ['--workdir=...']
                                                 + cmd[4:]),
              seconds=seconds, returncode=proc.returncode,
              load_start=load0, load_end=load1,
              last_lines=tail if proc.returncode else tail[-1:])


def config_arg(entry: str) -> str:
  """`stem[:variant]` -> the `--config` value of its tiny run."""
  stem, _, variant = entry.partition(':')
  return f"configs/{stem}.py:{','.join(t for t in (variant, 'tiny') if t)}"


def markdown(record: dict) -> str:
  limit = record['limit_seconds']
  lines = [
      '# `:tiny` runs on a CPU: wall time per config', '',
      f"Command: `{record['command']}`", '',
      f"Machine: {record['machine']}; JAX {record['jax']}; fast_compile "
      f"{record['fast_compile']}. Each run is a fresh process (start-up, "
      'set-up, compilation, two steps per stage, evaluation, export).', '',
      f'| config | wall s | within {limit:.0f} s | exit | load avg '
      'start / end |', '|---|---|---|---|---|']
  for r in record['runs']:
    ok = 'yes' if r['seconds'] <= limit and r['returncode'] == 0 else 'no'
    lines.append(f"| `{config_arg(r['config'])}` | {r['seconds']:.1f} | {ok} | "
                 f"{r['returncode']} | {r['load_start']:.2f} / "
                 f"{r['load_end']:.2f} |")
  secs = [r['seconds'] for r in record['runs']]
  lines += ['', f'Slowest {max(secs):.1f} s, median '
            f'{sorted(secs)[len(secs) // 2]:.1f} s, total {sum(secs):.0f} s.',
            '']
  if record.get('note'):
    lines += [record['note'], '']
  return '\n'.join(lines)


def main(argv):
  del argv
  entries = list(_CONFIGS.value) or config_entries()
  runs = []
  for entry in entries:
    r = run_one(entry, _FAST_COMPILE.value)
    print(f"{entry:28s} {r['seconds']:6.1f} s  exit {r['returncode']}  "
          f"load {r['load_start']:.2f}/{r['load_end']:.2f}", flush=True)
    runs.append(r)
  import jax  # After the runs: only for the record's version.
  record = dict(
      command='python -m benchmarks.bench_tiny ' + ' '.join(sys.argv[1:]),
      machine=f'{platform.machine()}, {os.cpu_count()} CPUs',
      jax=jax.__version__, fast_compile=_FAST_COMPILE.value,
      limit_seconds=_LIMIT.value, note=_NOTE.value, runs=runs)
  os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
  with open(_OUT.value + '.json', 'w') as f:
    json.dump(record, f, indent=1)
  with open(_OUT.value + '.md', 'w') as f:
    f.write(markdown(record))
  print('wrote', _OUT.value + '.json', _OUT.value + '.md')
  if any(r['returncode'] for r in runs):
    sys.exit(1)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
