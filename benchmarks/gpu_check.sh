#!/usr/bin/env bash
# The GPU path, end to end: the pipeline's process, tokenize, activations (forward in bf16), train, export and
# evaluate on CUDA with a small token budget, in a scratch directory, with one JSON line per stage (throughput,
# FVU, L0, CE recovered) and a non-zero exit on any failure.
#
# On CUDA the SAE kernels run as torch operators: the compiled (numba) kernels take only CPU tensors
# (saepipe.kernels.sparse.compiled), so train.device=cuda switches them off. The model hub is never used:
#   MODEL_DIR=path   a Hugging Face model directory (e.g. models/base from `saepipe base-model`); default:
#                    models/base when the tree has one, else a random-init model of SmolLM2-135M's shape built by
#                    benchmarks/gpu_model.py (throughput only: FVU, L0 and CE recovered then describe a random net)
#   DEVICE=cuda      or cuda:N, or cpu for a dry run of the script itself
#   MAX_TOKENS=N     activation rows to cache (default 40000 on CUDA, 2048 on cpu)
#   WORK=dir         scratch directory (default: a new temp dir; kept, its path printed at the end)
#   PYTHON=python    the interpreter with saepipe's dependencies
#
#   bash benchmarks/gpu_check.sh                      # on a CUDA machine
#   DEVICE=cpu MODEL_LAYERS=2 bash benchmarks/gpu_check.sh   # a quick dry run on a CPU
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python}
if [ "$DEVICE" = cpu ]; then default_tokens=2048; default_ablation=256; else default_tokens=40000; default_ablation=8192; fi
MAX_TOKENS=${MAX_TOKENS:-$default_tokens}
ABLATION_TOKENS=${ABLATION_TOKENS:-$default_ablation}
MODEL_LAYERS=${MODEL_LAYERS:-30}
WORK=${WORK:-$(mktemp -d -t saepipe-gpu-check.XXXXXX)}
mkdir -p "$WORK/logs"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

fail() {  # stage, message: one JSON line, the log's tail on stderr, exit 1
  "$PY" -c 'import json, sys; print(json.dumps({"stage": sys.argv[1], "ok": False, "error": sys.argv[2]}))' "$1" "$2"
  [ -f "$WORK/logs/$1.log" ] && tail -n 20 "$WORK/logs/$1.log" >&2
  exit 1
}

if [ "$DEVICE" != cpu ]; then
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || fail setup "CUDA is not available"
fi

random_model=false
if [ -z "${MODEL_DIR:-}" ]; then
  if [ -f "$REPO/models/base/config.json" ]; then
    MODEL_DIR="$REPO/models/base"
  else
    MODEL_DIR="$WORK/random-smol-135m"  # no "llama" in the name: TransformerLens reads meaning into it
    random_model=true
    "$PY" "$REPO/benchmarks/gpu_model.py" "$MODEL_DIR" --corpus "$REPO/data/raw" --layers "$MODEL_LAYERS" \
      > "$WORK/logs/model.log" 2>&1 || fail model "building the random-init model failed"
  fi
fi
[ -f "$MODEL_DIR/config.json" ] || fail setup "MODEL_DIR=$MODEL_DIR holds no config.json"

# params.yaml in the scratch directory: the repo's defaults with the check's paths, device, dtype and budget
"$PY" - "$REPO" "$WORK" "$MODEL_DIR" "$DEVICE" "$MAX_TOKENS" "$ABLATION_TOKENS" "$random_model" <<'EOF' \
  || fail setup "writing params.yaml failed"
import sys
from pathlib import Path

import yaml

repo, work, model_dir, device, max_tokens, ablation, random_model = sys.argv[1:]
p = yaml.safe_load((Path(repo) / "params.yaml").read_text())
p["process"].update(raw_dir=f"{repo}/data/raw", data_path=None, output_dir=f"{work}/data/processed")
p["base_model"]["output_dir"] = model_dir
if random_model == "true":
    p["base_model"]["model_name"] = "random-init SmolLM2-135M shape"
p["tokenize"]["output"] = f"{work}/data/tokens.h5"
p["activations"].update(forward_dtype="bfloat16", max_tokens=int(max_tokens), device=device,
                        output_dir=f"{work}/data/activations",
                        activation_batch_size=8 if device == "cpu" else 64)
p["train"].update(device=device, num_epochs=1, output_dir=f"{work}/models/checkpoints", wandb=False)
p["export"].update(output_dir=f"{work}/models/sae", upload_to_hf=False)
p["evaluate"].update(device=device, output_dir=f"{work}/analysis", ablation_max_tokens=int(ablation))
(Path(work) / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
EOF

report() {  # stage, seconds: one JSON line of the stage's figures, read from what it wrote; non-zero if absent
  "$PY" - "$WORK" "$1" "$2" "$DEVICE" <<'EOF'
import json
import math
import sys
from pathlib import Path

work, stage, seconds, device = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
line = {"stage": stage, "ok": True, "device": device, "seconds": round(seconds, 2)}
if stage == "tokenize":
    import h5py
    with h5py.File(work / "data/tokens.h5", "r") as f:
        line.update(documents=int(f.attrs["n_documents"]), tokens=int(f.attrs["n_tokens"]))
elif stage == "activations":
    s = json.loads((work / "data/activations/stats.json").read_text())
    line.update(hook=s["hook"], forward_dtype=s["forward_dtype"], rows=s["cached_rows"],
                model_tokens=s["model_tokens"], tokens_per_second=round(s["tokens_per_second"], 1))
elif stage == "train":
    r = json.loads((work / "models/checkpoints/default/history.json").read_text())[-1]
    line.update(activations_per_second=round(r["activations_per_second"], 1), fvu=r["fvu"], l0=r["l0"],
                val_fvu=r.get("val_fvu"), val_l0=r.get("val_l0"), dead_percent=r["dead_feature_percentage"])
elif stage == "export":
    c = json.loads((work / "models/sae/default/config.json").read_text())
    line.update(d_in=c["d_in"], d_sae=c["d_sae"], sae_type=c["sae_type"], hook=c["hook"])
elif stage == "evaluate":
    m = json.loads((work / "analysis/default/quick/metrics.json").read_text())
    ab = m.get("ablation") or {}
    line.update(fvu=m["reconstruction"]["fvu"], l0=m["sparsity"]["l0_mean"],
                ce_loss_recovered=ab.get("ce_loss_recovered"), kl_div_score=ab.get("kl_div_score"),
                tokens_per_second=round(m["timing"]["activation_tokens_per_second"], 1),
                ablation_tokens_per_second=round(m["timing"].get("ablation_tokens_per_second", 0.0), 1))
bad = [k for k, v in line.items() if isinstance(v, float) and not math.isfinite(v)]
if bad:
    line.update(ok=False, error=f"non-finite {', '.join(bad)}")
print(json.dumps(line))
sys.exit(0 if line["ok"] else 1)
EOF
}

cd "$WORK"
for stage in process tokenize activations train export evaluate; do
  started=$(date +%s.%N)
  "$PY" -m saepipe "$stage" > "logs/$stage.log" 2>&1 || fail "$stage" "saepipe $stage exited $? (log: $WORK/logs/$stage.log)"
  seconds=$("$PY" -c 'import sys, time; print(time.time() - float(sys.argv[1]))' "$started")
  report "$stage" "$seconds" || fail "$stage" "its outputs are missing or not finite"
done
echo "gpu_check: all stages passed on $DEVICE (model $MODEL_DIR, $MAX_TOKENS tokens); outputs in $WORK" >&2
