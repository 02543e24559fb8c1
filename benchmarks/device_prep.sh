#!/usr/bin/env bash
# Fetches, here, the wheels the accelerator image lacks (it reaches no registry) into .device_wheels/
# (ignored by git; carried by the device call), for its Python 3.12 on x86-64. The image already holds jax
# with CUDA, flax, optax, orbax-checkpoint, tensorstore, tokenizers, tqdm, matplotlib, absl-py, PyYAML,
# psutil, protobuf, etils and cloudpickle; jaxreplay itself runs from the working tree (PYTHONPATH).
#
#   bash benchmarks/device_prep.sh            # then, on the device machine, from the repo root:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
#     .device_wheels/*.whl && PYTHONPATH=$PWD:/tmp/site python3 benchmarks/suite.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .device_wheels && mkdir -p .device_wheels
# ml_collections and grain, and grain's needs the image does not hold (array_record, portpicker).
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .device_wheels \
  ml_collections==1.1.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0
ls -l .device_wheels
