#!/usr/bin/env bash
# Check the platform on a CUDA machine in under 8 minutes and print one markdown table of every check at the end.
#
#   bash scripts/gpu_check.sh                      # from the repository root
#   COOP_DATA_ROOT=/path/to/data bash scripts/gpu_check.sh
#
# 1. environment: runs scripts/setup.sh only if .venv/bin/python is missing; prints nvidia-smi -L and torch.cuda;
#    stops (exit 2) when torch.cuda.is_available() is False.
# 2. precision: the same CoOp run (tiny ViT, EuroSAT features from the tests' ridge-aligned tiny CLIP, or synthetic
#    features without data) on CPU fp32 and on CUDA in fp32, bf16 and amp; fp32 must match the CPU (logits and final
#    loss within 1e-3 relative), bf16/amp within 3 accuracy points and 10% of the final loss.
# 3. two sweeps (python -m platform.tune, tiny ViT, real EuroSAT): 4 trials at --gpus-per-trial 0.25, 8 at
#    --pack-size 4; pass when no trial errored. 5 (run before 4, so the time budget never starves it): with 2 GPUs
#    or more, a 2-worker NCCL DDP run (python -m platform.train --num-workers 2 --use-gpu yes).
# 4. benchmarks (bench.step_time, bench.packed_trials if present, bench.many_classes), shortened; their ratio keys.
#    None has a device flag (--device cuda is added where one appears): step_time and many_classes measure this
#    machine's CPUs; packed_trials runs platform.tune sweeps, which use the GPU. Overrides: $PACKED_TRIALS_ARGS,
#    $MANY_CLASSES_ARGS.
#
# Data: $COOP_DATA_ROOT, else ../shared/data, else ./shared/data. Each check runs under `timeout` and within an
# overall budget ($GPU_CHECK_BUDGET_S, default 450 s after setup; a check that no longer fits is SKIPped). Logs go
# to a temporary folder printed first. Exit status: 0 when no check FAILed, 1 otherwise, 2 without CUDA.
set -u
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  bash scripts/setup.sh || { echo "scripts/setup.sh failed: no .venv to check with" >&2; exit 2; }
fi
PY="$PWD/.venv/bin/python"
LOG=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
echo "logs: $LOG"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
DATA_ROOT=${COOP_DATA_ROOT:-../shared/data}
if [ -z "${COOP_DATA_ROOT:-}" ] && [ ! -d "$DATA_ROOT/eurosat/2750" ] && [ -d shared/data/eurosat/2750 ]; then
  DATA_ROOT=shared/data  # note: Ray ships the repository (working_dir) to its workers, this folder included
fi
DATA_ROOT=$(cd "$DATA_ROOT" 2>/dev/null && pwd || echo "$DATA_ROOT")
HAVE_DATA=0; [ -d "$DATA_ROOT/eurosat/2750" ] && HAVE_DATA=1
BUDGET_S=$(( SECONDS + ${GPU_CHECK_BUDGET_S:-450} ))
ROWS=(); FAILED=0; RC=0; TLIM=0

