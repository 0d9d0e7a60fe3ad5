#!/usr/bin/env bash
# Run every atheris harness for SECONDS seconds each (or RUNS executions), one after another,
# with an RSS cap, and print executions, coverage and peak RSS per harness.
#
#   fuzz/run.sh                      # 60 s per harness
#   SECONDS_PER_HARNESS=600 fuzz/run.sh fuzz_qcow fuzz_vmdk
#   RUNS=1000000 fuzz/run.sh         # a fixed number of executions instead
#
# New corpus entries go to $WORK/<harness> (default fuzz/work/, git-ignored), never into the
# committed seeds in corpus/<harness>; crash inputs go to $WORK/crashes/. Exit status 1 when any
# harness crashed. Environment: SECONDS_PER_HARNESS, RUNS, RSS_LIMIT_MB (2048), TIMEOUT (10 s
# per input), WORK, PYTHON.
set -u
cd "$(dirname "$0")/.."

SECONDS_PER_HARNESS=${SECONDS_PER_HARNESS:-60}
RUNS=${RUNS:--1}
RSS_LIMIT_MB=${RSS_LIMIT_MB:-2048}
TIMEOUT=${TIMEOUT:-10}
WORK=${WORK:-fuzz/work}
PYTHON=${PYTHON:-python3}
HARNESSES=("$@")
if [ ${#HARNESSES[@]} -eq 0 ]; then
    HARNESSES=(fuzz_qcow fuzz_vmdk fuzz_vhd fuzz_misc fuzz_raw_layouts fuzz_inspect_check)
fi

mkdir -p "$WORK/crashes" "$WORK/logs"
failed=0
rows=()
for harness in "${HARNESSES[@]}"; do
    mkdir -p "$WORK/$harness"
    log="$WORK/logs/$harness.log"
    limit=(-max_total_time="$SECONDS_PER_HARNESS")
    if [ "$RUNS" != "-1" ]; then
        limit=(-runs="$RUNS")
    fi
    echo "== $harness (${limit[*]}, -rss_limit_mb=$RSS_LIMIT_MB)" >&2
    "$PYTHON" "fuzz/$harness.py" "$WORK/$harness" "corpus/$harness" \
        -dict=fuzz/imgguard.dict -rss_limit_mb="$RSS_LIMIT_MB" -timeout="$TIMEOUT" \
        -print_final_stats=1 -artifact_prefix="$WORK/crashes/$harness-" "${limit[@]}" \
        >"$log" 2>&1
    status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    peak=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    seconds=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
    result=ok
    if [ $status -ne 0 ]; then
        result="CRASH (exit $status, see $log)"
        failed=1
    fi
    rows+=("$(printf '%-20s %12s %8s %10s %8s  %s' "$harness" "${execs:-?}" "${cov:-?}" \
        "${peak:-?}" "${seconds:-?}" "$result")")
done
printf '%-20s %12s %8s %10s %8s  %s\n' harness executions cov peak_MB seconds result
printf '%s\n' "${rows[@]}"
exit $failed
