"""The training side: runs in the training/tuning container (or as a local process) under
train.py, and imports torch.

- `data`: CIFAR-10 from disk into uint8 tensors.
- `increments`: labelled increments (docs/data.md) decoded, checked and appended to CIFAR-10.
- `engine`: the device set-up (`Compute`), batched augmentation, one epoch, weight averaging
  (`Lookahead`), evaluation.
- `allocator`: malloc told to keep the memory a training step frees, for the next to reuse.
- `muon`: `--optimizer muon`, Muon for the convolution filters and SGD for the other weights.
- `views`: the test-time views (mirror, shifted copies) and how their logits combine.
- `config`: the plain recipe every preset overrides, the presets, each key's help line, config
  validation, and how configs recorded before some keys existed are read and hashed.
- `state`: the training state (`TrainingState`), its checkpoints, a saved model loaded back.
- `runs`: the workspace's run folders (`Workspace`): choosing or continuing one, the run's clock
  and log, its data and lineage, publishing its results.
- `run`: one config's epoch loop (`train_config`) and `train.py`'s training and --reproduce
  modes.
- `evaluate`: `python -m ct.trainer.evaluate MODEL --out W`: a saved model re-scored on the test
  set the data holds now (the champion, before a run on a new test set is compared with it).
- `export`: `python -m ct.trainer.export MODEL --out W`: the champion as an ONNX graph (uint8
  images in, the recipe's test-time augmentation inside), checked against torch (job7).
- `tune`: one bounded tuning round and its workers; `train.py --tune` (imports optuna).
- `plan`: a tuning round's plan (the flags checked and frozen), and trial params as config keys.
- `study`: the Optuna study: search space, sampler, pruner, storage, a round's trial slots.
- `plots`: the pictures of a run (curves.png, confusion.png, a tuning run's trials.png), when
  matplotlib imports.
- `lineage`: what a run was made from (its metrics.json's `lineage`), and how a reproduction
  (`train.py --reproduce`) compares with the run it repeats.
- `stopping`: stopping cleanly on SIGTERM/SIGINT.
- `errors`: `UsageError`, bad input (exit status 2).
"""
