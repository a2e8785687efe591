"""The corpus builder: ``make corpus`` (``bench.corpus.build``) boots real guests and
writes real VM state, with its ``manifest.json``, outside git (docs/CORPUS.md).

The manifest reader is the product's (:mod:`federation.demo.corpus`): ``dwcp demo``
migrates a corpus guest when one is built, and nothing in the product imports ``bench``.
"""
