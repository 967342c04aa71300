"""The training side: runs in the training/tuning container (or as a local process) under
train.py, and imports torch.

- `data`: CIFAR-10 from disk into uint8 tensors.
- `engine`: the device set-up (`Compute`), batched augmentation, one epoch, weight averaging
  (`Lookahead`), evaluation.
- `run`: one run in the workspace: the training state, checkpoints, the epoch loop, the run
  clock, publishing the results; `train.py`'s training mode.
- `tune`: one bounded tuning round and its workers; `train.py --tune` (imports optuna).
- `study`: the Optuna study: search space, sampler, pruner, storage, a round's trial slots.
- `plots`: the pictures of a run (curves.png, a tuning run's trials.png), when matplotlib imports.
- `lineage`: what a run was made from (its metrics.json's `lineage`), and how a reproduction
  (`train.py --reproduce`) compares with the run it repeats.
- `compat`: config keys added after runs were recorded, and the values older runs meant.
- `stopping`: stopping cleanly on SIGTERM/SIGINT.
- `errors`: `UsageError`, bad input (exit status 2).
"""
