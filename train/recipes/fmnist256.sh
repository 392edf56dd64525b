#!/usr/bin/env bash
# The 256-token Fashion-MNIST model (issue 13), every stage resumable and skipped when done.
#
#   nohup train/recipes/fmnist256.sh >> /work/runs13/recipe.log 2>&1 &     # all stages, in order
#   train/recipes/fmnist256.sh mage                                          # one stage (or several)
#   train/recipes/fmnist256.sh status                                        # what is done, where runs stand
#
# Stages: data tokenizer recon caches pixels mage probe curve fd (and `status`); `fd` (10 000
# samples per seed, hours of CPU) runs only when named. Rerunning the script
# after a kill (or a reboot) continues where it stopped: finished stages are skipped (their output
# exists), the two training stages resume exactly from their latest checkpoint (--resume auto).
# Everything runs at one torch thread, one job at a time, under $RUNS (outside the repository).
#
# Geometry: Fashion-MNIST's 28x28 images padded with their black background to 32x32 (no
# resampling), a grayscale VQGAN with one 2x downsampling -> 16x16 = 256 tokens (257 with the class
# slot). Sizes and step counts below were set from a pilot on the shared 2-core machine
# (docs/TRAINING.md, "256-token model (in progress)"); override any of them from the environment.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RUNS=${RUNS:-/work/runs13}
PY=${PY:-$REPO/.venv/bin/python}
DEEPSPEED=${DEEPSPEED:-$(dirname "$PY")/deepspeed}
PORT=${PORT:-29613}            # the DeepSpeed launcher's port (two jobs on one port fail: EADDRINUSE)
SRC=${SRC:-/usr/share/datasets/fashion-mnist}
DATA=$RUNS/data/fmnist32
TOK=$RUNS/tok
MAGE=${MAGE_DIR:-$RUNS/mage}   # the MAGE stage's run folder (checkpoints, metrics.csv, the export)
CACHE=$RUNS/cache
MIN_PSNR=${MIN_PSNR:-26}        # the tokenizer gate (test split, central 28x28 pixels)
# The finished exports of the two training stages live in the repository (machines are new from one
# session to the next; checkpoints never go into git): a stage whose output is missing under $RUNS
# starts from the committed file instead of training again. SAVED= (empty) trains from scratch.
# The MAGE export is the shipped default model: $SAVED/mage_fmnist256.{pt,json} are links to
# mage_fast/assets/; a new run's `save` replaces the links with its own files (the asset is kept).
SAVED=${SAVED-$REPO/train/recipes/fmnist256}

# tokenizer (pilot: see docs/TRAINING.md)
TOK_CH=${TOK_CH:-32}
TOK_NRB=${TOK_NRB:-2}
TOK_Z=${TOK_Z:-32}
TOK_CODES=${TOK_CODES:-1024}
TOK_STEPS=${TOK_STEPS:-3000}
TOK_BATCH=${TOK_BATCH:-32}
TOK_LR=${TOK_LR:-1e-3}
# MAGE-C
M_DIM=${M_DIM:-192}
M_DEPTH=${M_DEPTH:-6}
M_HEADS=${M_HEADS:-6}
M_DDIM=${M_DDIM:-128}
M_DDEPTH=${M_DDEPTH:-2}
M_DHEADS=${M_DHEADS:-4}
M_BATCH=${M_BATCH:-32}          # pairs of augmented views per step (lr = blr x 32 / 256 = 1e-3)
M_STEPS=${M_STEPS:-3500}        # 112 000 pairs, 1.9 epochs: 85 min at 2 threads with the machine to itself
                                # (bf16 on AMX: 1.3-1.6 s a step). The committed export is this run
                                # (mage_fmnist256.stage1.*) continued twice, 5000 steps each from the
                                # previous export with a fresh cosine (docs/TRAINING.md): stage 2
                                # M_INIT=<stage-1 export> MAGE_DIR=$RUNS/mage2 M_STEPS=5000 M_SAVE=200 SAVED=
                                # (mage_fmnist256.stage2.*), then M_INIT=<stage-2 export> MAGE_DIR=$RUNS/mage3
                                # M_STEPS=5000 M_SAVE=250 M_WARMUP=200 M_BLR=6e-3 SAVED= (mage_fmnist256.*)
