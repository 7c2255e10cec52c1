#!/usr/bin/env bash
# One training seed of one row of the grip3 table (docs/results.md, issue #11), then the table again.
#
#   scripts/grip3_table.sh damvla 1        # ROW: damvla | cogact | damvla-nostate | damvla-armq | damvla-envstate |
#                                          #      cogact-envstate | damvla-armq-envstate | damvla-cogdit-envstate |
#                                          #      damvla-aug-envstate | cogact-aug-envstate; SEED: 0, 1, 2
#   scripts/grip3_table.sh --table         # only rewrite the table from the kept records
#   VARIANT=release scripts/grip3_table.sh damvla 0   # the same rows on another data recipe (below)
#   STEPS=18000 scripts/grip3_table.sh damvla 0       # the same rows trained longer (default 9000 steps)
#   THREADS=2 WORKERS=2 scripts/grip3_table.sh ...    # train on 2 threads, evaluate with 2 workers (default 1 and 1:
#                                                     # two rows side by side on a 2-core machine)
#   FINETUNE=checkpoints/damvla-cpu-grip3 STEPS=4500 VARIANT=front2 scripts/grip3_table.sh damvla-envstate 0
#                                                     # continue a trained checkpoint: its weights (--init), lr 1e-4
#
# VARIANT (default grip3): grip3 -- the suite, 52 demonstrations per task (50 train, 2 validation);
# release -- pick-place-v3 alone, its demonstrations opening the gripper at the goal (2 gripper flips);
# demos200 -- grip3 with 200 demonstrations per task; workspace -- grip3 rendered by our free "workspace"
# camera (damvla.envs.metaworld.FREE_CAMERAS) instead of corner4; front -- grip3 rendered by our free "front"
# camera, facing the robot across the table (objects at -x no longer project under the hand's fingers);
# dart -- grip3 collected with `--noise 0.3` (DART: perturbed execution, the expert's labels;
# damvla.envs.collect); front2 -- grip3 seen by the front camera and corner4 together (`--extra-cameras corner4`,
# every row reads both: vision.extra_cameras). Each variant has its own data, run folders, records and table.
#
# A row costs 1.5-2 hours on one core, more than a working session can keep a machine, so every piece
# resumes: the dataset is collected once, training continues from its last checkpoint (`--resume`), the
# evaluation from its journal (`--resume`). When a seed is evaluated, `damvla compare --keep-records` copies
# its results, metrics and configs (no weights) into docs/records/grip3/<row>_s<seed>/: commit that folder,
# and a later session adds the next seed to the same table without the earlier run folders.
#
# Environment: DAMVLA (the CLI, default .venv/bin/damvla), WORK (default /work: data/ and runs/ go there),
# DAMVLA_WEIGHTS and DAMVLA_FEATURE_CACHE as for `damvla train`.
set -euo pipefail

