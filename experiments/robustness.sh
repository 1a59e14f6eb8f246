#!/usr/bin/env bash
# Robustness of the speaker-listener teacher, a plain student, a DIGR student and a DIGR + adversarial
# student (seed 0 each), all against the full attack suite. Needs the teacher at runs/teachers/<env>
# (madistill train hydra.run.dir=runs/teachers/simple_speaker_listener_v4) and the students of
# experiments/distill_quality.py (plain_s0, digr_s0). Report: runs/experiments/robustness/<env>/reports/.
set -euo pipefail
ENV=${ENV:-simple_speaker_listener_v4}  # ENV=simple_spread_v3 VICTIM=agent_0 for spread
T=runs/teachers/$ENV
S=runs/experiments/distill_quality/$ENV
R=runs/experiments/robustness/$ENV
madistill distill distill=robust distill.teacher=$T seed=0 eval.episodes=100 logger.progress=false hydra.run.dir=$R/robust_s0
mkdir -p $R/policies
for v in plain digr; do rm -rf $R/candidates/$v; mkdir -p $R/candidates/$v/policies; cp -r $S/${v}_s0/policies/student $R/candidates/$v/policies/; done
rm -rf $R/candidates/robust; mkdir -p $R/candidates/robust/policies; cp -r $R/robust_s0/policies/student $R/candidates/robust/policies/
madistill attack attack.policy=$R/candidates "attack.victims=[all,${VICTIM:-listener_0}]" attack.episodes=100 logger.progress=false hydra.run.dir=$R/eval "$@"
