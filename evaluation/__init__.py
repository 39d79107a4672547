"""Evaluation of UniCL models as a library: zero-shot classification, linear probes, image-text retrieval,
ELEVATER-style metrics, suites over many datasets and checkpoints, and cached frozen features.

`evaluate.py` is the command line over it; training validates with `run_zeroshot`.
"""
from .cache import FeatureCache
from .encoder import Encoder, load_encoder
from .linear_probe import LinearProbeReport, LinearProbeResult, ProbeSettings, probe_features, run_linear_probe
from .metrics import METRICS, get_metric
from .retrieval import read_captioned_images, retrieval_recalls, run_retrieval
from .suite import SuiteDataset, load_suite, run_suite, suite_markdown, write_suite_results
from .zeroshot import ZeroShotResult, class_embeddings, run_zeroshot

__all__ = ['FeatureCache', 'Encoder', 'load_encoder', 'LinearProbeReport', 'LinearProbeResult', 'ProbeSettings',
           'probe_features',
           'run_linear_probe', 'METRICS', 'get_metric', 'read_captioned_images', 'retrieval_recalls',
           'run_retrieval', 'SuiteDataset', 'load_suite', 'run_suite', 'suite_markdown', 'write_suite_results',
           'ZeroShotResult', 'class_embeddings', 'run_zeroshot']
