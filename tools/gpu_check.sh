#!/usr/bin/env bash
# Device calls for the GPU machine: correctness, speed side by side with the PyTorch peer, and the
# recipe comparison. Run from the repo root there, with the stripped release binary, env.sh and
# shared/bench/peer_gpt2.py carried in .device/ (and, for the torchao fp8 peer, its wheel in .whl/):
#   bash tools/gpu_check.sh [selftest|bench|peer|recipes|baby|heldout|f16tiled|qkvbias|lazyzero|graphs|cubin|profile|all]...
# Each part takes: selftest ~40 s, bench ~1.5 min, peer ~5 min, recipes ~2.5 min (fp32 adds
# ~1.5 min; RECIPES="bf16 fp16 fp8 fp8-unit fp32"), baby ~40 s. Not in `all`: heldout ~6 min
# (HELDOUT_PEER=0 skips the peer's half), f16tiled ~1 min (fp8-unit at 0.91B with
# the tiled FP8 casts of f16 tensors on and off), qkvbias ~2 min (the opt-in QKV bias gradient
# in the Hopper attention backward: selftest with HALFLING_CUDA_ATTN_QKV_BIAS=1 into
# $OUT/selftest-qkvbias.txt, 124M with it 0/1 alternating twice, 0.91B fp8 with it 0/1, and a
# 124M profile with it on into $OUT/prof-124m-qkvbias.txt), lazyzero ~4 min (deferred
# gradient zeroing, the default: selftest with HALFLING_CUDA_LAZY_ZERO=0 into
# $OUT/selftest-lazyzero0.txt, a 200-step baby GPT run with it off and on (final val losses must
# match), 124M 0/1 alternating twice, 0.91B fp8 0/1), graphs ~4 min (training steps recorded
# as CUDA graphs: selftest with HALFLING_CUDA_GRAPHS=0, a 300-step baby GPT run with graphs
# off and on (final val losses must match), 124M 0/1 alternating twice, 0.91B bf16
# 0/1), cubin ~3 min (start-up with empty kernel caches, HALFLING_CUDA_CUBIN 0 then 1, and
# selftest with it into $OUT/selftest-cubin.txt), profile ~1 min (device time per
# kernel, 124M bf16 and 0.91B fp8, into $OUT/prof-*.txt). Files land in $OUT (or /tmp).
set -uo pipefail
source .device/env.sh >/dev/null 2>&1
BIN=${BIN:-./.device/halfling}
OUT=${OUT:-/tmp}
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/xdg}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
wall() { python3 -c "import time; print(round(time.time() - $1, 1))"; }
# ab VAR "0 1 0 1" CONFIG STEPS [RECIPE]: `bench` with the environment switch VAR at each value
# in turn (alternating, so drift shows), one JSON line each.
ab() {
  local var=$1 order=$2 config=$3 steps=$4 recipe=${5:-bf16}
  for on in $order; do
    echo "$config $recipe, $var=$on: $(env "$var=$on" $BIN bench --config "$config" \
      --device cuda --steps "$steps" --warmup 3 --set precision.recipe="$recipe" 2>&1 | tail -1)"
  done
}
# selftest_with VAR=VALUE FILE: `selftest --device cuda` with that switch into $OUT/FILE.
selftest_with() {
  env "$1" $BIN selftest --device cuda > "$OUT/$2" 2>&1
  echo "selftest with $1: rc=$? $(tail -1 "$OUT/$2")"
  grep FAIL "$OUT/$2" | head
}
for what in "${@:-all}"; do
  if [[ $what == selftest || $what == all ]]; then
    $BIN selftest --device cuda > "$OUT/selftest.txt" 2>&1
    echo "selftest rc=$? $(tail -1 "$OUT/selftest.txt")"; grep FAIL "$OUT/selftest.txt" | head
  fi
  if [[ $what == bench || $what == all ]]; then
    $BIN bench --config configs/gpt2_124m.toml --device cuda --steps 20 --warmup 3 2>&1 | tail -1
    for recipe in bf16 fp8; do
      $BIN bench --config configs/bench_0p9b.toml --device cuda --steps 10 --warmup 3 \
        --set precision.recipe=$recipe 2>&1 | tail -1
    done
  fi
  if [[ $what == peer || $what == all ]]; then
    modes=compile
    if ls .whl/torchao-*.whl >/dev/null 2>&1; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && modes=compile,fp8
    fi
    PYTHONUNBUFFERED=1 python3 .device/peer_gpt2.py --modes eager,compile 2>&1 | grep '^{"mode'
    PYTHONUNBUFFERED=1 python3 .device/peer_gpt2.py --modes $modes --layers 16 --dim 2048 --heads 16 \
      --batch 8 --seq 1024 --steps 15 --warmup 5 2>&1 | grep '^{"mode'
  fi
  if [[ $what == recipes || $what == all ]]; then
    runs=()
    for r in ${RECIPES:-bf16 fp16 fp8 fp8-unit}; do
      s=$(date +%s.%N)
      $BIN train --config configs/shakespeare_char_gpu.toml --device cuda --quiet --out /tmp/r/$r \
        --set data.tokenizer=bpe --set data.bpe_vocab_size=2048 --set data.dir=/tmp/bpe2048 \
        --set train.max_steps=2000 --set train.eval_interval=250 --set train.sample_tokens=0 \
        --set precision.monitor_interval=100 --set precision.recipe=$r > /tmp/r-$r.log 2>&1 \
        || { echo "$r failed:"; tail -5 /tmp/r-$r.log; continue; }
      echo "$r: $(wall $s) s"; runs+=(/tmp/r/$r)
    done
    $BIN compare "${runs[@]}" --out "$OUT/recipes_gpu_bpe2048.svg"
    [[ -d /tmp/r/fp8 ]] && $BIN report --run /tmp/r/fp8 > "$OUT/report-fp8.txt" 2>&1
  fi
  if [[ $what == baby || $what == all ]]; then
    s=$(date +%s.%N)
    $BIN train --config configs/shakespeare_char_gpu.toml --device cuda --quiet --out /tmp/baby \
      > /tmp/baby.log 2>&1
    echo "baby GPT: rc=$? $(wall $s) s $(grep -o '"final_val_loss":[^,]*' /tmp/baby/summary.json)"
  fi
  if [[ $what == heldout ]]; then
    # Shapes no config names: layers width heads batch context. Each is benched here and, unless
    # HELDOUT_PEER=0, by torch.compile at the same shape.
    for shape in "24 1024 16 8 1024" "12 768 6 16 1024" "12 768 12 8 2048" "12 960 10 8 1024" \
      "8 1280 16 8 1024" "6 512 8 32 512"; do
      read -r l d h b t <<< "$shape"
      echo "shape L$l d$d h$h (head size $((d / h))) batch $b context $t:"
      $BIN bench --config configs/gpt2_124m.toml --device cuda --steps 10 --warmup 3 \
        --set model.n_layer=$l --set model.n_embd=$d --set model.n_head=$h \
        --set train.batch_size=$b --set model.block_size=$t 2>&1 | tail -1
      [[ ${HELDOUT_PEER:-1} == 1 ]] && PYTHONUNBUFFERED=1 python3 .device/peer_gpt2.py \
        --modes compile --layers $l --dim $d --heads $h --batch $b --seq $t --steps 10 \
        --warmup 4 2>&1 | grep '^{"mode'
    done
  fi
  if [[ $what == profile ]]; then
    HALFLING_CUDA_PROFILE=1 $BIN bench --config configs/gpt2_124m.toml --device cuda --steps 3 \
      --warmup 2 > "$OUT/prof-124m.txt" 2>&1
    HALFLING_CUDA_PROFILE=1 $BIN bench --config configs/bench_0p9b.toml --device cuda --steps 3 \
      --warmup 1 --set precision.recipe=fp8 > "$OUT/prof-0p9b-fp8.txt" 2>&1
    head -25 "$OUT/prof-124m.txt"; tail -1 "$OUT/prof-124m.txt"
  fi
  if [[ $what == qkvbias ]]; then
    selftest_with HALFLING_CUDA_ATTN_QKV_BIAS=1 selftest-qkvbias.txt
    # the largest errors of the bias gradient against the CPU, per dtype
    for dt in f32 bf16 f16; do
      grep -E '^attention.* \+bias db ' "$OUT/selftest-qkvbias.txt" | awk -v dt=$dt '$(NF-3) == dt' \
        | awk '{print $(NF-2), $0}' | sort -g | tail -1 | cut -d' ' -f2-
    done
    ab HALFLING_CUDA_ATTN_QKV_BIAS "0 1 0 1" configs/gpt2_124m.toml 20
    ab HALFLING_CUDA_ATTN_QKV_BIAS "0 1" configs/bench_0p9b.toml 10 fp8
    HALFLING_CUDA_ATTN_QKV_BIAS=1 HALFLING_CUDA_PROFILE=1 $BIN bench --config configs/gpt2_124m.toml \
      --device cuda --steps 3 --warmup 2 > "$OUT/prof-124m-qkvbias.txt" 2>&1
    grep -E 'attention_backward|bias_backward|column_sums' "$OUT/prof-124m-qkvbias.txt"; tail -1 "$OUT/prof-124m-qkvbias.txt"
  fi
  if [[ $what == lazyzero ]]; then
    selftest_with HALFLING_CUDA_LAZY_ZERO=0 selftest-lazyzero0.txt
    # The same training run either way: the losses must agree bit for bit.
    for on in 0 1; do
      HALFLING_CUDA_LAZY_ZERO=$on $BIN train --config configs/shakespeare_char_gpu.toml \
        --device cuda --quiet --out /tmp/lz$on --set train.max_steps=200 \
        --set train.eval_interval=100 --set train.sample_tokens=0 > /tmp/lz$on.log 2>&1
      echo "train, HALFLING_CUDA_LAZY_ZERO=$on: $(grep -o '"final_val_loss":[^,]*' /tmp/lz$on/summary.json)"
    done
    ab HALFLING_CUDA_LAZY_ZERO "0 1 0 1" configs/gpt2_124m.toml 20
    ab HALFLING_CUDA_LAZY_ZERO "0 1" configs/bench_0p9b.toml 10 fp8
  fi
  if [[ $what == graphs ]]; then
    selftest_with HALFLING_CUDA_GRAPHS=0 selftest-graphs0.txt
    grep -E 'recorded' "$OUT/selftest.txt" "$OUT/selftest-graphs0.txt" 2>/dev/null | head -8
    # The same training run either way: losses must agree bit for bit.
    for on in 0 1; do
      HALFLING_CUDA_GRAPHS=$on $BIN train --config configs/shakespeare_char_gpu.toml \
        --device cuda --quiet --out /tmp/gr$on --set train.max_steps=300 \
        --set train.eval_interval=100 --set train.sample_tokens=0 > /tmp/gr$on.log 2>&1
      echo "train, HALFLING_CUDA_GRAPHS=$on: rc=$? $(grep -o '"final_val_loss":[^,]*' /tmp/gr$on/summary.json) $(grep -o '"tokens_per_s":[^,]*' /tmp/gr$on/summary.json)"
    done
    ab HALFLING_CUDA_GRAPHS "0 1 0 1" configs/gpt2_124m.toml 20
    ab HALFLING_CUDA_GRAPHS "0 1" configs/bench_0p9b.toml 10
  fi
  if [[ $what == cubin ]]; then
    # Start-up with empty kernel caches (ours and the driver's), PTX then CUBIN images.
    for on in 0 1; do
      rm -rf ~/.cache/halfling/ptx ~/.nv/ComputeCache
      s=$(date +%s.%N)
      HALFLING_CUDA_CUBIN=$on $BIN bench --config configs/shakespeare_char_gpu.toml --device cuda \
        --steps 1 --warmup 0 > /tmp/cold$on.log 2>&1
      echo "cold start, HALFLING_CUDA_CUBIN=$on: rc=$? $(wall $s) s"; tail -2 /tmp/cold$on.log
    done
    selftest_with HALFLING_CUDA_CUBIN=1 selftest-cubin.txt
  fi
  if [[ $what == f16tiled ]]; then
    ab HALFLING_CUDA_FP8_F16_TILED "0 1 0 1" configs/bench_0p9b.toml 10 fp8-unit
  fi
done
