"""The Jenkins side: run by the job scripts (scripts/) with the host's plain python3 around the
training container. Standard library only: nothing here, nor anything it imports, needs torch.
The job scripts invoke; the decisions about what follows from recorded state are made here.

- `after_run`: `python3 -m ct.pipeline.after_run judge|handed-to-tuning`: what follows every
  finished run (job4, job5, job6 --follow): judge, promote, mail, report, or hand to tuning,
  once per run.
- `process`: `python3 -m ct.pipeline.process ...`: a training/tuning process's record and what
  to do about it (job3, job5, job6): running, finished, restart within the budget, give up.
- `pushes`: `python3 -m ct.pipeline.pushes add|head|take|dispatch|list`: which push trains when
  (job1 queues, job3 takes, job6 hands on), one commit's chain at a time; `push_queue` is the
  queue's record and its order (CT_PUSH_ORDER) and bound (CT_PUSH_QUEUE_MAX).
- `push_source`: `python3 -m ct.pipeline.push_source check|config|tree`: what job1 takes from
  outside (the repository, the ref, the pushed tree), checked before git or the host uses it.
- `sandbox`: `python3 -m ct.pipeline.sandbox mounts`: what of the workspace a training
  container sees (its `docker run` mounts).
- `changes`: `python3 -m ct.pipeline.changes check`: has the code, the data version or the
  training flags changed since a judged run? (job3 before it trains, job6's check and weekly
  retrain before they start one).
- `snapshots`: `python3 -m ct.pipeline.snapshots digest|prune`: the commits' read-only code
  snapshots (code/<commit>/), their digest, and removing those nothing refers to.
- `run_facts`: what the workspace's files say about a process's run (finished, got past loading
  the data).
- `gate`: `python3 -m ct.pipeline.gate`: the accuracy gate, its verdict and history.
- `measured`: `python3 -m ct.pipeline.measured mounts|args|record`: the candidate's accuracy as
  the pipeline measures it (ct.serving.measure) before promotion, against what the run claims.
- `promote`: `python3 -m ct.pipeline.promote`: keep the run's model when it beats the best on
  the run's own test set; `rescore`: the best model's scores per test set (best.json `scores`,
  re-scorings in runs/eval-*); `class_guard`: the per-class guard (CT_MAX_CLASS_DROP) and the
  per-class comparison the mail and the report share.
- `notify`: `python3 -m ct.pipeline.notify`: the mail (best model, tuning result, failure, a
  failed deploy); `mail_delivery` is where it goes (SMTP from the settings, or outbox/).
- `exported`: `python3 -m ct.pipeline.exported record|needs`: an export of the champion to ONNX
  (ct.trainer.export) checked and stored content-addressed in models/, named in best.json (job7).
- `deploy`: `python3 -m ct.pipeline.deploy deploy|rollback|status|prune|running`: point the
  model service (ct.serving) at the champion's export, wait for its smoke test, roll back (job7);
  `deploy_records` keeps serving/wanted.json, serving/deployed.json and the models it names;
  `serving_api` reads the service's answers as untrusted input.
- `report`: `python3 -m ct.pipeline.report`: the static HTML report, W/report/index.html (job4,
  job5; Jenkins' HTML Publisher shows it); `report_inputs` reads what it shows,
  `report_chart` draws its chart.
- `lineage`: `python3 -m ct.pipeline.lineage [best|RUN_ID] [--verify]`: where a model came from
  (commit, image, data, config, run, model sha256), and whether its files still match.
- `records`: the one reader and writer of the workspace's records (properties, JSON), checked
  against their schemas; `python3 -m ct.pipeline.records get|set` for the job scripts.
- `cli`: what every command line here shares (--workspace, one line for bad input);
  `errors`: `PipelineError`, bad input (exit status 2).
"""
