"""The prediction service and its command line, run in the serving image (onnxruntime, numpy,
Pillow, starlette, uvicorn; no torch): docs/serving.md.

- `app`: the ASGI app (POST /predict, GET /healthz, /model, /metrics, the page at /).
- `batcher`: micro-batching of the requests' images into ONNX Runtime calls.
- `bodies`: a request body read under its limits into the images it sends.
- `cifar_test`: the CIFAR-10 test batch read with a restricted unpickler, for `measure`.
- `files`: reading files a container could have written (plain names, no links, size caps).
- `metrics`: the Prometheus metrics and their text format.
- `measure`: `python -m ct.serving.measure`: the pipeline's own measurement of a candidate's
  ONNX export on the test set it configured, before promotion (ct.pipeline.measured).
- `model`: an exported champion loaded with its manifest, its predictions, its smoke test.
- `predict`: `python -m ct.serving.predict`: classify image files from the command line.
- `settings`: the CT_SERVE_* settings and their defaults.
- `swap`: which model serves; serving/wanted.json polled, candidates smoke-tested, swapped.

- `__main__`: `python -m ct.serving --workspace WS [--host 127.0.0.1] [--port 8500]` runs the
  service (uvicorn).
"""
