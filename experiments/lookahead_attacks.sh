#!/usr/bin/env bash
# The lookahead target choice next to targeted_lowest and the default suite's per-step attacks on a
# speaker-listener teacher, in one attack run: random, FGSM, PGD-10 (3 restarts, KL), targeted_lowest and
# targeted_lookahead (attack.lookahead_horizon=$HORIZON), eps 0.3 and 1.0, victims all and listener_0, $EPISODES
# episodes from seed 20000, with the masking and objective checks. The teacher is experiments/targeted_attacks.sh's
# (trained here if missing). Report and JSON (returns, 95% CIs, seconds per evaluation, clean included) go to
# experiments/results/lookahead_attacks_<name>_h<horizon>.{md,json}.
#
#   experiments/lookahead_attacks.sh                          # 300k agent-steps teacher, seed 0, horizon 1
#   HORIZON=3 experiments/lookahead_attacks.sh                # a longer lookahead
#   STEPS=1500000 NAME=default experiments/lookahead_attacks.sh   # the env's default teacher budget
set -euo pipefail
STEPS=${STEPS:-300000}
NAME=${NAME:-300k}
HORIZON=${HORIZON:-1}
EPISODES=${EPISODES:-100}
R=runs/experiments/targeted_attacks/$NAME
OUT=experiments/results/lookahead_attacks_${NAME}_h$HORIZON
[ -d $R/teacher/policies ] || madistill train seed=0 teacher.total_agent_steps=$STEPS env.num_workers=0 \
  logger.progress=false hydra.run.dir=$R/teacher
madistill attack attack.policy=$R/teacher "attack.methods=[random,fgsm,pgd,targeted_lowest,targeted_lookahead]" \
  "attack.eps=[0.3,1.0]" "attack.victims=[all,listener_0]" attack.episodes=$EPISODES attack.lookahead_horizon=$HORIZON \
  env.num_workers=0 logger.progress=false hydra.run.dir=$R/lookahead_h$HORIZON
cp $R/lookahead_h$HORIZON/reports/robustness.md $OUT.md
cp $R/lookahead_h$HORIZON/reports/robustness.json $OUT.json