M_WARMUP=${M_WARMUP:-100}
M_BLR=${M_BLR:-8e-3}
M_DROPOUT=${M_DROPOUT:-0}       # the official 0.1 regularises a model that sees ImageNet 1600 times; this
                                # one sees Fashion-MNIST twice and is under-fit: 0 learns faster, and skips
                                # the random masks that are a quarter of a CPU step (docs/TRAINING.md)
M_INIT=${M_INIT:-}              # continue from this MAGE export (--init_from: weights only, a fresh optimizer
                                # and lr schedule); empty: from scratch
M_SAVE=${M_SAVE:-50}            # a checkpoint every M_SAVE steps (a few minutes; all kept, the curve reads them)
# bf16 (DeepSpeed: bf16 weights and activations, fp32 master weights) where the CPU multiplies bf16 in
# hardware (AMX: 3.5-4x fp32 matrix products, 1.4x a whole step here; AVX512-BF16 on AMD Zen 5: 4x
# the matrix products); fp32 elsewhere (bf16 is 6-50x slower than fp32 on CPUs without either). A
# run resumes with the precision it started with.
M_PRECISION=${M_PRECISION:-$(grep -qwE 'amx_bf16|avx512_bf16' /proc/cpuinfo && echo bf16 || echo fp32)}
VIEWS=${VIEWS:-3}               # cached views per training image: view 0 plain (the probe's), 2 crops
                                # (a run of 2 epochs draws about 4 views per image)
CURVE_LIMIT=${CURVE_LIMIT:-10000}   # training images the curve's probes fit on (the final probe: all)
CURVE_EVERY=${CURVE_EVERY:-500}     # probe the checkpoints at multiples of this many steps (a probe: 10-20 CPU-min)
FD_N=${FD_N:-10000}                 # seed 0's samples: the model card's Frechet distance (fd stage)
FD_FLOOR_N=${FD_FLOOR_N:-5000}      # seed 1's: the floor between seeds, 5 000 against seed 0's first 5 000,
                                    # the size of the test split's halves (the real floor) they sit beside

THREADS=${THREADS:-1}            # torch threads per job (one job runs at a time)
export PYTHONPATH=$REPO OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
cd "$REPO"

say() { echo "[$(date -u +%F' '%T)] fmnist256: $*"; }
need() { [ -e "$1" ] || { say "missing $1 (run the stage that makes it first)"; exit 1; }; }

restore() {  # file dir [more files]: copy a committed export (and its run's args.json, metrics.csv) into $RUNS
  local f=$1 dir=$2 x; shift 2
  [ -n "$SAVED" ] && [ -f "$SAVED/$f" ] || return 1
  [ -d "$dir/checkpoints" ] && return 1   # a run of this machine goes on (or finished): do not mix the two
  mkdir -p "$dir"
  for x in "$f" "$@"; do cp "$SAVED/$x" "$dir/$x"; done
  for x in args.json metrics.csv; do
    if [ -f "$SAVED/${f%.pt}.$x" ]; then cp "$SAVED/${f%.pt}.$x" "$dir/$x"; fi
  done
  say "$f: restored from $SAVED (the committed export of this stage; SAVED= trains it again)"
  return 0
}

save() {  # file dir [more files]: what `git add train/recipes/fmnist256` would keep of a finished stage
  local f=$1 dir=$2 x; shift 2
  [ -n "$SAVED" ] || return 0
  mkdir -p "$SAVED"
  for x in "$f" "$@"; do  # a link to the shipped asset is replaced, never written through
    [ -L "$SAVED/$x" ] && rm "$SAVED/$x"
    cp "$dir/$x" "$SAVED/$x"
  done
  cp "$dir/args.json" "$SAVED/${f%.pt}.args.json"
  cp "$dir/metrics.csv" "$SAVED/${f%.pt}.metrics.csv"
  say "$f: copied to $SAVED with its run's args.json and metrics.csv (commit them; never the checkpoints)"
}

stage_data() {
  if [ -f "$DATA/.done" ]; then say "data: done ($DATA)"; return; fi
  [ -d "$SRC" ] || { say "no $SRC: apt-get update && apt-get install -y dataset-fashion-mnist"; exit 1; }
  say "data: Fashion-MNIST padded to 32x32 -> $DATA"
  rm -rf "$DATA"
  "$PY" train/prepare_fashion_mnist.py --src "$SRC" --out "$DATA" --pad_to 32
  touch "$DATA/.done"
}

