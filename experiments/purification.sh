#!/usr/bin/env bash
# The purification defence on a speaker-listener teacher, next to its robust (adversarially distilled) student.
# Trains a purifier on the teacher's clean observations (madistill purify, seed 0), then attacks, each with
# random, FGSM, PGD-10 (3 restarts, KL) and targeted_lowest (4 candidates) at eps 0.3 and 1.0 on victims all
# and listener_0, 100 episodes (seeds 20000..20099), greedy actions, with the gradient-masking checks (2x PGD
# at eps 1.0 and the objective-level probe with SPSA; no collapse run: collapse_eps=0):
#   robust   the teacher alone and its robust student (one attack run: the teacher is added to its student)
#   ignore   teacher + purifier, attacks crafted on the teacher alone (unaware of the purifier)
#   through  teacher + purifier, attacks through the purifier (adaptive, white-box)
#   bpda     teacher + purifier, attacks through the purifier's forward pass with identity gradients (BPDA)
#   eot      teacher + a randomised purifier (purify=randomized: noise before denoising), attacks through it
#            averaging each head over $EOT draws of its noise (EOT)
#   eotcheck_<gradient>_<samples>   the randomised purifier, targeted_lowest at eps 1.0 on listener_0 only (checks
#            off), attacked with purify.gradient=<gradient> and purify.eot_samples=<samples>: does more EOT find more?
#            VIEWS="eotcheck_through_1 eotcheck_through_16 eotcheck_through_64 eotcheck_bpda_4" experiments/purification.sh
# Then experiments/purification_table.py writes experiments/results/purification_<name>.{md,json}.
#
#   experiments/purification.sh                                # runs/zoo/sl/s0's teacher, runs/zoo/sl/robust/s0
#   VIEWS="robust through" experiments/purification.sh         # some of the runs (e.g. two lanes in parallel)
#   TEACHER=<run> ROBUST=<distill run> NAME=<name> experiments/purification.sh
set -euo pipefail
TEACHER=${TEACHER:-runs/zoo/sl/s0}
ROBUST=${ROBUST:-runs/zoo/sl/robust/s0}
NAME=${NAME:-sl_s0}
EPISODES=${EPISODES:-100}
VIEWS=${VIEWS:-"robust ignore through bpda eot"}
EOT=${EOT:-4}
R=runs/experiments/purification/$NAME
ATTACK=("attack.methods=[random,fgsm,pgd,targeted_lowest]" "attack.eps=[0.3,1.0]" "attack.victims=[all,listener_0]"
        attack.episodes=$EPISODES attack.collapse_eps=0 env.num_workers=0 logger.progress=false)
[ -f $R/purifier/purifier/purifier.json ] || madistill purify purify.teacher=$TEACHER seed=0 env.num_workers=0 \
  logger.progress=false hydra.run.dir=$R/purifier
for view in $VIEWS; do
  if [ "$view" = robust ]; then
    madistill attack attack.policy=$ROBUST/policies/student "${ATTACK[@]}" hydra.run.dir=$R/attack_robust
  elif [ "$view" = eot ]; then
    [ -f $R/purifier_randomized/purifier/purifier.json ] || madistill purify purify=randomized purify.teacher=$TEACHER \
      seed=0 env.num_workers=0 logger.progress=false hydra.run.dir=$R/purifier_randomized
    madistill attack attack.policy=$TEACHER/policies/teacher "${ATTACK[@]}" purify.purifier=$R/purifier_randomized \
      purify.eot_samples=$EOT hydra.run.dir=$R/attack_eot
  elif [[ $view == eotcheck_* ]]; then  # eotcheck_<gradient>_<samples>: the randomised purifier, one cell
    IFS=_ read -r _ gradient samples <<< "$view"
    madistill attack attack.policy=$TEACHER/policies/teacher "attack.methods=[targeted_lowest]" "attack.eps=[1.0]" \
      "attack.victims=[listener_0]" attack.episodes=$EPISODES attack.checks=false env.num_workers=0 logger.progress=false \
      purify.purifier=$R/purifier_randomized purify.gradient=$gradient purify.eot_samples=$samples \
      hydra.run.dir=$R/attack_$view
  else
    madistill attack attack.policy=$TEACHER/policies/teacher "${ATTACK[@]}" purify.purifier=$R/purifier \
      purify.gradient=$view hydra.run.dir=$R/attack_$view
  fi
done
python experiments/purification_table.py $R experiments/results/purification_$NAME
