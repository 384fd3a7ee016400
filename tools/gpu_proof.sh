#!/usr/bin/env bash
# The GPU campaign in one call (issue 17), for a GPU machine that has torch but not our extras:
#   tools/gpu_proof.sh            # writes gpu_proof.json/.md, proof.log and gpu_tests.log to $OUT
# 1. installs the wheels carried in .whl/ (av, soundfile, cffi, pycparser: the device lacks them);
# 2. runs tools/gpu_proof.py on the 14B shapes at 704*384 (env, GEMMs, streamed vs resident, the
#    24/16/12 GB layouts capped and sampled device-wide, the torch decoder);
# 3. runs every GPU-marked test (the real-size ORT-on-CUDA one is left out: no CUDA EP there).
# Each step has its own time limit, so a hang in one still leaves the others' files in $OUT.
set -u
OUT=${OUT:-/tmp/gpu_proof}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv | tee "$OUT/nvidia_smi.txt"
timeout "${PROOF_TIMEOUT:-330}" python3 tools/gpu_proof.py --out "$OUT" --sections "${PROOF_SECTIONS:-env,gemm,dit,decoder,stream}" ${PROOF_ARGS:-} \
    > "$OUT/proof.log" 2>&1
echo "gpu_proof rc=$?"; tail -n 40 "$OUT/proof.log"
timeout "${TESTS_TIMEOUT:-180}" python3 -m pytest -q -p no:cacheprovider -m gpu -k "${TESTS_K:-not device_wide}" --timeout 150 -rfEs \
    --continue-on-collection-errors tests/ > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$?"; tail -n 60 "$OUT/gpu_tests.log"
# 4. the W8A8 linear eager vs fused at the 14B shapes, with W8A16 / bf16 / fp8 _scaled_mm beside it (issue 21);
#    the sageattention wheel, when carried in .whl/, lets test_cuda_sage_error_against_sdpa above run
timeout "${QLINEAR_TIMEOUT:-240}" python3 tools/bench_qlinear.py --repeats 20 > "$OUT/bench_qlinear.log" 2>&1
echo "bench qlinear rc=$?"; tail -n 12 "$OUT/bench_qlinear.log"
