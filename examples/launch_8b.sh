#!/usr/bin/env bash
# Safety neurons and SN-Tune of an 8B model on GPUs: importance, detection, SN-Tune, ASR, save.
# Documented, not run in CI (it needs the weights and GPUs); docs/scale.md has the memory model
# this plan comes from.
#
#   MODEL=meta-llama/Meta-Llama-3-8B-Instruct GPUS=4 examples/launch_8b.sh
#
# Needs: the model's weights (a local folder, or a hub id with HF_HUB_OFFLINE=0 and access to it),
# and GPUs with 80 GB each. What each stage needs, in bf16 (docs/scale.md, "Llama-3-8B"):
#   1. importance (data-parallel, examples/detect_distributed.py, one rank per GPU): each rank
#      holds the HF weights and TransformerLens' copy (2 x 16 GB) plus, while the TL model is
#      built, a converted third copy (48 GB peak): 1 GPU per rank, any number of ranks (GPUS).
#   2. SN-Tune with the default "delta" mechanism: the model and the copy it trains (2 x 16 GB),
#      AdamW state for the deltas only, activations of one batch: 1 GPU. "mask" on a set that
#      touches every layer adds grads, two AdamW states and a bool mask per owned weight (~56 GB
#      more): 2 GPUs via device_map; "full" (the control) 4 GPUs with device_map (pure bf16 AdamW).
#   3. ASR of the original and the tuned model on held-out prompts (HF generation): 1 GPU.
# Time (docs/scale.md, "Time"): importance of 400 prompts of ~100 tokens ~ a few minutes per GPU;
# SN-Tune of 400 documents ~ a minute on one GPU.
set -euo pipefail

MODEL=${MODEL:-meta-llama/Meta-Llama-3-8B-Instruct}
GPUS=${GPUS:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
OUT=${OUT:-runs/launch_8b}
MECHANISM=${MECHANISM:-delta}
PYTHON=${PYTHON:-python}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0}  # the weights come from the hub unless MODEL is a folder
export TOKENIZERS_PARALLELISM=false

echo "== 1. importance and safety neurons: $MODEL, $GPUS rank(s), bf16 =="
$PYTHON -m torch.distributed.run --standalone --nproc_per_node "$GPUS" examples/detect_distributed.py \
    --model "$MODEL" --dtype bfloat16 --batch-size 8 --quantile 0.98 --out "$OUT"

echo "== 2. SN-Tune ($MECHANISM) and 3. ASR before and after =="
MODEL="$MODEL" OUT="$OUT" MECHANISM="$MECHANISM" $PYTHON - <<'PY'
import json, os, time

import torch

import safety_circuits as sc
from safety_circuits.tuning import refusal_documents

model, out, mechanism = os.environ["MODEL"], os.environ["OUT"], os.environ["MECHANISM"]
# delta fits one GPU; mask and full shard the model over every visible GPU (accelerate).
placement = {"device": "cuda"} if mechanism == "delta" else {"device_map": "auto"}
subject = sc.load_model(model, dtype=torch.bfloat16, **placement)
neurons = sc.NeuronSet.load(f"{out}/safety.safetensors", expect=subject)
harmful = sc.data.sample(sc.harmbench("test"), 100)
asr = lambda s: sc.attack_success_rate(s, harmful, max_new_tokens=64, batch_size=16, use="hf").rate
before = asr(subject)
start = time.perf_counter()
docs = refusal_documents(sc.harmbench("val"))
tuned = sc.sn_tune(subject, docs, neurons, mechanism=mechanism, lr=1e-5, batch_size=8)
seconds = time.perf_counter() - start
after = asr(tuned.subject)
tuned.save(f"{out}/sn_tuned", overwrite=True)
summary = {"model": model, "neurons": len(neurons), "mechanism": mechanism, "asr_before": before,
           "asr_after": after, "tune_seconds": seconds, "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
print(summary)
PY
