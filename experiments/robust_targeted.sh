#!/usr/bin/env bash
# The robustness goal against the strong suite (issue 23): robust students distilled against the targeted inner
# adversary (distill.adv_objective=$OBJECTIVE, seeds $SEEDS, from $TEACHER) next to their teacher and robust
# students of the existing recipe ($EXISTING: run directories distilled from the same teacher), in one attack run
# on the same $EPISODES (100) episodes (seeds 20000..): $METHODS (targeted_lookahead: horizon 1, the teacher's local value
# heads as critic where it has them, each victim's target chosen alone: attack.lookahead_critic=true
# attack.lookahead_joint=1, the settings these results were measured with) at eps $EPS, victims $VICTIMS, masking checks if $CHECKS. Then
# experiments/summarise.py pools the students per recipe: clean retention, worst case over the suite and its
# victim subsets, and recovery (the share of the teacher's loss under attack the worst case gets back), mean over
# seeds [95% t-interval over seeds]. Writes experiments/results/robust_targeted_<name>.{md,json} and the attack
# run's own report (per attack, per victim set, bootstrap CIs over episodes) as robust_targeted_<name>_attack.{md,json}.
#
#   TEACHER=runs/zoo/sl/s0 EXISTING=runs/zoo/sl/robust/s0 experiments/robust_targeted.sh
#   SEEDS= NAME=sl_existing TEACHER=... EXISTING=...    # only the existing students (SEEDS empty), in a run of its own;
#   python experiments/summarise.py runs/experiments/robust_targeted/{sl,sl_existing}/attack --out ...   # pools both
#   NAME=spread TEACHER=runs/zoo/spread/teacher/s0 EXISTING=runs/zoo/spread/robust/s0 EPS=0.2 \
#     VICTIMS=all,agent_0 DISTILL=+experiment=spread_robust experiments/robust_targeted.sh
set -euo pipefail
: "${TEACHER:?set TEACHER=<the teacher run or policy directory>}"
NAME=${NAME:-sl}
SEEDS=${SEEDS-0 1 2}
OBJECTIVE=${OBJECTIVE:-targeted_lowest}
DISTILL=${DISTILL:-distill=robust}
EXISTING=${EXISTING:-}
EPS=${EPS:-0.3}
VICTIMS=${VICTIMS:-all,listener_0}
METHODS=${METHODS:-random,fgsm,pgd,targeted_lowest,targeted_lookahead}
# the masking checks add pgd_strong and a collapse run, about half again the cost on a loaded machine: opt-in
CHECKS=${CHECKS:-false}
EPISODES=${EPISODES:-100}
ATTACK=${ATTACK:-}
R=${R:-runs/experiments/robust_targeted/$NAME}
OUT=experiments/results/robust_targeted_$NAME
mkdir -p $R/candidates
for s in $SEEDS; do
  run=$R/candidates/${OBJECTIVE}_s$s
  [ -f $run/policies/student/manifest.json ] || madistill distill $DISTILL distill.adv_objective=$OBJECTIVE \
    distill.teacher=$TEACHER seed=$s logger.progress=false hydra.run.dir=$run
done
# an existing student joins as a run of its own: its policies and its Hydra record (summarise reads its recipe
# and seed there) linked, not copied
for run in $EXISTING; do
  link=$R/candidates/existing_$(echo $run | tr / _)
  mkdir -p $link
  ln -sfn "$(realpath $run)/policies" $link/policies
  ln -sfn "$(realpath $run)/.hydra" $link/.hydra
done
madistill attack $ATTACK attack.policy=$R/candidates "attack.methods=[$METHODS]" "attack.eps=[$EPS]" \
  attack.lookahead_critic=true attack.lookahead_joint=1 \
  "attack.victims=[$VICTIMS]" attack.episodes=$EPISODES attack.checks=$CHECKS logger.progress=false hydra.run.dir=$R/attack
python experiments/summarise.py $R/attack --out $OUT
cp $R/attack/reports/robustness.md ${OUT}_attack.md
cp $R/attack/reports/robustness.json ${OUT}_attack.json
