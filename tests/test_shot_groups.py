"""Many/medium/few-shot top-1 of long-tailed data (ImageNet-LT's groups:
more than 100, 20 to 100, fewer than 20 training images per class), from
training-time evaluation and from the evaluate command, on a small
synthetic long-tailed split."""

import json
import os
import tempfile

from absl.testing import absltest
import numpy as np

from gendd_jax import config_lib
from gendd_jax import data as data_lib
from gendd_jax import train
from gendd_jax.cli import common
from gendd_jax.cli import evaluate
from gendd_jax.data import builders

# Training images per class: two many-shot, two medium-shot, two few-shot.
_COUNTS = (130, 101, 100, 20, 19, 3)


class ShotAccuracyTest(absltest.TestCase):

  def test_groups_and_means_of_class_accuracies(self):
    counts = np.array([150, 101, 100, 20, 19, 1])
    hits = np.array([1, 3, 2, 0, 5, 0])
    totals = np.array([2, 4, 4, 1, 5, 0])  # The last class is not evaluated.
    got = data_lib.shot_accuracy(hits, totals, counts)
    self.assertAlmostEqual(got['many'], 100 * (0.5 + 0.75) / 2)
    self.assertAlmostEqual(got['medium'], 100 * (0.5 + 0.0) / 2)
    self.assertAlmostEqual(got['few'], 100.0)
    self.assertEqual(set(data_lib.shot_accuracy(hits[:2], totals[:2],
                                                counts[:2])), {'many'})

  def test_per_class(self):
    hits, totals = data_lib.per_class(np.array([1, 0, 1, 1]),
                                      np.array([2, 2, 0, 2]), 4)
    np.testing.assert_array_equal(hits, [1, 0, 2, 0])
    np.testing.assert_array_equal(totals, [1, 0, 3, 0])


class LongTailedRunTest(absltest.TestCase):

  def test_training_and_evaluate_report_the_same_groups(self):
    tmp_dir = tempfile.TemporaryDirectory(prefix='gendd_test_shots_')
    self.addCleanup(tmp_dir.cleanup)
    tmp = tmp_dir.name
    rng = np.random.default_rng(0)

    def split(counts):
      labels = np.repeat(np.arange(len(counts)), counts)
      images = rng.integers(0, 255, (len(labels), 8, 8, 3)).astype(np.uint8)
      # The class shows in the first channel, but the two few-shot classes
      # look alike: the groups' accuracies must differ.
      images[..., 0] = (np.minimum(labels, 4) * 50)[:, None, None]
      return images, labels

    tr_img, tr_lab = split(_COUNTS)
    va_img, va_lab = split((4,) * len(_COUNTS))
    src = os.path.join(tmp, 'lt.npz')
    np.savez(src, train_images=tr_img, train_labels=tr_lab,
             val_images=va_img, val_labels=va_lab)
    data_dir = os.path.join(tmp, 'tfds')
    builders.build('npz', src, data_dir, 'lt', log=lambda *a: None)
    c = config_lib.cifar100('resnet8', 'resnet8')
    c.data = config_lib.image_data('npz:lt', image_size=8, augment='none',
                                   batch_size=32, eval_batch_size=8,
                                   eval_split='val')
    c.data.data_dir = data_dir
    c.data.num_threads = 1
    c.data.prefetch = 4
    c.data.shot_groups = True
    c.stage = 'teacher'
    c.stages.teacher.epochs = 4.0
    c.stages.teacher.decay_epochs = ()
    workdir = os.path.join(tmp, 'run')
    res = train.train_and_evaluate(c, workdir, quiet=True)
    got = res['shot_accuracy']['acc']
    self.assertEqual(set(got), {'many', 'medium', 'few'})
    # Measured: many 100, medium 100, few 50 (the look-alikes), top-1 83.3;
    # chance is 1 in 6.
    self.assertGreater(got['many'], 100 / 6 + 30)
    self.assertLessEqual(got['few'], 50.0)
    self.assertGreater(got['many'], got['few'])
    # Recomputed from the stored predictions: 4 validation images a class.
    pred, labels = np.array(res['predictions']['acc']), np.array(res['labels'])
    per_class = [np.mean(pred[labels == k] == k) * 100 for k in range(6)]
    for name, classes in (('many', (0, 1)), ('medium', (2, 3)),
                          ('few', (4, 5))):
      self.assertAlmostEqual(got[name], np.mean([per_class[k]
                                                 for k in classes]), 4)
    with open(os.path.join(workdir, 'results.json')) as f:
      self.assertEqual(json.load(f)['shot_accuracy']['acc'], got)
    out = os.path.join(tmp, 'eval.json')
    self.assertEqual(common.call(evaluate.main, [
        f'--checkpoint={workdir}/export', '--mode=logits',
        f'--out={out}']), 0)
    with open(out) as f:
      standalone = json.load(f)['logits']
    for name in ('many', 'medium', 'few'):
      self.assertAlmostEqual(standalone['shot_accuracy'][name], got[name], 4)
    self.assertAlmostEqual(standalone['top1'], res['accuracy']['acc'], 4)


if __name__ == '__main__':
  absltest.main()
