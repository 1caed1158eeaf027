"""The training loop: one process, or one process per GPU/CPU rank under torchrun + DDP.

Resumption is exact: a checkpoint holds the weights, optimiser and schedule state, the step,
the position inside the epoch, the metrics window and every rank's RNG state; on resume the
loader (which draws its clips from ``seed`` and the epoch, not from the global RNG) is
fast-forwarded to the same batch and the RNG states are restored after that, so the run
continues as if never stopped.

The pieces around the loop live beside it and are tested on their own: the run directory
(lock, refusal to replace a run, atomic files) in :mod:`vidconv.train.rundir`; the model,
optimiser and schedule in :mod:`vidconv.train.build`; the ranks' agreement in
:mod:`vidconv.train.distributed`; the metrics log and progress display in
:mod:`vidconv.train.log`; the checkpoint format in :mod:`vidconv.train.checkpoint`.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vidconv.train import checkpoint as ckpt_io
from vidconv.train import data as train_data
from vidconv.train.build import build_model, build_optimizer, build_scheduler, load_resume
from vidconv.train.config import TrainConfig
from vidconv.train.data import loader_report, skipped_count, to_device
from vidconv.train.device import resolve_device
from vidconv.train.distributed import Group, init_group
from vidconv.train.freezing import set_train_mode
from vidconv.train.log import CSV_FIELDS, LogWindow, MetricsLog, Progress
from vidconv.train.metrics import to_json_safe
from vidconv.train.rundir import RunDir, note, save_text

__all__ = ["CSV_FIELDS", "StepHook", "Trainer", "resolve_device", "train"]

StepHook = Callable[[int, float], None]


class Trainer:
    """Builds model, optimiser, schedule and loader from a :class:`TrainConfig` and runs it.

    Construction claims the run directory (see :class:`vidconv.train.rundir.RunDir`) until
    :meth:`close`. ``on_step(step, loss)`` is called on every rank after each optimiser step
    (tests use it to interrupt a run).
    """

    def __init__(self, config: TrainConfig | dict[str, Any], *,
                 on_step: StepHook | None = None) -> None:
        if isinstance(config, dict):
            config = TrainConfig.from_dict(config)
        self.config = config
        self.on_step = on_step
        self._stop = False
        self.group: Group = init_group(config.device)
        self.rank, self.world, self.is_main = self.group.rank, self.group.world, \
            self.group.is_main
        self.rundir = RunDir(config.out)
        self.run_dir = self.rundir.path
        self.ckpt_path = self.rundir.checkpoint
        try:
            self.device = resolve_device(config.device, self.group.local_rank)
            notes = self.group.on_main(
                lambda: self.rundir.claim(resume=config.resume, overwrite=config.overwrite))
            for line in notes or []:
                note(line)
            self._build()
        except BaseException:
            self.close()
            raise

    # --------------------------------------------------------------------------- construction

    def _build(self) -> None:
        config = self.config
        torch.manual_seed(config.seed)  # same initial weights on every rank
        self.source = train_data.open_data(config.data, config.root)
        self.classes = list(self.source.classes)

        resume = (load_resume(config, self.ckpt_path, self.classes) if config.resume
                  else None)
        self.model, self.frozen = build_model(config, len(self.classes), resume)
        self.use_cuda = self.device.type == "cuda"
        self.channels_last = config.channels_last and self.use_cuda
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last_3d)
        if resume is not None:
            self.model.load_state_dict(resume["state_dict"])
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(config, self.params)

        self.loader = train_data.make_loader(
            self.source, self.model.spec, batch_size=config.batch_size, train=True,
            device=self.device, backend=config.backend, seed=config.seed,
            shard_id=self.rank if self.world > 1 else None,
            num_shards=self.world if self.world > 1 else None, workers=config.workers,
            worker_type=config.worker_type)
        # Shards may differ by a batch; every rank must run the same number of steps or DDP's
        # all-reduce hangs.
        steps_per_epoch = int(self.group.agree(len(self.loader), "min"))
        if steps_per_epoch < 1:
            raise ValueError(f"the dataset gives no full batch of {config.batch_size} clips per "
                             f"rank ({len(self.source.videos)} videos, {self.world} rank(s))")
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = config.steps or config.epochs * steps_per_epoch
        # One epoch, but not fewer than 100 steps: on a small dataset an epoch's mean loss is
        # too noisy to tell a plateau from chance and the LR would collapse within a few epochs.
        self.plateau_window = config.plateau_window or max(steps_per_epoch, 100)

        self.scheduler = build_scheduler(config, self.optimizer, self.total_steps)

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.plateau_sum = 0.0
        self.plateau_count = 0
        self.window = LogWindow()
        self.elapsed_before = 0.0  # training time of the run before this resume
        self.clips_seen = 0  # this rank's, in this process; the last batch of an epoch is
        # often not full
        self.last = {"loss": float("nan"), "clip_acc": float("nan"), "clips_per_s": 0.0}
        self._resume_rng: dict[str, Any] | None = None
        if resume is not None:
            self._restore(resume)
        else:
            # Dropout masks differ per rank; the weights were drawn from the shared seed above.
            torch.manual_seed(config.seed + 1_000_003 * self.rank)

        self.ddp_model: nn.Module = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp_model = DDP(self.model,
                                 device_ids=[self.device.index] if self.use_cuda else None)

    # ------------------------------------------------------------------------------ checkpoint

    def _restore(self, resume: dict[str, Any]) -> None:
        """Optimiser, schedule, position, metrics window and this rank's RNG from a checkpoint
        (the RNG is applied when the loop reaches the resumed batch)."""
        self.optimizer.load_state_dict(resume["optimizer"])
        if self.scheduler is not None and resume.get("scheduler") is not None:
            self.scheduler.load_state_dict(resume["scheduler"])
        self.step = int(resume["step"])
        self.epoch = int(resume["epoch"])
        self.batch_in_epoch = int(resume["batch_in_epoch"])
        plateau_sum, plateau_count = resume.get("plateau", (0.0, 0))
        self.plateau_sum, self.plateau_count = float(plateau_sum), int(plateau_count)
        self.window.load_state(resume.get("log_window"))
        self.elapsed_before = float(resume.get("elapsed_s", 0.0))
        rngs = resume.get("rng") or []
        if len(rngs) == self.world:
            self._resume_rng = rngs[self.rank]

    def checkpoint_payload(self, rngs: list[dict[str, Any]], elapsed_s: float) -> dict[str, Any]:
        """What :meth:`save` writes (every value a type a weights-only load accepts)."""
        return {
            "model": ckpt_io.model_info(self.model),
            "classes": self.classes,
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "plateau": (self.plateau_sum, self.plateau_count),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "log_window": self.window.state(),
            "elapsed_s": elapsed_s,
            "rng": rngs,
            "config": self.config.to_dict(),
        }

    def save(self, elapsed_s: float = 0.0) -> None:
        """Checkpoint (every rank calls it: the RNG states are gathered; rank 0 writes, and a
        failure to write stops every rank)."""
        rngs = self.group.gather(ckpt_io.rng_state())
        self.group.on_main(lambda: ckpt_io.save_checkpoint(
            self.ckpt_path, self.checkpoint_payload(rngs, elapsed_s)))

    # ----------------------------------------------------------------------------------- run

    def _request_stop(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        if self._stop and signum == signal.SIGINT:
            # A second Ctrl-C: the user does not want to wait for the step to finish.
            raise KeyboardInterrupt(
                f"interrupted twice: stopped without saving this step; --resume continues "
                f"from the last checkpoint in {self.run_dir}")
        self._stop = True
        if self.is_main:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
                  "(Ctrl-C again to abort without saving)", flush=True)

    def _agree(self, value: float, op: str = "mean") -> float:
        return self.group.agree(value, op)

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def run(self) -> dict[str, Any]:
        """Train to ``total_steps`` (or until SIGINT/SIGTERM) and return the summary."""
        cfg = self.config
        finished = self.run_dir / "summary.json"
        if self.step >= self.total_steps and finished.exists():
            # --resume of a run that already finished: nothing to train, keep its summary
            return json.loads(finished.read_text())
        self.group.on_main(lambda: save_text(self.run_dir / "config.json",
                                             json.dumps(cfg.to_dict(), indent=2),
                                             what="the run's config"))
        # a row at the resumed step was written mid-window; the window resumes from the
        # checkpoint and will write that row's steps again, in the row an unstopped run writes
        drop_step = self.step if self.window.count else None
        log = self.group.on_main(lambda: MetricsLog(self.run_dir, self.step, True,
                                                    drop_step=drop_step))
        log = log or MetricsLog(self.run_dir, self.step, False)
        handlers = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._request_stop)
        except ValueError:  # not the main thread: no signal handling
            handlers = {}
        progress = Progress(total=self.total_steps, initial=self.step,
                            desc=f"train {self.model.variant}", bar=cfg.progress,
                            enabled=self.is_main)
        t0 = time.perf_counter()
        try:
            set_train_mode(self.ddp_model, self.frozen)
            interrupted = self._train(log, progress, t0)
        finally:
            progress.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            log.close()
        return self._finish(time.perf_counter() - t0, interrupted)

    def _train(self, log: MetricsLog, progress: Progress, t0: float) -> bool:
        """Epochs until ``total_steps`` or a stop; returns whether the run was interrupted."""
        interrupted = False
        while self.step < self.total_steps and not interrupted:
            interrupted = self._train_epoch(log, progress, t0)
        if self.window.count:
            # Interrupted between log rows: the summary and the CSV still get its steps.
            self._log_row(log, progress, t0)
        return interrupted

    def _train_epoch(self, log: MetricsLog, progress: Progress, t0: float) -> bool:
        """The rest of the current epoch (all of it unless resumed mid-epoch); stops early at
        ``total_steps`` or an agreed stop, saving a checkpoint. Returns whether stopped."""
        cfg = self.config
        self.loader.set_epoch(self.epoch)
        # after a resume, skip the batches this epoch already trained on, undecoded
        batches = self.loader.iter_from(self.batch_in_epoch)
        if self._resume_rng is not None:
            ckpt_io.set_rng_state(self._resume_rng)
            self._resume_rng = None
        while self.batch_in_epoch < self.steps_per_epoch:
            try:
                batch = next(batches)
            except StopIteration:
                break
            loss, correct, n = self._train_step(batch)
            epoch_done = self._count_step(loss, correct, n)
            if self.on_step is not None:
                self.on_step(self.step, loss)
            self._schedule_step()
            done = self.step >= self.total_steps
            if self.step % cfg.log_every == 0 or done:
                self._log_row(log, progress, t0)
            progress.update(1)
            interrupted = self._agree(float(self._stop), "max") > 0
            if done or interrupted or self.step % cfg.checkpoint_every == 0:
                self.save(self.elapsed_before + time.perf_counter() - t0)
            if done or interrupted or epoch_done:
                return interrupted
        if self.step < self.total_steps:
            # The loader ran dry before steps_per_epoch (videos skipped): next epoch.
            self.epoch += 1
            self.batch_in_epoch = 0
        return False

    def _count_step(self, loss: float, correct: float, n: int) -> bool:
        """Advance the position and the running sums by one step; returns whether it ended
        the epoch."""
        self.step += 1
        self.batch_in_epoch += 1
        self.window.add(loss, correct, n)
        self.clips_seen += n
        self.plateau_sum += loss
        self.plateau_count += 1
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
            return True
        return False

    def _schedule_step(self) -> None:
        if self.scheduler is not None and self.config.schedule == "cosine":
            self.scheduler.step()
        if self.plateau_count >= self.plateau_window:
            self._plateau_check()

    def _log_row(self, log: MetricsLog, progress: Progress, t0: float) -> None:
        """A metrics row for the steps since the last one (every rank calls it: the means are
        all-reduced)."""
        w = self.window
        elapsed = w.elapsed()
        mean_loss = self._agree(w.loss_sum / max(w.count, 1))
        acc = self._agree(w.correct / max(w.count, 1))
        rate = self._agree(w.count, "sum") / max(elapsed, 1e-9)
        self.last = {"loss": mean_loss, "clip_acc": acc, "clips_per_s": rate}
        log.write(step=self.step, epoch=self.epoch, loss=mean_loss, clip_acc=acc, lr=self._lr(),
                  clips_per_s=rate, elapsed_s=self.elapsed_before + time.perf_counter() - t0)
        progress.report(self.step, loss=mean_loss, acc=acc, clips_s=rate, lr=self._lr())
        w.reset()

    def _finish(self, elapsed: float, interrupted: bool) -> dict[str, Any]:
        report = loader_report(self.loader)
        summary = {
            "run_dir": str(self.run_dir),
            "checkpoint": str(self.ckpt_path),
            "steps": self.step,
            "total_steps": self.total_steps,
            "epochs": self.epoch,
            "final_loss": self.last["loss"],
            "train_clip_acc": self.last["clip_acc"],
            "lr": self._lr(),
            "clips_per_s": self._agree(float(self.clips_seen), "sum") / max(elapsed, 1e-9),
            "elapsed_s": elapsed,
            "interrupted": interrupted,
            "skipped_videos": skipped_count(report),
            "loader_report": report,
            "classes": self.classes,
            "model": ckpt_io.model_info(self.model),
            "trainable_params": sum(p.numel() for p in self.params),
            "world_size": self.world,
            "device": str(self.device),
        }
        self.group.on_main(lambda: save_text(self.run_dir / "summary.json",
                                             json.dumps(to_json_safe(summary), indent=2),
                                             what="the run's summary"))
        self.group.barrier()
        return summary

    def _train_step(self, batch: Any) -> tuple[float, float, int]:
        cfg = self.config
        inputs = to_device(batch.inputs, self.device, self.channels_last)
        labels = batch.labels.to(self.device, non_blocking=True)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                            enabled=cfg.amp and self.use_cuda):
            logits = self.ddp_model(inputs)
        loss = F.cross_entropy(logits.float(), labels)
        # stop before a diverged step reaches the weights (and so any checkpoint)
        if self._agree(float(not torch.isfinite(loss).item()), "max") > 0:
            raise FloatingPointError(
                f"loss is not finite at step {self.step + 1} (on at least one rank): training "
                f"diverged; the last checkpoint is untouched. Lower --lr or set --grad-clip.")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        correct = (logits.detach().argmax(1) == labels).sum().item()
        return loss.item(), float(correct), labels.shape[0]

    def _plateau_check(self) -> None:
        mean = self._agree(self.plateau_sum / self.plateau_count)
        self.plateau_sum, self.plateau_count = 0.0, 0
        if self.config.schedule == "plateau":
            self.scheduler.step(mean)

    def close(self) -> None:
        """Release the run directory and end the process group this trainer started."""
        self.rundir.release()
        self.group.close()


def train(config: TrainConfig | dict[str, Any], *, on_step: StepHook | None = None
          ) -> dict[str, Any]:
    """Train a model as `config` says; returns the run summary (also in OUT/summary.json):
    steps, total_steps, epochs, final_loss, train_clip_acc, lr, clips_per_s, elapsed_s,
    interrupted, skipped_videos, loader_report, classes, model, trainable_params,
    world_size, device, run_dir, checkpoint.

    Under torchrun every rank calls this; rank 0 writes the checkpoint and logs.

    Raises:
        vidconv.train.rundir.RunDirError (an OSError): `config.out` holds another run (and
            neither resume nor overwrite is set), is in use by a running training, or cannot
            be written (the message names the path and the cause).
    """
    trainer = Trainer(config, on_step=on_step)
    try:
        return trainer.run()
    finally:
        trainer.close()
