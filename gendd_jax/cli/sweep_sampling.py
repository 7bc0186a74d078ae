r"""Accuracy against sampling steps, per sampler: the few-step study.

  python -m gendd_jax.cli.sweep_sampling \
      --runs='runs/digits/seed0/fold*/gendd' \
      --step_counts=1,2,4,8,16,32,64,100 \
      --samplers=ancestral,ddim,posterior_mean --seeds=3 \
      --out=docs/results/sampling_digits

Exports each GenDD training run (to `<run>/eval_export`, once), evaluates
every (sampler, steps) setting on each run's evaluation split, pools the
predictions over runs (e.g. the folds of a cross-validation, which together
test every image once) and averages over `--seeds` sampler-noise seeds.
`posterior_mean` is a single network call whatever the step count, so it is
evaluated once. The cost of a setting is its number of network evaluations
per image (steps x 2 with classifier-free guidance), which does not depend
on the machine; measured images/s are reported beside it. The recommended
setting is the cheapest whose accuracy is within `--tolerance` points of
the reference sampler (`--reference`, the paper's ancestral sampler).
Writes `<out>.json`, `<out>.md` and `<out>.png`.
"""

from __future__ import annotations

import glob
import json
import os
import statistics

from absl import flags

from gendd_jax import paths
from gendd_jax import errors
from gendd_jax.cli import common
from gendd_jax.cli import evaluate
from gendd_jax.cli import export as export_lib

_RUNS = flags.DEFINE_string('runs', None, 'Glob of GenDD training run dirs.')
_STEPS = flags.DEFINE_list(
    'step_counts', ['1', '2', '4', '8', '16', '32', '64', '100'],
    'Step counts.')
_SAMPLERS = flags.DEFINE_list('samplers', ['ancestral', 'ddim',
                                           'posterior_mean'], 'Samplers.')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Sampler-noise seeds averaged.')
_REFERENCE = flags.DEFINE_string(
    'reference', 'ancestral:64',
    'sampler:steps whose accuracy is the target.')
_TOLERANCE = flags.DEFINE_float('tolerance', 0.2, 'Points below the '
                                'reference still counted as equal.')
# Deprecated: this command's name for --out before the commands shared it.
flags.DEFINE_alias('output_prefix', 'out')
flags.declare_key_flag('clip_x0')
flags.declare_key_flag('out')


def _settings(samplers, steps):
  out = []
  for sampler in samplers:
    for n in ([steps[0]] if sampler == 'posterior_mean' else steps):
      out.append((sampler, '1' if sampler == 'posterior_mean' else n))
  return out


def cost(sampler: str, steps: str, cfg_scale: float) -> int:
  """Network evaluations per image and draw."""
  calls = 1 if sampler == 'posterior_mean' else int(steps)
  return calls * (2 if cfg_scale != 1.0 else 1)


def choose(rows: list[dict], reference: dict, tolerance: float) -> dict:
  """The cheapest row within `tolerance` points of `reference`."""
  ok = [r for r in rows if r['top1'] >= reference['top1'] - tolerance]
  return min(ok, key=lambda r: (r['cost'], -r['top1']))


