"""The Colab demo executes headlessly, end to end, in its quick mode."""

from __future__ import annotations

import os
import tempfile

from absl.testing import absltest
import nbclient
import nbformat

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NOTEBOOK = os.path.join(_ROOT, 'launch', 'colab_demo.ipynb')


class NotebookTest(absltest.TestCase):

  def test_executes_in_quick_mode(self):
    nb = nbformat.read(_NOTEBOOK, as_version=4)
    with tempfile.TemporaryDirectory(prefix='gendd_demo_') as tmp:
      os.environ['GENDD_DEMO_QUICK'] = '1'
      os.environ['GENDD_DEMO_WORKDIR'] = tmp
      try:
        nbclient.NotebookClient(
            nb, timeout=600, kernel_name='python3',
            resources={'metadata': {'path': os.path.dirname(_NOTEBOOK)}}
        ).execute()
      finally:
        for k in ('GENDD_DEMO_QUICK', 'GENDD_DEMO_WORKDIR'):
          os.environ.pop(k)
      self.assertTrue(os.path.exists(os.path.join(tmp, 'gendd',
                                                  'results.json')))
    outputs = [o for c in nb.cells if c.cell_type == 'code'
               for o in c.get('outputs', [])]
    self.assertFalse([o for o in outputs if o.output_type == 'error'])
    figures = [o for o in outputs if 'image/png' in o.get('data', {})]
    self.assertGreaterEqual(len(figures), 3)  # Curves, accuracy, PCA.
    text = ''.join(o.get('text', '') for o in outputs)
    self.assertIn('quick mode', text)
    self.assertRegex(text, r'ancestral +16 steps: top-1 +[\d.]+%')
    self.assertRegex(text, r'probe: top-1 [\d.]+%')
    self.assertIn('mean cosine(sample, teacher feature)', text)


if __name__ == '__main__':
  absltest.main()
