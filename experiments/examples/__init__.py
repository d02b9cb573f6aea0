"""Runnable jobs: fine-tuning examples on real weights and data, parallel and multi-host training,
and the LoRA paper's parameter counts. ``sentiment`` is the helper that ``finetune`` and ``quality``
share."""
