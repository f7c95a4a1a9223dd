#!/usr/bin/env bash
# Run the numeric tests under other CPU kernels, the way another machine would run them, and print how much of each
# comparison's budget (tests/numerics.py) the worst kernel set used.
#
#   bash scripts/kernel_matrix.sh            # the method's tests (tests/*.py) under every kernel set below
#   bash scripts/kernel_matrix.sh --platform # ... and the numeric tests of tests/platform/ (marker `numeric`, Ray)
#   KERNEL_SETS="ATEN_CPU_CAPABILITY=default;MKL_ENABLE_INSTRUCTIONS=AVX2" bash scripts/kernel_matrix.sh
#
# A kernel set is a list of environment assignments (separated by ';', several per set joined with ','):
# ATEN_CPU_CAPABILITY=default|avx2|avx512 picks ATen's vectorised kernels, MKL_ENABLE_INSTRUCTIONS=SSE4_2|AVX2|AVX512
# caps MKL's BLAS paths, MKL_CBWR=COMPATIBLE forces MKL's conditional-reproducibility path. A set that asks for
# instructions this CPU lacks is reported as not run (torch would die on an illegal instruction), never as passed.
# Each test's comparisons are logged through COOP_NUMERICS_LOG; the table at the end gives, per comparison, the
# largest difference measured in ulps against its budget.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PLATFORM=0
if [ "${1:-}" = "--platform" ]; then PLATFORM=1; shift; fi
DEFAULT_SETS="ATEN_CPU_CAPABILITY=default;ATEN_CPU_CAPABILITY=avx2;ATEN_CPU_CAPABILITY=avx512;MKL_ENABLE_INSTRUCTIONS=SSE4_2;MKL_ENABLE_INSTRUCTIONS=AVX2;MKL_ENABLE_INSTRUCTIONS=AVX512;MKL_CBWR=COMPATIBLE;ATEN_CPU_CAPABILITY=default,MKL_ENABLE_INSTRUCTIONS=SSE4_2"
IFS=';' read -r -a SETS <<< "${KERNEL_SETS:-$DEFAULT_SETS}"
LOGDIR=$(mktemp -d "${TMPDIR:-/tmp}/kernel-matrix.XXXXXX")
FLAGS=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)
has() { [[ " $FLAGS " == *" $1 "* ]]; }
failed=0
printf '%-62s %-10s %s\n' "kernel set" "ATen" "result"
for set in "${SETS[@]}"; do
  IFS=',' read -r -a assigns <<< "$set"
  needs=""
  for a in "${assigns[@]}"; do
    case "${a,,}" in
      *=avx512) needs="avx512f" ;;
      *=avx2) needs="avx2" ;;
    esac
  done
  if [ -n "$needs" ] && ! has "$needs"; then
    printf '%-62s %-10s %s\n' "$set" "-" "not run: this CPU has no ${needs%f}"
    continue
  fi
  tag=$(echo "$set" | tr -c 'A-Za-z0-9\n' '_')
  log="$LOGDIR/$tag.jsonl"
  aten=$(env "${assigns[@]}" "$PY" -c 'import torch; print(torch.backends.cpu.get_cpu_capability())')
  targets=(tests --ignore=tests/platform)
  out="$LOGDIR/$tag.out"
  env "${assigns[@]}" COOP_NUMERICS_LOG="$log" "$PY" -m pytest -q -p no:cacheprovider "${targets[@]}" "$@" > "$out" 2>&1
  rc=$?
  if [ "$PLATFORM" -eq 1 ] && [ "$rc" -eq 0 ]; then
    env "${assigns[@]}" COOP_NUMERICS_LOG="$log" "$PY" -m pytest -q -p no:cacheprovider tests/platform -m numeric "$@" \
      >> "$out" 2>&1
    rc=$?
  fi
  # one summary per pytest run: the method's tests, then (--platform) the platform's numeric ones
  summary=$(grep -E '[0-9]+ (passed|failed)' "$out" | sed -E 's/ in [0-9.]+s.*//; s/^=+ //' | paste -sd';' -)
  printf '%-62s %-10s %s\n' "$set" "$aten" "${summary:-rc $rc, see $out}"
  if [ "$rc" -ne 0 ]; then
    failed=1
    grep -E '^(FAILED|ERROR) ' "$out" | sed 's/^/    /'
  fi
done
echo
"$PY" - "$LOGDIR" <<'EOF'
import json, sys
from pathlib import Path

worst: dict[tuple[str, str], tuple[float, float, str]] = {}
for log in sorted(Path(sys.argv[1]).glob("*.jsonl")):
    for line in log.read_text().splitlines():
        r = json.loads(line)
        key = (r["test"].split("::", 1)[-1].split("[")[0], r["what"])
        if key not in worst or r["ulps"] > worst[key][0]:
            worst[key] = (r["ulps"], r["budget"], log.stem)
if worst:
    print(f"{'comparison':<100} {'worst ulps':>10} {'budget':>7} {'used':>6}")
    for (test, what), (ulps, budget, where) in sorted(worst.items(), key=lambda kv: -kv[1][0] / kv[1][1]):
        print(f"{(test + ': ' + what)[:100]:<100} {ulps:>10.1f} {budget:>7.0f} {ulps / budget:>6.1%}")
EOF
echo "logs: $LOGDIR"
exit "$failed"
