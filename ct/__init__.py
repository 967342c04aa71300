"""Support modules of the continuous-training pipeline.

Everything here except `data`, `checkpoint` and `tune` is standard-library only, so the job
scripts can run it with the host's plain python3 (no torch) around the training container.
"""