DAMVLA=${DAMVLA:-.venv/bin/damvla}
WORK=${WORK:-/work}
STEPS=${STEPS:-9000}  # training steps; another value is a table of its own (below)
THREADS=${THREADS:-1}  # torch threads of `damvla train` (results do not depend on it beyond float rounding)
WORKERS=${WORKERS:-1}  # evaluation worker processes (episodes are seeded one by one, so the same results)
VARIANT=${VARIANT:-grip3}
CAMERA=corner4
VISION=()  # policy overrides every row of the variant gets
case $VARIANT in
    grip3)
        SUITE=grip3; DEMOS=52; COLLECT=(); DATA=$WORK/data/grip3_52; TAG=v2
        TITLE="DAM-VLA vs CogACT on grip3, seeds 0-2: cpu preset, 50 demonstrations and 50 held-out episodes per task, 300-step limit" ;;
    release)
        SUITE=pick-place-v3; DEMOS=52; COLLECT=(--release); DATA=$WORK/data/pick-place_release_52; TAG=v2rel
        TITLE="DAM-VLA vs CogACT on pick-place with a release at the goal (2 gripper flips): cpu preset, 50 demonstrations, 50 held-out episodes, 300-step limit" ;;
    demos200)
        SUITE=grip3; DEMOS=200; COLLECT=(); DATA=$WORK/data/grip3_200; TAG=v2d200
        TITLE="DAM-VLA on grip3 with 200 demonstrations per task: cpu preset, 50 held-out episodes per task, 300-step limit" ;;
    workspace)
        SUITE=grip3; DEMOS=52; COLLECT=(); CAMERA=workspace; DATA=$WORK/data/grip3_ws_52; TAG=v2ws
        TITLE="DAM-VLA vs CogACT on grip3 seen by the workspace camera (1.5x corner4's scale): cpu preset, 50 demonstrations and 50 held-out episodes per task, 300-step limit" ;;
    front)
        SUITE=grip3; DEMOS=52; COLLECT=(); CAMERA=front; DATA=$WORK/data/grip3_front_52; TAG=v2front
        TITLE="DAM-VLA vs CogACT on grip3 seen by the front camera (facing the robot, mirror-symmetric about the hand's start): cpu preset, 50 demonstrations and 50 held-out episodes per task, 300-step limit" ;;
    dart)
        SUITE=grip3; DEMOS=52; COLLECT=(--noise 0.3 --max-tries 250); DATA=$WORK/data/grip3_dart03_52; TAG=v2dart
        TITLE="DAM-VLA vs CogACT on grip3 with DART demonstrations (executed xyz perturbed, std 0.3; expert labels): cpu preset, 50 demonstrations and 50 held-out episodes per task, 300-step limit" ;;
    front2)
        SUITE=grip3; DEMOS=52; COLLECT=(--extra-cameras corner4); CAMERA=front; DATA=$WORK/data/grip3_front_corner4_52
        TAG=v2front2; VISION=('vision.extra_cameras=["corner4"]')
        TITLE="DAM-VLA vs CogACT on grip3 seen by two cameras, front and corner4: cpu preset, 50 demonstrations and 50 held-out episodes per task, 300-step limit" ;;
    *) echo "VARIANT must be grip3, release, demos200, workspace, front, dart or front2, got '$VARIANT'" >&2; exit 2 ;;
esac
RECORDS=docs/records/$VARIANT
FINETUNE=${FINETUNE:-}  # a damvla checkpoint folder: train from its weights and architecture instead of the preset
if [ -n "$FINETUNE" ]; then  # its own run folders, records and table; the lr restarts lower, as for any fine-tune
    [ -f "$FINETUNE/model.safetensors" ] || { echo "FINETUNE=$FINETUNE is not a damvla checkpoint folder" >&2; exit 2; }
    TAG=${TAG}ft; RECORDS=$RECORDS-ft
    # one table for every fine-tune of the variant: each row's source checkpoint is its --init in the reproduction
    TITLE="$TITLE, each row fine-tuned at lr 1e-4 from the trained checkpoint its command names (--init)"
fi
if [ "$STEPS" != 9000 ]; then  # a longer (or shorter) recipe: its own run folders, records and table
    [[ "$STEPS" =~ ^[1-9][0-9]*$ ]] || { echo "STEPS must be a positive integer, got '$STEPS'" >&2; exit 2; }
    TAG=${TAG}s$STEPS; RECORDS=$RECORDS-s$STEPS; TITLE="$TITLE, $STEPS training steps"
fi

