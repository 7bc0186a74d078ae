r"""Accuracy against sampling steps, per sampler and x0 clipping: the
few-step study.

  python -m gendd_jax.cli.sweep_sampling \
      --runs='runs/digits/seed0/fold*/gendd' \
      --step_counts=1,2,4,8,16,32,64,trailing1,trailing2,trailing4,trailing8 \
      --samplers=ancestral,ddim,dpmpp_2m,posterior_mean \
      --clip_x0=none,data,dynamic,dynamic_clip [--cfg_scales=1,2] \
      [--temperatures=1,0.5,0] [--init_temperatures=1,0] --seeds=3 \
      --out=docs/results/sampling_digits

Exports each GenDD training run (to `<run>/eval_export`, once), evaluates
every (sampler, steps, x0 clipping) setting on each run's evaluation split,
pools the predictions over runs (e.g. the folds of a cross-validation, which
together test every image once) and averages over `--seeds` sampler-noise
seeds. `posterior_mean` is a single network call whatever the step count, so
it is evaluated once per clipping. Step counts are respacings: 'N' is the
paper's rule, 'trailingN' keeps the noisiest step (`diffusion.trailing_steps`).
`--cfg_scales` adds a guidance axis (default: the runs' own scale, the
paper's 2); scale 1 is unguided, one network call per step instead of two.
`--temperatures` adds an axis of noise temperatures for ancestral sampling
(default: the runs' own, 1): the scale of the noise each step injects, 0
injecting none after x_T (each step then moves to the posterior mean). The
other samplers inject no noise, so they are evaluated at the runs' own
temperature only. `--init_temperatures` scales the initial noise x_T (every
sampler; default the runs' own, 1): with temperature 0, 0 makes sampling
deterministic (x_T = 0, no noise injected).
The cost of a setting is its number of network evaluations per image (steps
x 2 with classifier-free guidance), which does not depend on the machine;
measured images/s are reported beside it.

The recommended setting is the cheapest whose accuracy is within
`--tolerance` points of the BEST setting measured (any sampler, clipped or
not); speed-ups are stated against `--reference`, the paper's sampler
(ancestral, no clipping, 64 or 100 steps), which sets the cost to beat.
Writes `<out>.json`, `<out>.md` and `<out>.png`.
"""

from __future__ import annotations

import glob
import json
import os
import statistics

from absl import flags

from gendd_jax import diffusion
from gendd_jax import errors
from gendd_jax import gendd
from gendd_jax import paths
from gendd_jax.cli import common
from gendd_jax.cli import evaluate
from gendd_jax.cli import export as export_lib

_RUNS = flags.DEFINE_string('runs', None, 'Glob of GenDD training run dirs.')
_STEPS = flags.DEFINE_list(
    'step_counts', ['1', '2', '4', '8', '16', '32', '64', '100'],
    "Step counts (respacings: 'N', or 'trailingN' from the noisiest step).")
_SAMPLERS = flags.DEFINE_list(
    'samplers', ['ancestral', 'ddim', 'dpmpp_2m', 'posterior_mean'],
    'Samplers.')
_CFG_SCALES = flags.DEFINE_list(
    'cfg_scales', [], "Classifier-free guidance scales (default: the runs' "
    'own); 1 is unguided.')
_TEMPERATURES = flags.DEFINE_list(
    'temperatures', [], 'Noise temperatures of ancestral sampling (default: '
    "the runs' own); 0 injects no noise after x_T.")
_INIT_TEMPERATURES = flags.DEFINE_list(
    'init_temperatures', [], "Scales of the initial noise x_T (default: the "
    "runs' own, 1).")
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Sampler-noise seeds averaged.')
_REFERENCE = flags.DEFINE_string(
    'reference', 'ancestral:64',
    "sampler:steps of the paper's sampler (no clipping), whose cost the "
    'speed-ups are stated against.')
_TOLERANCE = flags.DEFINE_float('tolerance', 0.2, 'Points below the best '
                                'setting still counted as equal.')
# Deprecated: this command's name for --out before the commands shared it.
flags.DEFINE_alias('output_prefix', 'out')
_MERGE = flags.DEFINE_list(
    'merge', [], 'Instead of evaluating, re-select from studies written '
    'before (their .json files, e.g. one per clipping) pooled as one.')
