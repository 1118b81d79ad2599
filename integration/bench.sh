#!/usr/bin/env bash
# Runs baton's benchmarks and prints one table. About 13 minutes on a
# 2-core machine. Figures are medians/percentiles over trials and ratios
# against baselines measured in the same run.
#
#   integration/bench.sh                  # everything
#   BATON_BENCH_IDLE=30s integration/bench.sh   # shorter idle window
set -euo pipefail
cd "$(dirname "$0")/.."
: "${BATON_BENCH_IDLE:=2m}"
export BATON_BENCH_IDLE
out=$(mktemp)
trap 'rm -f "$out"' EXIT
{
	go test ./election -run '^$' -bench 'RevokeToNewOwner|HandOver|ColdElections' -benchtime 20x -count 1 -timeout 20m
	go test ./integration -run '^$' -bench 'CrashFailover' -benchtime 20x -count 1 -timeout 30m
	go test ./integration -run '^$' -bench 'Memory|SteadyState' -benchtime 1x -count 1 -timeout 20m
} 2>&1 | grep -E '^(Benchmark|ok|FAIL|goos|goarch|cpu|pkg)' | tee "$out"
echo
echo "== table (one line per benchmark: its own metrics)"
grep '^Benchmark' "$out" | awk '{
	name=$1; printf "%-55s", name
	for (i = 3; i < NF; i += 2) printf "  %s %s", $i, $(i+1)
	printf "\n"
}'
