"""Zero-shot evaluation cost: building the ImageNet-1K classifier (1000 classes x 81 templates through the
text encoder) and encoding images, for `unicl_swin_tiny` (random weights: speed does not depend on them).

    python bench/zeroshot.py [--classes 50] [--amp fp32 bf16]

On a CPU the full classifier takes tens of minutes, so `--classes N` encodes the 81 templates of the first N
ImageNet classes and the table states the time scaled to 1000 classes (the work is the same for every class:
81 short prompts). Image throughput is the eval transform's output size at the config's image size.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench.common import machine, markdown_table, write_results  # noqa: E402
from configs import load_config  # noqa: E402
from data.classnames import imagenet_classnames, zeroshot_templates  # noqa: E402
from evaluation import Encoder, class_embeddings  # noqa: E402
from model import build_tokenizer, build_unicl_model  # noqa: E402
from utils.precision import autocast, autocast_dtype  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', default='unicl_swin_tiny')
    parser.add_argument('--classes', type=int, default=50, help='ImageNet classes encoded (scaled to 1000)')
    parser.add_argument('--amp', nargs='+', default=['fp32', 'bf16'])
    parser.add_argument('--image-batch', type=int, default=32)
    parser.add_argument('--image-batches', type=int, default=4)
    args = parser.parse_args(argv)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    config = load_config(os.path.join(ROOT, 'configs', f'{args.config}.yaml'))
    torch.manual_seed(0)
    model = build_unicl_model(config).to(device).eval()
    tokenizer = build_tokenizer(config.MODEL.TEXT_ENCODER)
    names, templates = imagenet_classnames()[:args.classes], zeroshot_templates()
    size = config.DATA.IMG_SIZE
    rows, results = [], []
    for amp in args.amp:
        dtype = autocast_dtype(amp, device)
        encoder = Encoder(model, tokenizer, config, device, dtype)
        start = time.perf_counter()
        class_embeddings(encoder, names, templates)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        images = torch.randn(args.image_batch, 3, size, size, device=device)
        with torch.inference_mode(), autocast(device, dtype):
            model.encode_image(images)  # warm-up
            if device.type == 'cuda':
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.image_batches):
                model.encode_image(images)
            if device.type == 'cuda':
                torch.cuda.synchronize()
        images_per_sec = args.image_batches * args.image_batch / (time.perf_counter() - start)
        result = {'amp': amp, 'device': device.type, 'classes_measured': len(names),
                  'texts_per_sec': len(names) * len(templates) / seconds,
                  'classifier_seconds_1000_classes': seconds * 1000 / len(names),
                  'eval_images_per_sec': images_per_sec, 'image_batch': args.image_batch}
        results.append(result)
        print(result, flush=True)
        rows.append([f'{device.type} {amp}', f"{result['texts_per_sec']:.0f}",
                     f"{result['classifier_seconds_1000_classes'] / 60:.1f} min",
                     f'{images_per_sec:.1f}'])
    print(markdown_table([f'{args.config}', 'prompts/s', 'IN-1K classifier (81,000 prompts)', 'eval images/s'], rows))
    print('results:', write_results('zeroshot', {'machine': machine(), 'config': args.config, 'results': results}))


if __name__ == '__main__':
    main()
