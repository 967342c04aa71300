"""One tuning round: `train.py --tune` (`tune_mode`), optionally helped by workers
(`train.py --tune --worker K`, same flags) that share its trials.

Trials are chosen on a validation split held out of the training set, never on the test set; the
test set is touched once, by the round's winner, after every worker has ended. The round is bounded
twice: --trials slots, and a wall-clock budget checked at every epoch (a trial cut short by it ends
as FAIL, not used). The study (`ct.trainer.study`) outlives the round: TPE proposes each trial from
every finished trial of every earlier round, and the pruner stops a trial whose validation curve
falls behind the others at the same tenth of its schedule. Each trial is an ordinary resumable run
in `<round>/trial-NNN/` (NNN: its number in the study), so a killed worker's trial resumes from its
checkpoint in whichever worker retries it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ct import atomic
from ct import workspace as names
from ct.trainer import plots, stopping
from ct.trainer import study as studies
from ct.trainer.data import Cifar
from ct.trainer.engine import Compute, evaluate_as_configured
from ct.trainer.errors import UsageError
from ct.trainer.plan import TuneOptions, config_of, make_plan, upgrade_plan, validation_images
from ct.trainer.run import Split, make_split, per_class_view, train_config
from ct.trainer.runs import (
    Log,
    LogLine,
    RunClock,
    RunOptions,
    Workspace,
    choose_run_dir,
    load_data,
    pin_data,
    publish,
    record_lineage,
    run_summary,
)
from ct.trainer.state import load_model

POLL_S = 2.0  # how often an idle worker looks at the study again
JOIN_POLL_S = 0.5  # how often a helper looks for its round: a short round must not pass it by
JOIN_WAIT_S = 600.0  # how long a helper worker waits for the round it should join

optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own log line per trial says it all


class WontFinish(Exception):
    """A trial that, at its pace so far, would end after the round's deadline."""


@dataclass
class Outcome:
    best_params: dict[str, Any]
    best_config: dict[str, Any]
    val_accuracy: float
    test_accuracy: float
    counts: dict[str, int]
    per_class: dict[str, Any]  # the best trial's per-class test view (run.per_class_view)


def trial_dir(run_dir: Path, number: int) -> Path:
    """Where the study's trial `number` keeps its resumable run."""
    return run_dir / f"trial-{number:03d}"


