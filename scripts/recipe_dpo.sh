#!/usr/bin/env bash
# The dpo recipe (recipes/dpo.yaml) as plain `alignkit train` calls: SFT, then DPO starting from the
# SFT policy (policy.init). `alignkit recipe dpo` runs the same stages and also skips finished ones,
# resumes an interrupted one, and writes DIR/report.md with plots.
#   scripts/recipe_dpo.sh [DIR [overrides for every stage ...]]
#   scripts/recipe_dpo.sh runs/tone model=tiny train.max_steps=5
set -euo pipefail
DIR=${1:-runs/recipe-dpo}
shift || true
SHARED=(data=sentiment train.save_every=10)

alignkit train "${SHARED[@]}" method=sft train.max_steps=30 "$@" run.dir="$DIR/sft"
alignkit train "${SHARED[@]}" method=dpo train.max_steps=30 train.lr=2.0e-4 policy.init="$DIR/sft" "$@" run.dir="$DIR/dpo"
alignkit eval run="$DIR/sft"   # gold score of SFT vs the base, KL to the base
alignkit eval run="$DIR/dpo"   # gold score of DPO vs SFT (its reference), KL to SFT
