"""The training loop: one process, or one process per GPU/CPU rank under torchrun + DDP.

Resumption is exact: a checkpoint holds the weights, optimiser and schedule state, the step,
the position inside the epoch and every rank's RNG state; on resume the loader (which draws its
clips from ``seed`` and the epoch, not from the global RNG) is fast-forwarded to the same batch
and the RNG states are restored after that, so the run continues as if never stopped.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vidconv.train import checkpoint as ckpt_io
from vidconv.train import data as train_data
from vidconv.train.config import RESUME_MUST_MATCH, TrainConfig
from vidconv.train.data import loader_report, skipped_count, to_device
from vidconv.train.finetune import apply_finetune, set_train_mode
from vidconv.train.metrics import to_json_safe

CSV_FIELDS = ("step", "epoch", "loss", "clip_acc", "lr", "clips_per_s", "elapsed_s")
StepHook = Callable[[int, float], None]


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """"auto" -> this rank's GPU if CUDA works, else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for CUDA but no CUDA device is available")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def _init_distributed(device_hint: str) -> tuple[int, int, int, bool]:
    """(rank, world_size, local_rank, created) from torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0, False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_hint != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank, True


class Trainer:
    """Builds model, optimiser, schedule and loader from a :class:`TrainConfig` and runs it.

    ``on_step(step, loss)`` is called on every rank after each optimiser step (tests use it to
    interrupt a run).
    """

    def __init__(self, config: TrainConfig | dict[str, Any], *,
                 on_step: StepHook | None = None) -> None:
        if isinstance(config, dict):
            config = TrainConfig.from_dict(config)
        self.config = config
        self.on_step = on_step
        self.rank, self.world, local_rank, self._created_pg = _init_distributed(config.device)
        self.device = resolve_device(config.device, local_rank)
        self.is_main = self.rank == 0
        self.run_dir = Path(config.out)
        self.ckpt_path = self.run_dir / "checkpoint.pt"
        self._stop = False

        torch.manual_seed(config.seed)  # same initial weights on every rank
        self.source = train_data.open_data(config.data, config.root)
        self.classes = list(self.source.classes)

        resume = self._load_resume() if config.resume else None
        self.model, self.frozen = self._build_model(resume)
        self.use_cuda = self.device.type == "cuda"
        self.channels_last = config.channels_last and self.use_cuda
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last_3d)
        if resume is not None:
            self.model.load_state_dict(resume["state_dict"])

        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: every parameter is frozen")
        self.params = params
        if config.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=config.lr, momentum=config.momentum,
                weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=config.lr,
                                               weight_decay=config.weight_decay)

        self.loader = train_data.make_loader(
            self.source, self.model.spec, batch_size=config.batch_size, train=True,
            device=self.device, backend=config.backend, seed=config.seed,
            shard_id=self.rank if self.world > 1 else None,
            num_shards=self.world if self.world > 1 else None, workers=config.workers)
        steps_per_epoch = len(self.loader)
        if self.world > 1:
            # Shards may differ by a batch; every rank must run the same number of steps or
            # DDP's all-reduce hangs.
            n = torch.tensor([steps_per_epoch], device=self._comm_device())
            dist.all_reduce(n, op=dist.ReduceOp.MIN)
            steps_per_epoch = int(n.item())
        if steps_per_epoch < 1:
            raise ValueError(f"the dataset gives no full batch of {config.batch_size} clips per "
                             f"rank ({len(self.source.videos)} videos, {self.world} rank(s))")
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = config.steps or config.epochs * steps_per_epoch
        # One epoch, but not fewer than 100 steps: on a small dataset an epoch's mean loss is
        # too noisy to tell a plateau from chance and the LR would collapse within a few epochs.
        self.plateau_window = config.plateau_window or max(steps_per_epoch, 100)

        self.scheduler: Any = None
        if config.schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=self.total_steps)
        elif config.schedule == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="min", factor=config.lr_factor, patience=config.patience)

        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.plateau_sum = 0.0
        self.plateau_count = 0
        self._resume_rng: dict[str, Any] | None = None
        if resume is not None:
            self.optimizer.load_state_dict(resume["optimizer"])
            if self.scheduler is not None and resume.get("scheduler") is not None:
                self.scheduler.load_state_dict(resume["scheduler"])
            self.step = int(resume["step"])
            self.epoch = int(resume["epoch"])
            self.batch_in_epoch = int(resume["batch_in_epoch"])
            self.plateau_sum, self.plateau_count = resume.get("plateau", (0.0, 0))
            rngs = resume.get("rng") or []
            if len(rngs) == self.world:
                self._resume_rng = rngs[self.rank]
        else:
            # Dropout masks differ per rank; the weights were drawn from the shared seed above.
            torch.manual_seed(config.seed + 1_000_003 * self.rank)

        self.ddp_model: nn.Module = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp_model = DDP(self.model,
                                 device_ids=[self.device.index] if self.use_cuda else None)

    # --------------------------------------------------------------------------- construction

    def _load_resume(self) -> dict[str, Any]:
        if not self.ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {self.ckpt_path} (run directory "
                                    f"{self.run_dir}); drop --resume to start a new run")
        resume = ckpt_io.load_checkpoint(self.ckpt_path)
        old = resume.get("config") or {}
        if self.config.init_from is not None:
            # A fine-tuning run's model fields came from the pretrained checkpoint.
            for key in ("model", "multires", "stream", "width"):
                if key in old:
                    setattr(self.config, key, old[key])
        diffs = [f"{key}: checkpoint has {old.get(key)!r}, this run {getattr(self.config, key)!r}"
                 for key in RESUME_MUST_MATCH if old.get(key) != getattr(self.config, key)]
        if diffs:
            raise ValueError(f"--resume: {self.ckpt_path} was written by a different run: "
                             + "; ".join(diffs))
        if list(resume["classes"]) != self.classes:
            raise ValueError(f"--resume: the dataset's classes differ from the checkpoint's "
                             f"({len(self.classes)} vs {len(resume['classes'])} classes)")
        return resume

    def _build_model(self, resume: dict[str, Any] | None) -> tuple[nn.Module, list[nn.Module]]:
        from vidconv.models import build

        cfg = self.config
        num_classes = len(self.classes)
        if resume is not None:
            model = ckpt_io.build_model(resume["model"])
        elif cfg.init_from is not None:
            init = ckpt_io.load_checkpoint(cfg.init_from)
            if cfg.finetune_mode == "scratch":
                model = ckpt_io.build_model({**init["model"], "num_classes": num_classes})
            else:
                model = ckpt_io.build_model(init["model"])
                try:
                    model.load_state_dict(init["state_dict"])
                except RuntimeError as exc:
                    raise ValueError(f"checkpoint {cfg.init_from} does not fit "
                                     f"{ckpt_io.describe(init['model'])}: {exc}") from exc
                model.reset_classifier(num_classes)
            # The run's model fields follow the checkpoint, so config.json tells the truth.
            info = init["model"]
            cfg.model, cfg.multires, cfg.stream, cfg.width = (
                info["name"], info["multires"], info["stream"], info["width"])
        else:
            model = build(cfg.model, num_classes, multires=cfg.multires, stream=cfg.stream,
                          width=cfg.width, dropout=cfg.dropout)
        frozen: list[nn.Module] = []
        if cfg.finetune_mode is not None:
            frozen = apply_finetune(model, cfg.finetune_mode, cfg.keep_prob)
        elif cfg.keep_prob is not None:
            model.set_dropout(1.0 - cfg.keep_prob)
        return model, frozen

    def _comm_device(self) -> torch.device:
        return self.device if self.use_cuda else torch.device("cpu")

    # ------------------------------------------------------------------------------ checkpoint

    def save(self) -> None:
        rng = ckpt_io.rng_state()
        rngs = [rng]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, rng)
        if not self.is_main:
            return
        ckpt_io.save_checkpoint(self.ckpt_path, {
            "model": ckpt_io.model_info(self.model),
            "classes": self.classes,
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "plateau": (self.plateau_sum, self.plateau_count),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "rng": rngs,
            "config": self.config.to_dict(),
        })

    # ----------------------------------------------------------------------------------- run

    def _request_stop(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        if self._stop and signum == signal.SIGINT:
            # A second Ctrl-C: the user does not want to wait for the step to finish.
            raise KeyboardInterrupt
        self._stop = True
        if self.is_main:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
                  "(Ctrl-C again to abort without saving)", flush=True)

    def _agree(self, value: float, op: str = "mean") -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.item() / (self.world if op == "mean" else 1)

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def run(self) -> dict[str, Any]:
        """Train to ``total_steps`` (or until SIGINT/SIGTERM) and return the summary."""
        cfg = self.config
        finished = self.run_dir / "summary.json"
        if self.step >= self.total_steps and finished.exists():
            # --resume of a run that already finished: nothing to train, keep its summary
            return json.loads(finished.read_text())
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        log = _MetricsLog(self.run_dir, self.step, enabled=self.is_main)
        handlers = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                handlers[sig] = signal.signal(sig, self._request_stop)
        except ValueError:  # not the main thread: no signal handling
            handlers = {}

        bar = None
        if self.is_main and cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                       desc=f"train {self.model.variant}")
        t0 = time.perf_counter()
        win_loss = win_correct = win_count = 0.0
        clips_seen = 0  # this rank's; the last batch of an epoch is often not full
        win_start = time.perf_counter()
        last = {"loss": float("nan"), "clip_acc": float("nan"), "clips_per_s": 0.0}
        interrupted = False

        def log_window() -> None:
            """Log the steps since the last row (every rank calls it: the means are
            all-reduced)."""
            nonlocal win_loss, win_correct, win_count, win_start, last
            elapsed = time.perf_counter() - win_start
            mean_loss = self._agree(win_loss / max(win_count, 1))
            acc = self._agree(win_correct / max(win_count, 1))
            rate = self._agree(win_count, "sum") / max(elapsed, 1e-9)
            last = {"loss": mean_loss, "clip_acc": acc, "clips_per_s": rate}
            log.write(step=self.step, epoch=self.epoch, loss=mean_loss, clip_acc=acc,
                      lr=self._lr(), clips_per_s=rate, elapsed_s=time.perf_counter() - t0)
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{acc:.2f}",
                                clips_s=f"{rate:.1f}", lr=f"{self._lr():.1e}")
            win_loss = win_correct = win_count = 0.0
            win_start = time.perf_counter()

        set_train_mode(self.ddp_model, self.frozen)
        try:
            while self.step < self.total_steps and not interrupted:
                self.loader.set_epoch(self.epoch)
                # after a resume, skip the batches this epoch already trained on, undecoded
                it = self.loader.iter_from(self.batch_in_epoch)
                if self._resume_rng is not None:
                    ckpt_io.set_rng_state(self._resume_rng)
                    self._resume_rng = None
                epoch_done = False
                while self.batch_in_epoch < self.steps_per_epoch:
                    try:
                        batch = next(it)
                    except StopIteration:
                        break
                    loss, correct, n = self._train_step(batch)
                    self.step += 1
                    self.batch_in_epoch += 1
                    win_loss += loss * n
                    win_correct += correct
                    win_count += n
                    clips_seen += n
                    self.plateau_sum += loss
                    self.plateau_count += 1
                    epoch_done = self.batch_in_epoch >= self.steps_per_epoch
                    if epoch_done:
                        self.epoch += 1
                        self.batch_in_epoch = 0
                    if self.on_step is not None:
                        self.on_step(self.step, loss)
                    if self.scheduler is not None and cfg.schedule == "cosine":
                        self.scheduler.step()
                    if self.plateau_count >= self.plateau_window:
                        self._plateau_check()
                    done = self.step >= self.total_steps
                    if self.step % cfg.log_every == 0 or done:
                        log_window()
                    if bar is not None:
                        bar.update(1)
                    interrupted = self._agree(float(self._stop), "max") > 0
                    if done or interrupted or self.step % cfg.checkpoint_every == 0:
                        self.save()
                    if done or interrupted or epoch_done:
                        break
                if not epoch_done and not interrupted and self.step < self.total_steps:
                    # The loader ran dry before steps_per_epoch (videos skipped): next epoch.
                    self.epoch += 1
                    self.batch_in_epoch = 0
            if win_count:
                # Interrupted between log rows: the summary and the CSV still get its steps.
                log_window()
        finally:
            if bar is not None:
                bar.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            log.close()

        elapsed = time.perf_counter() - t0
        report = loader_report(self.loader)
        summary = {
            "run_dir": str(self.run_dir),
            "checkpoint": str(self.ckpt_path),
            "steps": self.step,
            "total_steps": self.total_steps,
            "epochs": self.epoch,
            "final_loss": last["loss"],
            "train_clip_acc": last["clip_acc"],
            "lr": self._lr(),
            "clips_per_s": self._agree(float(clips_seen), "sum") / max(elapsed, 1e-9),
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
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(to_json_safe(summary), indent=2))
        if self.world > 1:
            dist.barrier()
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
        if self._created_pg and dist.is_initialized():
            dist.destroy_process_group()


def train(config: TrainConfig | dict[str, Any], *, on_step: StepHook | None = None
          ) -> dict[str, Any]:
    """Train a model as `config` says; returns the run summary (also in OUT/summary.json):
    steps, total_steps, epochs, final_loss, train_clip_acc, lr, clips_per_s, elapsed_s,
    interrupted, skipped_videos, loader_report, classes, model, trainable_params,
    world_size, device, run_dir, checkpoint.

    Under torchrun every rank calls this; rank 0 writes the checkpoint and logs.
    """
    trainer = Trainer(config, on_step=on_step)
    try:
        return trainer.run()
    finally:
        trainer.close()


class _MetricsLog:
    """metrics.csv (rows past a resumed checkpoint's step dropped) and TensorBoard if present."""

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.file = None
        self.tb = None
        if not enabled:
            return
        path = run_dir / "metrics.csv"
        rows: list[dict[str, str]] = []
        if resume_step > 0 and path.is_file():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.file = path.open("w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=CSV_FIELDS)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step or None)
        except Exception:  # noqa: BLE001 - tensorboard is optional
            self.tb = None

    def write(self, **row: float) -> None:
        if not self.enabled:
            return
        self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                              for k, v in row.items()})
        self.file.flush()
        if self.tb is not None:
            for key in ("loss", "clip_acc", "lr", "clips_per_s"):
                self.tb.add_scalar(f"train/{key}", row[key], row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
