"""Layering: utils/ imports nothing of the project; main.py and evaluate.py are command lines over the
training/ and evaluation/ libraries, and nothing imports the scripts."""
from __future__ import annotations

import ast
import glob
import os

from tests.conftest import ROOT

PROJECT_PACKAGES = {'configs', 'data', 'evaluate', 'evaluation', 'loss', 'main', 'model', 'training', 'utils'}


def _imports(path: str):
    tree = ast.parse(open(path, encoding='utf-8').read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_utils_imports_nothing_of_the_project():
    for path in glob.glob(os.path.join(ROOT, 'utils', '*.py')):
        found = [m for m in _imports(path) if m.split('.')[0] in PROJECT_PACKAGES - {'utils'}]
        assert not found, f'{os.path.relpath(path, ROOT)} imports {found}'


def test_main_is_the_command_line():
    tree = ast.parse(open(os.path.join(ROOT, 'main.py'), encoding='utf-8').read())
    assert not [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    assert {n.name for n in tree.body if isinstance(n, ast.FunctionDef)} == {'parse_option', 'build_run_config', 'main'}


def test_nothing_imports_the_scripts():
    for path in glob.glob(os.path.join(ROOT, '*', '*.py')) + glob.glob(os.path.join(ROOT, '*.py')):
        if os.sep + 'tests' + os.sep in path or os.sep + '.venv' in path:
            continue
        found = [m for m in _imports(path) if m in ('main', 'evaluate')]
        assert not found, f'{os.path.relpath(path, ROOT)} imports the script(s) {found}'
