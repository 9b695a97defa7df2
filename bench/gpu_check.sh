#!/usr/bin/env bash
# The whole GPU verification in one call: at most 10 minutes on one H100, no network.
#
#   bench/gpu_check.sh RESULTS_DIR            on a machine with a CUDA GPU (fails at once without one)
#   bench/gpu_check.sh RESULTS_DIR --smoke    the same parts on the CPU, tiny (tests/test_gpu_check.py)
#
# Parts, each with its own time budget inside a 570 s deadline (a part that would start with under
# 15 s left is skipped; one that overruns is stopped; either shows in the summary):
#   faces        ~7,000 distinct faces: random crops/rotations/flips/colours of the shared faces
#                (bench/scale_bench.py's generator), 256 px JPEGs                          (smoke: 48, 64 px)
#   weights      torchvision-shaped random state dicts for resnet50/inceptionv3/mobilenetv2, used as
#                `weights` (the pipeline loads <folder>/<model>.pth exactly as ImageNet's; each is loaded
#                into its model here, strictly, so a shape or key mismatch fails this part)
#   paper        python -m gender_tasks run --profile paper, end to end, label audit included, into a
#                temp storage                                           (smoke: tiny profile, cnn only)
#   train_bench  bench/train_bench.py on the run's cache: pipeline epoch vs bare loop per model
#   concurrency  the four models as one-epoch jobs, 1, 2 and 4 at a time on the one GPU
#   compile      resnet50 eager vs torch.compile: overhead, steady speed-up, break-even epochs
# nvidia-smi samples utilisation and memory every 0.5 s during each part. Everything lands in
# RESULTS_DIR: summary.md, results.json (all figures), one JSON per part, logs/, smi-<part>.csv.
#
# Environment: PYTHON (the interpreter; default the checkout's .venv/bin/python,
# then python3), GPU_CHECK_FACES (a folder with female/ and male/ faces to vary), GPU_CHECK_KEEP=1
# (keep the work folder), AIRFLOW_HOME (reused if it holds a migrated airflow.db).
set -uo pipefail

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; }
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
results="" smoke=0
for arg in "$@"; do
  case "$arg" in
    --smoke) smoke=1 ;;
    -h | --help) usage; exit 0 ;;
    -*) echo "error: unknown option $arg" >&2; usage >&2; exit 2 ;;
    *) results=$arg ;;
  esac
done
[[ -n "$results" ]] || { echo "error: name a results folder" >&2; usage >&2; exit 2; }
mkdir -p "$results/logs" && results=$(cd "$results" && pwd)

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  for candidate in "$REPO/.venv/bin/python" "$(command -v python3)"; do
    [[ -x "$candidate" ]] && { PY=$candidate; break; }
  done
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's gender_tasks, installed or not
# Without a GPU, stop at once, before any Python starts (the smoke check runs on the CPU on purpose).
nogpu() {
  echo "error: no CUDA GPU here ($1)." \
       "Run this on a GPU machine, or pass --smoke for the small CPU check." >&2
  exit 3
}
if ((smoke == 0)); then
  command -v nvidia-smi > /dev/null || nogpu "no nvidia-smi"
  nvidia-smi -L > /dev/null 2>&1 || nogpu "nvidia-smi -L fails"
fi

if ((smoke)); then
  n_faces=48 px=64 profile=tiny run_models=cnn budget=600
  bench_args=(--profile tiny --models cnn --rounds 1)
  conc_args=(--profile tiny --models cnn,cnn --levels 1,2 --epochs 1)
  compile_args=(--profile tiny --model cnn --epochs 2 --backend eager)
else
  n_faces=7000 px=256 profile=paper run_models=inceptionv3,resnet50,mobilenetv2,cnn budget=570
  bench_args=(--profile paper --rounds 1 --limit 2048)
  conc_args=(--profile paper --levels 1,2,4 --epochs 1)
  compile_args=(--profile paper --model resnet50 --epochs 3 --limit 2048 --backend inductor)
fi

# One interpreter checks the imports and CUDA and records the environment (each start imports torch: seconds).
"$PY" - "$results/environment.json" "$smoke" "$n_faces" "$profile" 2> "$results/logs/imports.log" << 'EOF'
import sys

try:
    import datetime, json, torch, torchvision, airflow, gender_tasks  # all four must import
except Exception:
    import traceback

    traceback.print_exc()
    sys.exit(2)
path, smoke, faces, profile = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), sys.argv[4]
cuda = torch.cuda.is_available()
if not smoke and not cuda:
    sys.exit(3)
json.dump({"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
           "cuda": torch.version.cuda, "mode": "smoke (CPU)" if smoke else "full", "faces": faces, "profile": profile,
           "gpu_memory_gib": torch.cuda.mem_get_info()[1] / 2**30 if cuda else None,
           "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}, open(path, "w"), indent=1)
EOF
case $? in
  0) ;;
  3) nogpu "torch.cuda.is_available() is False" ;;
  *) echo "error: $PY cannot import torch, torchvision, airflow and gender_tasks (see $results/logs/imports.log);" \
          "set PYTHON to the project's virtual environment (make install)" >&2
     exit 2 ;;