flags.declare_key_flag('clip_x0')
flags.declare_key_flag('out')


def _settings(samplers, steps, clips):
  """`(sampler, steps, clip_x0)` of every setting, checked before any run.

  Raises:
    ValueError: an unknown sampler, step count or clipping.
  """
  for sampler in samplers:
    if sampler not in diffusion.SAMPLERS:
      raise ValueError(f'unknown sampler {sampler!r} in --samplers; '
                       f'expected some of {", ".join(diffusion.SAMPLERS)}')
  for n in steps:
    try:
      diffusion.space_timesteps(1000, n)
    except ValueError as e:
      raise ValueError(f'--step_counts: {n!r}: {e}') from None
  for clip in clips:
    gendd.parse_clip_x0(clip)
  out = []
  for clip in clips:
    for sampler in samplers:
      for n in (['1'] if sampler == 'posterior_mean' else steps):
        out.append((sampler, n, clip))
  return out


def cost(sampler: str, steps: str, cfg_scale: float,
         diffusion_steps: int = 1000) -> int:
  """Network evaluations per image and draw."""
  calls = (1 if sampler == 'posterior_mean' else
           len(diffusion.space_timesteps(diffusion_steps, steps)))
  return calls * (2 if cfg_scale != 1.0 else 1)


def choose(rows: list[dict], tolerance: float) -> tuple[dict, dict]:
  """`(best, cheapest)`: the most accurate row, and the cheapest row within
  `tolerance` points of it (the more accurate of equally cheap ones)."""
  best = max(rows, key=lambda r: (r['top1'], -r['cost']))
  ok = [r for r in rows if r['top1'] >= best['top1'] - tolerance]
  return best, min(ok, key=lambda r: (r['cost'], -r['top1']))


Key = tuple[str, str, str, float | None, float | None, float | None]


def _key(r: dict) -> Key:
  """A row's setting; `cfg_scale` / `temperature` / `init_temperature`
  None in rows of studies that did not record them (all at their runs'
  own)."""
  return (r['sampler'], r['steps'], r['clip_x0'], r.get('cfg_scale'),
          r.get('temperature'), r.get('init_temperature'))


# The samplers whose result depends on the noise temperature (the others
# inject no noise after x_T).
_NOISY = ('ancestral',)


def _numbers(values, flag: str, low: float, what: str) -> list[float]:
  """`values` as floats, each at least `low`.

  Raises:
    ValueError: a value that is not a number, or below `low`.
  """
  out = []
  for v in values:
    try:
      out.append(float(v))
    except ValueError:
      raise ValueError(f'--{flag}: {v!r} is not a number') from None
    if out[-1] < low:
      raise ValueError(f'--{flag} {",".join(map(str, values))}: {what}')
  return out


