#!/usr/bin/env bash
# Every detector, convention and reference set on one trained default run (experiments/detectors_default/README.md).
#   bash experiments/detectors_default/run.sh outputs/default        # a finished default run
# Each setting gets its own run directory under outputs/detectors_default/<setting>, holding copies of
# the base run's data/poison/pretrain markers and plan (pretraining is skipped, the checkpoint is the
# base run's), and re-runs extract + reduce with its overrides. Then the table is collected.
set -euo pipefail
BASE=$(realpath "${1:?usage: run.sh <finished default run dir>}")
OUT=${OUT:-outputs/detectors_default}
PY=${PY:-.venv/bin/python}
ALL='detector=[dao,slof,kdist,lid,iforest,clipscore,abl]'
NB='detector=[dao,slof,kdist,lid,iforest]'
declare -A SETTINGS=(
  [batch_textbook]="$ALL"
  [batch_faithful]="detector=[dao,slof,kdist,lid] detector.dao.convention=faithful detector.slof.convention=faithful detector.kdist.convention=faithful detector.lid.convention=faithful"
  [batch_1024]="$NB scoring.batch_size=1024"
  [batch_image_text]="detector=[dao,slof,kdist,lid] scoring.features=image+text"
  [bank_train_2000]="$NB scoring.reference=bank scoring.bank_size=2000"
  [bank_test_2000]="$NB scoring.reference=bank scoring.bank_source=test scoring.bank_size=2000"
  [global_flat]="$NB scoring.reference=global"
  [cd_20_steps]="detector=[cd] detector.cd.steps=20"
)
ORDER=(batch_textbook batch_faithful batch_1024 batch_image_text bank_train_2000 bank_test_2000 global_flat cd_20_steps)
for s in "${ORDER[@]}"; do
  d="$OUT/$s"
  if [[ -f "$d/metrics.json" && -f "$d/stages/reduce.json" ]]; then echo "== $s: done"; continue; fi
  echo "== $s: ${SETTINGS[$s]}"
  mkdir -p "$d/stages" "$d/checkpoints"
  cp "$BASE"/{data.json,data_index.h5,poison_plan.json} "$d/"
  cp "$BASE"/stages/{data,poison,pretrain}.json "$d/stages/"
  [[ -d "$BASE/attack" ]] && cp -r "$BASE/attack" "$d/"
  [[ -d "$BASE/sample_loss" ]] && cp -r "$BASE/sample_loss" "$d/"
  ln -sf "$BASE/checkpoints/latest.pt" "$d/checkpoints/latest.pt"
  # shellcheck disable=SC2086
  $PY -m clipbd.run hydra.run.dir="$d" 'stages=[data,poison,pretrain,extract,reduce]' ${SETTINGS[$s]}
done
$PY experiments/detectors_default/collect.py "$OUT" --base "$BASE" --out experiments/detectors_default
