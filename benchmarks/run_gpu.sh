#!/usr/bin/env bash
# The GPU lease in one call: bash benchmarks/run_gpu.sh [--budget SECONDS] [--dry-run] [--phase NAME ...]
# The phases, their limits and the three files written to $OUT (status.json, results.json,
# logs.tar.gz) are described in benchmarks/lease.py; the plan with each phase's expected
# device seconds is in benchmarks/README.md. Commit status.json and results.json under
# benchmarks/results/ after a lease.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$PWD/build/lease/bin:$PATH"  # tools carried to the lent machine, when there
PY="$(command -v python3 || command -v python)"  # the lent machine's torch is its python3
OUT="${OUT:-benchmarks/results/lease}"
export OUT

# If Python cannot even start the lease (a broken import), status.json still says why. A
# refused flag (exit status 2) writes nothing and leaves $OUT as it was.
on_exit() {
    local rc=$?
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 2 ] && [ ! -f "$OUT/status.json" ]; then
        mkdir -p "$OUT"
        printf '{"schema": "proper.lease/1", "phases": [], "error": "benchmarks.lease did not start (exit status %s); see the output of run_gpu.sh"}\n' \
            "$rc" > "$OUT/status.json"
    fi
}
trap on_exit EXIT
# The lease runs as a child; a SIGTERM or SIGINT to this script (or to its process group) is
# passed on, and the script waits while the lease packs its results.
child=""
trap '[ -n "$child" ] && kill -TERM "$child" 2> /dev/null' TERM INT
"$PY" -m benchmarks.lease "$@" &
child=$!
wait "$child"
rc=$?
while kill -0 "$child" 2> /dev/null; do
    wait "$child"
    rc=$?
done
exit "$rc"