@dataclass
class Worker:
    """What one process needs to run the round's trials."""

    round: studies.Round
    plan: dict[str, Any]
    run_dir: Path
    split: Split
    compute: Compute
    log: LogLine
    name: str  # w0 for the round's owner, wK for helper K
    deadline: float  # time.time() when the round's budget ends
    stale_after: float
    dry_run: bool
    clock: RunClock | None = None  # the owner's: saved with every checkpoint

    def run(self, wait_for_others: bool) -> int:
        """Run slots until none is left or the budget ends; the owner (`wait_for_others`) also
        waits for the other workers' trials and retries those whose worker is gone. Returns the
        number of trials this process ran."""
        ran = 0
        while True:
            for number in self.round.retry_lost(self.name, self.stale_after):
                self.log(f"trial-{number:03d} lost its worker: retried as a new trial that "
                         "resumes from its checkpoint")
            running = self.round.trials(states=(TrialState.RUNNING,))
            if time.time() > self.deadline:
                if wait_for_others and running and time.time() < self.deadline + self.stale_after:
                    time.sleep(POLL_S)
                    continue
                self.log(f"time budget of {self.plan['time_budget']:.0f}s spent")
                return ran
            stopping.at("between trials", "every finished trial is kept")
            trial = self.round.pop(self.name)
            if trial is not None:
                self.run_trial(trial)
                ran += 1
            elif wait_for_others and running:
                time.sleep(POLL_S)
            else:
                return ran

    def run_trial(self, trial: optuna.Trial) -> None:
        params = studies.suggest(trial, self.plan["optimizers"], self.plan["max_epochs"],
                                 self.plan["base"])
        cfg = {**self.plan["base"], **params, "val_split": len(self.split.eval_x)}
        folder = trial_dir(self.run_dir, trial.number)
        with stopping.deferred():  # no trial folder without its config
            folder.mkdir(exist_ok=True)
            atomic.write_json(folder / names.RUN_CONFIG, cfg)
            self._take_over_checkpoint(trial, folder)
        slots, source = self.plan["trials"], studies.source_of(trial)
        self.log(f"trial-{trial.number:03d} ({self.name}, slot {self._slot(trial)}/{slots}, "
                 f"{source}): {json.dumps(params, sort_keys=True)}")
        reported, started, first_epoch = 0, time.monotonic(), None

        def after_epoch(epoch: int, accuracy: float) -> None:
            nonlocal reported, first_epoch
            reported = studies.report(trial, reported, epoch, cfg["epochs"], accuracy)
            studies.beat(trial)
            if source == "base":  # the round's reference runs to its end, or to the budget's
                return
            if source == "sampled" and trial.should_prune():  # the recipe is a known good point
                raise optuna.TrialPruned()
            first_epoch = epoch - 1 if first_epoch is None else first_epoch
            per_epoch = (time.monotonic() - started) / (epoch - first_epoch)
            if time.time() + per_epoch * (cfg["epochs"] - epoch) > self.deadline:
                raise WontFinish(f"stopped after epoch {epoch}/{cfg['epochs']}: at "
                                 f"{per_epoch:.0f}s an epoch it would not finish within the "
                                 "round's time budget")

        try:
            with studies.heartbeat(trial, self.stale_after):
                result = train_config(folder, cfg, self.split, self.compute, self.log,
                                      dry_run=self.dry_run, clock=self.clock,
                                      deadline=time.monotonic() + self.deadline - time.time(),
                                      after_epoch=after_epoch)
            if result.get("stopped"):
                trial.set_user_attr(studies.ENDED_ATTR, "cut short by the round's time budget")
                self._tell(trial, started, state=TrialState.FAIL)
            else:
                self._tell(trial, started, value=result["validation_accuracy"])
        except WontFinish as why:
            # A trial the deadline would cut is no use; its remaining time goes to other trials.
            trial.set_user_attr(studies.ENDED_ATTR, str(why))
            self._tell(trial, started, state=TrialState.FAIL)
            self.log(f"trial-{trial.number:03d} {why}")
        except optuna.TrialPruned:
            self._tell(trial, started, state=TrialState.PRUNED)
            self.log(f"trial-{trial.number:03d} pruned: its validation curve fell behind")
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another worker saw no heartbeat for --stale-after seconds and retried this trial
            # from its checkpoint: that retry counts, this one stops.
            self.log(f"trial-{trial.number:03d} was retried by another worker meanwhile: "
                     "leaving it to that retry")

    def _tell(self, trial: optuna.Trial, started: float, value: float | None = None,
              state: TrialState | None = None) -> None:
        with stopping.deferred():  # a finished trial is recorded, so no restart redoes it
            trial.set_user_attr("seconds", round(time.monotonic() - started, 2))
            self.round.study.tell(trial, value, state=state)
            write_trials(self.run_dir, self.round, self.log)

    def _slot(self, trial: optuna.Trial) -> int:
        numbers = sorted(t.number for t in self.round.trials()
                         if studies.RESUME_ATTR not in t.user_attrs)
        return numbers.index(trial.number) + 1 if trial.number in numbers else len(numbers)

    def _take_over_checkpoint(self, trial: optuna.Trial, folder: Path) -> None:
        """A retried trial starts from the lost trial's checkpoint (same params, same config)."""
        lost = trial.user_attrs.get(studies.RESUME_ATTR)
        if lost is None or (folder / names.RUN_CHECKPOINT).exists():
            return
        source = trial_dir(self.run_dir, int(lost))
        for name in (names.RUN_CHECKPOINT, names.RUN_EPOCHS):
            if (source / name).is_file():
                atomic.copy_file(source / name, folder / name)


def trial_rows(rnd: studies.Round) -> list[dict[str, Any]]:
    """The round's trials as trials.jsonl has them: number, params, how it ended."""
    status = {TrialState.COMPLETE: "done", TrialState.PRUNED: "pruned",
              TrialState.FAIL: "failed", TrialState.RUNNING: "running"}
    rows = []
    for t in sorted(rnd.trials(), key=lambda t: t.number):
        if t.state == TrialState.WAITING or not t.params:
            continue
        ended = t.user_attrs.get(studies.ENDED_ATTR, "")
        rows.append({"trial": t.number, "source": studies.source_of(t),
                     "params": config_of(t.params),
                     "status": "stopped" if "time budget" in ended else status[t.state],
                     "val_accuracy": t.value, "seconds": t.user_attrs.get("seconds"),
                     "worker": t.user_attrs.get(studies.WORKER_ATTR), "ended": ended or None,
                     "finished_at": (t.datetime_complete.isoformat(timespec="seconds")
                                     if t.datetime_complete else None)})
    return rows


def write_trials(run_dir: Path, rnd: studies.Round, log: LogLine) -> list[dict[str, Any]]:
    """trials.jsonl and trials.png from the study; the rows written."""
    rows = trial_rows(rnd)
    atomic.write_text(run_dir / names.RUN_TRIALS, "".join(json.dumps(r) + "\n" for r in rows))
    plots.draw_trials(run_dir, rows, lambda number: trial_dir(run_dir, number), log)
    return rows


