"""Benchmarks: step time, memory, decoding, MFU, profiles and XLA options, with their shared
machinery (``models_gpt``, the ``bench_*`` runners and reports, ``results_io``)."""
