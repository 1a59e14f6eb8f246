#!/usr/bin/env bash
# Clean retention vs robustness of DIGR + adversarial students on simple_spread_v3 (seed 0 each): the
# adversarial budget and weights that were tried. Each student's retention is printed by its distill run
# (500 evaluation episodes); then FGSM and PGD-10 (3 restarts) at eps 0.1/0.2/0.3, victims all, 200
# episodes: runs/experiments/robust_tradeoff/eval/reports/robustness.md. Needs the spread teacher at
# runs/teachers/simple_spread_v3 (madistill train env=simple_spread_v3 hydra.run.dir=runs/teachers/simple_spread_v3).
set -euo pipefail
T=runs/teachers/simple_spread_v3
R=runs/experiments/robust_tradeoff
run() {  # name, overrides...: one run per student under candidates/, which the attack stage reads as a sweep
  local name=$1; shift
  madistill distill distill=robust distill.teacher=$T seed=0 eval.episodes=500 logger.progress=false \
    hydra.run.dir=$R/candidates/$name "$@" | grep -E "keeps"
}
run digr_only distill.adv_weight=0 distill.smooth_weight=0
run robust                                   # adv_weight 1, smooth_weight 0.5, adv_eps 0.3 (conf/distill/robust.yaml)
run robust_eps0.2 distill.adv_eps=0.2
run robust_eps0.1 distill.adv_eps=0.1
run adv1_smooth0 distill.smooth_weight=0
run adv0.5_smooth0 distill.adv_weight=0.5 distill.smooth_weight=0
run adv1_smooth0_eps0.2 distill.smooth_weight=0 distill.adv_eps=0.2
run adv0_smooth0.5 distill.adv_weight=0
run ce_eps0.2 distill.adv_objective=ce distill.adv_eps=0.2
run width112_eps0.2 "student.hidden_sizes=[112,112]" distill.adv_eps=0.2
# the attack stage adds the students' teacher (recorded in their manifests)
madistill attack attack.policy=$R/candidates "attack.methods=[fgsm,pgd]" "attack.eps=[0.1,0.2,0.3]" \
  "attack.victims=[all]" attack.episodes=200 attack.checks=false logger.progress=false hydra.run.dir=$R/eval

# Second round: more DAgger data (rounds), more updates on the same data, collection under attack
# (distill.adv_collect), the greedy-action and combined training objectives, FGSM's point in training (adv_fgsm). Same teacher, seed 0, retention
# over 500 episodes; each student then alone against FGSM and PGD-10 (3 restarts) at eps 0.2, victims all,
# 200 episodes (the teacher is evaluated beside each): runs/experiments/tradeoff2/eval_<name>/reports/.
R2=runs/experiments/tradeoff2
run2() {
  local name=$1; shift
  madistill distill distill=robust distill.teacher=$T seed=0 eval.episodes=500 logger.progress=false \
    hydra.run.dir=$R2/candidates/$name "$@" | grep -E "keeps"
  madistill attack attack.policy=$R2/candidates/$name "attack.methods=[fgsm,pgd]" "attack.eps=[0.2]" \
    "attack.victims=[all]" attack.episodes=200 attack.checks=false logger.progress=false \
    hydra.run.dir=$R2/eval_$name | grep -E "clean .*victims"
}
run2 long8x1000 distill.rounds=8
run2 rounds12 distill.rounds=12
run2 upd3000 distill.updates_per_round=3000
run2 long8x2000_eps0.25 distill.rounds=8 distill.updates_per_round=2000 distill.adv_eps=0.25
run2 long8_eps0.4 distill.rounds=8 distill.adv_eps=0.4
run2 long8_collect0.5 distill.rounds=8 distill.adv_collect=0.5
run2 long8_ce_eps0.2 distill.rounds=8 distill.adv_objective=ce distill.adv_eps=0.2
run2 long8_both distill.rounds=8 distill.adv_objective=both
run2 long8_fgsm distill.rounds=8 distill.adv_fgsm=true
run2 long8_both_fgsm distill.rounds=8 distill.adv_fgsm=true distill.adv_objective=both
