#!/usr/bin/env bash
# Runs baton's benchmarks and prints one table. About 13 minutes on a
# 2-core machine, most of it the PowerJob-style baseline's 10 s polling
# (10 crash trials, not 20, to leave room for the scale benchmarks), the
# rebalancing scenarios' rate-limited moves and the steady state's idle
# window. BenchmarkScale runs 1,000 apps here; BATON_BENCH_SCALE=10k (or
# 30k, 100k) runs the larger sizes, each several minutes. Figures are medians/percentiles over trials and ratios
# against baselines measured in the same run.
#
#   integration/bench.sh                        # everything
#   BATON_BENCH_IDLE=2m integration/bench.sh    # a longer idle window
set -euo pipefail
cd "$(dirname "$0")/.."
: "${BATON_BENCH_IDLE:=30s}"
export BATON_BENCH_IDLE
out=$(mktemp)
trap 'rm -f "$out"' EXIT
start=$(date +%s)
{
	go test ./election -run '^$' -bench 'RevokeToNewOwner|HandOver' -benchtime 20x -count 1 -timeout 20m
	go test ./integration -run '^$' -bench 'CrashFailover' -benchtime 10x -count 1 -timeout 30m
	go test ./integration -run '^$' -bench 'GracefulHandover' -benchtime 20x -count 1 -timeout 30m
	go test ./integration -run '^$' -bench 'ColdStart|Memory|SteadyState' -benchtime 1x -count 1 -timeout 20m
	go test ./integration -run '^$' -bench 'LeaderLossStorm' -benchtime 5x -count 1 -timeout 20m
	go test ./integration -run '^$' -bench 'Placement' -benchtime 1x -count 3 -timeout 20m
	go test ./integration -run '^$' -bench 'Rebalance' -benchtime 1x -count 1 -timeout 20m
	go test ./integration -run '^$' -bench 'MassFailover|Scale' -benchtime 1x -count 1 -timeout 20m
} 2>&1 | grep -E '^(Benchmark|ok|FAIL|goos|goarch|cpu|pkg)' | tee "$out"
echo
echo "== table (one line per benchmark: its own metrics; $(( $(date +%s) - start )) s in all)"
grep '^Benchmark' "$out" | awk '{
	name=$1; printf "%-55s", name
	for (i = 3; i < NF; i += 2) printf "  %s %s", $i, $(i+1)
	printf "\n"
}'