stage_tokenizer() {
  if [ -f "$TOK/tokenizer.pt" ]; then say "tokenizer: done ($TOK/tokenizer.pt)"; return; fi
  if restore tokenizer.pt "$TOK"; then return; fi
  need "$DATA/.done"
  say "tokenizer: grayscale VQGAN ch $TOK_CH, ch_mult 1,2, $TOK_NRB res blocks, $TOK_CODES codes, $TOK_STEPS steps"
  "$DEEPSPEED" --master_port "$PORT" train/train_tokenizer.py --data_path "$DATA/train" --img_size 32 \
    --crop_scale_min 0.5 --grayscale --ch "$TOK_CH" --ch_mult 1,2 --num_res_blocks "$TOK_NRB" \
    --z_channels "$TOK_Z" --n_embed "$TOK_CODES" --batch_size "$TOK_BATCH" --max_steps "$TOK_STEPS" \
    --lr "$TOK_LR" --warmup_steps 50 --min_lr 1e-5 --weight_decay 0.0 --l1_weight 0.5 --restart_every 50 \
    --log_every 25 --save_every 100 --keep_last 2 --num_workers 1 --data_backend torch --threads "$THREADS" \
    --no_progress --output_dir "$TOK" --export "$TOK/tokenizer.pt.tmp" --resume auto
  mv "$TOK/tokenizer.pt.tmp" "$TOK/tokenizer.pt"
  save tokenizer.pt "$TOK"
}

stage_recon() {
  need "$TOK/tokenizer.pt"
  if [ ! -f "$TOK/recon_test.json" ]; then
    say "recon: tokenizer on the 10 000 test images (central 28x28 scored)"
    "$PY" train/evaluate.py --json "$TOK/recon_test.json.tmp" recon --tokenizer "$TOK/tokenizer.pt" \
      --data_path "$DATA/test" --img_size 32 --center_crop 28 --png "$TOK/recon_test.png" --png_per_class 3
    mv "$TOK/recon_test.json.tmp" "$TOK/recon_test.json"
  fi
  local psnr
  psnr=$("$PY" -c "import json,sys; print(json.loads(open(sys.argv[1]).readlines()[-1])['psnr_db'])" \
         "$TOK/recon_test.json")
  say "recon: PSNR $psnr dB on the test split (gate: $MIN_PSNR dB); picture $TOK/recon_test.png"
  if ! "$PY" -c "import sys; sys.exit(float(sys.argv[1]) < float(sys.argv[2]))" "$psnr" "$MIN_PSNR"; then
    say "recon: below $MIN_PSNR dB: not training MAGE on this tokenizer. Train a new one (move $TOK away, raise" \
        "TOK_STEPS or TOK_CH) or pass MIN_PSNR=... to go on anyway"
    exit 2
  fi
}

cache() {  # split views out [extra cache_tokens.py flags]
  local split=$1 views=$2 out=$3; shift 3
  if [ -f "$out" ]; then say "caches: $out done"; return; fi
  say "caches: $split, $views view(s) -> $out"
  "$PY" train/cache_tokens.py --data_path "$DATA/$split" --tokenizer "$TOK/tokenizer.pt" --img_size 32 \
    --views "$views" --plain_first --batch_size 250 --num_workers 0 --out "$out.tmp" "$@"
  mv "$out.tmp" "$out"
}

stage_caches() {
  need "$TOK/recon_test.json"
  mkdir -p "$CACHE"
  cache test 1 "$CACHE/test_plain.pt"
  cache train "$VIEWS" "$CACHE/train_v$VIEWS.pt" --crop_scale_min 0.35   # view 0 plain: the probe reads it
}

stage_pixels() {
  if [ -f "$RUNS/pixels.json" ]; then say "pixels: done ($RUNS/pixels.json)"; return; fi
  need "$DATA/.done"
  say "pixels: the raw-pixel logistic regression (the probe's bar), 32x32 padded, full splits"
  "$PY" train/evaluate.py --json "$RUNS/pixels.json.tmp" pixels --train_path "$DATA/train" \
    --test_path "$DATA/test" --img_size 32
  mv "$RUNS/pixels.json.tmp" "$RUNS/pixels.json"
}