def seed_sampler(rnd: studies.Round, plan: dict[str, Any], worker: str) -> None:
    """The round's sampler, seeded by the base seed, the number of trials earlier rounds left in
    the study and the worker: each round and worker draws differently, a restarted one the same
    way again, and two fresh studies (a benchmark's arms) start from the same draws."""
    earlier = sum(t.user_attrs.get(studies.ROUND_ATTR) != rnd.run_id
                  for t in rnd.study.get_trials(deepcopy=False))
    key = f"{plan['base']['seed']}/{earlier}/{worker}"
    seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    rnd.study.sampler = studies.make_sampler(plan["sampler"], seed)


def _study(ws: Workspace, plan: dict[str, Any], data: Cifar, create: bool) -> optuna.Study:
    """The plan's study (created when `create`); its sampler is set per round (seed_sampler)."""
    storage = studies.open_storage(ws.root)
    # trials on other data are not comparable: with increments the study is the data version's
    # (without, the base's sha256, as it always was, so an existing study goes on)
    identity = data.version if data.record.get("increments") else data.sha256
    name = studies.study_name(plan["base"], plan["optimizers"], plan["max_epochs"],
                              identity or "", validation_images(plan["base"], data))
    pruner = studies.make_pruner(plan["pruner"])
    try:
        if create:
            return optuna.create_study(study_name=name, storage=storage, direction="maximize",
                                       load_if_exists=True, pruner=pruner)
        return optuna.load_study(study_name=name, storage=storage, pruner=pruner)
    except KeyError:
        raise
    except Exception as exc:
        raise UsageError(f"tuning storage {studies.storage_description(ws.root)}: cannot open "
                         f"study {name} ({exc.__class__.__name__}: {studies.redact(str(exc))})"
                         ) from exc


def _finish(run_dir: Path, plan: dict[str, Any], rnd: studies.Round, data: Cifar,
            compute: Compute, log: LogLine) -> Outcome:
    """Test the round's best trial once, on the test set; best.json and model.pt beside it."""
    rows = write_trials(run_dir, rnd, log)
    finished = rnd.trials(states=(TrialState.COMPLETE,))
    if not finished:
        raise UsageError(f"no trial finished within --time-budget {plan['time_budget']:.0f}s; "
                         "raise the budget or lower --epochs")
    best: FrozenTrial = max(finished, key=lambda t: t.value or 0.0)
    best_dir = trial_dir(run_dir, best.number)
    if not (best_dir / names.RUN_MODEL).is_file():
        raise UsageError(f"the best trial's model {best_dir / names.RUN_MODEL} is not in this "
                         "workspace: workers on other machines must share CT_WORKSPACE")
    model, cfg = load_model(best_dir / names.RUN_MODEL, compute)
    test_x, test_y = data.test_x.to(compute.device), data.test_y.to(compute.device)
    predictions: list[Any] = []
    test_accuracy, _ = evaluate_as_configured(model, test_x, test_y, compute, cfg,
                                              predictions=predictions)
    per_class = per_class_view(list(data.classes), test_y, predictions)
    counts = {**rnd.counts(), "run": len(rows)}
    params = config_of(best.params)
    with stopping.deferred():  # the model and best.json describing it, together
        atomic.copy_file(best_dir / names.RUN_MODEL, run_dir / names.RUN_MODEL)
        atomic.write_json(run_dir / names.RUN_BEST, {
            "trial": best.number, "params": params, "val_accuracy": best.value,
            "test_accuracy": round(test_accuracy, 2),
            "validation_images": cfg["val_split"],
            "study": rnd.study.study_name, "trials_in_study": len(rnd.study.get_trials(
                deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))),
            **{f"trials_{key}": value for key, value in counts.items()},
        })
    if (best_dir / names.RUN_CURVES).is_file():  # the round's picture in the report and the mail
        atomic.copy_file(best_dir / names.RUN_CURVES, run_dir / names.RUN_CURVES)
    plots.draw_confusion(run_dir, per_class["classes"], per_class["confusion_matrix"], "test",
                         log)
    log(f"best trial-{best.number:03d}: validation {best.value:.2f}%, test {test_accuracy:.2f}% "
        f"({counts['finished']} finished, {counts['pruned']} pruned this round)")
    return Outcome(params, cfg, float(best.value or 0.0), test_accuracy, counts, per_class)


