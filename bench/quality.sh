#!/usr/bin/env bash
# The quality table of bench/RESULTS.md ("Quality recipe"): the shipped demo model converted at 90.6% and 97%
# nominal sparsity (32-token blocks, 3 or 1 of 33 key blocks kept), α calibrated, then `sla2 finetune --recipe`
# (stage 1, then stage 2 distilled from the dense teacher) with a dense control, and `sla2 quality` against the
# dense model (held-out v-loss on 128 dense samples, 32 paired samples of 50 Heun steps at CFG 2.0).
# Usage on a GPU machine: bash bench/quality.sh OUT_DIR [WHEEL_DIR] [STAGE2_STEPS]
set -euo pipefail
out=${1:?output folder}
source "$(dirname "$0")/gpu_env.sh" "${2:-}"
steps=${3:-500}
demo=sla2cli/assets/demo-jit.safetensors
common=(--data-free --data-free-samples 256 --eval-samples 128 --batch-size 32 --dtype bf16 --device cuda
        --save-every 0 --router-steps 200 --steps "$steps" --recipe --json)
for keep in 0.1:90 0.03:97; do
    topk=${keep%%:*}; tag=${keep##*:}
    sla2 convert "$demo" -o "$out/c$tag.safetensors" --layers all --topk "$topk" --block-q 32 --block-k 32 \
        --no-qat --calibrate 16 --device cuda --json > "$out/convert$tag.json"
    extra=(); [ "$tag" = 90 ] && extra=(--control)
    sla2 finetune "$out/c$tag.safetensors" -o "$out/f$tag.safetensors" "${common[@]}" "${extra[@]}" \
        > "$out/recipe$tag.json"
    sla2 quality "$out/f$tag.safetensors" --dense "$demo" -n 32 --eval-samples 128 --steps 50 --cfg 2.0 \
        --device cuda --json > "$out/quality$tag.json"
    python3 - "$out" "$tag" <<'PY'
import json, sys
out, tag = sys.argv[1:]
r, q = json.load(open(f"{out}/recipe{tag}.json")), json.load(open(f"{out}/quality{tag}.json"))
h = r["held_out"]
line = (f"{tag}%: held-out v-loss vs dense: converted {h['converted']['ratio']:.4f}x, stage 1 "
        f"{h['stage1']['ratio']:.4f}x, recipe {h['finetuned']['ratio']:.4f}x")
if "control" in h:
    line += f", control {h['control']['ratio']:.4f}x, recipe/control {h['finetuned_vs_control']:.4f}x"
s1, s2 = r["stage1"], r["stage2"]
line += (f" | stage 1 {s1['seconds']:.0f} s, stage 2 {s2['seconds']:.0f} s | sla2 quality: v-loss "
         f"{q['v_loss']['ratio']:.4f}x, PSNR {q['paired']['psnr_mean']:.2f} dB, SSIM {q['paired']['ssim_mean']:.4f}")
print(line, flush=True)
PY
done
