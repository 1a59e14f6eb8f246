#!/usr/bin/env bash
# Targeted vs untargeted attacks on a speaker-listener teacher, side by side in one attack run: random, FGSM,
# PGD-10 (3 restarts, KL) and the targeted PGDs (targeted_random, targeted_lowest), eps 0.3 and 1.0, victims
# all and listener_0, 100 episodes (seeds 20000..20099), with the masking and objective checks. The report
# and JSON (returns, 95% CIs, worst case and the subset it came from, seconds per evaluation) are copied to
# experiments/results/targeted_attacks_<name>[_candidates<k>].{md,json}.
#
#   experiments/targeted_attacks.sh                   # teacher at 300k agent-steps (a few minutes), seed 0
#   CANDIDATES=2 experiments/targeted_attacks.sh      # the same with attack.target_candidates=2
#   STEPS=1500000 NAME=default experiments/targeted_attacks.sh   # the env's default budget (1.5M)
set -euo pipefail
STEPS=${STEPS:-300000}
NAME=${NAME:-300k}
CANDIDATES=${CANDIDATES:-4}
R=runs/experiments/targeted_attacks/$NAME
OUT=experiments/results/targeted_attacks_$NAME$([ "$CANDIDATES" = 4 ] || echo _candidates$CANDIDATES)
[ -d $R/teacher/policies ] || madistill train seed=0 teacher.total_agent_steps=$STEPS env.num_workers=0 \
  logger.progress=false hydra.run.dir=$R/teacher
madistill attack attack.policy=$R/teacher "attack.methods=[random,fgsm,pgd,targeted_random,targeted_lowest]" \
  "attack.eps=[0.3,1.0]" "attack.victims=[all,listener_0]" attack.episodes=100 attack.target_candidates=$CANDIDATES \
  env.num_workers=0 logger.progress=false hydra.run.dir=$R/attack_candidates$CANDIDATES
cp $R/attack_candidates$CANDIDATES/reports/robustness.md $OUT.md
cp $R/attack_candidates$CANDIDATES/reports/robustness.json $OUT.json