def sweep(run_dirs, samplers, steps, seeds, reference, tolerance,
          clips=('none',), cfg_scales=(), temperatures=(),
          init_temperatures=()) -> dict:
  """Evaluates every setting on every run; see the module docstring.

  `reference` is 'sampler:steps', always without clipping (the paper's), at
  the runs' own guidance scale and temperatures; `cfg_scales`,
  `temperatures` and `init_temperatures` (default: the runs' own) multiply
  the settings, `temperatures` those of ancestral sampling only.
  """
  settings = _settings(samplers, steps, clips)
  ref_sampler, _, ref_steps = reference.partition(':')
  _settings([ref_sampler], [ref_steps], ['none'])
  scales = _numbers(cfg_scales, 'cfg_scales', 1.0,
                    'a scale is 1 (unguided) or more')
  temps = _numbers(temperatures, 'temperatures', 0.0,
                   'a temperature is 0 or more')
  inits = _numbers(init_temperatures, 'init_temperatures', 0.0,
                   'a temperature is 0 or more')
  exports = []
  for run in run_dirs:
    out = os.path.join(run, 'eval_export')
    if not paths.exists(os.path.join(out, 'meta.json')):
      export_lib.export(run, out)
    exports.append(evaluate.load(out))
  rows = []
  # The runs' own guidance scale (read from the config: a run that clips by
  # default needs its clip bound for a full sampler_spec; the scale does
  # not).
  run_cfg = float(exports[0].config.sampler.cfg_scale)
  run_temp = float(exports[0].config.sampler.temperature)
  run_init = float(exports[0].config.sampler.get('init_temperature', 1.0))
  num_steps = int(exports[0].config.gendd.diffusion_steps)
  # The samplers without noise: evaluated once, at the runs' temperature.
  grid = [(s, n, c, g, tau, x) for x in (inits or [run_init])
          for g in (scales or [run_cfg]) for s, n, c in settings
          for tau in ((temps or [run_temp]) if s in _NOISY else [run_temp])]
  ref_key = (ref_sampler, ref_steps, 'none', run_cfg, run_temp, run_init)
  if ref_key not in grid:
    grid.append(ref_key)
  for sampler, n, clip, cfg, temp, init in grid:
    accs, top5s, speeds = [], [], []
    for seed in range(seeds):
      hits1 = hits5 = total = 0
      for ex in exports:
        spec = evaluate.sampler_spec(ex.config, sampler=sampler, steps=n,
                                     cfg_scale=cfg, temperature=temp,
                                     init_temperature=init, clip_x0=clip,
                                     clip_bound=ex.meta.get('clip_bound'))
        r = evaluate.evaluate(ex, evaluate.eval_batches(ex), 'sample', spec,
                              seed=seed)
        hits1 += r['top1'] * r['images'] / 100.0
        hits5 += r['top5'] * r['images'] / 100.0
        total += r['images']
        speeds.append(r['images_per_sec'])
      accs.append(100.0 * hits1 / total)
      top5s.append(100.0 * hits5 / total)
    row = dict(sampler=sampler, steps=n, clip_x0=clip, cfg_scale=cfg,
               temperature=temp, init_temperature=init,
               cost=cost(sampler, n, cfg, num_steps),
               top1=statistics.mean(accs),
               top1_std=statistics.pstdev(accs), top1_per_seed=accs,
               top5=statistics.mean(top5s),
               images_per_sec=statistics.median(speeds), images=total)
    rows.append(row)
    print(f'{sampler:>15s} {n:>11s} {clip:>12s} cfg {cfg:<4g} '
          f'T {temp:<4g} x_T x{init:<3g} ({row["cost"]:4d} calls): '
          f'top-1 {row["top1"]:6.2f} ± {row["top1_std"]:.2f}  top-5 '
          f'{row["top5"]:6.2f}  {row["images_per_sec"]:9.1f} images/s',
          flush=True)
  probe = []
  for ex in exports:
    probe.append(evaluate.evaluate(ex, evaluate.eval_batches(ex), 'probe'))
  probe_top1 = (sum(p['top1'] * p['images'] for p in probe) /
                sum(p['images'] for p in probe))
  ref = next(r for r in rows if _key(r) == ref_key)
  return _study(rows, ref, tolerance, clip_x0=list(clips),
                cfg_scales=scales or [run_cfg],
                temperatures=temps or [run_temp],
                init_temperatures=inits or [run_init],
                probe_top1=probe_top1, seeds=seeds,
                runs=[os.path.abspath(r) for r in run_dirs])


def _study(rows: list[dict], ref: dict, tolerance: float, **more) -> dict:
  """The study record of `rows`: the best and recommended rows (`choose`)
  and the recommended row's speed-ups over `ref`, plus `more`."""
  best, cheapest = choose(rows, tolerance)
  return dict(rows=rows, reference=ref, best=best, recommended=cheapest,
              tolerance=tolerance,
              speedup_calls=ref['cost'] / cheapest['cost'],
              speedup_measured=(cheapest['images_per_sec'] /
                                ref['images_per_sec']), **more)


