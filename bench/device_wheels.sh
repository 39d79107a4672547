#!/usr/bin/env bash
# Downloads, here, the wheels of the requirements that the lent H200 machine's image lacks, into .whl/
# (git-ignored): that image has Python 3.12 with torch 2.11, torchvision, timm, transformers, tokenizers,
# tensorboard, matplotlib, pillow, tqdm, regex and pyyaml, but not yacs, termcolor, ftfy or webdataset, and
# it cannot download. bench/device_check.sh installs whatever lies in .whl/ before it starts.
#
#   bash bench/device_wheels.sh    # then: run(command="bash bench/device_check.sh", carry=[".whl"])
#
# Under 1 MB in all; the versions are the ones the CPU suite ran with.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download --isolated --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .whl yacs==0.1.8 termcolor==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 webdataset==1.0.2 braceexpand==0.1.7
ls .whl
