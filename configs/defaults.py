"""Default configuration: every key of the official UniCL YACS tree, plus the keys this project adds.

Official keys keep their official defaults so that the released YAML files mean what they meant there.
Keys marked "added" do not exist in the official code.
"""
from yacs.config import CfgNode as CN

_C = CN()
_C.VERBOSE = False
# Base config files, relative to the file that names them.
_C.BASE = ['']

# -----------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------
_C.DATA = CN()
# Batch size per GPU (process).
_C.DATA.BATCH_SIZE = 128
_C.DATA.DATA_PATH = ''
_C.DATA.DATASET = 'imagenet'
_C.DATA.IMG_SIZE = 224
# random, bilinear, bicubic
_C.DATA.INTERPOLATION = 'bicubic'
_C.DATA.ZIP_MODE = False
_C.DATA.CACHE_MODE = 'part'
_C.DATA.PIN_MEMORY = True
_C.DATA.NUM_WORKERS = 8
# added: zero-shot validation folder (ImageFolder tree), relative to DATA_PATH; empty means DATA_PATH/val.
_C.DATA.VAL_PATH = ''
# added: training sources, a list of mappings {TYPE, PATH[, NAME, WEIGHT, CLASSNAMES, NUM_SAMPLES]}
# (TYPE: imagefolder, zip, tsv, csv, webdataset; relative PATHs are under DATA_PATH; see data/specs.py).
# Empty: the one source DATASET + DATA_PATH, as the official code.
_C.DATA.SOURCES = []
# added: samples per epoch over all processes (mixed and endless sources need one); 0: the sources' sizes summed.
_C.DATA.EPOCH_SAMPLES = 0
# added: give identical captions (ignoring case and spacing) one shared label; off: every caption is unique.
_C.DATA.MERGE_CAPTIONS = False
# added: samples shuffled together within a webdataset shard, per loader worker (memory: that many samples).
_C.DATA.SHUFFLE_BUFFER = 1000
# added: bad samples (unreadable, corrupt, empty caption, ...) each process logs with their path; all are counted.
_C.DATA.LOG_BAD_SAMPLES = 10
# added: training JPEGs decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps the RandomResizedCrop box
# >= IMG_SIZE, the box drawn from the header size (data/crop_decode.py); same draws, pixels within a bounded
# error of a full decode (exact when no reduction applies). False: full-scale decode, timm's pixels exactly (of
# the box's rectangle only where data/jpeg_region.py's helper is built: the same pixels, less work).
_C.DATA.REDUCED_DECODE = True
# added: 'cuda' decodes the training JPEGs in batches on the training GPU (nvJPEG) and crops, resizes, flips and
# normalises them there; the workers only read the files and draw the crop, flip and erasing (data/gpu_decode.py).
# Needs AUG.AUTO_AUGMENT none and AUG.COLOR_JITTER 0 (PIL operations); REDUCED_DECODE does not apply. 'cpu': the workers decode.
_C.DATA.DECODE_DEVICE = 'cpu'
# added: prefix conditioning (Saito et al., CVPR 2023; data/text_prefix.py): '' off, 'words' puts
# TEXT_PREFIX_LABEL before every class prompt and TEXT_PREFIX_CAPTION before every caption, so the text
# encoder knows which kind of supervision a text is. Zero-shot class prompts take the prefix of the kind
# TEXT_PREFIX_ZEROSHOT names ('label' or 'caption'); retrieval captions the caption prefix.
_C.DATA.TEXT_PREFIX = ''
_C.DATA.TEXT_PREFIX_LABEL = 'label: '
_C.DATA.TEXT_PREFIX_CAPTION = 'caption: '
_C.DATA.TEXT_PREFIX_ZEROSHOT = 'label'

# -----------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------
_C.MODEL = CN()
_C.MODEL.NAME = ''
_C.MODEL.RESUME = ''
_C.MODEL.NUM_CLASSES = 0
_C.MODEL.LABEL_SMOOTHING = 0.1
_C.MODEL.PRETRAINED = ''
_C.MODEL.DIM_PROJECTION = 512
_C.MODEL.SPEC = CN(new_allowed=True)
# added: initial temperature as logit_scale = ln(1 / T); the official code starts at logit_scale = 1.0.
# null: the TRAIN.LOSS's own start, ln(1 / 0.07) as CLIP for unicl and clip, ln 10 as SigLIP for sigmoid.
_C.MODEL.LOGIT_SCALE_INIT = None
# added: logit_scale is clamped to this after every step (ln 100, as CLIP).
_C.MODEL.LOGIT_SCALE_MAX = 4.605170185988092
# added: LiT-style locked towers (model/lock.py; open_clip's --lock-image, --lock-text). A locked tower is
# frozen, left out of the optimizer and kept in evaluation mode, its projection included; *_UNLOCKED_GROUPS
# leaves its last N groups trainable (the projection is the last group; then blocks, last first).
_C.MODEL.LOCK_IMAGE = False
_C.MODEL.LOCK_IMAGE_UNLOCKED_GROUPS = 0
_C.MODEL.LOCK_TEXT = False
_C.MODEL.LOCK_TEXT_UNLOCKED_GROUPS = 0