def merge(results: list[dict], reference: str, tolerance: float) -> dict:
  """One study from several written before on the same runs (e.g. one per
  clipping, as this tool wrote them when it took a single `--clip_x0`),
  re-selected under the rule of `choose`. Rows lacking a clipping take
  their study's; rows lacking a guidance scale or a noise temperature (older
  studies did not record them) take the runs' own, read from their exports
  where these are still on disk. A setting measured by several studies is
  kept once, as the first study measured it.

  Raises:
    ValueError: studies of different runs or seeds, or no reference row.
  """
  first = results[0]
  for r in results[1:]:
    if r['runs'] != first['runs'] or r['seeds'] != first['seeds']:
      raise ValueError('--merge takes studies of the same runs and seeds')
  own = _runs_sampler(first['runs'])
  rows, seen = [], set()
  for res in results:
    clip = res.get('clip_x0', 'none')
    for row in res['rows']:
      row = dict(row, clip_x0=row.get('clip_x0', clip))
      for name, value in own.items():
        if row.get(name) is None:
          row[name] = value
      if _key(row) not in seen:
        seen.add(_key(row))
        rows.append(row)
  ref_sampler, _, ref_steps = reference.partition(':')
  ref = [r for r in rows if _key(r)[:3] == (ref_sampler, ref_steps, 'none')
         and r.get('cfg_scale') != 1.0
         and r.get('temperature') in (None, own.get('temperature', 1.0))
         and r.get('init_temperature') in (None,
                                           own.get('init_temperature', 1.0))]
  if not ref:
    raise ValueError(f'no study holds the reference {reference} unclipped')
  return _study(rows, ref[0], tolerance,
                clip_x0=sorted({r['clip_x0'] for r in rows}),
                probe_top1=first['probe_top1'], seeds=first['seeds'],
                runs=first['runs'],
                merged_from=[r.get('source', '') for r in results])


def _runs_sampler(runs: list[str]) -> dict:
  """The guidance scale and noise temperature the runs sample with (from
  the first run's export), or {} when it is not on disk."""
  try:
    with open(os.path.join(runs[0], 'eval_export', 'meta.json')) as f:
      sampler = json.load(f)['config']['sampler']
    return dict(cfg_scale=float(sampler['cfg_scale']),
                temperature=float(sampler['temperature']),
                init_temperature=float(sampler.get('init_temperature', 1.0)))
  except (OSError, IndexError, KeyError, TypeError, ValueError):
    return {}


def markdown(res: dict) -> str:
  """The study's table and its conclusion, in markdown."""
  lines = ['| sampler | steps | x0 clipping | guidance | noise temperature '
           '| x_T scale | network calls / '
           f'image | top-1 % (mean ± std over {res["seeds"]} seeds) | top-5 % '
           '| images/s |',
           '|---|---|---|---|---|---|---|---|---|---|']
  ref, best, pick = res['reference'], res['best'], res['recommended']
  for r in res['rows']:
    marks = [name for name, row in (('best', best), ('recommended', pick),
                                     ('paper', ref)) if _key(r) == _key(row)]
    mark = f" **({', '.join(marks)})**" if marks else ''
    lines.append(f"| {r['sampler']}{mark} | {r['steps']} | {r['clip_x0']} | "
                 f"{_cfg(r)} | {_temp(r)} | {_temp(r, 'init_temperature')} | "
                 f"{r['cost']} | "
                 f"{r['top1']:.2f} ± {r['top1_std']:.2f} | "
                 f"{r['top5']:.2f} | {r['images_per_sec']:.1f} |")
  lines += ['', f"Linear probe (no sampling): {res['probe_top1']:.2f}%. "
            f"The paper's sampler ({ref['sampler']} {ref['steps']} steps, no "
            f"clipping): {ref['top1']:.2f}%, {ref['cost']} calls. Best "
            f"setting: {_name(best)}, {best['top1']:.2f}%. Cheapest within "
            f"{res['tolerance']} points of the best: {_name(pick)}, "
            f"{pick['top1']:.2f}%, {pick['cost']} calls — "
            f"{res['speedup_calls']:.1f}x fewer network calls than the "
            f"paper's sampler, {res['speedup_measured']:.1f}x its measured "
            'images/s.']
  return '\n'.join(lines) + '\n'


def _cfg(r: dict) -> str:
  return _temp(r, 'cfg_scale')


def _temp(r: dict, name: str = 'temperature') -> str:
  """A row's noise temperature, or another recorded setting (`name`):
  'run's' where the study did not record it (its runs' own)."""
  value = r.get(name)
  return "run's" if value is None else f'{value:g}'