record() {  # record NAME RESULT NUMBERS: one row of the final table
  local nums=${3//|/\\|}
  ROWS+=("| $1 | $2 | ${nums//$'\n'/ } |")
  [ "$2" = FAIL ] && FAILED=1
  echo ">>> $1: $2 -- $3"
}
last_err() {  # last_err PREFIX: the last error-looking line of PREFIX.err / PREFIX.out (else the last line)
  local line
  line=$(cat "$1.err" "$1.out" 2>/dev/null | grep -E 'Error|error:|Exception|FAIL|Traceback|refused' | tail -n1)
  [ -z "$line" ] && line=$(cat "$1.err" "$1.out" 2>/dev/null | grep -v '^[[:space:]]*$' | tail -n1)
  echo "${line:0:200}"
}
step() {  # step SLUG CAP CMD...: CMD under min(CAP, budget left) s; sets RC (200: no time left) and TLIM
  local slug=$1 cap=$2; shift 2
  TLIM=$(( BUDGET_S - SECONDS )); [ "$TLIM" -gt "$cap" ] && TLIM=$cap
  if [ "$TLIM" -lt 30 ]; then RC=200; return; fi
  echo "--- $slug (timeout ${TLIM}s): $*"
  timeout -k 10 "$TLIM" "$@" >"$LOG/$slug.out" 2>"$LOG/$slug.err"
  RC=$?
}
finish() {  # finish NAME SLUG OK NUMBERS: PASS when OK=1 and rc 0, else FAIL with the reason; SKIP when out of time
  if [ "$RC" -eq 200 ]; then record "$1" SKIP "time budget spent"
  elif [ "$RC" -eq 124 ] || [ "$RC" -eq 137 ]; then record "$1" FAIL "timed out after ${TLIM}s (rest of budget or cap)"
  elif [ "$RC" -eq 0 ] && [ "$3" = 1 ]; then record "$1" PASS "$4"
  else record "$1" FAIL "rc $RC: $(last_err "$LOG/$2")${4:+; $4}"; fi
}
jget() {  # jget FILE PATTERN...: "key=value" for the keys matching the glob PATTERNs in FILE's last line (JSON)
  "$PY" - "$@" <<'EOF'
import fnmatch, json, sys
try:
    obj = json.loads([l for l in open(sys.argv[1], errors="replace").read().splitlines() if l.strip()][-1])
except (OSError, IndexError, ValueError):
    print("no JSON on the last line")
    sys.exit(0)
number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
shown = [(k, v) for p in sys.argv[2:] for k, v in sorted(obj.items())  # a glob shows numbers only, no targets
         if k == p or (fnmatch.fnmatch(k, p) and number(v) and not k.startswith("target"))]
print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={json.dumps(v)}" for k, v in shown))
EOF
}

# --- 1. environment -------------------------------------------------------------------------------------------------
NGPU=0
if command -v nvidia-smi >/dev/null; then nvidia-smi -L; NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); fi
"$PY" - <<'EOF'
import sys, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"float32 matmul precision {torch.get_float32_matmul_precision()}")
if not torch.cuda.is_available():
    sys.exit(3)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}")
print(f"bf16 supported: {torch.cuda.is_bf16_supported()}")
EOF
rc=$?
if [ "$rc" -ne 0 ]; then
  [ "$rc" -eq 3 ] && echo "torch.cuda.is_available() is False: no usable CUDA GPU (driver? CPU-only torch?)" >&2
  exit 2
fi
record "cuda" PASS "$NGPU GPU(s) from nvidia-smi -L; data root $DATA_ROOT$([ $HAVE_DATA = 1 ] || echo ' (no EuroSAT)')"

# --- 2. CUDA training against CPU fp32 ------------------------------------------------------------------------------
cat >"$LOG/precision.py" <<'EOF'
import dataclasses, math, sys, time
from pathlib import Path
import torch
import torch.nn.functional as F
sys.path.insert(0, "tests")  # tests/aligned.py: the tests' EuroSAT-aligned tiny CLIP
from coop_core import (CachedViews, FeatureSet, PromptConfig, TrainConfig, build_few_shot, build_model, evaluate,
                       evaluation_features, load_clip, load_dataset, prepare_features, train)

