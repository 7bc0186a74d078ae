"""The recipe table (`docs/recipes.md`, written by `python -m tools.recipes`):
every paper config carries the released value of each recorded
hyperparameter unless a reason is given, and the table is up to date."""

import copy

from absl.testing import absltest

from gendd_jax import config_lib
from tools import recipes


class RecipeTableTest(absltest.TestCase):

  def test_configs_carry_the_released_recipes(self):
    problems = [p for arg in recipes.experiments()
                for p in recipes.unexplained(arg)]
    self.assertEqual(problems, [])

  def test_a_drifting_config_is_caught(self):
    for arg, key, value in (
        ('r18_from_r34', 'gendd.beta', 0.0),
        ('cifar100_gendd:vgg13-vgg8', 'stages.gendd.schedule', 'cosine'),
        ('imagenet_lt:r50', 'stages.gendd.warmup_epochs', 10.0),
        ('cc3m_unsup:mbv1_kl', 'kd.temperature', 4.0)):
      c = copy.deepcopy(recipes.load_config(arg))
      *parents, leaf = key.split('.')
      node = c
      for p in parents:
        node = node[p]
      node[leaf] = value
      found = recipes.unexplained(arg, c)
      self.assertLen(found, 1, (arg, key))
      self.assertIn(f'({key})', found[0])

  def test_every_released_cifar_pair_is_a_config(self):
    self.assertLessEqual(set(recipes.CIFAR_SCRIPTS),
                         set(config_lib.CIFAR_PAIRS))
    for pair, (_, smooth, _) in recipes.CIFAR_SCRIPTS.items():
      self.assertEqual(config_lib.CIFAR_PAIRS[pair], smooth, pair)

  def test_doc_is_current(self):
    with open(recipes.DOC) as f:
      self.assertEqual(f.read(), recipes.render(),
                       'docs/recipes.md is stale: run python -m tools.recipes')


if __name__ == '__main__':
  absltest.main()
