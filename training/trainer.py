"""The training loop: one optimizer step, epochs, checkpoints and resuming, validation, throughput.

One optimizer step: ACCUMULATION_STEPS batches of (images, tokens, labels) -> mixup/cutmix when AUG turns
it on (data/mixup.py) -> model -> normalized features -> the TRAIN.LOSS loss over the batch gathered from all
ranks (per micro-batch, or over all of them with TRAIN.ACCUMULATION_MODE features; see accumulation.py) ->
backward (DDP averages gradients) -> unscale + clip -> AdamW -> per-step LR -> clamp logit_scale.
"""
from __future__ import annotations

import datetime
import logging
import os
import time
import warnings
from dataclasses import asdict
from typing import Any, Dict, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from data import build_train_loader
from data.order import derive_seed
from evaluation import Encoder, run_zeroshot
from data.mixup import LabelSpaceMixup
from loss import build_loss
from model import UniCLModel, build_tokenizer, build_unicl_model
from model.checkpoint import load_loaded, load_pretrained
from model.lock import check_same_trainable, trainable_names
from utils.checkpoint import CheckpointManager, resolve_source, safe_load
from utils.distributed import barrier
from utils.optim import build_optimizer, build_scheduler, scaled_learning_rates
from utils.precision import autocast, autocast_dtype

from .accumulation import StepParts, get_accumulation_mode, to_device
from .compile import compile_for_training
from .metrics import Meter, open_tensorboard, peak_memory_mb
from .resume import BatchLayout, convert_step, load_agreed, saved_layout
from .signals import StopRequest
from .state import Progress, all_rng_states, rng_untouched, seed_everything, set_rng_state

logger = logging.getLogger('unicl.train')


class StepResult(NamedTuple):
    loss: float  # the global loss, the same on all ranks
    grad_norm: float
    overflow: bool = False  # fp16: the GradScaler found inf/NaN gradients, skipped the step, lowered its scale


