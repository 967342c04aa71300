"""The Jenkins side: run by the job scripts (scripts/) with the host's plain python3 around the
training container. Standard library only: nothing here, nor anything it imports, needs torch.

- `gate`: `python3 -m ct.pipeline.gate check|promote`: the accuracy gate (job4) and model
  promotion (job4, job5).
- `notify`: `python3 -m ct.pipeline.notify`: the mail (best model, tuning result, failure).
- `report`: `python3 -m ct.pipeline.report`: the static HTML report, W/report/index.html (job4,
  job5; Jenkins' HTML Publisher shows it).
- `lineage`: `python3 -m ct.pipeline.lineage [best|RUN_ID] [--verify]`: where a model came from
  (commit, image, data, config, run, model sha256), and whether its files still match.
"""
