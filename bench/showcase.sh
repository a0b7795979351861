#!/usr/bin/env bash
# The showcase model (issue 18) on one H200, in steps that each fit a device call (under 9 minutes):
#
#   bash bench/showcase.sh train OUT_DIR [STATE_DIR] [WHEEL_DIR]
#     Step A: `scripts/train_demo_model.py --model showcase` for CALL_MINUTES (default 7) of a budget of MINUTES
#     (default 14) training minutes over all calls, continuing STATE_DIR (the showcase-train-state/ folder an
#     earlier call left in its OUT_DIR) when given. Writes to OUT_DIR showcase-jit.safetensors (14 MB),
#     showcase-samples.png, showcase-loss.png, showcase-train.json and showcase-train-state/ (four files of
#     11 MB: weights in float16, Adam's moments in bfloat16, since the exact float32 state, 88 MB, cannot come
#     back from a call): eight files, about 58 MiB, what a device call returns at most.
#   bash bench/showcase.sh demo OUT_DIR [MODEL_FILE] [WHEEL_DIR]
#     Step B: installs MODEL_FILE (a showcase-jit.safetensors of step A) as sla2cli/assets/showcase-jit.safetensors
#     when given, then `sla2 demo --model showcase --json` > OUT_DIR/showcase-demo.json (its log beside it; if it
#     stops part-way, what its finished steps measured in OUT_DIR/showcase-demo-partial.json).
#
# Two training calls and the demo, each a device call (copy what a call returns into an ignored folder of the
# checkout, here .showcase/, and name that folder in the next call's carry):
#   bash bench/showcase.sh train "$OUT"
#   bash bench/showcase.sh train "$OUT" .showcase/showcase-train-state
#   bash bench/showcase.sh demo "$OUT" .showcase/showcase-jit.safetensors
# (a smoke run on a CPU: DEVICE=cpu MINUTES=0.2 CALL_MINUTES=0.1 EXTRA="--batch-size 1 --sample-steps 0
# --eval-images 1" bash bench/showcase.sh train /tmp/s)
set -euo pipefail
mode=${1:?train or demo}
out=${2:?output folder}
source "$(dirname "$0")/gpu_env.sh" "${4:-}"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$out"
case "$mode" in
    train)
        resume=(); [ -n "${3:-}" ] && resume=(--resume "$3")
        read -r -a extra <<< "${EXTRA:-}"
        python3 scripts/train_demo_model.py --model showcase --device "${DEVICE:-cuda}" --minutes "${MINUTES:-14}" \
            --call-minutes "${CALL_MINUTES:-7}" --save-state --compact-state "${resume[@]}" "${extra[@]}" \
            --out-dir "$out"
        rm -f "$out/showcase-samples-fast.png"  # a call returns eight files at most
        ;;
    demo)
        asset=sla2cli/assets/showcase-jit.safetensors
        if [ -n "${3:-}" ] && ! [ "$3" -ef "$asset" ]; then cp "$3" "$asset"; fi
        sla2 demo --model showcase --device "${DEVICE:-cuda}" --out /tmp/showcase-demo --json \
            > "$out/showcase-demo.json" 2> "$out/showcase-demo.log" || {
            partial=/tmp/showcase-demo/sla2-demo.json  # what the finished steps measured (absent if none started)
            if [ -f "$partial" ]; then cp "$partial" "$out/showcase-demo-partial.json"; fi
            tail -20 "$out/showcase-demo.log"; exit 1; }
        python3 - "$out/showcase-demo.json" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
r, s = doc["results"], doc["seconds"]
m = r["measure"].get("finetuned") or r["measure"]["converted"]
line = (f"{doc['model']}: layers {doc['layers']}; held-out v-loss {m['held_out_v_loss']:.4f} vs dense "
        f"{m['dense_held_out_v_loss']:.4f} ({m['held_out_v_loss'] / m['dense_held_out_v_loss']:.3f}x); "
        f"texture FD {r['fid']['fid']:.2f} (dense {r['fid']['compare']['fid_other']:.2f})")
if "speed" in r:
    v = r["speed"]["models"]
    line += (f"; sampling {v['dense']['images_per_second']:.2f} -> {v['SLA2']['images_per_second']:.2f} images/s "
             f"({r['speed']['speedup']:.2f}x)")
print(line + f"; {sum(s.values()):.0f} s in all")
PY
        ;;
    *) echo "mode must be train or demo, not $mode" >&2; exit 2 ;;
esac
