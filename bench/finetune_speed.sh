#!/usr/bin/env bash
# Stage-1 finetune speed of JiT-B/16 at 1024 px (random dense weights, all layers at topk 0.1, data-free,
# global batch 4, bf16 autocast, Triton backend), as recorded in RESULTS.md.
# Usage on a GPU machine whose python has torch and triton: bash bench/finetune_speed.sh OUT_DIR [WHEEL_DIR]
set -euo pipefail
out=${1:?output folder}
source "$(dirname "$0")/gpu_env.sh" "${2:-}"
python3 - "$out/b16.safetensors" <<'PY'
import sys, torch
from sla2cli import save_model
from sla2cli.models.jit import JiT, architecture_config
torch.manual_seed(0)
m = JiT(architecture_config("JiT-B/16", input_size=1024))
with torch.no_grad():  # upstream zero-initialises these; small random values keep every block a real one
    for n, p in m.named_parameters():
        if "adaLN_modulation" in n or "final_layer.linear" in n:
            p.normal_(0, 0.02)
save_model(m, sys.argv[1], provenance={"source": "random JiT-B/16 1024px (bench)"})
PY
sla2 convert "$out/b16.safetensors" -o "$out/b16-sla2.safetensors" --layers all --topk 0.1 --no-qat
sla2 finetune "$out/b16-sla2.safetensors" -o "$out/ft.safetensors" --data-free --data-free-samples 8 \
    --eval-samples 4 --steps 20 --batch-size 4 --dtype bf16 --device cuda --save-every 0 --json > "$out/finetune.json"
rm -f "$out"/*.safetensors
python3 - "$out/finetune.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"steps/s {r['steps_per_second']:.3f}  seconds {r['seconds']:.1f}  loss {r['loss_history'][0]:.4f} -> "
      f"{r['loss_history'][-1]:.4f}  rel. sq. error {r['mean_error_before']:.4f} -> {r['mean_error_after']:.4f} "
      f"({r['error_reduction']:.2f}x)  backend {r['backend']}")
PY
