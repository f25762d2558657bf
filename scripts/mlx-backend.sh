#!/usr/bin/env bash
# Prints the pip requirement of the MLX build for this machine, e.g. `mlx[cuda13]==0.32.4`
# (with --name: only the backend: cpu, cuda12, cuda13 or metal). The version is the one pinned
# in requirements.txt (`mlx==X`); this script only picks the extra (docs/platform.md):
#   macOS                                    -> metal (plain `mlx`: Metal and CPU in one wheel)
#   Linux, NVIDIA driver >= 580              -> cuda13
#   Linux, NVIDIA driver >= 550 (and < 580)  -> cuda12
#   Linux otherwise (no nvidia-smi, no GPU)  -> cpu
#   EXTMIND_MLX_BACKEND=cpu|cuda12|cuda13    overrides the detection (CUDA only on Linux).
set -u
valid="cpu, cuda12, cuda13"
root="$(cd "$(dirname "$0")/.." && pwd)"
version="$(sed -n 's/^mlx==\([^ ;#]*\).*/\1/p' "$root/requirements.txt" | head -n 1)"
if [ -z "$version" ]; then
  echo "mlx-backend: no 'mlx==<version>' line in $root/requirements.txt" >&2; exit 2
fi
os="$(uname -s)"
backend="${EXTMIND_MLX_BACKEND:-}"
case "$backend" in
  "" | cpu | cuda12 | cuda13) ;;
  *) echo "mlx-backend: EXTMIND_MLX_BACKEND='$backend' is not one of: $valid" >&2; exit 2 ;;
esac
if [ "$os" = "Darwin" ]; then
  case "$backend" in
    cuda*) echo "mlx-backend: EXTMIND_MLX_BACKEND=$backend: CUDA is Linux-only (macOS uses Metal; valid here: cpu)" >&2; exit 2 ;;
  esac
  backend=metal
elif [ -z "$backend" ]; then
  backend=cpu
  if [ "$os" = "Linux" ] && command -v nvidia-smi >/dev/null 2>&1; then
    # The first GPU's driver, e.g. "580.82.07"; nvidia-smi fails when no driver is loaded.
    driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')"
    major="${driver%%.*}"
    if [[ "$major" =~ ^[0-9]+$ ]]; then
      # MLX's CUDA 13 wheels need a driver >= 580, its CUDA 12 ones >= 550.54.14.
      if [ "$major" -ge 580 ]; then backend=cuda13; elif [ "$major" -ge 550 ]; then backend=cuda12
      elif [ "${1:-}" != "--name" ]; then
        echo "mlx-backend: NVIDIA driver $driver is older than 550 (MLX's CUDA 12 build): using the CPU build" >&2
      fi
    fi
  fi
fi
if [ "${1:-}" = "--name" ]; then
  echo "$backend"
elif [ "$backend" = metal ]; then
  echo "mlx==$version"
else
  echo "mlx[$backend]==$version"
fi