table() {  # table [ROW SEED EVAL RUN]: every kept record, with ROW/sSEED from its run folders instead
    local runs=() name
    for rec in "$RECORDS"/*_s*/; do  # unmatched: the literal pattern, skipped below
        [ -f "$rec/record.json" ] || continue
        name=$(basename "$rec")
        [ "$name" = "${1:-}_s${2:-}" ] && continue
        runs+=(--run "${name%_s*}/s${name##*_s}=${rec%/}")
    done
    [ $# -eq 4 ] && runs+=(--run "$1/s$2=$3:$4")
    [ ${#runs[@]} -gt 0 ] || { echo "no records in $RECORDS yet" >&2; return 1; }
    local baseline=() b  # CogACT: its plain row, else its environment-state row, else that row with shifts
    for b in cogact cogact-envstate cogact-aug-envstate; do
        if [[ " ${runs[*]}" == *" $b/s"* ]]; then baseline=(--baseline "$b"); break; fi
    done
    "$DAMVLA" compare "${runs[@]}" "${baseline[@]}" --title "$TITLE" \
        --append-results docs/results.md --figures docs/figures --keep-records "$RECORDS"
}

if [ "${1:-}" = "--table" ]; then
    table
    exit
fi
ROWS="damvla|cogact|damvla-nostate|damvla-armq|damvla-envstate|cogact-envstate|damvla-armq-envstate|damvla-cogdit-envstate|damvla-aug-envstate|cogact-aug-envstate"
ROW=${1:?usage: $0 $ROWS SEED  (or --table)}
SEED=${2:?usage: $0 $ROWS SEED}
STATE=state_dim=4  # proprioception on (the cpu preset's measured choice); damvla-nostate: the paper's inputs
EXTRA=()  # policy overrides of the row
TRAIN=()  # training flags of the row
ABLATION=()  # the row's first word names its heads: DAM-VLA's, or CogACT's single head
[[ $ROW == cogact* ]] && ABLATION=(--ablation cogact)
case $ROW in
    damvla|cogact) ;;
    damvla-nostate) STATE=state_dim=0 ;;
    damvla-armq) EXTRA=(vision.arm_queries=4) ;;  # the arm head reads 4 patch queries of its own
    # f_cog also regresses Meta-World's object and goal state during training (env_state_dim, docs/method.md),
    # from the same demonstrations collected with that column (data of their own); with CogACT's head the rows
    # differ in the heads alone
    damvla-envstate|cogact-envstate) EXTRA=(env_state_dim=39); COLLECT+=(--environment-state); DATA=${DATA}_envstate ;;
    # the arm head with patch queries of its own besides the class tokens: with the environment-state target,
    # its data and its rows (docs/results.md, push far sideways)
    damvla-armq-envstate) EXTRA=(env_state_dim=39 vision.arm_queries=4); COLLECT+=(--environment-state); DATA=${DATA}_envstate ;;
    # both heads built as CogACT's: timestep and f_cog in one prefix token, DDIM without x0 clipping, so that
    # against cogact-envstate the rows differ in the heads, the router and the weights alone
    damvla-cogdit-envstate) EXTRA=(env_state_dim=39 dit.condition=cogact diffusion.clip_sample=false)
        COLLECT+=(--environment-state); DATA=${DATA}_envstate ;;
    # random image shifts (up to 6% of the side) through 3 cached views per frame: the frame and 2 shifted copies
    damvla-aug-envstate|cogact-aug-envstate) EXTRA=(env_state_dim=39); TRAIN=(--aug-shift 0.06 --aug-views 3)
        COLLECT+=(--environment-state); DATA=${DATA}_envstate ;;
    *) echo "ROW must be one of $ROWS, got '$ROW'" >&2; exit 2 ;;
esac
RUN=$WORK/runs/${TAG}_${ROW}_s${SEED}
EVAL=$WORK/runs/eval_${TAG}_${ROW}_s${SEED}

if [ ! -f "$DATA/meta/info.json" ]; then
    "$DAMVLA" collect metaworld --suite "$SUITE" --episodes $DEMOS --out "$DATA" --camera "$CAMERA" --resolution 128 \
        "${COLLECT[@]}"
fi
if [ -f "$RUN/checkpoints/latest" ]; then
    "$DAMVLA" train --resume "$RUN" --steps $STEPS
else
    START=(--preset cpu "${ABLATION[@]}") LR=(--lr 3e-4 --warmup 300)
    # --init takes the architecture (ablation included) from the checkpoint: the row must be the one it was trained as
    if [ -n "$FINETUNE" ]; then
        [ ${#ABLATION[@]} -eq 0 ] || { echo "FINETUNE continues the checkpoint's own row: $ROW's ${ABLATION[*]} cannot apply" >&2; exit 2; }
        START=(--init "$FINETUNE") LR=(--lr 1e-4 --warmup 100)
    fi
    "$DAMVLA" train "${START[@]}" --dataset "$DATA" --out "$RUN" --steps $STEPS --batch-size 32 "${LR[@]}" \
        --schedule cosine --seed "$SEED" --ema 0.999 --val-episodes 6 \
        --val-every 1000 --save-every 1000 --threads "$THREADS" ${TRAIN[@]+"${TRAIN[@]}"} "$STATE" "${EXTRA[@]}" "${VISION[@]}"
fi
if [ -f "$EVAL/results.json" ] && ! grep -q '"complete": false' "$EVAL/results.json"; then
    echo "$EVAL is complete: not evaluated again"
else
    resume=()
    [ -f "$EVAL/run.json" ] && resume=(--resume)
    "$DAMVLA" eval "$RUN" --policy checkpoint --suite "$SUITE" --episodes 50 --out "$EVAL" --workers "$WORKERS" --seed 0 \
        --videos 1 --plots 3 --device cpu --threads 1 --max-steps 300 "${resume[@]}"
fi
table "$ROW" "$SEED" "$EVAL" "$RUN"