stage_mage() {
  if [ -f "$MAGE/mage_fmnist256.pt" ]; then say "mage: done ($MAGE/mage_fmnist256.pt)"; return; fi
  if restore mage_fmnist256.pt "$MAGE" mage_fmnist256.json; then return; fi
  need "$CACHE/train_v$VIEWS.pt"
  if [ -f "$MAGE/args.json" ]; then  # a run resumes with the precision it started with
    M_PRECISION=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['precision'])" "$MAGE/args.json")
  fi
  say "mage: $M_PRECISION, class-conditional MAGE-C, encoder $M_DIM x $M_DEPTH, decoder $M_DDIM x $M_DDEPTH, $M_BATCH pairs," \
      "dropout $M_DROPOUT, $M_STEPS steps (resumes from $MAGE/checkpoints/latest if there)"
  "$DEEPSPEED" --master_port "$PORT" train/pretrain.py --model tiny --embed_dim "$M_DIM" --depth "$M_DEPTH" \
    --num_heads "$M_HEADS" --decoder_embed_dim "$M_DDIM" --decoder_depth "$M_DDEPTH" \
    --decoder_num_heads "$M_DHEADS" --img_size 32 --tokenizer "$TOK/tokenizer.pt" ${M_INIT:+--init_from "$M_INIT"} \
    --token_cache "$CACHE/train_v$VIEWS.pt" --class_cond --class_dropout_prob 0.2 \
    --contrastive_weight 1.0 --temperature 0.2 --dropout "$M_DROPOUT" --batch_size "$M_BATCH" --max_steps "$M_STEPS" \
    --warmup_steps "$M_WARMUP" --blr "$M_BLR" --min_lr 1e-5 --log_every 20 --save_every "$M_SAVE" \
    --keep_last 0 --threads "$THREADS" --deepspeed_config zero1 --precision "$M_PRECISION" --no_progress --output_dir "$MAGE" \
    --export "$MAGE/mage_fmnist256.pt.tmp" --resume auto
  # the model card beside it: class names in label (folder) order, so --class-id NAME|all work
  "$PY" - "$CACHE/train_v$VIEWS.pt" "$MAGE/mage_fmnist256.json" <<'CARD'
import json, sys, torch
classes = torch.load(sys.argv[1], map_location="cpu", weights_only=True)["meta"]["classes"]
card = {"description": "class-conditional MAGE-C + grayscale VQGAN on Fashion-MNIST padded to 32 px, 16x16 = 256 "
                       "tokens (train/recipes/fmnist256.sh; docs/TRAINING.md)",
        "class_conditional": True, "classes": [c.split("_", 1)[1] for c in classes],
        "sampling": {"num_iter": 20, "temperature": 1.0}}
json.dump(card, open(sys.argv[2], "w"), indent=1)
CARD
  mv "$MAGE/mage_fmnist256.pt.tmp" "$MAGE/mage_fmnist256.pt"
  save mage_fmnist256.pt "$MAGE" mage_fmnist256.json
}

probe_one() {  # ckpt json [evaluate.py probe flags]
  local ckpt=$1 json=$2; shift 2
  "$PY" train/evaluate.py --json "$json" probe --ckpt "$ckpt" --train_cache "$CACHE/train_v$VIEWS.pt" \
    --test_cache "$CACHE/test_plain.pt" "$@"
}

stage_probe() {
  need "$MAGE/mage_fmnist256.pt"
  if [ -f "$MAGE/probe_final.json" ]; then say "probe: done ($MAGE/probe_final.json)"; return; fi
  say "probe: the exported model, the whole training split"
  probe_one "$MAGE/mage_fmnist256.pt" "$MAGE/probe_final.json.tmp" --fewshot 1 5 10
  mv "$MAGE/probe_final.json.tmp" "$MAGE/probe_final.json"
}