def tune_mode(opts: RunOptions, base: dict[str, Any], ws: Workspace, compute: Compute,
              started: float, tuning: TuneOptions) -> dict[str, Any] | None:
    """`train.py --tune`: run a round (or continue an unfinished one, or help the open one as
    worker K), test the best trial, publish the results. A helper returns None."""
    plan = make_plan(base, tuning)
    if tuning.worker:
        _help(opts, plan, ws, compute, tuning)
        return None
    run_dir, plan, resumed = choose_run_dir(ws, "tune", plan, opts, upgrade_plan)
    base = plan["base"]  # a continued round keeps its own
    clock = RunClock.begin(run_dir, started, resumed)
    with clock.saved_on_stop():
        log = Log(run_dir / names.RUN_LOG)
        log(f"tune {run_dir.name} plan {json.dumps(plan, sort_keys=True)}")
        data = load_data(opts, ws, log)
        pin_data(run_dir, data.version)
        study = _study(ws, plan, data, create=True)
        rnd = studies.Round(study, run_dir.name)
        seed_sampler(rnd, plan, "w0")
        deadline = time.time() + max(0.0, plan["time_budget"] - clock.before)
        if rnd.open_slots(studies.params_of(base, base), plan["trials"], plan["recipe"]):
            log(f"study {study.study_name} in {studies.storage_description(ws.root)}: "
                f"{len(study.trials) - plan['trials']} earlier trial(s); "
                f"{plan['trials']} slot(s) added")
        # Open only once every slot waits: a helper that joined a round still being filled
        # found no slot to pop and ended with nothing done.
        study.set_user_attr(studies.ROUND_ATTR, {"run_id": run_dir.name, "deadline": deadline,
                                                 "open": True})
        split = make_split(data, {**base, "val_split": validation_images(base, data)},
                           compute.device)
        worker = Worker(rnd, plan, run_dir, split, compute, log, "w0", deadline,
                        tuning.stale_after, opts.dry_run, clock)
        worker.run(wait_for_others=True)
        rnd.close()
        study.set_user_attr(studies.ROUND_ATTR, {"run_id": run_dir.name, "open": False,
                                                 "closed_at": time.time()})
        stopping.at("while testing the best trial", "every finished trial is kept")
        outcome = _finish(run_dir, plan, rnd, data, compute, log)
        extra = {"config": outcome.best_config, "best_params": outcome.best_params,
                 "val_accuracy": outcome.val_accuracy, "trials": outcome.counts["run"],
                 "trials_finished": outcome.counts["finished"],
                 "trials_pruned": outcome.counts["pruned"], "study": study.study_name,
                 "trials_planned": plan["trials"], "time_budget_s": plan["time_budget"],
                 "dry_run": opts.dry_run, **outcome.per_class,
                 names.LINEAGE: record_lineage(ws, run_dir, data, outcome.best_config, compute)}
        summary = run_summary(ws, run_dir, compute, clock, "tune", outcome.test_accuracy, extra)
        publish(ws, run_dir, summary, opts.dry_run)
    return summary


def _help(opts: RunOptions, plan: dict[str, Any], ws: Workspace, compute: Compute,
          tuning: TuneOptions) -> None:
    """Worker K: wait for the round the owner opened in the same study, run its slots, end."""
    name = f"w{tuning.worker}"
    began = time.time()
    log = Log()
    data = load_data(opts, ws, log)
    waited_until = time.monotonic() + JOIN_WAIT_S
    log(f"worker {tuning.worker}: waiting for worker 0 to open a round with these flags")
    while True:
        stopping.at("while waiting for the round to open", "nothing to keep yet")
        try:
            study = _study(ws, plan, data, create=False)
            opened = study.user_attrs.get(studies.ROUND_ATTR, {})
        except KeyError:
            opened = {}
        if opened.get("open") and (ws.runs / opened["run_id"]).is_dir():
            break
        if opened.get("closed_at", 0.0) >= began:
            # The owner (and other helpers) ran every slot while this one started up.
            log(f"worker {tuning.worker} done: {opened['run_id']} ended before it could join")
            return
        if time.monotonic() > waited_until:
            raise UsageError(f"worker {tuning.worker}: no open tuning round for these flags after "
                             f"{JOIN_WAIT_S:.0f}s; start train.py --tune (worker 0) with the "
                             "same flags and workspace")
        time.sleep(JOIN_POLL_S)
    run_dir = ws.runs / opened["run_id"]
    rnd = studies.Round(study, run_dir.name)
    seed_sampler(rnd, plan, name)
    log = Log(run_dir / f"worker-{tuning.worker}.log")
    split = make_split(data, {**plan["base"], "val_split": validation_images(plan["base"], data)},
                       compute.device)
    worker = Worker(rnd, plan, run_dir, split, compute, log, name,
                    float(opened["deadline"]), tuning.stale_after, opts.dry_run)
    ran = worker.run(wait_for_others=False)
    log(f"worker {tuning.worker} done: {ran} trial(s) of {run_dir.name}")
