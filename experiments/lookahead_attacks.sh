#!/usr/bin/env bash
# The lookahead target choice next to targeted_lowest and the default suite's per-step attacks on a
# speaker-listener teacher, in one attack run: random, FGSM, PGD-10 (3 restarts, KL), targeted_lowest and
# targeted_lookahead (attack.lookahead_horizon=$HORIZON), eps 0.3 and 1.0, victims all and listener_0, $EPISODES
# episodes from seed 20000, with the masking and objective checks. The lookahead adds the critic's value at the
# horizon and chooses each victim's target alone (attack.lookahead_critic=true, attack.lookahead_joint=1: the
# results files docs/attacks.md quotes); CRITIC=false and JOINT=64 give the suite's defaults. The teacher is
# experiments/targeted_attacks.sh's (trained here if missing). Report and JSON (returns, 95% CIs, seconds per
# evaluation, clean included) go to experiments/results/lookahead_attacks_<name>_h<horizon>[_joint<j>][_nocritic].{md,json}.
#
#   experiments/lookahead_attacks.sh                          # 300k agent-steps teacher, seed 0, horizon 1
#   HORIZON=3 experiments/lookahead_attacks.sh                # a longer lookahead
#   CRITIC=false JOINT=64 experiments/lookahead_attacks.sh    # the suite's lookahead
#   STEPS=1500000 NAME=default experiments/lookahead_attacks.sh   # the env's default teacher budget
set -euo pipefail
STEPS=${STEPS:-300000}
NAME=${NAME:-300k}
HORIZON=${HORIZON:-1}
EPISODES=${EPISODES:-100}
CRITIC=${CRITIC:-true}
JOINT=${JOINT:-1}
TAG=h$HORIZON$([ "$JOINT" = 1 ] || echo _joint$JOINT)$([ "$CRITIC" = true ] || echo _nocritic)
R=runs/experiments/targeted_attacks/$NAME
OUT=experiments/results/lookahead_attacks_${NAME}_$TAG
[ -d $R/teacher/policies ] || madistill train seed=0 teacher.total_agent_steps=$STEPS env.num_workers=0 \
  logger.progress=false hydra.run.dir=$R/teacher
madistill attack attack.policy=$R/teacher "attack.methods=[random,fgsm,pgd,targeted_lowest,targeted_lookahead]" \
  "attack.eps=[0.3,1.0]" "attack.victims=[all,listener_0]" attack.episodes=$EPISODES attack.lookahead_horizon=$HORIZON \
  attack.lookahead_critic=$CRITIC attack.lookahead_joint=$JOINT \
  env.num_workers=0 logger.progress=false hydra.run.dir=$R/lookahead_$TAG
cp $R/lookahead_$TAG/reports/robustness.md $OUT.md
cp $R/lookahead_$TAG/reports/robustness.json $OUT.json