_C.MODEL.IMAGE_ENCODER = CN()
_C.MODEL.IMAGE_ENCODER.TYPE = 'swin'
_C.MODEL.IMAGE_ENCODER.IMG_SIZE = 224
_C.MODEL.IMAGE_ENCODER.DROP_RATE = 0.0
_C.MODEL.IMAGE_ENCODER.DROP_PATH_RATE = 0.1

_C.MODEL.IMAGE_ENCODER.SWIN = CN()
_C.MODEL.IMAGE_ENCODER.SWIN.PATCH_SIZE = 4
_C.MODEL.IMAGE_ENCODER.SWIN.IN_CHANS = 3
_C.MODEL.IMAGE_ENCODER.SWIN.EMBED_DIM = 96
_C.MODEL.IMAGE_ENCODER.SWIN.DEPTHS = [2, 2, 6, 2]
_C.MODEL.IMAGE_ENCODER.SWIN.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.IMAGE_ENCODER.SWIN.WINDOW_SIZE = 7
_C.MODEL.IMAGE_ENCODER.SWIN.MLP_RATIO = 4.
_C.MODEL.IMAGE_ENCODER.SWIN.QKV_BIAS = True
_C.MODEL.IMAGE_ENCODER.SWIN.QK_SCALE = None
_C.MODEL.IMAGE_ENCODER.SWIN.APE = False
_C.MODEL.IMAGE_ENCODER.SWIN.PATCH_NORM = True

_C.MODEL.IMAGE_ENCODER.FOCAL = CN()
_C.MODEL.IMAGE_ENCODER.FOCAL.PATCH_SIZE = 4
_C.MODEL.IMAGE_ENCODER.FOCAL.IN_CHANS = 3
_C.MODEL.IMAGE_ENCODER.FOCAL.EMBED_DIM = 96
_C.MODEL.IMAGE_ENCODER.FOCAL.DEPTHS = [2, 2, 6, 2]
_C.MODEL.IMAGE_ENCODER.FOCAL.MLP_RATIO = 4.
_C.MODEL.IMAGE_ENCODER.FOCAL.PATCH_NORM = True
_C.MODEL.IMAGE_ENCODER.FOCAL.FOCAL_LEVELS = [2, 2, 2, 2]
_C.MODEL.IMAGE_ENCODER.FOCAL.FOCAL_WINDOWS = [3, 3, 3, 3]
_C.MODEL.IMAGE_ENCODER.FOCAL.FOCAL_FACTORS = [2, 2, 2, 2]
_C.MODEL.IMAGE_ENCODER.FOCAL.USE_CONV_EMBED = False
_C.MODEL.IMAGE_ENCODER.FOCAL.USE_LAYERSCALE = False
_C.MODEL.IMAGE_ENCODER.FOCAL.USE_POSTLN = False

_C.MODEL.TEXT_ENCODER = CN()
_C.MODEL.TEXT_ENCODER.NAME = 'transformer'
_C.MODEL.TEXT_ENCODER.LOAD_PRETRAINED = False
_C.MODEL.TEXT_ENCODER.PRETRAINED = ''
_C.MODEL.TEXT_ENCODER.TOKENIZER = 'clip'
# added: a hub tokenizer name (e.g. 'openai/clip-vit-base-patch32') used instead of the shipped CLIP
# vocabulary; needs the hub to be reachable. Empty: the shipped files, offline.
_C.MODEL.TEXT_ENCODER.PRETRAINED_TOKENIZER = ''
_C.MODEL.TEXT_ENCODER.CONTEXT_LENGTH = 77
_C.MODEL.TEXT_ENCODER.WIDTH = 1024
_C.MODEL.TEXT_ENCODER.HEADS = 16
_C.MODEL.TEXT_ENCODER.LAYERS = 12
_C.MODEL.TEXT_ENCODER.AUTOGRESSIVE = True

# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------
_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0
_C.TRAIN.EPOCHS = 32
_C.TRAIN.WARMUP_EPOCHS = 5
_C.TRAIN.WEIGHT_DECAY = 0.1
_C.TRAIN.BASE_LR = 5e-4
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
_C.TRAIN.CLIP_GRAD = 5.0
_C.TRAIN.AUTO_RESUME = True
_C.TRAIN.ACCUMULATION_STEPS = 0
# added: 'gradients' (official): each accumulated micro-batch is its own contrastive batch; 'features'
# (GradCache): one contrastive batch of BATCH_SIZE x processes x ACCUMULATION_STEPS pairs (training/accumulation.py).
_C.TRAIN.ACCUMULATION_MODE = 'gradients'
_C.TRAIN.USE_CHECKPOINT = False
# added: also checkpoint every N optimizer steps (0: only at epoch ends, every SAVE_FREQ epochs).
_C.TRAIN.SAVE_STEPS = 0
# added: how many of the newest checkpoints to keep in OUTPUT (0 keeps all).
_C.TRAIN.KEEP_CHECKPOINTS = 3
# added: resuming with another global batch (processes x BATCH_SIZE x ACCUMULATION_STEPS) continues by
# samples seen; when those are not a whole number of new steps the run refuses, unless this rounds the
# position down (the part step's samples are trained again). See training/resume.py.
_C.TRAIN.RESUME_ROUND_DOWN = False
# added: on a non-finite loss, 'stop' the run (the last checkpoint stays good) or 'skip' the step.
_C.TRAIN.NAN_POLICY = 'stop'
# added: UniCLLoss computes the logits in T x T tiles and never holds the B x N matrix; this is T. Any value
# gives the same loss and gradients; 0 picks it from the device (64 MiB tiles on CPU, up to 1 GiB on CUDA).
_C.TRAIN.LOSS_TILE_SIZE = 0
# added: the loss (loss/__init__.py): 'unicl' (pairs sharing a label are positives), 'clip' (labels ignored,
# each pair its own class: the paper's CLIP baseline), 'sigmoid' (SigLIP's pairwise sigmoid loss with a
# learned bias, label-aware: pairs sharing a label are positives).
_C.TRAIN.LOSS = 'unicl'
# added: torch.compile the model's forward for training (training/compile.py): text lengths rounded up to a
# multiple of 16 so that few graphs are compiled, their count logged. COMPILE_MODE is torch.compile's mode
# ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'; inductor only); COMPILE_BACKEND
# 'inductor', or 'aot_eager' / 'eager' (the same graphs run by torch's operators) to tell a compiler problem
# from a tracing one. Evaluation stays eager.
_C.TRAIN.COMPILE = False
_C.TRAIN.COMPILE_MODE = 'default'
_C.TRAIN.COMPILE_BACKEND = 'inductor'

_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = 'cosine'
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1

_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = 'adamw'
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9
# torch's fused kernel (one pass over each parameter's memory) where the device and torch version have one, else
# the per-parameter loop. The same update up to float rounding (~1e-8 per step); on a CPU 5x faster for the
# tiny model's 6.3M-entry token embedding. False: exactly the official per-parameter loop.
_C.TRAIN.OPTIMIZER.FUSED = True

# -----------------------------------------------------------------------------
# Augmentation
# -----------------------------------------------------------------------------
_C.AUG = CN()
_C.AUG.COLOR_JITTER = 0.4
_C.AUG.AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'
_C.AUG.REPROB = 0.25
_C.AUG.REMODE = 'pixel'
_C.AUG.RECOUNT = 1
# Added: RandomResizedCrop's area range (timm's default, which the official runs used).
_C.AUG.CROP_SCALE = [0.08, 1.0]
# Off by default, unlike the official tree (0.8 / 1.0): the released UniCL models were trained without
# mixup/cutmix. On, images are mixed within each process's batch as timm's Mixup does and the targets in
# image-text-label space become soft (data/mixup.py, loss/targets.py).
_C.AUG.MIXUP = 0.0
_C.AUG.CUTMIX = 0.0
_C.AUG.CUTMIX_MINMAX = None
_C.AUG.MIXUP_PROB = 1.0
_C.AUG.MIXUP_SWITCH_PROB = 0.5
_C.AUG.MIXUP_MODE = 'batch'

# -----------------------------------------------------------------------------
# Testing
# -----------------------------------------------------------------------------
_C.TEST = CN()
_C.TEST.CROP = True

# -----------------------------------------------------------------------------
# Misc
# -----------------------------------------------------------------------------
_C.AMP_OPT_LEVEL = ''
_C.OUTPUT = ''
_C.TAG = 'default'
_C.SAVE_FREQ = 1
_C.PRINT_FREQ = 100
_C.SEED = 0
_C.EVAL_MODE = False
_C.THROUGHPUT_MODE = False
_C.DEBUG_MODE = False
_C.LOCAL_RANK = 0


def get_defaults() -> CN:
    """A fresh copy of the defaults, safe to mutate."""
    return _C.clone()
