#!/usr/bin/env bash
# The rlhf recipe (recipes/rlhf.yaml) as plain `alignkit train` calls: SFT, a reward model on the SFT
# policy, then PPO from the SFT policy scored by that reward model. `alignkit recipe rlhf` runs the same
# stages and also skips finished ones, resumes an interrupted one, and writes DIR/report.md with plots.
#   scripts/recipe_rlhf.sh [DIR [overrides for every stage ...]]
#   scripts/recipe_rlhf.sh runs/rlhf-tone model=tiny train.max_steps=5
set -euo pipefail
DIR=${1:-runs/recipe-rlhf}
shift || true
SHARED=(data=sentiment train.save_every=10)

alignkit train "${SHARED[@]}" method=sft train.max_steps=30 "$@" run.dir="$DIR/sft"
alignkit train "${SHARED[@]}" method=rm train.max_steps=30 policy.init="$DIR/sft" "$@" run.dir="$DIR/rm"
alignkit train "${SHARED[@]}" method=ppo train.max_steps=16 train.batch_size=8 train.lr=2.0e-4 \
    method.ppo_epochs=2 method.max_new_tokens=24 method.sample_every=2 policy.init="$DIR/sft" reward.run="$DIR/rm" "$@" run.dir="$DIR/ppo"
alignkit eval run="$DIR/sft"   # gold score of SFT vs the base, KL to the base
alignkit eval run="$DIR/ppo"   # gold score of PPO vs SFT (its reference), KL to SFT
