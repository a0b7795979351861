#!/usr/bin/env bash
# End-to-end profile of JiT-B/16 on the GPU (random weights, bf16, 95% sparsity), as recorded in RESULTS.md.
# Usage on a GPU machine whose python has torch and triton: bash bench/profile_e2e.sh OUT_DIR [WHEEL_DIR]
set -euo pipefail
out=${1:?output folder}
source "$(dirname "$0")/gpu_env.sh" "${2:-}"
sla2 profile --arch JiT-B/16 --layers 4-11 --topk 0.05 --resolution 2048 --batch-size 1 --json > "$out/b16-2048-4-11.json"
sla2 profile --arch JiT-B/16 --layers all --topk 0.05 --resolution 2048 --batch-size 1 --json > "$out/b16-2048-all.json"
sla2 profile --arch JiT-B/16 --layers 4-11 --topk 0.05 --resolution 1024 --batch-size 4 --json > "$out/b16-1024-4-11.json"
python3 - "$out" <<'PY'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text())
    print(f.stem, json.dumps(r.get("end_to_end", r.get("e2e", {})), default=str)[:900])
PY
