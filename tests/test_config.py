import os

import pytest

from configs import CONFIG_DIR, ConfigError, load_config


def _write(path, text):
    with open(path, 'w') as f:
        f.write(text)
    return str(path)


@pytest.mark.parametrize('name, embed, depths, heads, drop_path', [
    ('unicl_swin_tiny.yaml', 96, [2, 2, 6, 2], [3, 6, 12, 24], 0.2),
    ('unicl_swin_base.yaml', 128, [2, 2, 18, 2], [4, 8, 16, 32], 0.5),
])
def test_official_configs_load(name, embed, depths, heads, drop_path):
    cfg = load_config(os.path.join(CONFIG_DIR, name))
    swin = cfg.MODEL.IMAGE_ENCODER.SWIN
    assert (swin.EMBED_DIM, swin.DEPTHS, swin.NUM_HEADS, swin.WINDOW_SIZE) == (embed, depths, heads, 7)
    assert cfg.MODEL.IMAGE_ENCODER.DROP_PATH_RATE == drop_path
    text = cfg.MODEL.TEXT_ENCODER
    assert (text.NAME, text.WIDTH, text.HEADS, text.LAYERS, text.CONTEXT_LENGTH) == ('transformer', 512, 8, 12, 77)
    assert cfg.MODEL.DIM_PROJECTION == 512


def test_official_tree_keys_present():
    cfg = load_config()
    for key in ['DATA.ZIP_MODE', 'DATA.CACHE_MODE', 'MODEL.LABEL_SMOOTHING', 'MODEL.SPEC',
                'MODEL.IMAGE_ENCODER.SWIN.QK_SCALE', 'MODEL.IMAGE_ENCODER.FOCAL.FOCAL_FACTORS',
                'MODEL.TEXT_ENCODER.AUTOGRESSIVE', 'TRAIN.LR_SCHEDULER.DECAY_RATE', 'TRAIN.OPTIMIZER.BETAS',
                'AUG.MIXUP_MODE', 'TEST.CROP', 'AMP_OPT_LEVEL', 'THROUGHPUT_MODE', 'EVAL_MODE', 'SAVE_FREQ']:
        node = cfg
        for part in key.split('.'):
            node = node[part]


def test_base_inheritance_and_opts(tmp_path):
    _write(tmp_path / 'base.yaml', 'DATA:\n  BATCH_SIZE: 16\n  IMG_SIZE: 96\nTRAIN:\n  BASE_LR: 1e-3\n')
    child = _write(tmp_path / 'child.yaml', "BASE: ['base.yaml']\nDATA:\n  BATCH_SIZE: 8\n"
                                            "MODEL:\n  IMAGE_ENCODER:\n    SWIN:\n      MLP_RATIO: 4\n")
    cfg = load_config(child, ['TRAIN.EPOCHS', '3', 'MODEL.IMAGE_ENCODER.SWIN.DEPTHS', '[1, 1, 2, 1]',
                              'TRAIN.AUTO_RESUME', 'False', 'MODEL.SPEC.ANYTHING', '5'])
    assert cfg.DATA.BATCH_SIZE == 8 and cfg.DATA.IMG_SIZE == 96
    assert cfg.TRAIN.BASE_LR == pytest.approx(1e-3) and isinstance(cfg.TRAIN.BASE_LR, float)
    assert isinstance(cfg.MODEL.IMAGE_ENCODER.SWIN.MLP_RATIO, float)
    assert cfg.TRAIN.EPOCHS == 3 and cfg.MODEL.IMAGE_ENCODER.SWIN.DEPTHS == [1, 1, 2, 1]
    assert cfg.TRAIN.AUTO_RESUME is False and cfg.MODEL.SPEC.ANYTHING == 5
    assert cfg.is_frozen()


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    bad = _write(tmp_path / 'bad.yaml', 'MODEL:\n  IMAGE_ENCODER:\n    SWIN:\n      EMBED_DIMS: 96\n')
    with pytest.raises(ConfigError, match=r'bad\.yaml.*MODEL\.IMAGE_ENCODER\.SWIN\.EMBED_DIMS.*EMBED_DIM\?'):
        load_config(bad)


def test_unknown_key_in_opts():
    with pytest.raises(ConfigError, match=r'--opts.*TRAIN\.BASELR'):
        load_config(None, ['TRAIN.BASELR', '0.1'])


@pytest.mark.parametrize('key, value, expected', [
    ('DATA.BATCH_SIZE', 'many', 'DATA.BATCH_SIZE expects int'),
    ('MODEL.IMAGE_ENCODER.SWIN.DEPTHS', '[1, "two"]', r'MODEL.IMAGE_ENCODER.SWIN.DEPTHS\[1\] expects int'),
    ('TRAIN.AUTO_RESUME', '1', 'TRAIN.AUTO_RESUME expects bool'),
    ('MODEL.IMAGE_ENCODER', '3', 'MODEL.IMAGE_ENCODER is a section'),
])
def test_wrong_type_names_key(key, value, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [key, value])


def test_odd_opts_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match='pairs'):
        load_config(None, ['DATA.BATCH_SIZE'])
    with pytest.raises(ConfigError, match='not found'):
        load_config(str(tmp_path / 'nope.yaml'))


def test_every_shipped_config_loads_with_known_sources():
    from data import SOURCE_TYPES
    names = sorted(n for n in os.listdir(CONFIG_DIR) if n.endswith('.yaml'))
    assert len(names) >= 15
    for name in names:
        cfg = load_config(os.path.join(CONFIG_DIR, name))
        assert all(source['TYPE'] in SOURCE_TYPES for source in cfg.DATA.SOURCES), name


def test_flags_go_through_the_checked_merge():
    """--batch-size and friends set config keys with the same type checks as the file and --opts."""
    import main
    args = main.parse_option(['--cfg', os.path.join(CONFIG_DIR, 'unicl_tiny.yaml'), '--batch-size', '6',
                              '--accumulation-steps', '2', '--use-checkpoint', '--output', 'out'])
    config = main.build_run_config(args)
    assert (config.DATA.BATCH_SIZE, config.TRAIN.ACCUMULATION_STEPS, config.TRAIN.USE_CHECKPOINT) == (6, 2, True)
    assert config.OUTPUT == os.path.join('out', 'unicl_tiny', 'default')
    args.batch_size = 'six'  # as a caller of build_run_config (not argparse) might pass it
    with pytest.raises(ConfigError, match='--batch-size: config key DATA.BATCH_SIZE expects int'):
        main.build_run_config(args)
