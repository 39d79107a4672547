from .image_encoder import IMAGE_ENCODERS, build_image_encoder, register_image_encoder
from .text_encoder import TextTransformer, build_text_encoder
from .tokenizer import build_tokenizer, tokenize
from .unicl import TokenBatch, UniCLModel, build_unicl_model

__all__ = ['IMAGE_ENCODERS', 'TextTransformer', 'TokenBatch', 'UniCLModel', 'build_image_encoder',
           'build_text_encoder', 'build_tokenizer', 'build_unicl_model', 'register_image_encoder',
           'tokenize']