esac

faces_source=${GPU_CHECK_FACES:-}
if [[ -z "$faces_source" ]]; then
  for candidate in /work/shared/data/generated_photos "$REPO/../shared/data/generated_photos" \
                   "$REPO/shared/data/generated_photos"; do
    [[ -d "$candidate/female" && -d "$candidate/male" ]] && { faces_source=$candidate; break; }
  done
fi
[[ -n "$faces_source" ]] || { echo "error: no faces to vary: set GPU_CHECK_FACES to a folder with female/ and male/" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
sampler=""
cleanup() {
  [[ -n "$sampler" ]] && kill "$sampler" 2> /dev/null
  [[ "${GPU_CHECK_KEEP:-0}" == 1 ]] && echo "work folder kept: $work" || rm -rf "$work"
}
trap cleanup EXIT
store="$work/store" weights="$work/weights" faces="$work/faces"
export GX_ANALYTICS_ENABLED=False

started=$SECONDS
: > "$results/timings.tsv"

# part NAME BUDGET_S COMMAND...: run with the smaller of its budget and what the deadline leaves.
part() {
  local name=$1 want=$2; shift 2
  local left=$((budget - (SECONDS - started) - 10)) t0=$SECONDS rc
  local limit=$((want < left ? want : left))
  if ((limit < 15)); then
    echo "== $name: skipped, ${left}s left of the ${budget}s deadline" | tee -a "$results/logs/$name.log"
    printf '%s\t%s\t%s\n' "$name" 125 0 >> "$results/timings.tsv"
    return
  fi
  echo "== $name (up to ${limit}s)"
  if ((smoke == 0)); then
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 \
      > "$results/smi-$name.csv" 2> /dev/null &
    sampler=$!
  fi
  timeout -k 10 "$limit" "$@" > "$results/logs/$name.log" 2>&1
  rc=$?
  [[ -n "$sampler" ]] && { kill "$sampler" 2> /dev/null; wait "$sampler" 2> /dev/null; sampler=""; }
  ((rc == 124 || rc == 137)) && echo "   $name ran out of its ${limit}s" | tee -a "$results/logs/$name.log"
  ((rc != 0)) && { echo "   $name failed (exit $rc); its log:"; tail -n 20 "$results/logs/$name.log"; }
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$results/timings.tsv"
}

if [[ -z "${AIRFLOW_HOME:-}" || ! -f "${AIRFLOW_HOME}/airflow.db" ]]; then
  export AIRFLOW_HOME="$work/airflow"
  AIRFLOW__CORE__LOAD_EXAMPLES=False "$PY" -m airflow db migrate > "$results/logs/airflow-migrate.log" 2>&1 \
    || { echo "error: airflow db migrate failed; see $results/logs/airflow-migrate.log" >&2; exit 1; }
fi

part faces 90 "$PY" "$REPO/bench/gpu_check.py" faces "$n_faces" "$faces" --source "$faces_source" --px "$px"
part weights 60 "$PY" "$REPO/bench/gpu_check.py" weights "$weights"
paper_t0=$SECONDS
part paper 330 "$PY" -m gender_tasks run --source "$faces" --storage "$store" --profile "$profile" \
  --models "$run_models" --weights "$weights"
paper_rc=$(tail -n 1 "$results/timings.tsv" | cut -f2)
"$PY" "$REPO/bench/gpu_check.py" paper "$store" "$results/paper.json" --seconds "$((SECONDS - paper_t0))" \
  --rc "$paper_rc" > "$results/logs/paper-figures.log" 2>&1
part train_bench 100 "$PY" "$REPO/bench/train_bench.py" --source "$faces" --storage "$store" "${bench_args[@]}" \
  --json "$results/train_bench.json"
part concurrency 120 "$PY" "$REPO/bench/gpu_check.py" concurrency "$store" "$results/concurrency.json" "${conc_args[@]}"
part compile 120 "$PY" "$REPO/bench/gpu_check.py" compile "$store" "$results/compile.json" "${compile_args[@]}"

"$PY" "$REPO/bench/gpu_check.py" summarise "$results" > "$results/logs/summarise.log" 2>&1 \
  || { echo "error: the summary failed; see $results/logs/summarise.log" >&2; exit 1; }
cat "$results/summary.md"
echo "total $((SECONDS - started))s; figures in $results (summary.md, results.json)"
# Exit non-zero when a part failed, so a caller (and the smoke test) sees it; the figures are written anyway.
if awk -F'\t' '$2 != 0 { bad = 1 } END { exit !bad }' "$results/timings.tsv"; then exit 1; fi
