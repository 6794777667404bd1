#!/usr/bin/env bash
# The commands of the lent GPU machine, run there from the repository root (README.md beside this
# file gives the sequence of device calls).
#   prepare  first call (carries carry-1): extract the base packages, then write the benchmark's
#            random-weight models and shards in the background, while later calls carry the rest
#   check    last call (carries the last folder): extract everything, wait for prepare, then
#            `pytest -m gpu` and `benchmarks/run.py --device cuda --quick`; logs under $OUT
#   pillow   plan B, if earlier carries did not stay on the machine: base packages only (carry-1),
#            the same checks with Pillow decoding on the CPU instead of DALI
set -uo pipefail
step=${1:-check}
out=${OUT:-/tmp/imgcurator-gpu-out}
mkdir -p "$out"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 IMGCURATOR_OFFLINE=1
prepared=/tmp/imgcurator-prepare

case $step in
prepare)
    python3 benchmarks/device/unpack.py .device --only base || exit $?
    nvidia-smi 2>&1 | tee "$out/nvidia-smi.txt"
    # a new session keeps it alive after this call returns (the device tool ends the others)
    setsid bash -c "python3 benchmarks/run.py --device cuda --quick --prepare > $prepared.log 2>&1; echo \$? > $prepared.rc" \
        < /dev/null > /dev/null 2>&1 &
    echo "preparing models and shards in the background: $prepared.log"
    ;;
check|pillow)
    if [ "$step" = check ]; then
        python3 benchmarks/device/unpack.py .device || exit $?
        decoder=auto
    else
        python3 benchmarks/device/unpack.py .device --only base || exit $?
        decoder=pillow
    fi
    python3 - <<'EOF' 2>&1 | tee "$out/versions.txt"
import importlib
import torch
found = {}
for name in ("dask", "distributed", "dask_cuda", "open_clip", "webdataset", "nvidia.dali"):
    try:
        found[name] = getattr(importlib.import_module(name), "__version__", "?")
    except ImportError as exc:
        found[name] = f"missing ({exc})"
print({"torch": torch.__version__, **found})
print("cuda", torch.version.cuda, torch.cuda.get_device_name(0))
EOF
    if [ -f "$prepared.log" ]; then  # at most 5 min; the benchmark writes what is still missing itself
        for _ in $(seq 150); do [ -f "$prepared.rc" ] && break; sleep 2; done
        cp "$prepared.log" "$out/prepare.log"
    fi
    timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts= -m gpu tests 2>&1 | tee "$out/pytest-gpu.txt"
    # curate_alt: one task thread per GPU worker (the default is imgcurator.cuda.threads-per-worker: 2)
    timeout 400 python3 benchmarks/run.py --device cuda --quick --decoder "$decoder" --compare-task-threads 1 2>&1 \
        | tee "$out/bench-gpu.jsonl"
    ;;
*)
    echo "usage: bash benchmarks/device/gpu_check.sh prepare|check|pillow" >&2
    exit 2
    ;;
esac
