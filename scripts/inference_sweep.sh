#!/usr/bin/env bash
# Inference settings of one trained policy (action execution, guidance, DDIM steps): chosen on validation
# states, then checked once on the test states, each table written by `damvla compare` (docs/results.md).
#
#   scripts/inference_sweep.sh NAME RUN [SETTING ...]          # the sweep, on the validation states
#   FINAL=SETTING scripts/inference_sweep.sh NAME RUN          # the chosen setting on the test states, paired
#                                                              # with the checkpoint's own settings there
#
# NAME names the records (docs/records/inference-NAME[-test]/) and the tables; RUN is a `damvla train` run
# folder (its final checkpoint is evaluated; the training curves go with the records).
# SETTING: checkpoint (the checkpoint's own settings; always run, the sweep's baseline) | adaptive-ensemble |
# temporal-ensemble | execute-N (chunk execution, N actions per chunk) | cfg-X (guidance scale) | ddim-N (DDIM
# steps). Default: checkpoint adaptive-ensemble execute-2 cfg-1 execute-8.
#
# Validation states: EPISODES (default 30) per task from eval-pool index OFFSET (default 50). The tables of
# docs/results.md evaluate indices 0..49, so a setting chosen here was chosen without seeing them. The test
# evaluation is the tables' own protocol (50 per task from index 0). TEST_BASELINE=EVAL_DIR reuses an evaluation
# of RUN with its own settings on those states instead of running it again.
#
# Environment: DAMVLA (default .venv/bin/damvla), WORK (default /work: evaluations go to WORK/sweeps/NAME/),
# SUITE (default grip3), WORKERS (default 2), MAX_STEPS (default 300).
set -euo pipefail

DAMVLA=${DAMVLA:-.venv/bin/damvla}
WORK=${WORK:-/work}
SUITE=${SUITE:-grip3}
WORKERS=${WORKERS:-2}
MAX_STEPS=${MAX_STEPS:-300}
EPISODES=${EPISODES:-30}
OFFSET=${OFFSET:-50}
FINAL=${FINAL:-}
TEST_BASELINE=${TEST_BASELINE:-}
USAGE="usage: [FINAL=SETTING] $0 NAME RUN [SETTING ...]"
NAME=${1:?$USAGE}
RUN=${2:?$USAGE}
shift 2
[[ "$NAME" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || { echo "NAME must be a plain name (letters, digits, . _ -), got '$NAME'" >&2; exit 2; }
[ -f "$RUN/checkpoints/latest" ] || { echo "RUN=$RUN is not a damvla train run folder (no checkpoints/latest)" >&2; exit 2; }
[[ "$OFFSET" =~ ^[0-9]+$ && "$EPISODES" =~ ^[1-9][0-9]*$ ]] || { echo "OFFSET and EPISODES must be integers" >&2; exit 2; }
if [ -z "$FINAL" ] && [ "$OFFSET" -lt 50 ]; then
    echo "OFFSET=$OFFSET overlaps the test states (eval-pool indices 0..49): choose settings on others" >&2; exit 2
fi

flags() {  # flags SETTING: the `damvla eval` options of one setting
    case $1 in
        checkpoint) ;;
        adaptive-ensemble) echo --execution adaptive_ensemble ;;
        temporal-ensemble) echo --execution temporal_ensemble ;;
        execute-*) [[ "${1#execute-}" =~ ^[1-9][0-9]*$ ]] || return 1; echo --execution chunk --execute-steps "${1#execute-}" ;;
        cfg-*) [[ "${1#cfg-}" =~ ^[0-9]+(\.[0-9]+)?$ ]] || return 1; echo --cfg-scale "${1#cfg-}" ;;
        ddim-*) [[ "${1#ddim-}" =~ ^[1-9][0-9]*$ ]] || return 1; echo --inference-steps "${1#ddim-}" ;;
        *) return 1 ;;
    esac
}

require() {  # require SETTING...: every name checked before the first evaluation
    for s in "$@"; do
        flags "$s" > /dev/null || { echo "unknown SETTING '$s' (checkpoint, adaptive-ensemble, temporal-ensemble, execute-N, cfg-X, ddim-N)" >&2; exit 2; }
    done
}

evaluate() {  # evaluate SETTING OUT EPISODES OFFSET VIDEOS PLOTS: resumes an interrupted one, skips a finished one
    local f
    f=$(flags "$1")
    if [ -f "$2/results.json" ] && ! grep -q '"complete": false' "$2/results.json"; then
        echo "$2 is complete: not evaluated again"; return
    fi
    local resume=()
    [ -f "$2/run.json" ] && resume=(--resume)
    # shellcheck disable=SC2086  # $f: the setting's options, word-split on purpose
    "$DAMVLA" eval "$RUN" --policy checkpoint --suite "$SUITE" --episodes "$3" --state-offset "$4" --out "$2" \
        --workers "$WORKERS" --seed 0 --videos "$5" --plots "$6" --device cpu --threads 1 --max-steps "$MAX_STEPS" \
        $f "${resume[@]}"
}

OUT=$WORK/sweeps/$NAME
if [ -z "$FINAL" ]; then
    settings=(checkpoint)
    for s in "${@:-adaptive-ensemble execute-2 cfg-1 execute-8}"; do
        for w in $s; do [ "$w" = checkpoint ] || settings+=("$w"); done
    done
    require "${settings[@]}"
    runs=()
    for s in "${settings[@]}"; do
        evaluate "$s" "$OUT/$s" "$EPISODES" "$OFFSET" 0 0
        runs+=(--run "$s=$OUT/$s:$RUN")
    done
    last=$((OFFSET + EPISODES - 1))
    "$DAMVLA" compare "${runs[@]}" --baseline checkpoint \
        --title "Inference settings of $NAME on validation states (eval-pool indices $OFFSET-$last, $EPISODES per task, not the tables' test states): $SUITE, $MAX_STEPS-step limit" \
        --append-results docs/results.md --figures docs/figures --keep-records "docs/records/inference-$NAME"
else
    [ $# -eq 0 ] || { echo "FINAL evaluates one setting: no SETTING arguments" >&2; exit 2; }
    [ "$FINAL" != checkpoint ] || { echo "FINAL=checkpoint is the baseline itself: name the chosen setting" >&2; exit 2; }
    require "$FINAL"
    base=${TEST_BASELINE:-$OUT/test-checkpoint}
    [ -n "$TEST_BASELINE" ] || evaluate checkpoint "$base" 50 0 1 3
    [ -f "$base/results.json" ] || { echo "TEST_BASELINE=$base has no results.json" >&2; exit 2; }
    evaluate "$FINAL" "$OUT/test-$FINAL" 50 0 1 3
    "$DAMVLA" compare --run "checkpoint=$base:$RUN" --run "$FINAL=$OUT/test-$FINAL:$RUN" --baseline checkpoint \
        --title "Inference setting $FINAL of $NAME, chosen on validation states, on the test states (50 held-out episodes per task): $SUITE, $MAX_STEPS-step limit" \
        --append-results docs/results.md --figures docs/figures --keep-records "docs/records/inference-$NAME-test"
fi
