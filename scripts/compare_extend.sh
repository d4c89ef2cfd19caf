#!/usr/bin/env bash
# ExtendSFT→DPO against SFT→DPO on the embedded default (SmolLM2-135M-Instruct, synthetic set), end to end:
#   SFT and ExtendSFT (configs/sft.yaml, configs/extend_sft.yaml, 24 steps each), DPO from each export
#   (configs/dpo.yaml, lr 5e-5 and $DPO_STEPS steps as in the README's squeezing recipe, generations logged during
#   training), `dynlab plot` of both DPO runs overlaid, `dynlab generate` on the probe_test prompts for all four
#   models, the repetition table, `dynlab judge` of the two DPO models with a local judge, the same judge on the
#   known chosen/rejected probe pairs (its calibration), and a markdown report: $OUT/report.md.
#
#   make compare-extend     (or scripts/compare_extend.sh; about 20 minutes on 2 idle CPU cores; THREADS=1 on busy ones)
#   JUDGE=openai:https://api.openai.com/v1@gpt-4o-mini#OPENAI_API_KEY make compare-extend
#
# Stages whose export/ exists are reused (FRESH=1 redoes everything). Runs: runs/<stage>/$TAG*. CONFIG_OVERLAY is
# stacked on every fit (CONFIG_OVERLAY=configs/tiny.yaml JUDGE=hf:tiny: the whole pipeline in a minute, for tests).
# THREADS=1 sets OMP_NUM_THREADS: on a CPU shared with other jobs one thread per process is several times faster
# than two threads fighting for two busy cores.
set -euo pipefail

DYNLAB=${DYNLAB:-dynlab}
CONFIGS=${CONFIGS:-configs}
PYTHON=${PYTHON:-python}
TAG=${TAG:-compare-extend}
OUT=${OUT:-runs/compare-extend}
DPO_STEPS=${DPO_STEPS:-16}
DPO_LR=${DPO_LR:-5e-5}
SAMPLES=${SAMPLES:-4}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-64}
JUDGE=${JUDGE:-hf:embedded:smollm2-135m-instruct}
export WANDB_MODE=${WANDB_MODE:-disabled}
if [[ -n "${THREADS:-}" ]]; then
    export OMP_NUM_THREADS=$THREADS
fi

SFT=runs/sft/$TAG
EXT=runs/extend_sft/$TAG
SFT_DPO=runs/dpo/$TAG-sft
EXT_DPO=runs/dpo/$TAG-extend

if [[ "${FRESH:-0}" == 1 ]]; then
    rm -rf "$SFT" "$EXT" "$SFT_DPO" "$EXT_DPO" "$OUT"
fi
mkdir -p "$OUT/gen"  # timings.tsv keeps the stages of earlier calls that this one reuses

timed() {  # timed NAME COMMAND...: run it, append its wall time to timings.tsv
    local name=$1 start=$SECONDS
    shift
    echo "== $name: $*" >&2
    "$@"
    printf '%s\t%s\n' "$name" "$((SECONDS - start))" >> "$OUT/timings.tsv"
}

fit() {  # fit RUN_DIR CONFIG [ARGS...]: a dynlab fit into RUN_DIR, unless it already finished
    local run=$1 config=$2
    shift 2
    if [[ -f "$run/export/config.json" ]]; then
        echo "== reusing $run" >&2
        return
    fi
    rm -rf "$run"  # an unfinished run would append to its old metrics
    DYNLAB_RUN_VERSION=$(basename "$run") timed "fit $run" "$DYNLAB" fit --config "$config" \
        ${CONFIG_OVERLAY:+--config "$CONFIG_OVERLAY"} "$@"
}

GEN_METRICS=(--trainer.callbacks+=dynlab.evaluation.callback.GenerationMetrics --trainer.callbacks.num_prompts=4)
fit "$SFT" "$CONFIGS/sft.yaml"
fit "$EXT" "$CONFIGS/extend_sft.yaml"
for pair in "$SFT:$SFT_DPO" "$EXT:$EXT_DPO"; do
    fit "${pair#*:}" "$CONFIGS/dpo.yaml" --model.init_args.init_from="${pair%%:*}/export" \
        --model.init_args.optimizer.init_args.lr="$DPO_LR" --trainer.max_steps="$DPO_STEPS" \
        --model.init_args.precompute_ref_logps=true "${GEN_METRICS[@]}"
done

timed plot "$DYNLAB" plot "$SFT_DPO" "$EXT_DPO" --out "$OUT/figures"

for pair in "sft:$SFT" "extend_sft:$EXT" "sft_dpo:$SFT_DPO" "extend_dpo:$EXT_DPO"; do
    name=${pair%%:*} run=${pair#*:}
    timed "generate $name" "$DYNLAB" generate --model "$run" --prompts "$run:test" --out "$OUT/gen/$name.jsonl" \
        --num-samples "$SAMPLES" --max-new-tokens "$MAX_NEW_TOKENS" --seed 0
done

timed "judge DPO models" "$DYNLAB" judge "$OUT/gen/extend_dpo.jsonl" "$OUT/gen/sft_dpo.jsonl" --judge "$JUDGE" \
    --labels "ExtendSFT→DPO" "SFT→DPO" --out "$OUT/judge"
# calibration: the same judge on pairs whose answer is known (the synthetic chosen is correct, rejected is not)
timed "judge chosen vs rejected" "$DYNLAB" judge "$SFT_DPO/probes/probe_test.jsonl:chosen" \
    "$SFT_DPO/probes/probe_test.jsonl:rejected" --judge "$JUDGE" --labels "chosen y+" "rejected y-" \
    --out "$OUT/judge_calibration"

"$PYTHON" -m dynlab.evaluation.report "$OUT" --run "SFT→DPO=$SFT_DPO" --run "ExtendSFT→DPO=$EXT_DPO"
