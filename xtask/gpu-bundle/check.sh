#!/bin/sh
# check.sh: the GPU check of an edge box, from the bundle `cargo xtask
# gpu-bundle` writes. Needs nothing installed beyond the NVIDIA driver and
# the CUDA 13 libraries, and no network.
#
#   ./check.sh [OUT_DIR]        (default: ./results beside this script)
#
# 1. Finds the libraries the CUDA build links: the driver's libcuda.so.1 and
#    CUDA 13's libcudart, libcublas(Lt), libcurand, in the CUDA toolkit's
#    directories or in the lib folders of the nvidia-* Python packages
#    (MEC_CUDA_LIBS=DIR[:DIR...] names them instead), and says which it used.
# 2. Reports the driver and the GPUs (nvidia-smi, when present).
# 3. Runs `edge-agent-cuda gpu-check`: the agreement of the GPU path with the
#    CPU path and llama.cpp on a fixed text, and speed figures (time to first
#    token for 200- and 800-token prompts, decode tokens/s at 1, 16 and 64
#    streams; MEC_SPEED=PROMPTS:STREAMS:TOKENS changes the plan, MEC_SPEED=
#    none skips it). Where no GPU can run the model it runs on the CPU and
#    says why.
# 4. With MEC_SYNTH=1.5b or 7b: writes a synthetic model of that shape (random
#    Q4_1 weights, this model's tokenizer: its text is noise) in OUT_DIR and
#    measures its speed alone (for the share of the memory-bandwidth bound:
#    weight_bytes_per_token x tokens/s over the GPU's bandwidth).
# Writes OUT_DIR/results.json and OUT_DIR/results.txt; exit 0 when the check
# passed, 1 when a figure is outside its tolerance, 69 when the build
# cannot start here.
set -u
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/results}
mkdir -p "$out"
txt=$out/results.txt
: >"$txt"
say() { printf '%s\n' "$*" | tee -a "$txt"; }
json_str() { printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g'; }

# --- 1. libraries -----------------------------------------------------------
need_toolkit="libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13"
if [ -n "${MEC_CUDA_LIBS:-}" ]; then
    search=$(echo "$MEC_CUDA_LIBS" | tr ':' ' ')
    driver_search=$search
else
    search=""
    for d in ${CUDA_HOME:-} ${CUDA_PATH:-} /usr/local/cuda /usr/local/cuda-13* /opt/cuda; do
        for sub in lib64 lib targets/x86_64-linux/lib; do
            [ -d "$d/$sub" ] && search="$search $d/$sub"
        done
    done
    # The nvidia-* Python packages (pip's CUDA): site-packages/nvidia/*/lib.
    for root in /usr/lib /usr/local/lib /opt "${HOME:-/root}/.local/lib" /root/.local/lib; do
        [ -d "$root" ] || continue
        for d in $(find "$root" -maxdepth 7 -type d -path '*site-packages/nvidia/*/lib' 2>/dev/null | sort); do
            search="$search $d"
        done
    done
    driver_search="/usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib"
    # A distribution's CUDA packages put the toolkit's libraries there too.
    search="$search /usr/lib/x86_64-linux-gnu /usr/lib64"
fi
libpath=""
libs_json=""
missing=""
add_dir() {
    case ":$libpath:" in *":$1:"*) ;; *) libpath=${libpath:+$libpath:}$1 ;; esac
}
find_lib() { # name, dirs...
    name=$1
    shift
    for d in "$@"; do
        case $d in *compat*) continue ;; esac # the forward-compat copy is not the driver's
        if [ -e "$d/$name" ]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}
for lib in libcuda.so.1 $need_toolkit; do
    if [ "$lib" = libcuda.so.1 ]; then
        dir=$(find_lib "$lib" $driver_search)
    else
        dir=$(find_lib "$lib" $search)
    fi
    if [ -n "$dir" ]; then
        add_dir "$dir"
        say "library $lib: $dir"
        libs_json="$libs_json${libs_json:+,}\"$lib\":\"$(json_str "$dir")\""
    else
        say "library $lib: not found"
        libs_json="$libs_json${libs_json:+,}\"$lib\":null"
        missing="$missing $lib"
    fi
done

# --- 2. driver and GPUs ------------------------------------------------------
smi=""
if command -v nvidia-smi >/dev/null 2>&1; then
    smi=$(nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used --format=csv,noheader 2>&1 | tr '\n' ';')
    say "nvidia-smi: $smi"
else
    say "nvidia-smi: not installed"
fi
smi_json=$(json_str "$smi")

# --- 3. the check ------------------------------------------------------------
speed=${MEC_SPEED:-200,800:1,16,64:128}
set -- gpu-check --model "$here/model.gguf" --json-out "$out/gpu-check.json"
[ "$speed" = none ] || set -- "$@" --speed "$speed"
rm -f "$out/gpu-check.json"
LD_LIBRARY_PATH=$libpath${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
    "$here/edge-agent-cuda" "$@" >"$out/gpu-check.txt" 2>"$out/gpu-check.log"
rc=$?
tee -a "$txt" <"$out/gpu-check.txt"
if [ ! -s "$out/gpu-check.json" ]; then
    say "the CUDA build did not run its check here (exit $rc):"
    tee -a "$txt" <"$out/gpu-check.log"
    check=null
    [ $rc -eq 0 ] && rc=1
else
    check=$(cat "$out/gpu-check.json")
fi
# --- 4. a synthetic model, for speed alone --------------------------------------
synth=null
synth_speed=null
if [ -n "${MEC_SYNTH:-}" ] && [ "$check" != null ]; then
    model=$out/synthetic-$MEC_SYNTH.gguf
    if synth=$(LD_LIBRARY_PATH=$libpath${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
        "$here/edge-agent-cuda" synth-model --shape "$MEC_SYNTH" --out "$model" \
        --tokenizer-from "$here/model.gguf" 2>>"$out/gpu-check.log"); then
        say "synthetic model: $synth"
        synth_plan=${MEC_SYNTH_SPEED:-200:1,16:128}
        if LD_LIBRARY_PATH=$libpath${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
            "$here/edge-agent-cuda" gpu-check --model "$model" --speed "$synth_plan" --speed-only \
            --json-out "$out/synthetic-speed.json" >/dev/null 2>>"$out/gpu-check.log"; then
            synth_speed=$(cat "$out/synthetic-speed.json")
            say "synthetic model speed (its text is noise): $synth_speed"
        else
            say "synthetic model speed: failed (see $out/gpu-check.log)"
            rc=1
        fi
        rm -f "$model"
    else
        say "synthetic model: could not be written (see $out/gpu-check.log)"
        synth=null
        rc=1
    fi
fi
cat >"$out/results.json" <<JSON
{"libraries":{$libs_json},"ld_library_path":"$(json_str "$libpath")","nvidia_smi":"$smi_json","exit_code":$rc,"gpu_check":$check,"synthetic_model":$synth,"synthetic_speed":$synth_speed}
JSON
say "results: $out/results.json, $out/results.txt (exit $rc)"
exit $rc
