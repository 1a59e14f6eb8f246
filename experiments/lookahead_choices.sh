#!/usr/bin/env bash
# The suite's lookahead (targeted_lookahead) on the listener of a speaker-listener teacher with one setting
# changed from the defaults, to compare with the default's cells in experiments/results/strong_suite_<name>.json:
# critic = attack.lookahead_critic=true (the critic's value at the horizon added), h3 = attack.lookahead_horizon=3,
# restarts3 = attack.lookahead_restarts=3 (a third of the default forcing restarts, as many as the suite's PGD). Eps 0.3 and 1.0, 100 episodes (seeds 20000..20099),
# greedy; one run per variant, at once; a variant whose run has a report already is not run again. Reports and
# JSON go to experiments/results/lookahead_choices_<name>_<variant>.{md,json}.
#
#   experiments/lookahead_choices.sh runs/zoo/sl/s0/policies/teacher sl_s0
set -euo pipefail
POLICY=$1
NAME=$2
declare -A VARIANTS=([critic]="attack.lookahead_critic=true" [h3]="attack.lookahead_horizon=3" [restarts3]="attack.lookahead_restarts=3")
for v in "${!VARIANTS[@]}"; do
  R=runs/experiments/lookahead_choices/${NAME}_$v
  [ -f $R/reports/robustness.json ] && continue
  madistill attack attack.policy=$POLICY "attack.methods=[targeted_lookahead]" "attack.eps=[0.3,1.0]" \
    "attack.victims=[listener_0]" attack.episodes=100 attack.checks=false ${VARIANTS[$v]} env.num_workers=0 \
    logger.progress=false logger.figures=false hydra.run.dir=$R > /dev/null &
done
wait
for v in "${!VARIANTS[@]}"; do
  R=runs/experiments/lookahead_choices/${NAME}_$v
  cp $R/reports/robustness.md experiments/results/lookahead_choices_${NAME}_$v.md
  cp $R/reports/robustness.json experiments/results/lookahead_choices_${NAME}_$v.json
done