class Trainer:
    def __init__(self, config, rank: int, world_size: int, device: torch.device):
        self.config, self.rank, self.world_size, self.device = config, rank, world_size, device
        self.accumulation = max(config.TRAIN.ACCUMULATION_STEPS, 1)
        self.amp_dtype = autocast_dtype(config.AMP_OPT_LEVEL, device)
        self.tokenizer = build_tokenizer(config.MODEL.TEXT_ENCODER)
        self.model: UniCLModel = build_unicl_model(config).to(device)
        if config.TRAIN.USE_CHECKPOINT:
            self.model.set_grad_checkpointing(True)
        if config.MODEL.PRETRAINED:
            load_pretrained(self.model, config.MODEL.PRETRAINED, config.MODEL.IMAGE_ENCODER.TYPE, strict=False)
        # Compiled in place before DDP wraps it (training/compile.py); the watch logs the graphs compiled.
        self.compile_watch = compile_for_training(self.model, config) if config.TRAIN.COMPILE else None
        self.ddp = None
        if world_size > 1:
            with warnings.catch_warnings():
                # Newer torch renames the flag; the buffers (Swin's index tables and masks) are constants,
                # so re-broadcasting them every forward would be a wasted collective.
                warnings.filterwarnings('ignore', message='.*broadcast_buffers.*')
                self.ddp = DistributedDataParallel(
                    self.model, device_ids=[device.index] if device.type == 'cuda' else None,
                    broadcast_buffers=False)
        self.criterion = build_loss(config)
        self.mixup = LabelSpaceMixup.from_config(config)  # None unless AUG turns mixup/cutmix on
        mode = get_accumulation_mode(config.TRAIN.ACCUMULATION_MODE)
        # With a single micro-batch the modes agree; the plain one spares the second forward.
        self.accumulate = mode if self.accumulation > 1 else get_accumulation_mode('gradients')
        self.checkpoints = CheckpointManager(config.OUTPUT, keep=config.TRAIN.KEEP_CHECKPOINTS)
        self.progress = Progress()
        # The epoch's running means, saved with the run: an epoch's logged loss covers all of its steps even
        # when a stop split it.
        self.meters = {'loss': Meter(), 'grad_norm': Meter()}
        self.loader = None
        self.optimizer = self.scheduler = None
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None

    # -- setup ----------------------------------------------------------------------------------------
    def build_training(self) -> None:
        self.validation_folder()  # a wrong VAL_PATH fails now, not after the first epoch
        # The images arrive normalised on self.device: the workers send uint8 (data/normalize.py).
        self.loader = build_train_loader(self.config, self.tokenizer, self.rank, self.world_size, device=self.device)
        if len(self.loader) < self.accumulation:
            raise ValueError(f'an epoch has {len(self.loader)} batches, fewer than ACCUMULATION_STEPS '
                             f'({self.accumulation})')
        self.build_optimization(len(self.loader) // self.accumulation)

    def build_optimization(self, steps_per_epoch: int) -> None:
        self.steps_per_epoch = steps_per_epoch
        lrs = scaled_learning_rates(self.config, self.world_size)
        logger.info(f'learning rate {lrs.base:.3g} (warmup from {lrs.warmup:.3g}, min {lrs.minimum:.3g}) '
                    f'for a global batch of {self.global_batch}')
        self.optimizer = build_optimizer(self.config, self.model, lrs.base)
        self.scheduler = build_scheduler(self.config, self.optimizer, steps_per_epoch, lrs)

    @property
    def layout(self) -> BatchLayout:
        return BatchLayout(self.world_size, self.config.DATA.BATCH_SIZE, self.accumulation, self.steps_per_epoch)

    @property
    def global_batch(self) -> int:
        return self.layout.global_batch

    @property
    def contrastive_batch(self) -> int:
        """Pairs one loss sees: the global batch with ACCUMULATION_MODE features, else one micro-batch's."""
        per_loss = self.accumulation if self.config.TRAIN.ACCUMULATION_MODE == 'features' else 1
        return self.config.DATA.BATCH_SIZE * self.world_size * per_loss

    # -- checkpoints ----------------------------------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        # No scheduler state: the LR is a function of the config and the step (`step_update`), and the saved
        # one would carry the old run's warmup, total steps and scaled LR into a resume on a new layout.
        return {
            'model': self.model.state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'trainable': trainable_names(self.model),  # the optimizer's parameters, which MODEL.LOCK_* decide
            'scaler': self.scaler.state_dict() if self.scaler else None,
            'progress': asdict(self.progress),
            'meters': {name: meter.state_dict() for name, meter in self.meters.items()},
            'data': self.loader.state_dict(),  # the position in the epoch and in the shard streams
            'rng': all_rng_states(),
            'world_size': self.world_size,
            'layout': self.layout.as_dict(),
            'config': self.config.dump(),
        }

    def save(self) -> None:
        state = self.state()  # on every rank: gathering RNG states and stream positions is a collective
        if self.rank == 0:
            path = self.checkpoints.save(state, self.progress.step)
            logger.info(f'saved {path} (epoch {self.progress.epoch}, step {self.progress.step})')
        barrier()  # no rank exits (after a stop) while rank 0 still writes

    def resume(self) -> None:
        """Continue from the run's newest checkpoint (MODEL.RESUME 'latest', or TRAIN.AUTO_RESUME), else from
        MODEL.RESUME (a training checkpoint, or a release file that only initializes the weights).

        With AUTO_RESUME the run's own checkpoints win over a MODEL.RESUME file of any kind, as in the official
        code, so the same command started again (torchrun --max-restarts, a requeue) continues where it
        stopped instead of going back to that file. Rank 0 chooses; every rank loads its choice."""
        path, state = load_agreed(self._choose_checkpoint, lambda chosen: safe_load(resolve_source(chosen)))
        if path is None:
            return
        if 'optimizer' not in state:  # a release file: weights only
            load_loaded(self.model, state, path, self.config.MODEL.IMAGE_ENCODER.TYPE)
            logger.info(f'initialized the weights from {path} (MODEL.RESUME); training starts at step 1')
            return
        check_same_trainable(state.get('trainable'), self.model, path)
        self.model.load_state_dict(state['model'])
        self._load_optimizer(state['optimizer'])
        if self.scaler and state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
        self.progress = Progress.from_state(state['progress'])
        for name, meter_state in state.get('meters', {}).items():
            self.meters[name].load_state_dict(meter_state)
        saved = saved_layout(state)
        if saved != self.layout:
            self.progress.step, change = convert_step(self.progress.epoch, self.progress.step, saved, self.layout,
                                                      self.config.TRAIN.RESUME_ROUND_DOWN)
            logger.warning(change)
        if state.get('data') is not None:
            self.loader.load_state_dict(state['data'])
        self.loader.seek(self.progress.epoch, self.step_in_epoch * self.accumulation)
        if saved.world_size == self.world_size:
            set_rng_state(state['rng'][self.rank])
        else:
            seed_everything(derive_seed(self.config.SEED, self.rank, self.progress.step) % 2 ** 32)
            logger.warning(f'checkpoint from {saved.world_size} processes, now {self.world_size}: the RNG streams '
                           f'(drop-path) are seeded anew from SEED, rank and step')
        logger.info(f'resuming from {path}: epoch {self.progress.epoch}, step {self.progress.step}, '
                    f'next step {self.progress.step + 1}')

    def _choose_checkpoint(self) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
        source = self.config.MODEL.RESUME
        own_first = source == 'latest' or self.config.TRAIN.AUTO_RESUME
        path, state = self.checkpoints.load_latest() if own_first else (None, None)
        if path is not None and source not in ('', 'latest'):
            logger.info(f'this run has checkpoints of its own: resuming from the newest, {path}, '
                        f'instead of MODEL.RESUME {source} (TRAIN.AUTO_RESUME)')
        elif path is None and source not in ('', 'latest'):
            path, state = source, safe_load(resolve_source(source))
        elif path is None and own_first:
            logger.info(f'no checkpoint in {self.config.OUTPUT}: starting from scratch')
        return path, state

    def _load_optimizer(self, saved: Dict[str, Any]) -> None:
        """The saved moments; the hyperparameters (LR, weight decay, betas) stay the config's, scaled for this
        run's global batch."""
        configured = [{k: v for k, v in group.items() if k != 'params'} for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(saved)
        for group, hyperparameters in zip(self.optimizer.param_groups, configured):
            group.update(hyperparameters)

    @property
    def step_in_epoch(self) -> int:
        return self.progress.step - self.progress.epoch * self.steps_per_epoch

    # -- one optimizer step ----------------------------------------------------------------------------
    def _autocast(self):
        return autocast(self.device, self.amp_dtype)

    def _step_parts(self) -> StepParts:
        return StepParts(model=self.model, module=self.ddp or self.model, ddp=self.ddp, criterion=self.criterion,
                         autocast=self._autocast, scaler=self.scaler, device=self.device)

    def optimizer_step(self, batches) -> StepResult:
        """One step over `batches`. A non-finite loss (or, without a GradScaler, gradient) leaves the weights
        alone for `handle_nonfinite` to judge; an fp16 overflow is the GradScaler's normal skip."""
        if self.mixup is not None:
            # Once per micro-batch, before any forward: ACCUMULATION_MODE features runs each one twice.
            batches = [self.mixup.mix_batch(to_device(batch, self.device)) for batch in batches]
        loss = self.accumulate(self._step_parts(), batches)
        if not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss.item(), float('nan'))
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.config.TRAIN.CLIP_GRAD or float('inf')
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if not self.scaler and not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss.item(), grad_norm.item())
        overflow = False
        if self.scaler:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skipped when unscale_ found inf/NaN gradients
            self.scaler.update()
            overflow = self.scaler.get_scale() < scale  # the scale only goes down after a skipped step
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, self.config.MODEL.LOGIT_SCALE_MAX)
        return StepResult(loss.item(), grad_norm.item(), overflow)

    # -- loops ----------------------------------------------------------------------------------------
    def handle_nonfinite(self, loss: float, grad_norm: float) -> None:
        where = f'epoch {self.progress.epoch} step {self.progress.step + 1} (loss {loss}, grad norm {grad_norm})'
        last = self.checkpoints.checkpoints()
        if self.config.TRAIN.NAN_POLICY == 'skip':
            self.progress.skipped_steps += 1
            logger.warning(f'non-finite at {where}: step skipped ({self.progress.skipped_steps} so far)')
            return
        raise FloatingPointError(f'non-finite at {where}; stopping. The last good checkpoint is '
                                 f'{last[-1] if last else "none (no checkpoint was saved yet)"}')

    def train_one_epoch(self, stop: StopRequest, writer) -> int:
        """Returns the agreed stop signal when one asked the run to stop within the epoch (after saving),
        else 0. A signal that arrives during the epoch's last step is left to `fit`, which ends the epoch
        first."""
        config, progress = self.config, self.progress
        self.loader.set_epoch(progress.epoch)
        self.model.train()
        total_steps = config.TRAIN.EPOCHS * self.steps_per_epoch
        step_in_epoch = self.step_in_epoch
        if step_in_epoch == 0:
            for meter in self.meters.values():
                meter.reset()
        loss_meter, norm_meter = self.meters['loss'], self.meters['grad_norm']
        window_start, window_steps, run_start, run_steps = time.time(), 0, time.time(), 0
        batches = []
        for batch in self.loader:
            batches.append(batch)
            if len(batches) < self.accumulation:
                continue
            self.scheduler.step_update(progress.step)
            loss, grad_norm, overflow = self.optimizer_step(batches)
            batches = []
            if self.compile_watch:
                self.compile_watch.check(progress.step + 1)
            if overflow:
                progress.overflow_steps += 1
                logger.info(f'fp16 gradient overflow at step {progress.step + 1}: step skipped, loss scale '
                            f'now {self.scaler.get_scale():g} ({progress.overflow_steps} skipped so far)')
            elif not (np.isfinite(loss) and np.isfinite(grad_norm)):
                self.handle_nonfinite(loss, grad_norm)
            else:
                loss_meter.update(loss)
                norm_meter.update(grad_norm)
            progress.step += 1
            step_in_epoch += 1
            window_steps += 1
            run_steps += 1
            if progress.step % config.PRINT_FREQ == 0 or step_in_epoch == self.steps_per_epoch:
                elapsed = time.time() - window_start
                images_per_sec = window_steps * self.global_batch / max(elapsed, 1e-9)
                eta = (total_steps - progress.step) * (time.time() - run_start) / run_steps
                lr = self.optimizer.param_groups[0]['lr']
                # The temperature, and the sigmoid loss's learned bias where the model has one.
                logits = {'logit_scale': self.model.logit_scale.exp().item()}
                if hasattr(self.model, 'logit_bias'):
                    logits['logit_bias'] = self.model.logit_bias.item()
                logger.info(
                    f'Train: [{progress.epoch}/{config.TRAIN.EPOCHS}][{step_in_epoch}/{self.steps_per_epoch}] '
                    f'step {progress.step}  lr {lr:.3e}  loss {loss:.4f} ({loss_meter.avg:.4f})  '
                    f'grad_norm {grad_norm:.3f} ({norm_meter.avg:.3f})  '
                    + ''.join(f'{name} {value:.2f}  ' for name, value in logits.items())
                    + f'{images_per_sec:.1f} img/s  mem {peak_memory_mb(self.device):.0f}MB  '
                    f'eta {datetime.timedelta(seconds=int(eta))}')
                if writer:
                    for name, value in (('loss', loss), ('lr', lr), ('grad_norm', grad_norm), *logits.items(),
                                        ('images_per_sec', images_per_sec)):
                        writer.add_scalar(f'train/{name}', value, progress.step)
                window_start, window_steps = time.time(), 0
            if step_in_epoch == self.steps_per_epoch:
                # Leftover batches cannot fill an accumulation group. The epoch's end (its counter, its
                # save, a pending stop) is `fit`'s: a checkpoint taken here, before the counter moves on,
                # would resume with the data one epoch ahead of the training.
                break
            signum = stop.agreed(self.device)
            if signum:
                logger.warning(f'signal {signum}: saving at step {progress.step} and exiting')
                self.save()
                return signum
            if config.TRAIN.SAVE_STEPS and progress.step % config.TRAIN.SAVE_STEPS == 0:
                self.save()
        skipped = self.loader.skipped() if hasattr(self.loader, 'skipped') else {}
        logger.info(f'epoch {progress.epoch} done: loss {loss_meter.avg:.4f}, grad_norm {norm_meter.avg:.3f}'
                    + (f', fp16 overflow steps so far {progress.overflow_steps}' if self.scaler else '')
                    + (f', bad samples skipped {skipped}' if skipped else '')
                    + (f', graphs compiled so far {self.compile_watch.count}' if self.compile_watch else ''))
        if writer:
            writer.add_scalar('train/epoch_loss', loss_meter.avg, progress.epoch)
        return 0

    def validation_folder(self, required: bool = False) -> Optional[str]:
        """DATA.VAL_PATH (relative to DATA_PATH, as DATA.SOURCES paths are), or DATA_PATH/val when it is
        empty; None when that default folder does not exist, unless `required`. A VAL_PATH that is not
        a folder fails."""
        data = self.config.DATA
        path = os.path.join(data.DATA_PATH, data.VAL_PATH or 'val')
        if os.path.isdir(path):
            return path
        if data.VAL_PATH or required:
            raise FileNotFoundError(f'DATA.VAL_PATH {data.VAL_PATH!r}: no folder {path}')
        return None

    def validate(self, writer) -> Optional[float]:
        """Zero-shot accuracy on the validation folder, logged for the epoch just finished
        (`progress.epoch - 1` during training). The training's RNG streams are left as they were."""
        val_path = self.validation_folder()
        if val_path is None:
            logger.info('no DATA.VAL_PATH and no DATA_PATH/val folder: skipping zero-shot validation')
            return None
        # The same autocast as training; evaluate.py defaults to it too (the config's AMP_OPT_LEVEL).
        encoder = Encoder(self.model, self.tokenizer, self.config, self.device, self.amp_dtype)
        with rng_untouched():
            result = run_zeroshot(encoder, val_path)
        self.progress.max_accuracy = max(self.progress.max_accuracy or 0.0, result.top1)
        logger.info(f'zero-shot on {result.num_images} images of {val_path}: Acc@1 {result.top1:.2f} '
                    f'Acc@5 {result.top5:.2f}  (best Acc@1 {self.progress.max_accuracy:.2f})')
        if writer:
            writer.add_scalar('val/acc1', result.top1, self.progress.epoch)
            writer.add_scalar('val/acc5', result.top5, self.progress.epoch)
        return result.top1

    def fit(self) -> int:
        """Train to TRAIN.EPOCHS and validate every epoch; returns the process exit code: 0 when the run is
        complete, 128 + the signal after a stop (saved, the same code on every rank)."""
        config, progress = self.config, self.progress
        writer = open_tensorboard(config, self.rank)
        logger.info(f'training {config.TRAIN.EPOCHS} epochs x {self.steps_per_epoch} steps, global batch '
                    f'{self.global_batch} (contrastive batch {self.contrastive_batch}), autocast {self.amp_dtype}, '
                    f'{self.world_size} process(es)')
        start = time.time()
        with StopRequest() as stop:
            try:
                signum = self._validate_due(stop, writer)  # an epoch a stop or a kill left unvalidated
                while not signum and progress.epoch < config.TRAIN.EPOCHS:
                    signum = self.train_one_epoch(stop, writer) or self._end_epoch(stop, writer)
            finally:
                if writer:
                    writer.close()
        if signum:
            return 128 + signum
        best = 'n/a' if progress.max_accuracy is None else f'{progress.max_accuracy:.2f}'
        logger.info(f'training time {datetime.timedelta(seconds=int(time.time() - start))}, '
                    f'best zero-shot Acc@1 {best}')
        return 0

    def _end_epoch(self, stop: StopRequest, writer) -> int:
        """Close the epoch: count it, save when due (always on a stop), then validate it unless a stop asks
        to exit first (the restarted run validates it before training on). Returns the agreed stop signal."""
        config, progress = self.config, self.progress
        epoch = progress.epoch
        progress.epoch += 1
        signum = stop.agreed(self.device)
        steps_due = config.TRAIN.SAVE_STEPS and progress.step % config.TRAIN.SAVE_STEPS == 0
        if signum or epoch % config.SAVE_FREQ == 0 or progress.epoch == config.TRAIN.EPOCHS or steps_due:
            self.save()
        if signum:
            logger.warning(f'signal {signum}: saved at the end of epoch {epoch} (step {progress.step}), exiting; '
                           f'its validation runs when the run continues')
            return signum
        return self._validate_due(stop, writer)

    def _validate_due(self, stop: StopRequest, writer) -> int:
        """Validate the last finished epoch if that has not happened yet. A stop that arrived meanwhile saves
        (with the result) and is returned."""
        progress = self.progress
        if progress.validated_epochs >= progress.epoch:
            return 0
        self.validate(writer)
        progress.validated_epochs = progress.epoch
        signum = stop.agreed(self.device)
        if signum:
            logger.warning(f'signal {signum} during the validation of epoch {progress.epoch - 1}: saving and exiting')
            self.save()
        return signum

    @torch.no_grad()
    def throughput(self) -> None:
        """Images/s of the image encoder and of a full forward on one training batch (as the official)."""
        images, tokens, _ = to_device(next(iter(self.loader)), self.device)
        self.model.eval()
        warmup, timed = (50, 30) if self.device.type == 'cuda' else (2, 5)
        for name, run in (('image encoder', lambda: self.model.encode_image(images)),
                          ('image + text', lambda: self.model(images, tokens))):
            with self._autocast():
                for _ in range(warmup):
                    run()
                if self.device.type == 'cuda':
                    torch.cuda.synchronize()
                start = time.time()
                for _ in range(timed):
                    run()
                if self.device.type == 'cuda':
                    torch.cuda.synchronize()
            logger.info(f'{name}: batch {images.shape[0]}, {timed * images.shape[0] / (time.time() - start):.1f} '
                        f'images/s')

