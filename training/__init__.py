"""Training as a library: `Trainer` runs the loop that main.py's command line configures."""
from .state import Progress, seed_everything
from .trainer import StepResult, Trainer

__all__ = ['Progress', 'StepResult', 'Trainer', 'seed_everything']
