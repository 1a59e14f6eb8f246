#!/usr/bin/env bash
# Do robust students contain cascades? Teacher vs DIGR vs robust (distill=robust) students of simple_speaker_listener_v4,
# 3 seeds, on the same faults and episodes: PGD at eps 0.3 on the speaker's observation from step 5 to the end
# (fault=attack), 30 paired episodes; cascade size and the listener's return delta with 95% CIs. Needs the
# speaker-listener teachers of `python experiments/cascade_ground_truth.py --cases speaker_listener --steps 50000`
# (under /tmp/cascade_ground_truth). Small budgets (teachers 50k agent steps, students 2 DAgger rounds of 5000
# steps): a check of the comparison, not a verdict on well-trained policies. Writes
# experiments/results/cascade_compare_speaker_listener.md.
set -euo pipefail
OUT=${OUT:-/tmp/cascade_compare}
mkdir -p "$OUT/policies"
for s in 0 1 2; do
  T=/tmp/cascade_ground_truth/speaker_listener/s$s
  rm -rf "$OUT/policies/teacher_s$s" && cp -r "$T" "$OUT/policies/teacher_s$s"
  for d in digr robust; do
    madistill distill distill=$d distill.teacher=$T seed=$s logger=quiet env.num_workers=0 env.num_envs=8 \
      distill.rounds=2 distill.agent_steps_per_round=5000 distill.updates_per_round=300 "student.hidden_sizes=[32]" \
      hydra.run.dir="$OUT/policies/${d}_s$s" > /dev/null
  done
done
rm -rf "$OUT/cascade"
madistill cascade cascade.policy="$OUT/policies" cascade.episodes=30 fault=attack "fault.victims=[speaker_0]" \
  fault.eps=0.3 cascade.noise_quantile=null logger=quiet env.num_workers=0 hydra.run.dir="$OUT/cascade" > /dev/null
sed -n '/## Comparison/,$p' "$OUT/cascade/reports/cascade.md" > experiments/results/cascade_compare_speaker_listener.md
cat experiments/results/cascade_compare_speaker_listener.md
