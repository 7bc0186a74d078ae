"""The bundled digits data without importing scikit-learn: the same images,
labels and stratified folds as scikit-learn's own functions."""

from __future__ import annotations

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
from sklearn import datasets
from sklearn.model_selection import StratifiedKFold

from gendd_jax.data import memory


class DigitsTest(parameterized.TestCase):

  def test_load_digits_equals_scikit_learn(self):
    images, labels = memory.load_digits()
    d = datasets.load_digits()
    np.testing.assert_array_equal(images, d.data.astype(np.float32) / 16.0)
    np.testing.assert_array_equal(labels, d.target)
    self.assertEqual((images.dtype, labels.dtype), (np.float32, np.int32))
    self.assertEqual(images.shape, (1797, 64))

  @parameterized.parameters((5, 0), (5, 1), (2, 0), (20, 3), (3, 12345))
  def test_folds_equal_stratified_k_fold(self, folds, seed):
    _, labels = memory.load_digits()
    ours = memory.stratified_folds(labels, folds, seed)
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    theirs = list(skf.split(np.zeros(len(labels)), labels))
    self.assertLen(ours, folds)
    for (a, b), (c, d) in zip(ours, theirs):
      np.testing.assert_array_equal(a, np.sort(c))
      np.testing.assert_array_equal(b, np.sort(d))

  def test_folds_of_labels_in_any_order(self):
    # Classes numbered by first appearance, not by value.
    labels = np.array([7, 7, 3, 3, 7, 3, 9, 9, 9, 3, 7, 9] * 3)
    ours = memory.stratified_folds(labels, 3, 4)
    skf = StratifiedKFold(n_splits=3, shuffle=True, random_state=4)
    for (a, b), (c, d) in zip(ours, skf.split(labels, labels)):
      np.testing.assert_array_equal(a, np.sort(c))
      np.testing.assert_array_equal(b, np.sort(d))

  def test_too_few_folds(self):
    with self.assertRaisesRegex(memory.DataError, 'num_folds must be >= 2'):
      memory.stratified_folds(np.arange(10) % 2, 1, 0)


if __name__ == '__main__':
  absltest.main()