def sweep(run_dirs, samplers, steps, seeds, reference, tolerance,
          clip_x0: str = 'none') -> dict:
  exports = []
  for run in run_dirs:
    out = os.path.join(run, 'eval_export')
    if not paths.exists(os.path.join(out, 'meta.json')):
      export_lib.export(run, out)
    exports.append(evaluate.load(out))
  rows = []
  ref_sampler, ref_steps = reference.split(':')
  settings = _settings(samplers, steps)
  if (ref_sampler, ref_steps) not in settings:
    settings.append((ref_sampler, ref_steps))
  for sampler, n in settings:
    accs, top5s, speeds = [], [], []
    for seed in range(seeds):
      hits1 = hits5 = total = 0
      for ex in exports:
        spec = evaluate.sampler_spec(ex.config, sampler=sampler, steps=n,
                                     clip_x0=clip_x0,
                                     clip_bound=ex.meta.get('clip_bound'))
        r = evaluate.evaluate(ex, evaluate.eval_batches(ex), 'sample', spec,
                              seed=seed)
        hits1 += r['top1'] * r['images'] / 100.0
        hits5 += r['top5'] * r['images'] / 100.0
        total += r['images']
        speeds.append(r['images_per_sec'])
      accs.append(100.0 * hits1 / total)
      top5s.append(100.0 * hits5 / total)
    cfg = evaluate.sampler_spec(exports[0].config).cfg_scale
    row = dict(sampler=sampler, steps=n, cost=cost(sampler, n, cfg),
               top1=statistics.mean(accs),
               top1_std=statistics.pstdev(accs), top1_per_seed=accs,
               top5=statistics.mean(top5s),
               images_per_sec=statistics.median(speeds), images=total)
    rows.append(row)
    print(f'{sampler:>15s} {n:>4s} steps ({row["cost"]:4d} calls): top-1 '
          f'{row["top1"]:6.2f} ± {row["top1_std"]:.2f}  top-5 '
          f'{row["top5"]:6.2f}  {row["images_per_sec"]:9.1f} images/s',
          flush=True)
  probe = []
  for ex in exports:
    probe.append(evaluate.evaluate(ex, evaluate.eval_batches(ex), 'probe'))
  probe_top1 = (sum(p['top1'] * p['images'] for p in probe) /
                sum(p['images'] for p in probe))
  ref = next(r for r in rows if (r['sampler'], r['steps']) ==
             (ref_sampler, ref_steps))
  best = choose(rows, ref, tolerance)
  return dict(rows=rows, reference=ref, recommended=best, clip_x0=clip_x0,
              tolerance=tolerance, probe_top1=probe_top1, seeds=seeds,
              runs=[os.path.abspath(r) for r in run_dirs],
              speedup_calls=ref['cost'] / best['cost'],
              speedup_measured=best['images_per_sec'] / ref['images_per_sec'])


def markdown(res: dict) -> str:
  lines = ['| sampler | steps | network calls / image | top-1 % (mean ± std '
           f'over {res["seeds"]} seeds) | top-5 % | images/s |',
           '|---|---|---|---|---|---|']
  for r in res['rows']:
    mark = ' **(recommended)**' if r is res['recommended'] or (
        r['sampler'], r['steps']) == (res['recommended']['sampler'],
                                      res['recommended']['steps']) else ''
    lines.append(f"| {r['sampler']}{mark} | {r['steps']} | {r['cost']} | "
                 f"{r['top1']:.2f} ± {r['top1_std']:.2f} | {r['top5']:.2f} | "
                 f"{r['images_per_sec']:.1f} |")
  ref, best = res['reference'], res['recommended']
  lines += ['', f"x0 clipping: {res['clip_x0']}. "
            f"Linear probe (no sampling): {res['probe_top1']:.2f}%. "
            f"Reference: {ref['sampler']} {ref['steps']} steps "
            f"{ref['top1']:.2f}%. Cheapest within {res['tolerance']} points: "
            f"{best['sampler']} {best['steps']} step(s), {best['top1']:.2f}% "
            f"— {res['speedup_calls']:.0f}x fewer network calls, "
            f"{res['speedup_measured']:.1f}x the measured images/s."]
  return '\n'.join(lines) + '\n'


def plot(res: dict, path: str) -> None:
  # matplotlib is optional and heavy: imported only to draw the plot.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  # Optional, like matplotlib above; the headless backend is chosen first.
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  by = {}
  for r in res['rows']:
    by.setdefault(r['sampler'], []).append(r)
  for sampler, rows in by.items():
    xs = [int(r['steps']) for r in rows]
    ax.errorbar(xs, [r['top1'] for r in rows],
                yerr=[r['top1_std'] for r in rows], marker='o',
                label=sampler, capsize=3)
  ax.axhline(res['probe_top1'], color='gray', ls='--', label='linear probe')
  ax.axhline(res['reference']['top1'] - res['tolerance'], color='k', ls=':',
             lw=0.8, label=f"reference - {res['tolerance']}")
  ax.set_xscale('log', base=2)
  ax.set_xlabel('sampling steps')
  ax.set_ylabel('top-1 (%)')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  out = common.OUT.value
  if len(argv) > 1 or not _RUNS.value or not out:
    errors.fail('--runs and --out (the output path prefix) are required')
  out = paths.absolute(out)
  runs = sorted(glob.glob(paths.absolute(_RUNS.value)))
  if not runs:
    errors.fail(f'no run directory matches {_RUNS.value}')
  clip_x0 = 'none' if common.CLIP_X0.value is None else common.CLIP_X0.value
  res = sweep(runs, _SAMPLERS.value, _STEPS.value, _SEEDS.value,
              _REFERENCE.value, _TOLERANCE.value, clip_x0)
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
