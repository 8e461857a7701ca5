#!/usr/bin/env bash
# Wall time of the two test tiers on this machine, and the slowest tests of each.
# Run it on a quiet machine: the numbers go into docs/BENCHMARKS.md ("Test suite").
set -u
cd "$(dirname "$0")/.."
out=${1:-build/bench_tests}
mkdir -p "$out"
for target in test-fast test; do
    start=$(date +%s)
    make "$target" PYTEST_ARGS="--durations=15" >"$out/$target.log" 2>&1
    rc=$?
    end=$(date +%s)
    summary=$(grep -E "^=+ .*(passed|failed).* in " "$out/$target.log" | tail -1)
    printf 'make %-9s exit %d  %4d s  %s\n' "$target" "$rc" "$((end - start))" "$summary"
done
echo "logs (with the slowest tests): $out/"
