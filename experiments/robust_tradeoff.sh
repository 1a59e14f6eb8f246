#!/usr/bin/env bash
# Clean retention vs robustness of DIGR + adversarial students on simple_spread_v3 (seed 0 each): the
# adversarial budget and weights that were tried. Each student's retention is printed by its distill run
# (500 evaluation episodes); then FGSM and PGD-10 (3 restarts) at eps 0.1/0.2/0.3, victims all, 200
# episodes: runs/experiments/robust_tradeoff/eval/reports/robustness.md. Needs the spread teacher at
# runs/teachers/simple_spread_v3 (madistill train env=simple_spread_v3 hydra.run.dir=runs/teachers/simple_spread_v3).
set -euo pipefail
T=runs/teachers/simple_spread_v3
distil() {  # run dir, seed, overrides...: one robust student of the spread teacher (retention over 500 episodes)
  local dir=$1 seed=$2; shift 2
  madistill distill distill=robust distill.teacher=$T seed=$seed eval.episodes=500 logger.progress=false \
    hydra.run.dir=$dir "$@" | grep -E "keeps"
}
fgsm_pgd() {  # policy, attack run dir, eps list, overrides...: FGSM and PGD-10 (3 restarts), victims all, 200 episodes
  local policy=$1 dir=$2 eps=$3; shift 3
  madistill attack attack.policy=$policy "attack.methods=[fgsm,pgd]" "attack.eps=[$eps]" "attack.victims=[all]" \
    attack.episodes=200 attack.checks=false logger.progress=false hydra.run.dir=$dir "$@" | grep -E "clean .*victims"
}
R=runs/experiments/robust_tradeoff
run() {  # name, overrides...: one run per student under candidates/, which the attack stage reads as a sweep
  local name=$1; shift
  distil $R/candidates/$name 0 "$@"
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
fgsm_pgd $R/candidates $R/eval 0.1,0.2,0.3

# Second round: more DAgger data (rounds), more updates on the same data, collection under attack
# (distill.adv_collect), the greedy-action and combined training objectives, FGSM's point in training (adv_fgsm). Same teacher, seed 0, retention
# over 500 episodes; each student then alone against FGSM and PGD-10 (3 restarts) at eps 0.2, victims all,
# 200 episodes (the teacher is evaluated beside each): runs/experiments/tradeoff2/eval_<name>/reports/.
R2=runs/experiments/tradeoff2
run2() {
  local name=$1; shift
  distil $R2/candidates/$name 0 "$@"
  fgsm_pgd $R2/candidates/$name $R2/eval_$name 0.2
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

# Third round: 3 seeds per recipe (one seed's retention moves by 2-3 points between seeds), all on 8 rounds:
# an annealed learning rate (distill.lr_final), a weight average as the saved student (distill.weight_average),
# a teacher-sized student, a sharper teacher target (temperature 0.5), a stronger training PGD (7 steps).
# Each student against FGSM and PGD-10 (3 restarts) at eps 0.2, victims all, 200 episodes; then one table,
# mean over seeds [95% t-interval]: python experiments/tradeoff_summary.py runs/experiments/tradeoff3
R3=runs/experiments/tradeoff3
run3() {
  local name=$1; shift
  for s in 0 1 2; do
    distil $R3/candidates/${name}_s$s $s env.num_workers=0 "$@"
    fgsm_pgd $R3/candidates/${name}_s$s $R3/eval_${name}_s$s 0.2 env.num_workers=0
  done
}
run3 r8 distill.rounds=8
run3 r8_cos distill.rounds=8 distill.lr_final=0.05
run3 r8_ema distill.rounds=8 distill.weight_average=0.999
run3 r8_w256 distill.rounds=8 "student.hidden_sizes=[256,256]"
run3 r8_t0.5 distill.rounds=8 distill.temperature=0.5
run3 r8_adv7 distill.rounds=8 distill.adv_steps=7
python experiments/tradeoff_summary.py $R3

# Where the loss comes from: the same attacks confined to one kind of feature (attack.exclude keeps the rest),
# on the teacher and the seed-0 student of r8 (the attack stage adds the teacher)
for spec in "landmarks:[0,1,2,3,10,11,12,13,14,15,16,17]" "others:[0,1,2,3,4,5,6,7,8,9,14,15,16,17]" \
            "self:[4,5,6,7,8,9,10,11,12,13,14,15,16,17]"; do
  fgsm_pgd $R3/candidates/r8_s0 $R3/features_${spec%%:*} 0.2 env.num_workers=0 "+attack.exclude.agent=${spec#*:}"
done

# The closest recipe against the whole suite (as experiments/robustness.py runs it: eps 0.2, victims all and
# agent_0, 100 episodes with the suite's seeds, masking checks on), and two with more DAgger data:
# python experiments/tradeoff_summary.py runs/experiments/tradeoff3 --prefix suite_
suite() {  # recipe, overrides...: seeds ${SEEDS:-0 1 2}, students of teacher $T under ${ROOT:-$R3}
  local name=$1 root=${ROOT:-$R3}; shift
  for s in ${SEEDS:-0 1 2}; do
    [ -d $root/candidates/${name}_s$s/policies ] || distil $root/candidates/${name}_s$s $s env.num_workers=0 "$@"
    madistill attack attack.policy=$root/candidates/${name}_s$s "attack.eps=[0.2]" "attack.victims=[all,agent_0]" \
      attack.episodes=100 logger.progress=false env.num_workers=0 hydra.run.dir=$root/suite_${name}_s$s \
      | grep -E "student.*clean .*victims"
  done
}
suite r8 distill.rounds=8
suite r16 distill.rounds=16
suite r8_80k distill.rounds=8 distill.agent_steps_per_round=80000
# Fourth round, three more knobs on the 8-round recipe against the same suite: no training perturbation of the
# agent's own position and velocity (attack.scale 0 there in the distill run only; attacks confined to them
# cost the teacher 0.13), DAgger rounds collected with greedy actions (as the evaluation acts), and half the
# updates per round (seed 0 only: it lost 4 points of retention there)
suite r8_noself distill.rounds=8 +attack.scale.agent.self_vel=0 +attack.scale.agent.self_pos=0
suite r8_greedy distill.rounds=8 distill.deterministic=true
SEEDS=0 suite r8_u500 distill.rounds=8 distill.updates_per_round=500
python experiments/tradeoff_summary.py $R3 --prefix suite_

# A teacher trained twice as long (its training return still rose at 2M agent-steps), and the 8-round recipe
# distilled from it, against the same suite; then that teacher at the outer budgets:
# python experiments/tradeoff_summary.py runs/experiments/teacher4m --prefix suite_
T4=runs/teachers/simple_spread_v3_4m R4=runs/experiments/teacher4m
[ -d $T4/policies ] || madistill train env=simple_spread_v3 teacher.total_agent_steps=4000000 logger.progress=false \
  hydra.run.dir=$T4 > /dev/null
T=$T4 ROOT=$R4 suite r8 distill.rounds=8
python experiments/tradeoff_summary.py $R4 --prefix suite_
madistill attack attack.policy=$T4 "attack.eps=[0.1,0.3]" "attack.victims=[all,agent_0]" attack.episodes=100 \
  logger.progress=false env.num_workers=0 hydra.run.dir=$R4/teacher_outer_eps | grep -E "clean .*victims"

# The constant-offset search (opt-in attack, README "Why spread resists") on the seed-0 8-round student
madistill attack attack.policy=$R3/candidates/r8_s0 "attack.methods=[offsets]" "attack.eps=[0.2]" \
  "attack.victims=[all,agent_0]" attack.episodes=100 attack.checks=false logger.progress=false env.num_workers=0 \
  hydra.run.dir=$R3/offsets_r8_s0 | grep -E "clean .*victims"

# Robust RL fine-tuning (madistill finetune) of the 8-round students: PPO on the env's return for 400k
# agent-steps, half the env steps played under PGD on the greedy action (eps 0.2), SA-PPO's smoothness
# regulariser at weight 0.03, with and without checkpoint selection; against the same whole suite:
# python experiments/tradeoff_summary.py runs/experiments/finetune --prefix suite_
RF=runs/experiments/finetune
finetune_suite() {  # recipe, overrides...: fine-tunes the r8 student of each seed in ${SEEDS:-0 1 2}
  local name=$1; shift
  for s in ${SEEDS:-0 1 2}; do
    [ -d $RF/candidates/${name}_s$s/policies ] || madistill finetune finetune.policy=$R3/candidates/r8_s$s seed=$s \
      eval.episodes=500 logger.progress=false env.num_workers=0 hydra.run.dir=$RF/candidates/${name}_s$s "$@" > /dev/null
    madistill attack attack.policy=$RF/candidates/${name}_s$s "attack.eps=[0.2]" "attack.victims=[all,agent_0]" \
      attack.episodes=100 logger.progress=false env.num_workers=0 hydra.run.dir=$RF/suite_${name}_s$s \
      | grep -E "student.*clean .*victims"
  done
}
# Before it, five settings on the seed-0 student alone, against FGSM and PGD (eps 0.2, all agents, 100 episodes)
finetune_explore() {  # name, agent-steps, overrides...
  local name=$1 steps=$2; shift 2
  [ -d $RF/explore/$name/policies ] || madistill finetune finetune.policy=$R3/candidates/r8_s0 \
    finetune.total_agent_steps=$steps finetune.select_every=0 eval.episodes=100 logger.progress=false \
    env.num_workers=0 hydra.run.dir=$RF/explore/$name "$@" > /dev/null
  madistill attack attack.policy=$RF/explore/$name "attack.methods=[fgsm,pgd]" "attack.eps=[0.2]" \
    "attack.victims=[all]" attack.episodes=100 attack.checks=false logger.progress=false env.num_workers=0 \
    hydra.run.dir=$RF/explore/attack_$name | grep -E "clean .*victims" | sed "s/^/$name /"
}
finetune_explore ppo 200000 finetune.smooth_weight=0 finetune.attack_fraction=0
finetune_explore reg0.03 200000 finetune.smooth_weight=0.03 finetune.eps=0.3 finetune.attack_fraction=0
finetune_explore reg0.1 200000 finetune.smooth_weight=0.1 finetune.eps=0.3 finetune.attack_fraction=0
finetune_explore attack 400000 finetune.smooth_weight=0 finetune.attack_fraction=0.5
finetune_explore attack_reg0.03 400000
# 400k agent-steps, half under attack, regulariser 0.03, eps 0.2, the last policy saved
finetune_suite ft_adv finetune.total_agent_steps=400000 finetune.select_every=0
# the same with checkpoint selection on held-out episodes, and 1M agent-steps with it (the defaults)
finetune_suite ft_sel finetune.total_agent_steps=400000
finetune_suite ft_sel1m
# three more seeds of the whole recipe (8-round students, then fine-tuned): the README's seeds 0-5
SEEDS="3 4 5" suite r8 distill.rounds=8
SEEDS="3 4 5" finetune_suite ft_sel1m
# The 1M students of seeds 0-2 at three budgets (one run each, as experiments/robustness.py runs them:
# python experiments/tradeoff_summary.py runs/experiments/finetune --prefix budgets_), against the
# constant-offset search, and their saliency against the teacher's, beside the 8-round students'
for s in 0 1 2; do
  madistill attack attack.policy=$RF/candidates/ft_sel1m_s$s "attack.eps=[0.1,0.2,0.3]" "attack.victims=[all,agent_0]" \
    attack.episodes=100 logger.progress=false env.num_workers=0 hydra.run.dir=$RF/budgets_ft_sel1m_s$s \
    | grep -E "student.*clean .*victims"
  madistill attack attack.policy=$RF/candidates/ft_sel1m_s$s "attack.methods=[offsets]" "attack.eps=[0.2]" \
    "attack.victims=[all,agent_0]" attack.episodes=100 attack.checks=false logger.progress=false env.num_workers=0 \
    hydra.run.dir=$RF/offsets_ft_sel1m_s$s | grep -E "clean .*victims"
  for student in $R3/candidates/r8_s$s $RF/candidates/ft_sel1m_s$s; do
    madistill saliency saliency.policy=$student logger.progress=false env.num_workers=0 \
      hydra.run.dir=$RF/saliency/$(basename $student) | grep "student@" | sed "s|^|$(basename $student) |"
  done
done
python experiments/tradeoff_summary.py $RF --prefix suite_
