"""The continuous-training pipeline's Python code, in three packages by where it runs.

- `ct.trainer`: the training side, run by train.py in the training/tuning container (or as a
  local process): imports torch.
- `ct.pipeline`: the Jenkins side, run by the job scripts with the host's plain python3 around
  the container: standard library only.
- `ct.serving`: the champion's prediction service and `predict`, run in the serving image (ONNX
  Runtime, numpy, Pillow, starlette, uvicorn): no torch.

What both sides use stays here, standard library only:

- `ct.atomic`: atomic writes (a reader sees the old file or the new one).
- `ct.cpu_budget`: the CPU threads a training process may use, so trainings sharing a host
  share its cores (the host splits them; the trainer reads its share).
- `ct.data_version`: the data a run reads (CIFAR-10 plus labelled increments: their layout and
  classes) and its version, which the trainer records and the host's lineage check recomputes.
- `ct.untrusted`: files a training container could have written, read by the host and the serving
  image without following links (regular files only, size caps).
- `ct.workspace`: the workspace contract: its file names and how a run's commit is found.

And one module the training container and the serving image share (numpy and Pillow, no torch):

- `ct.images`: an image file as the network's input, uint8 (3, 32, 32): increments are decoded
  for training as the service decodes a request.
"""
