#!/usr/bin/env bash
# Distil the miniature teacher (assets/mini/teacher) the way Magic 1-For-1 does, on a 2-core CPU:
#   1. CFG distillation: a student with a guidance input (both cores)
#   2. DMD2 from that student at guidance input $GUIDANCE: 4-step TI2V (the shipped student) and 4-step T2V (Fig. 5),
#      one core each, side by side
#   3. DMD2 8-step TI2V (Table 1)
# Runs resume from runs/<name>/ (checkpoints) if restarted. Ship and measure afterwards (README, "Distillation").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/ensure_venv.sh
PY=.venv/bin/python
CFG_MIN=${CFG_MIN:-15}
DMD_MIN=${DMD_MIN:-55}
DMD8_MIN=${DMD8_MIN:-25}
GUIDANCE=${GUIDANCE:-3}  # w = 3 matches the teacher's two-pass CFG scale 4 (= 1 + w)
COMMON=(--preset-dir assets/mini --eval-every 100 --eval-clips 20)

$PY -m magic_demo train distill cfg "${COMMON[@]}" --out runs/cfg --export runs/cfg/student --minutes "$CFG_MIN" \
    --guidance "$GUIDANCE" \
    --threads 2
DMD=(dmd2 "${COMMON[@]}" --base runs/cfg/student --guidance "$GUIDANCE" --threads 1)
$PY -m magic_demo train distill "${DMD[@]}" --steps 4 --out runs/dmd2 --export runs/dmd2/student \
    --minutes "$DMD_MIN" > runs/dmd2.log 2>&1 &
$PY -m magic_demo train distill "${DMD[@]}" --steps 4 --t2v --out runs/dmd2_t2v --export runs/dmd2_t2v/student \
    --minutes "$DMD_MIN" > runs/dmd2_t2v.log 2>&1
wait
$PY -m magic_demo train distill "${DMD[@]}" --threads 2 --steps 8 --out runs/dmd2_8 --export runs/dmd2_8/student \
    --minutes "$DMD8_MIN"
