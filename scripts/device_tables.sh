#!/usr/bin/env bash
# Trains the backbones and writes the post-hoc tables on an accelerator machine.
#   OUT=/tmp/out DATA=../shared/data bash scripts/device_tables.sh
# Each step logs to $OUT/log.txt and writes its JSON table to $OUT; a failing step does not
# stop the others.
set -u
OUT=${OUT:-/tmp/out}; DATA=${DATA:-../shared/data}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:.
exec > >(tee -a "$OUT/log.txt") 2>&1
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
ml="data=ml-100k,path=$DATA/ml-100k/u.data"
time python3 scripts/posthoc_table.py --config "configs/default.py:$ml" \
  --workdir /tmp/ml_hstu --out "$OUT/ml100k_hstu.json"
time python3 scripts/posthoc_table.py --config "configs/default.py:$ml,model=sasrec" \
  --workdir /tmp/ml_sasrec --methods lowrank --chains=false --out "$OUT/ml100k_sasrec.json"
time python3 scripts/posthoc_table.py --config configs/synthetic_long.py \
  --workdir /tmp/syn1024 --out "$OUT/synthetic1024_hstu.json"
