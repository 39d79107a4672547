"""TRAIN.COMPILE: the model's forward compiled with torch.compile for training, with a bounded number of graphs.

What is compiled, and why there:
- The UniCL model's forward (both encoders, the projections), in place with `nn.Module.compile()`, before DDP
  wraps it: torch's documentation recommends compiling the inner module, as DDP is a wrapper torch.compile
  does not trace well. In place, the state_dict keys stay the model's own (`torch.compile(model)` returns a
  wrapper whose keys carry an `_orig_mod.` prefix), so checkpoints load into an eager model and back.
- Not the loss (its tiles and collectives stay eager), the backward pass (the compiled graphs' own backward
  runs inside it) or the optimizer.
- Evaluation calls `encode_image` / `encode_text`, not the forward, so it stays eager: its batch sizes and
  lengths vary, and it runs once an epoch.

The text lengths: the causal text encoder trims a batch to its longest text, a length read from the data
(`int(...)`, a graph break); every new length would compile new graphs. With compilation on, the model
rounds that length up to a multiple of TEXT_LENGTH_MULTIPLE (model/unicl.py `bucketed_length`): 5 lengths
(16, 32, 48, 64, 77) for the 77-token context, each compiled once with static shapes (`dynamic=False`: no
symbolic-shape kernels, and no recompilation to turn shapes symbolic).

The bound: dynamo compiles at most `cache_size_limit` variants of one function (renamed `recompile_limit` in
newer torch, which keeps the old name as an alias), then runs it uncompiled with a warning. `compile_model`
raises that limit to what the buckets need. The count of graphs dynamo compiled (its `unique_graphs`
counter, in every torch from 2.4 on) is logged as it grows by `CompileWatch`, which warns once if it passes
the number the buckets explain.
"""
from __future__ import annotations

import logging
import math
import time
import torch
import torch._dynamo
from torch import nn

logger = logging.getLogger('unicl.train')

TEXT_LENGTH_MULTIPLE = 16
# torch.compile's modes; 'default' is passed as no mode, as the other backends take none.
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
# 'inductor' generates kernels; 'aot_eager' and 'eager' trace the same graphs but run them with torch's own
# operators, for telling a compiler problem from a tracing one (and for fast tests).
COMPILE_BACKENDS = ('inductor', 'aot_eager', 'eager')
# Graphs of one forward at one text length, split at the length's graph break: 3 on torch 2.14 (the forward
# up to the length, the rest of encode_text, the rest of the forward); an older dynamo that cannot resume
# inside a called function also splits the forward where it calls encode_text, hence 4. Only the graph of
# encode_text's rest depends on the length.
GRAPHS_PER_FORWARD = 4


def text_buckets(context_length: int, multiple: int = TEXT_LENGTH_MULTIPLE) -> int:
    """How many trimmed text lengths the model can produce: the multiples of `multiple` below the context,
    and the context itself."""
    return math.ceil(context_length / multiple)


def graph_bound(context_length: int, passes: int) -> int:
    """The graphs a training run compiles at most: one forward's graphs, then one more per further bucket,
    for each kind of pass (`passes`: 2 with ACCUMULATION_MODE features, whose first forward runs without a
    graph for autograd, else 1)."""
    return passes * (GRAPHS_PER_FORWARD + text_buckets(context_length) - 1)


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far."""
    return torch._dynamo.utils.counters['stats']['unique_graphs']


def compile_for_training(model: nn.Module, config) -> 'CompileWatch':
    """Compile the UniCL `model`'s forward in place as TRAIN.COMPILE_MODE and COMPILE_BACKEND say, its text
    lengths bucketed (see the module docstring); the watch over the graphs it compiles."""
    train = config.TRAIN
    # ACCUMULATION_MODE features also runs the forward without autograd: graphs of its own.
    passes = 2 if train.ACCUMULATION_STEPS > 1 and train.ACCUMULATION_MODE == 'features' else 1
    context = model.text_encoder.context_length
    model.text_length_multiple = TEXT_LENGTH_MULTIPLE
    # Every bucket of every pass gets its graph of the function that takes the text length.
    needed = passes * text_buckets(context)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, needed)
    mode = train.COMPILE_MODE
    model.compile(backend=train.COMPILE_BACKEND, mode=None if mode == 'default' else mode, dynamic=False)
    bound = graph_bound(context, passes)
    logger.info(f'torch.compile: the model forward, backend {train.COMPILE_BACKEND}, mode {mode}; text lengths '
                f'rounded up to multiples of {TEXT_LENGTH_MULTIPLE} ({text_buckets(context)} lengths), at most '
                f'{bound} graphs expected')
    return CompileWatch(bound)


class CompileWatch:
    """Logs the graphs compiled since it was made, as they appear, and warns once past `bound`."""

    def __init__(self, bound: int):
        self.bound = bound
        self.start = self.seen = graphs_compiled()
        self.since = time.perf_counter()
        self.warned = False

    @property
    def count(self) -> int:
        return self.seen - self.start

    def check(self, step: int) -> None:
        """After a step: log the graphs it compiled, with the time since the last check (the step, its
        compilation included, and the wait for its batch)."""
        now, elapsed = graphs_compiled(), time.perf_counter() - self.since
        self.since = time.perf_counter()
        if now == self.seen:
            return
        added, self.seen = now - self.seen, now
        logger.info(f'torch.compile: {added} graph(s) compiled in step {step} ({elapsed:.1f} s), '
                    f'{self.count} so far')
        if self.count > self.bound and not self.warned:
            self.warned = True
            logger.warning(f'torch.compile: {self.count} graphs, more than the {self.bound} the text-length '
                           f'buckets explain: something else in the batches changes (shapes, dtypes, modes), '
                           f'and each change compiles anew until dynamo\'s limit of '
                           f'{torch._dynamo.config.cache_size_limit} per function runs it uncompiled')
