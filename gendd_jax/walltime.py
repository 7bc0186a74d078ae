"""Estimated training time: the traced step's FLOPs over an accelerator's
throughput.

An estimate, not a measurement: the FLOPs of one training step's matrix
products and convolutions (`flops.matmul_flops` of the traced step: teacher
forward, student and head forward and backward), times the steps of the
schedule, divided by the accelerator's dense bfloat16 peak times an assumed
utilisation (`UTILISATION`). Input pipelines, evaluation, checkpoints and
compilation are not counted. Every printed figure says "estimated".
"""

from __future__ import annotations

# Dense bfloat16 peak per chip, TFLOP/s (vendor figures), by the start of
# `jax.Device.device_kind`.
PEAK_TFLOPS = {
    'TPU v4': 275.0,
    'TPU v5 lite': 197.0,
    'TPU v5e': 197.0,
    'TPU v5p': 459.0,
    'TPU v5': 459.0,
    'TPU v6 lite': 918.0,
    'TPU v6e': 918.0,
    'NVIDIA A100': 312.0,
    'NVIDIA H100': 989.0,
    'NVIDIA H200': 989.0,
}
# Where the devices' own peak is unknown (CPU), estimates name this one:
# the released runs used 8 GPUs per node.
REFERENCE = ('NVIDIA A100', 8)
# Assumed fraction of the peak a training step reaches: a planning figure,
# not a measurement. Convolutional networks at a few dozen images per chip
# use the matrix units far less fully than large transformers, and real
# runs are often bound by the input pipeline; a run prints a measured
# estimate after its first steps.
UTILISATION = 0.15


def peak_tflops(device_kind: str) -> float | None:
  """The peak of a `jax.Device.device_kind`, or None when unknown."""
  for prefix in sorted(PEAK_TFLOPS, key=len, reverse=True):
    if device_kind.startswith(prefix):
      return PEAK_TFLOPS[prefix]
  return None


def seconds(total_flops: float, device_kind: str, chips: int
            ) -> float | None:
  """Estimated seconds for `total_flops` on `chips` of `device_kind`."""
  peak = peak_tflops(device_kind)
  if peak is None:
    return None
  return total_flops / (chips * peak * 1e12 * UTILISATION)


def amount(secs: float) -> str:
  """'~1.5 days', '~3.2 h', '~12 min' or '< 1 min'."""
  if secs >= 2 * 86400:
    return f'~{secs / 86400:.1f} days'
  if secs >= 3600:
    return f'~{secs / 3600:.1f} h'
  if secs >= 60:
    return f'~{secs / 60:.0f} min'
  return '< 1 min'


def describe(secs: float | None, device_kind: str, chips: int) -> str:
  """'~3.2 h on 8 x TPU v4 (estimated: ...)' or why there is no figure."""
  if secs is None:
    return (f'no estimate for {device_kind!r} (peak unknown; the progress '
            'line measures steps/s and the remaining time)')
  return (f'{amount(secs)} on {chips} x {device_kind} (estimated: traced step '
          f'FLOPs at {UTILISATION:.0%} of the bfloat16 peak; data loading, '
          'evaluation and compilation not counted)')