def _noise(r: dict, with_default: bool = False) -> str:
  """', noise temperature T, x_T scale X' of a row, each part left out
  where it is not recorded or (the x_T scale; the temperature unless
  `with_default`) at the default 1; the temperature only for samplers
  that inject noise."""
  tau, init = r.get('temperature'), r.get('init_temperature')
  out = ''
  if (r['sampler'] in _NOISY and tau is not None and
      (with_default or tau != 1.0)):
    out += f', noise temperature {tau:g}'
  if init not in (None, 1.0):
    out += f', x_T scale {init:g}'
  return out


def _name(r: dict) -> str:
  steps = '1 call' if r['sampler'] == 'posterior_mean' else f"{r['steps']}"
  return (f"{r['sampler']} {steps}, x0 clipping {r['clip_x0']}, guidance "
          f'{_cfg(r)}{_noise(r)}')


def frontiers(rows: list[dict]) -> dict[str, list[dict]]:
  """Per sampler family (sampler, and noise temperature for the noisy
  ones), its most accurate row at each cost, by cost: the plot's lines
  (clipping, guidance and spacing vary along a line; the table has every
  row)."""
  by: dict[str, dict[int, dict]] = {}
  for r in rows:
    at = by.setdefault(r['sampler'] + _noise(r, with_default=True), {})
    if r['cost'] not in at or r['top1'] > at[r['cost']]['top1']:
      at[r['cost']] = r
  return {name: [at[c] for c in sorted(at)] for name, at in sorted(by.items())}


def plot(res: dict, path: str) -> None:
  # matplotlib is optional and heavy: imported only to draw the plot.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  # Optional, like matplotlib above; the headless backend is chosen first.
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(9, 6))
  for name, rows in frontiers(res['rows']).items():
    ax.errorbar([r['cost'] for r in rows], [r['top1'] for r in rows],
                yerr=[r['top1_std'] for r in rows], marker='o',
                label=name, capsize=3, ms=3, lw=1)
  for mark, row, style in (('paper', res['reference'], 'kx'),
                           ('recommended', res['recommended'], 'r*')):
    ax.plot([row['cost']], [row['top1']], style, ms=10,
            label=f'{mark}: {_name(row)}')
  ax.axhline(res['probe_top1'], color='gray', ls='--', label='linear probe')
  ax.axhline(res['best']['top1'] - res['tolerance'], color='k', ls=':',
             lw=0.8, label=f"best - {res['tolerance']}")
  ax.set_xscale('log', base=2)
  # Down to the paper's sampler where it is far below (it is plotted).
  ax.set_ylim(max(0.0, min(res['probe_top1'] - 15.0,
                           res['reference']['top1'] - 3.0)), 100.0)
  ax.set_xlabel('network calls per image')
  ax.set_ylabel('top-1 (%)')
  ax.set_title('each line: the most accurate setting of a sampler family at '
               'each cost (every row: the .md table)', fontsize=8)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _read(path: str) -> dict:
  with open(paths.absolute(path)) as f:
    return dict(json.load(f), source=path)


def main(argv):
  if len(argv) > 1 or not common.OUT.value or not (_RUNS.value or
                                                   _MERGE.value):
    errors.fail('--out (the output path prefix) and one of --runs or '
                '--merge are required')
  try:
    if _MERGE.value:
      res = merge([_read(p) for p in _MERGE.value], _REFERENCE.value,
                  _TOLERANCE.value)
    else:
      runs = sorted(glob.glob(paths.absolute(_RUNS.value)))
      if not runs:
        errors.fail(f'no run directory matches {_RUNS.value}')
      clips = ('none' if common.CLIP_X0.value is None else
               common.CLIP_X0.value).split(',')
      res = sweep(runs, _SAMPLERS.value, _STEPS.value, _SEEDS.value,
                  _REFERENCE.value, _TOLERANCE.value, clips,
                  _CFG_SCALES.value, _TEMPERATURES.value,
                  _INIT_TEMPERATURES.value)
  except (ValueError, OSError) as e:  # Bad settings, unreadable studies.
    errors.fail(str(e))
  out = paths.absolute(common.OUT.value)  # `~` expanded.
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out + '.json', 'w') as f:
    json.dump(res, f, indent=1)
  table = markdown(res)
  with open(out + '.md', 'w') as f:
    f.write(table)
  plot(res, out + '.png')
  print('\n' + table)


def entry() -> None:
  """The `gendd-sweep-sampling` console script."""
  common.run(main, __name__)


if __name__ == '__main__':
  entry()
