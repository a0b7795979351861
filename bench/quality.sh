#!/usr/bin/env bash
# The quality table of bench/RESULTS.md ("Quality recipe", issue 14's protocol): the shipped demo model at 90% and
# 95% of its attention FLOPs removed (16-token blocks, 4 or 1 of 65 key blocks kept, a learned rank-R feature map
# and α per query, calibrated), then `sla2 finetune --recipe` (stage 1 on training textures: router, α and feature
# maps against the dense model's velocity; stage 2 JiT's v-loss at JiT's t, EMA), a dense control at 90%, and
# `sla2 quality` of stage 1 alone, the recipe and the control against the dense model: held-out v-loss on 512
# textures of HELD_OUT_SEED, PSNR/SSIM of 128 paired samples (50 Heun steps, CFG 2.0); `sla2 profile` counts the
# FLOPs. Usage on a GPU machine: bash bench/quality.sh OUT_DIR [WHEEL_DIR] [STAGE1_STEPS] [STAGE2_STEPS]
# (a quick smoke run elsewhere: DEVICE=cpu TRAIN_IMAGES=64 EVAL_IMAGES=16 PAIRED=2 bash bench/quality.sh /tmp/q "" 2 2;
# ROWS="95:0.015:8" runs one row: TAG:TOPK:FEATURE_RANK, 16-token blocks (TOPK "e0.02": each layer's topk chosen
# within that error budget, `sla2 convert --max-error 0.02`, as the showcase's demo converts); DATA="--data-free ..." trains on the
# dense model's samples or sampling trajectories instead of the training textures; CONTROL=TAG: the row that
# also trains the dense control, 90 by default; MODEL=showcase runs the 4096-token showcase model instead of the demo
# model, BLOCKS its block size (16 by default), SPEED=1 adds each row's end-to-end sampling speed against dense (`sla2 demo`'s speed step: CUDA graphs, blocks
# compiled) and the texture Fréchet distances of stage 1, the recipe, the control and the dense model against the
# reference textures (its FID step); DENSE_UNTIL="0 0.1 0.25" repeats those for each value, the SLA2 models'
# evaluations at t below it dense (`eval-fid --dense-until`); T_DIST sets stage 1's `--t-distribution` (stage 2 trains at JiT's t);
# QUALITY=0 skips `sla2 quality`, for a rerun of the speed and texture columns; QAT=1 converts with `--qat`, issue 16's
# low-bit sparse branch trained by QAT)
set -euo pipefail
out=${1:?output folder}
source "$(dirname "$0")/gpu_env.sh" "${2:-}"
router_steps=${3:-500}
steps=${4:-300}
model=${MODEL:-demo}
demo=$(python3 -c "from sla2cli.models.shipped import SHIPPED_MODELS; print(SHIPPED_MODELS['$model'].path)")
blocks=${BLOCKS:-16}
dev=${DEVICE:-cuda}
train=${TRAIN_IMAGES:-16384}
eval=${EVAL_IMAGES:-512}
paired=${PAIRED:-128}
mkdir -p "$out"
read -r -a data <<< "${DATA:---data $out/train}"
qat=(--no-qat); [ -n "${QAT:-}" ] && qat=(--qat)
[ -n "${DATA:-}" ] && train=0
python3 - "$out" "$train" "$eval" "$model" <<'PY'
import sys
from pathlib import Path
import torch
from sla2cli.data.textures import TRAIN_SEED, texture_batch
from sla2cli.models.shipped import SHIPPED_MODELS
from sla2cli.pipeline import write_textures
out, shipped = Path(sys.argv[1]), SHIPPED_MODELS[sys.argv[4]]
size = shipped.config.input_size
if int(sys.argv[2]):
    x, y = texture_batch(torch.arange(int(sys.argv[2])), seed=TRAIN_SEED, size=size)
    write_textures(out / "train", x, y)
