"""Configuration loading: defaults, YAML files with `BASE:` inheritance, and `KEY VALUE` overrides.

yacs alone rejects `MLP_RATIO: 4` against a float default and reports a bad key without the file it came
from; here every value is checked against the default's type (ints widen to floats, lists/tuples
interchange) and an unknown key or a wrongly typed value raises `ConfigError` naming the key and source.
The merged result is then checked against the ranges and choices of configs/validation.py.
"""
from __future__ import annotations

import ast
import difflib
import os
from typing import Any, Iterable, Optional, Sequence

import yaml
from yacs.config import CfgNode as CN

from .defaults import get_defaults
from .validation import validate_config

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))

__all__ = ['CN', 'CONFIG_DIR', 'ConfigError', 'load_config', 'merge_file', 'merge_opts', 'merge_dict',
           'validate_config']


class ConfigError(ValueError):
    """A configuration file or override that does not fit the config tree."""


def _parse_literal(text: str) -> Any:
    # Same rule as yacs: a Python literal when it parses as one, else the string itself.
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _type_name(value: Any) -> str:
    return type(value).__name__


def _coerce(key: str, default: Any, value: Any, source: str) -> Any:
    if default is None or value is None:
        return value
    if isinstance(value, str) and not isinstance(default, str):
        value = _parse_literal(value)
        if isinstance(default, bool) and isinstance(value, str) and value.lower() in ('true', 'false'):
            value = value.lower() == 'true'
    if isinstance(default, bool) or isinstance(value, bool):
        if type(default) is type(value):
            return value
    elif isinstance(default, float) and isinstance(value, int):
        return float(value)
    elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        if default:
            value = [_coerce(f'{key}[{i}]', default[0], v, source) for i, v in enumerate(value)]
        return type(default)(value)
    elif type(default) is type(value):
        return value
    raise ConfigError(
        f'{source}: config key {key} expects {_type_name(default)} (default {default!r}), '
        f'got {_type_name(value)} {value!r}')


def _unknown_key(node: CN, key: str, full_key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(node.keys()), n=1)
    hint = f' (did you mean {full_key[:-len(key)]}{close[0]}?)' if close else ''
    return ConfigError(f'{source}: unknown config key {full_key}{hint}')


def merge_dict(config: CN, updates: dict, source: str, prefix: str = '') -> None:
    """Merge a nested dict into `config` in place, checking every key and value type."""
    for key, value in updates.items():
        full_key = prefix + str(key)
        if key not in config:
            if not config.is_new_allowed():
                raise _unknown_key(config, key, full_key, source)
            config[key] = CN(value, new_allowed=True) if isinstance(value, dict) else value
            continue
        if isinstance(config[key], CN):
            if not isinstance(value, dict):
                raise ConfigError(f'{source}: config key {full_key} is a section; got {value!r}')
            merge_dict(config[key], value, source, full_key + '.')
        else:
            config[key] = _coerce(full_key, config[key], value, source)


def merge_file(config: CN, cfg_file: str) -> None:
    """Merge a YAML file (after the files its `BASE:` list names, relative to it) into `config`."""
    if not os.path.isfile(cfg_file):
        raise ConfigError(f'config file not found: {cfg_file}')
    with open(cfg_file) as f:
        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f'{cfg_file}: expected a mapping of config keys at the top level')
    for base in loaded.get('BASE') or []:
        if base:
            merge_file(config, os.path.join(os.path.dirname(cfg_file), base))
    merge_dict(config, loaded, cfg_file)


def merge_opts(config: CN, opts: Sequence[str]) -> None:
    """Merge `KEY VALUE` pairs such as `DATA.BATCH_SIZE 32 MODEL.IMAGE_ENCODER.SWIN.DEPTHS [1,1,2,1]`."""
    if len(opts) % 2:
        raise ConfigError(f'--opts takes KEY VALUE pairs; got an odd number of items: {list(opts)}')
    for full_key, text in zip(opts[0::2], opts[1::2]):
        *parents, leaf = full_key.split('.')
        update: dict = {leaf: _parse_literal(text) if isinstance(text, str) else text}
        for parent in reversed(parents):
            update = {parent: update}
        merge_dict(config, update, '--opts')


def load_config(cfg_file: Optional[str] = None, opts: Optional[Iterable[str]] = None,
                freeze: bool = True) -> CN:
    """Defaults, then `cfg_file` (with its bases), then `opts` overrides, validated as a whole (a file may
    set a value that only makes sense with a later override, such as a shorter DEPTHS with NUM_HEADS)."""
    config = get_defaults()
    if cfg_file:
        merge_file(config, cfg_file)
    if opts:
        merge_opts(config, list(opts))
    validate_config(config)
    if freeze:
        config.freeze()
    return config
