"""Logging: a coloured console on rank 0, and a plain log file per rank when an output folder is given."""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from termcolor import colored

_FORMAT = '[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s'
_DATE = '%Y-%m-%d %H:%M:%S'


class _ColorFormatter(logging.Formatter):
    _COLORS = {logging.WARNING: 'yellow', logging.ERROR: 'red', logging.CRITICAL: 'red'}

    def format(self, record: logging.LogRecord) -> str:
        prefix = colored(f'[{self.formatTime(record, _DATE)} {record.name}]', 'green')
        message = record.getMessage()
        if record.levelno in self._COLORS:
            message = colored(f'{record.levelname} {message}', self._COLORS[record.levelno])
        if record.exc_info:
            message += '\n' + self.formatException(record.exc_info)
        return f'{prefix} {message}'


def setup_logger(output_dir: Optional[str] = None, rank: int = 0, name: str = 'unicl') -> logging.Logger:
    """Configure the root logger (so library modules' loggers reach the same handlers) and return `name`."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(_ColorFormatter() if sys.stdout.isatty() else logging.Formatter(_FORMAT, _DATE))
        root.addHandler(console)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(output_dir, f'log_rank{rank}.txt'), mode='a')
        file_handler.setFormatter(logging.Formatter(_FORMAT, _DATE))
        root.addHandler(file_handler)
    return logging.getLogger(name)