x, y = texture_batch(torch.arange(int(sys.argv[3])), seed=shipped.held_out_seed, size=size)
write_textures(out / "held-out", x, y)
PY
quality() {  # model tag
    sla2 quality "$1" --dense "$demo" --data "$out/held-out" --eval-samples "$eval" -n "$paired" --steps 50 \
        --cfg 2.0 --device "$dev" --json > "$out/quality-$2.json"
}
for row in ${ROWS:-90:0.0615:16 95:0.015:8}; do
    IFS=: read -r tag topk rank <<< "$row"
    sparsity=(--topk "$topk"); [ "${topk:0:1}" = e ] && sparsity=(--max-error "${topk#e}")
    sla2 convert "$demo" -o "$out/c$tag.safetensors" --layers all "${sparsity[@]}" --block-q "$blocks" --block-k "$blocks" \
        --feature-rank "$rank" --alpha-mode per_query "${qat[@]}" --calibrate 16 --device "$dev" --json > "$out/convert$tag.json"
    sla2 profile "$out/c$tag.safetensors" --device "$dev" --json > "$out/profile$tag.json"
    extra=(); [ "$tag" = "${CONTROL:-90}" ] && extra=(--control)
    sla2 finetune "$out/c$tag.safetensors" -o "$out/f$tag.safetensors" --recipe --keep-stage1 "${extra[@]}" \
        "${data[@]}" --t-distribution "${T_DIST:-jit}" --eval-samples 128 --batch-size 32 --dtype bf16 --device "$dev" --save-every 0 \
        --router-steps "$router_steps" --steps "$steps" --json > "$out/recipe$tag.json"
    if [ "${QUALITY:-1}" != 0 ]; then
        quality "$out/f$tag.safetensors.stage1.safetensors" "stage1-$tag"
        quality "$out/f$tag.safetensors" "recipe-$tag"
        [ "$tag" = "${CONTROL:-90}" ] && quality "$out/f$tag.control.safetensors" "control-$tag"
    fi
    if [ -n "${SPEED:-}" ]; then
        python3 - "$out" "$tag" "$model" "$dev" "${DENSE_UNTIL:-0}" <<'PY'
import dataclasses, json, sys
from pathlib import Path
import torch
from sla2cli.checkpoints import load_model
from sla2cli.models.shipped import SHIPPED_MODELS
from sla2cli.pipeline import Demo, plan_for, step_fid, step_speed
out, tag, model, dev = Path(sys.argv[1]), sys.argv[2], sys.argv[3], torch.device(sys.argv[4])
shipped, tuned = SHIPPED_MODELS[model], out / f"f{tag}.safetensors"
demo = Demo(out=out / f"fid{tag}", device=dev, plan=plan_for(False, dev), shipped=shipped, files={"finetuned": str(tuned)})
demo.dense, demo.tuned = (load_model(p, device=dev)[0].eval() for p in (shipped.path, tuned))
demo.out.mkdir(exist_ok=True)
plan = demo.plan
for until in map(float, sys.argv[5].split()):  # each value: the SLA2 models' evaluations at t < it run dense
    suffix = f"-dense{until:g}" if until else ""
    demo.plan = dataclasses.replace(plan, dense_until=until)
    (out / f"speed{tag}{suffix}.json").write_text(json.dumps(step_speed(demo), indent=1))
    for kind, path in (("stage1", f"{tuned}.stage1.safetensors"), ("recipe", tuned), ("control", out / f"f{tag}.control.safetensors")):
        if Path(path).exists():  # stage 2 can cost texture FD that held-out v-loss does not show: each model's own FD
            demo.files["finetuned"] = str(path)
            fid = step_fid(demo)
            (out / f"fid-{kind}-{tag}{suffix}.json").write_text(json.dumps(
                {k: fid[k] for k in ("fid", "compare", "samples", "steps", "dense_until") if k in fid}, indent=1, default=str))
PY
    fi
    python3 - "$out" "$tag" <<'PY'
import json, sys
from pathlib import Path
out, tag = Path(sys.argv[1]), sys.argv[2]
load = lambda name: json.loads((out / name).read_text())
p, r = load(f"profile{tag}.json")["totals"], load(f"recipe{tag}.json")
removed = 1 - p["executed_attention_flops"] / p["dense_attention_flops"]
q = {k: load(f"quality-{k}-{tag}.json") for k in ("stage1", "recipe", "control") if (out / f"quality-{k}-{tag}.json").exists()}
line = f"{tag}%: attention FLOPs removed {removed:.2%} | stage 1 {r['stage1']['seconds']:.0f} s, stage 2 {r['stage2']['seconds']:.0f} s"
for k, d in q.items():
    line += f" | {k}: v-loss {d['v_loss']['ratio']:.4f}x dense"
    if d["paired"]:  # PAIRED=0: none drawn
        line += f", PSNR {d['paired']['psnr_mean']:.2f} dB, SSIM {d['paired']['ssim_mean']:.3f}"
for speed in sorted(out.glob(f"speed{tag}*.json")):
    v, suffix = load(speed.name), speed.stem[len(f"speed{tag}"):]
    line += (f" | sampling{suffix} {v['models']['dense']['images_per_second']:.2f} -> "
             f"{v['models']['SLA2']['images_per_second']:.2f} images/s ({v['speedup']:.2f}x)")
for kind in ("stage1", "recipe", "control"):
    for fid in sorted(out.glob(f"fid-{kind}-{tag}*.json")):
        f = load(fid.name)
        line += f" | {kind}{fid.stem[len(f'fid-{kind}-{tag}'):]} texture FD {f['fid']:.2f} (dense {f['compare']['fid_other']:.2f})"
if "control" in q:
    line += f" | recipe/control {q['recipe']['v_loss']['model'] / q['control']['v_loss']['model']:.4f}x"
print(line, flush=True)
PY
done