CFG, ROOT, TMP = "tests/fixtures/tiny-vit.json", Path(sys.argv[1]), Path(sys.argv[2])
PROMPT = PromptConfig(n_ctx=4)
BASE = TrainConfig(shots=16, epochs=10, batch_size=32, lr=0.05, warmup_epochs=0, n_views=2, loader_workers=4)
if (ROOT / "eurosat" / "2750").is_dir():  # features on the CPU once; every run trains on the same ones
    from aligned import aligned_tiny_checkpoint
    weights, source = str(aligned_tiny_checkpoint(CFG, ROOT, TMP / "aligned-tiny-vit.pt")), "EuroSAT 16-shot"
    clip, splits = load_clip(CFG, weights), load_dataset("eurosat", ROOT)
    ordered = sorted(splits.test, key=lambda it: (it.label, it.path))  # 1000 class-balanced test images
    splits = dataclasses.replace(splits, test=tuple(ordered[i * len(ordered) // 1000] for i in range(1000)))
    fewshot = build_few_shot(splits, BASE.shots, seed=1, cache_dir=None)
    train_src = prepare_features(clip, splits, fewshot, BASE, cache_dir=None, with_test=False).train
    test, _ = evaluation_features(clip, splits, "test", cache_dir=None, loader_workers=BASE.loader_workers)
    classnames = splits.classnames
else:  # no data: noisy copies of a teacher context's text features (tests/test_engine.py's learnable data)
    weights, source = "none", "synthetic"
    classnames = ("annual crop land", "forest", "highway", "river", "sea or lake", "residential buildings")
    with torch.no_grad():
        text = build_model(load_clip(CFG, weights), classnames, PROMPT, seed=7).text_features()
    g = torch.Generator().manual_seed(0)
    y_train, y_test = (torch.randint(len(classnames), (n,), generator=g) for n in (320, 1000))
    noisy = lambda y, v: F.normalize(text[y] + 0.05 * torch.randn(v, len(y), text.shape[1], generator=g), dim=-1)
    train_src, test = CachedViews(noisy(y_train, 2), y_train), FeatureSet(noisy(y_test, 1)[0], y_test)


def run(device: str, precision: str) -> dict:
    model = build_model(load_clip(CFG, weights), classnames, PROMPT, seed=1, device=device)  # moves its own CLIP
    t0 = time.perf_counter()
    history = train(model, train_src, dataclasses.replace(BASE, precision=precision))
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    with torch.no_grad():  # the learned context's logits, always in fp32
        logits = model.forward_features(test.features.to(device).float()).float().cpu()
    return {"loss": history[-1]["train_loss"], "acc": evaluate(model, test)["acc"], "logits": logits, "wall": wall}


ref, ok = run("cpu", "fp32"), True
parts = [f"{source}: cpu fp32 acc {ref['acc']:.1f} loss {ref['loss']:.4f} ({ref['wall']:.1f}s)"]
for precision in ("fp32", "bf16", "amp"):
    try:
        r = run("cuda", precision)
    except Exception as err:
        ok = False
        parts.append(f"{precision} ERROR {type(err).__name__}: {str(err)[:100]}")
        continue
    dlogit = (r["logits"] - ref["logits"]).abs().max().item()
    rel_logit = dlogit / ref["logits"].abs().max().item()
    rel_loss = abs(r["loss"] - ref["loss"]) / abs(ref["loss"])
    dacc = abs(r["acc"] - ref["acc"])
    good = math.isfinite(r["loss"]) and (rel_logit <= 1e-3 and rel_loss <= 1e-3 if precision == "fp32"
                                         else dacc <= 3.0 and rel_loss <= 0.10)
    ok &= good
    parts.append(f"{precision} {'ok' if good else 'BAD'}: max|dlogit| {dlogit:.1e} (rel {rel_logit:.1e}), "
                 f"dloss rel {rel_loss:.1e}, acc {r['acc']:.1f} ({r['wall']:.1f}s)")
    print(parts[-1], flush=True)
print(("PASS " if ok else "FAIL ") + "; ".join(parts))
EOF
step precision 150 "$PY" - "$DATA_ROOT" "$LOG" <"$LOG/precision.py"
line=$(tail -n1 "$LOG/precision.out" 2>/dev/null)
finish "precision: CUDA fp32/bf16/amp vs CPU fp32" precision "$([[ $line == PASS* ]] && echo 1)" "${line#* }"

# --- 3. sweeps on the GPU -------------------------------------------------------------------------------------------
RUN_ARGS=(--dataset eurosat --data-root "$DATA_ROOT" --backbone tests/fixtures/tiny-vit.json --pretrained none
          --shots 2 --epochs 3 --max-test-items 200 --n-views 1 --use-gpu yes --cache-dir "$LOG/cache" --json)
sweep() {  # sweep SLUG NAME TRIALS FLAGS...: pass when rc 0, TRIALS trials and none errored
  local slug=$1 name=$2 n=$3; shift 3
  if [ "$HAVE_DATA" = 0 ]; then record "$name" SKIP "no EuroSAT under $DATA_ROOT (set COOP_DATA_ROOT)"; return; fi
  mkdir -p "$LOG/$slug"
  step "$slug" 150 "$PY" -m platform.tune "${RUN_ARGS[@]}" --storage-path "$LOG/$slug/ray" \
    --tracking-uri "sqlite:///$LOG/$slug/mlflow.db" --num-samples "$n" "$@"
  local nums; nums=$(jget "$LOG/$slug.out" trials trials_errored wall_s pack_size)
  local ok; [[ " $nums " == *" trials=$n "* && " $nums " == *" trials_errored=0 "* ]] && ok=1
  finish "$name" "$slug" "${ok:-0}" "$nums"
}
sweep sweep-gpu-share "sweep: 4 trials, --gpus-per-trial 0.25" 4 --gpus-per-trial 0.25
sweep sweep-packed "sweep: 8 trials, --pack-size 4" 8 --pack-size 4

# --- 5. two-worker NCCL DDP -----------------------------------------------------------------------------------------
if [ "$NGPU" -lt 2 ]; then record "DDP: 2 workers, NCCL" SKIP "skipped ($NGPU GPU)"
elif [ "$HAVE_DATA" = 0 ]; then record "DDP: 2 workers, NCCL" SKIP "no EuroSAT under $DATA_ROOT"
else
  mkdir -p "$LOG/ddp"
  step ddp 150 "$PY" -m platform.train "${RUN_ARGS[@]}" --num-workers 2 --storage-path "$LOG/ddp/ray" \
    --tracking-uri "sqlite:///$LOG/ddp/mlflow.db"
  finish "DDP: 2 workers, NCCL" ddp 1 "$(jget "$LOG/ddp.out" num_workers use_gpu text_sharding test_acc wall_s)"
fi

# --- 4. benchmarks --------------------------------------------------------------------------------------------------
bench() {  # bench NAME CAP ARGS...: python -m bench.NAME --json ARGS (+ --device cuda where the script has that flag)
  local name=$1 cap=$2; shift 2
  if [ ! -f "bench/$name.py" ]; then record "bench.$name" SKIP "not present"; return; fi
  local extra=(); grep -q -- '"--device"' "bench/$name.py" && extra=(--device cuda)
  step "bench-$name" "$cap" "$PY" -m "bench.$name" --json "$@" ${extra[@]+"${extra[@]}"}
  local label="bench.$name ${*//"$DATA_ROOT"/DATA}"
  finish "$label" "bench-$name" 1 "$(jget "$LOG/bench-$name.out" '*ratio*' '*diff*')"
}
bench step_time 120 --reps 2
# packed_trials (real EuroSAT): the tiny ViT only, 2 shots x 2 epochs, one round (default: both backbones, 16 x 20)
if [ "$HAVE_DATA" = 0 ] && [ -f bench/packed_trials.py ]; then record "bench.packed_trials" SKIP "no EuroSAT"
else
  read -r -a PT_ARGS <<< "${PACKED_TRIALS_ARGS:---models tiny --shots 2 --epochs 2 --rounds 1 --timeout 120}"
  bench packed_trials 150 --data-root "$DATA_ROOT" "${PT_ARGS[@]}"
fi
# many_classes: 200 classes, one round of 2 steps (the README's 1000 x 2 rounds x 3 steps is ~14 min on 2 cores)
read -r -a MC_ARGS <<< "${MANY_CLASSES_ARGS:---n-cls 200 --rounds 1 --steps 2}"
bench many_classes 150 "${MC_ARGS[@]}"

# --- summary --------------------------------------------------------------------------------------------------------
echo
echo "## GPU check ($(date -u +%Y-%m-%dT%H:%MZ), ${SECONDS}s, logs in $LOG)"
echo
echo "| check | result | numbers |"
echo "|---|---|---|"
printf '%s\n' "${ROWS[@]}"
exit "$FAILED"
