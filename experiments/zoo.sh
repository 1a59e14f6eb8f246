#!/bin/bash
# The trained policies the cascade, repair, explanation and robustness experiments share ("the zoo"): per env,
# 3 seeds of a teacher and its DIGR, plain and robust students. Each finished run gets a DONE file, so a rerun
# picks up where it stopped.
#   bash experiments/zoo.sh [root] [sl|spread|all]      # root defaults to runs/zoo
# Layout:
#   <root>/sl/s{0,1,2}               madistill pipeline seed=s (the main job: teacher + DIGR student)
#   <root>/sl/{robust,plain}/s{s}    distill=robust / distill=plain students of that teacher
#   <root>/spread/teacher/s{s}       +experiment=spread_batched teachers (docs/batched_mpe.md)
#   <root>/spread/{digr,robust,plain}/s{s}   DIGR (env default lambda), +experiment=spread_robust, plain students
set -u
root=${1:-runs/zoo}
which=${2:-all}
mkdir -p "$root/logs"
run() {  # run <dir> <madistill args...>
  local dir=$1; shift
  [ -f "$dir/DONE" ] && return
  rm -rf "$dir"
  local t0; t0=$(date +%s)
  madistill "$@" hydra.run.dir="$dir" > "$root/logs/$(echo "$dir" | tr / _).log" 2>&1
  local rc=$?
  echo "$dir rc=$rc $(( $(date +%s) - t0 ))s" >> "$root/logs/times.txt"
  if [ $rc -ne 0 ]; then echo "zoo: $dir failed (rc $rc), see $root/logs/times.txt" >&2; exit $rc; fi
  echo "madistill $*" > "$dir/DONE"
}
if [ "$which" = sl ] || [ "$which" = all ]; then
  for s in 0 1 2; do run "$root/sl/s$s" pipeline seed=$s; done
  for s in 0 1 2; do run "$root/sl/robust/s$s" distill distill=robust distill.teacher="$root/sl/s$s" seed=$s; done
  for s in 0 1 2; do run "$root/sl/plain/s$s" distill distill=plain distill.teacher="$root/sl/s$s" seed=$s; done
fi
if [ "$which" = spread ] || [ "$which" = all ]; then
  for s in 0 1 2; do run "$root/spread/teacher/s$s" train +experiment=spread_batched seed=$s; done
  for s in 0 1 2; do
    run "$root/spread/digr/s$s" distill env=simple_spread_v3 distill.teacher="$root/spread/teacher/s$s" seed=$s
    run "$root/spread/robust/s$s" distill +experiment=spread_robust distill.teacher="$root/spread/teacher/s$s" seed=$s
    run "$root/spread/plain/s$s" distill env=simple_spread_v3 distill=plain distill.teacher="$root/spread/teacher/s$s" seed=$s
  done
fi