stage_curve() {  # the probe at every CURVE_EVERY steps among the saved checkpoints (not yet probed)
  need "$CACHE/test_plain.pt"
  [ -d "$MAGE/checkpoints" ] || { say "curve: no checkpoints yet"; return; }
  mkdir -p "$MAGE/curve"
  local step latest
  latest=$(sed -n 's/^step\([0-9][0-9]*\)$/\1/p' "$MAGE/checkpoints/latest" 2>/dev/null || true)
  for step in $(ls "$MAGE/checkpoints" | sed -n 's/^step\([0-9][0-9]*\)$/\1/p' | sort -n); do
    # only the latest checkpoint resumes: drop the optimizer states (3/4 of the bytes) of those
    # older than it (a run going on only writes newer ones), keep their weights for probes. The
    # curve's own steps keep theirs until probed: a bf16 run's fp32 weights live there.
    local probed=0
    grep -q "\"step\": $step," "$MAGE/curve.jsonl" 2>/dev/null && probed=1
    if [ -n "$latest" ] && [ "$step" -lt "$latest" ] && { [ $((step % CURVE_EVERY)) -ne 0 ] || [ $probed = 1 ]; }; then
      rm -f "$MAGE/checkpoints/step$step/"*optim_states.pt
    fi
    [ $((step % CURVE_EVERY)) -eq 0 ] && [ $probed = 0 ] || continue
    say "curve: probe at step $step (fit on $CURVE_LIMIT training images)"
    "$PY" train/export_checkpoint.py --run_dir "$MAGE" --tag "step$step" --out "$MAGE/curve/step$step.pt" >/dev/null
    probe_one "$MAGE/curve/step$step.pt" "$MAGE/curve/step$step.json" --train_limit "$CURVE_LIMIT"
    "$PY" - "$MAGE/curve/step$step.json" "$step" "$MAGE/metrics.csv" >> "$MAGE/curve.jsonl" <<'EOF'
import csv, json, sys
res = json.loads(open(sys.argv[1]).readlines()[-1])
step = int(sys.argv[2])
rows = [r for r in csv.DictReader(open(sys.argv[3])) if int(r["step"]) <= step]
last = rows[-1] if rows else {}
print(json.dumps({"step": step, "probe_test_accuracy": res["test_accuracy"], "train_n": res["train_n"],
                  "loss": float(last.get("loss", "nan")), "mlm_loss": float(last.get("mlm_loss") or "nan"),
                  "contrastive_loss": float(last.get("contrastive_loss") or "nan")}))
EOF
    rm -f "$MAGE/curve/step$step.pt"
    tail -1 "$MAGE/curve.jsonl"
  done
}

