"""UniCL training.

    torchrun --nproc_per_node=8 main.py --cfg configs/unicl_swin_tiny.yaml --data-path /data/imagenet
    python main.py --cfg configs/unicl_tiny.yaml --data-path demo_data/labels      # one process, CPU or GPU

The command line: flags and config -> the run's config -> training.Trainer (the loop lives in training/).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import torch

from configs import ConfigError, load_config, merge_dict, validate_config
from model.checkpoint import load_pretrained
from training import Trainer, seed_everything
from utils.distributed import destroy_distributed, init_distributed
from utils.logger import setup_logger
from utils.stop_signals import ignore_stop_signals

logger = logging.getLogger('unicl.train')

# The dedicated flags and the config keys they set (after the config file and --opts, as the official).
FLAG_KEYS = {
    'batch_size': 'DATA.BATCH_SIZE', 'dataset': 'DATA.DATASET', 'data_path': 'DATA.DATA_PATH',
    'zip': 'DATA.ZIP_MODE', 'cache_mode': 'DATA.CACHE_MODE', 'resume': 'MODEL.RESUME',
    'accumulation_steps': 'TRAIN.ACCUMULATION_STEPS', 'use_checkpoint': 'TRAIN.USE_CHECKPOINT',
    'amp_opt_level': 'AMP_OPT_LEVEL', 'output': 'OUTPUT', 'tag': 'TAG', 'eval': 'EVAL_MODE',
    'throughput': 'THROUGHPUT_MODE',
}


def parse_option(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser('UniCL training and evaluation')
    parser.add_argument('--cfg', required=True, metavar='FILE', help='config file')
    parser.add_argument('--opts', nargs='+', help="config overrides as 'KEY VALUE' pairs")
    parser.add_argument('--batch-size', type=int, help='batch size per process')
    parser.add_argument('--dataset', help='DATA.DATASET')
    parser.add_argument('--data-path', help='DATA.DATA_PATH')
    parser.add_argument('--zip', action='store_true', help='read the zip layout (train.zip + train_map.txt)')
    parser.add_argument('--cache-mode', choices=['no', 'full', 'part'], help='DATA.CACHE_MODE')
    parser.add_argument('--resume', help="'latest' (newest checkpoint in the output folder) or a path/URL")
    parser.add_argument('--accumulation-steps', type=int, help='batches per optimizer step')
    parser.add_argument('--use-checkpoint', action='store_true', help='gradient checkpointing')
    parser.add_argument('--amp-opt-level', help="O0 (fp32), O1/O2 (bf16 on CUDA), bf16, fp16 (with GradScaler)")
    parser.add_argument('--output', help='root output folder (runs go to OUTPUT/MODEL.NAME/TAG)')
    parser.add_argument('--tag', help='run tag')
    parser.add_argument('--eval', action='store_true', help='zero-shot evaluation of --resume only')
    parser.add_argument('--throughput', action='store_true', help='measure forward throughput only')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=None,
                        help='accepted for torch.distributed.launch; torchrun sets LOCAL_RANK instead')
    return parser.parse_args(argv)


def build_run_config(args: argparse.Namespace):
    """The config file, then --opts, then the dedicated flags (which win, as in the official code). The
    flags go through the same checked merge as the file, so a value of the wrong type fails naming it."""
    config = load_config(args.cfg, args.opts, freeze=False)
    for name, key in FLAG_KEYS.items():
        value = getattr(args, name)
        if value is None or value is False:  # not given (store_true flags only ever switch a key on)
            continue
        *parents, leaf = key.split('.')
        update = {leaf: value}
        for parent in reversed(parents):
            update = {parent: update}
        merge_dict(config, update, f"--{name.replace('_', '-')}")
    config.LOCAL_RANK = int(os.environ.get('LOCAL_RANK', args.local_rank or 0))
    config.OUTPUT = os.path.join(config.OUTPUT or 'output', config.MODEL.NAME or 'unicl', config.TAG)
    validate_config(config)  # again: the flags may have changed what load_config checked
    config.freeze()
    return config


def main(argv=None) -> int:
    args = parse_option(argv)
    try:
        config = build_run_config(args)
        rank, world_size, local_rank = init_distributed()
        device = torch.device('cuda', local_rank) if torch.cuda.is_available() else torch.device('cpu')
        setup_logger(config.OUTPUT, rank)
        seed_everything(config.SEED + rank)
        if rank == 0:
            os.makedirs(config.OUTPUT, exist_ok=True)
            with open(os.path.join(config.OUTPUT, 'config.yaml'), 'w') as f:
                f.write(config.dump())
        logger.info(f'run folder {config.OUTPUT}')
        try:
            trainer = Trainer(config, rank, world_size, device)
            if config.EVAL_MODE:
                if not config.MODEL.RESUME:
                    raise ValueError('--eval needs --resume CHECKPOINT')
                trainer.validation_folder(required=True)
                load_pretrained(trainer.model, config.MODEL.RESUME, config.MODEL.IMAGE_ENCODER.TYPE)
                trainer.validate(None)
                return 0
            trainer.build_training()
            if config.THROUGHPUT_MODE:
                trainer.throughput()
                return 0
            trainer.resume()
            code = trainer.fit()
            # Past the loop a stop has nothing left to save: a SIGTERM now (torchrun sends one to the ranks still
            # tearing down once another has exited) must not turn this rank's exit code into a death by signal.
            ignore_stop_signals()
            return code
        finally:
            destroy_distributed()
    except ConfigError as error:  # a key's value refused, when read or when what it needs turns out missing
        print(f'main.py: error: {error}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
