#!/usr/bin/env bash
# Run a command under one of the three CPU kernel settings the learning claims are checked on, each with its own
# fresh inductor compile cache: inductor's cache key does not include ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA, so a
# shared cache hands one setting's compiled kernels to another (measured: a compiled float32 forward off by 1.7e5,
# and a native run after an avx2 one dying in malloc).
#
#   bash scripts/kernels.sh native|avx2|default COMMAND...
#   bash scripts/kernels.sh avx2 .venv/bin/python -m pytest -m learning -q
#
# native: what this CPU picks (AVX512 and its BF16/VNNI where present); avx2: PyTorch's AVX2 kernels and oneDNN held
# to AVX2, as an older x86 CPU runs them; default: PyTorch's portable non-vectorised kernels (oneDNN keeps its own
# choice). Each changes the rounding of float32 matmuls and reductions the way another CPU would.
set -euo pipefail
setting=${1:?usage: scripts/kernels.sh native|avx2|default COMMAND...}
shift
unset ATEN_CPU_CAPABILITY ONEDNN_MAX_CPU_ISA
case "$setting" in
  native) ;;
  avx2) export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ;;
  default) export ATEN_CPU_CAPABILITY=default ;;
  *) echo "scripts/kernels.sh: unknown kernel setting '$setting'; choose native, avx2 or default" >&2; exit 2 ;;
esac
cache=$(mktemp -d "${TMPDIR:-/tmp}/petvit-inductor-$setting.XXXXXX")
trap 'rm -rf "$cache"' EXIT
export TORCHINDUCTOR_CACHE_DIR=$cache PETVIT_KERNELS=$setting
echo "kernels: $setting (ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-} ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-}," \
  "TORCHINDUCTOR_CACHE_DIR=$cache)" >&2
"$@"