stage_fd() {  # the model card's Frechet distances: samples against the test split, with both noise floors
  need "$MAGE/mage_fmnist256.pt"
  local gen=$MAGE/gen fd=$MAGE/fd seed n   # beside the run: each model its own samples
  mkdir -p "$gen" "$fd"
  for seed in 0 1; do  # exact decoding, the model card's settings; --resume: a killed run goes on
    [ -f "$fd/gen_seed$seed.done" ] && continue
    n=$FD_N; [ "$seed" = 1 ] && n=$FD_FLOOR_N
    say "fd: $n class-balanced samples (--class-id all), seed $seed -> $gen/seed$seed"
    "$PY" -m mage_fast generate --ckpt "$MAGE/mage_fmnist256.pt" --num-images "$n" --class-id all \
      --seed "$seed" --batch-size 100 --grid 100 --out "$gen/seed$seed" --resume
    touch "$fd/gen_seed$seed.done"
  done
  if [ ! -f "$fd/gen_base49.done" ]; then  # the 49-token model it would replace as the default, same work
    say "fd: $FD_N samples of the shipped 49-token model (mage_fmnist, its card's settings), seed 0 -> $gen/base49"
    "$PY" -m mage_fast generate --ckpt mage_fmnist --num-images "$FD_N" --class-id all --seed 0 \
      --batch-size 100 --grid 100 --out "$gen/base49" --resume
    touch "$fd/gen_base49.done"
  fi
  # The distances from four feature sets, each computed once (EfficientNet-Lite0: about 58 images/s
  # at two threads; 35 000 images, half what one `mage_fast fid` call per pair would featurise) and
  # cached beside the results; the real floor splits the test features in two disjoint halves,
  # alternating within each class folder (5 000 each, class-balanced). `python -m mage_fast fid X Y`
  # gives the same number for any one pair.
  # The 49-token model's 28 px samples are padded to 32 px with black, as its training images
  # were by this recipe's data stage, so both models meet the same reference features.
  "$PY" - "$gen/seed0" "$gen/seed1" "$DATA/test" "$gen/base49" "$fd" <<'FD'
import os, sys
import torch
from PIL import Image
from mage_fast.eval.frechet import content_key, efficientnet_features, frechet_distance, gaussian_stats, sample_files
from mage_fast.runs import write_json

*dirs, out = sys.argv[1:]
sets = {}
for name, d in zip(("seed0", "seed1", "test", "base49"), dirs):
    try:  # by hand, before every set is made: the pairs of the sets that are
        files = sample_files(d, name)[0]
    except (FileNotFoundError, ValueError) as e:
        print(f"features of {name}: skipped ({e})")
        continue
    if name == "base49":
        os.makedirs(d + "_pad32", exist_ok=True)
        for f in files:
            im = Image.open(f).convert("RGB")
            canvas = Image.new("RGB", (32, 32))
            canvas.paste(im, ((32 - im.width) // 2, (32 - im.height) // 2))
            canvas.save(os.path.join(d + "_pad32", os.path.basename(f)))
        files = [os.path.join(d + "_pad32", os.path.basename(f)) for f in files]
    cache, key = os.path.join(out, name + "_features.pt"), content_key(files)
    st = torch.load(cache, weights_only=True) if os.path.isfile(cache) else {}
    if st.get("content_sha256") != key:
        print(f"features of {name}: {len(files)} images ({d})", flush=True)
        st = {"features": efficientnet_features(files), "content_sha256": key, "files": files}
        torch.save(st, cache + ".tmp")
        os.replace(cache + ".tmp", cache)
    sets[name] = st
by_class = {}
for i, f in enumerate(sets["test"]["files"]):
    by_class.setdefault(os.path.dirname(f), []).append(i)
half = [sorted(idx, key=lambda i: sets["test"]["files"][i])[k::2] for idx in by_class.values() for k in (0, 1)]
halves = [torch.tensor(sum(half[0::2], [])), torch.tensor(sum(half[1::2], []))]
feats = {n: st["features"] for n, st in sets.items()}
feats["test_a"], feats["test_b"] = (sets["test"]["features"][h] for h in halves)
if "seed0" in feats and "seed1" in feats:  # the seed floor at seed 1's count: seed 0's first images
    feats["seed0_first"] = feats["seed0"][: len(feats["seed1"])]  # (indices cycle the classes: balanced)
for pair, (x, y) in {"seed0_test": ("seed0", "test"), "seed0first_test": ("seed0_first", "test"),
                     "seed1_test": ("seed1", "test"), "seed0first_seed1": ("seed0_first", "seed1"),
                     "testa_testb": ("test_a", "test_b"), "base49_test": ("base49", "test")}.items():
    if not {x, y} <= set(feats):
        continue
    (mx, sx), (my, sy) = gaussian_stats(feats[x]), gaussian_stats(feats[y])
    r = {"frechet_efficientnet_lite0": frechet_distance(mx, sx, my, sy), "num_generated": len(feats[x]),
         "num_reference": len(feats[y]), "sets": [x, y],
         "note": "EfficientNet-Lite0 features: ranks quality offline, not comparable to published (Inception) FID"}
    write_json(os.path.join(out, pair + ".json"), r)
    print(f"  {pair:12s} {r['frechet_efficientnet_lite0']:8.3f}  ({r['num_generated']} vs {r['num_reference']})")
FD
}

stage_status() {
  for f in "$DATA/.done" "$TOK/tokenizer.pt" "$TOK/recon_test.json" "$CACHE/test_plain.pt" \
           "$CACHE/train_v$VIEWS.pt" "$RUNS/pixels.json" "$MAGE/mage_fmnist256.pt" "$MAGE/probe_final.json"; do
    if [ -e "$f" ]; then echo "done     $f"; else echo "not yet  $f"; fi
  done
  for r in "$TOK" "$MAGE"; do
    [ -f "$r/metrics.csv" ] && echo "$r: latest $(cat "$r/checkpoints/latest" 2>/dev/null || echo none)," \
      "last log: $(tail -1 "$r/metrics.csv" | cut -d, -f1-6)"
  done
  [ -f "$MAGE/curve.jsonl" ] && cat "$MAGE/curve.jsonl"
  return 0
}

main() {
  local stages=("$@") s
  [ ${#stages[@]} -gt 0 ] || stages=(data tokenizer recon caches pixels mage probe curve)
  for s in "${stages[@]}"; do
    case $s in
      data|tokenizer|recon|caches|pixels|mage|probe|curve|fd|status) ;;
      *) echo "unknown stage $s (data tokenizer recon caches pixels mage probe curve fd status)" >&2; exit 64 ;;
    esac
  done
  for s in "${stages[@]}"; do "stage_$s"; done
  say "finished: ${stages[*]}"
}

# one line: bash has read all of it before it runs, so editing this file during a run is safe
main "$@"; exit $?
