# Sourced by the other scripts: the one place that knows where the cached PyTorch lives.
# libtorch comes from the pinned PyTorch wheel (tch 0.26 needs exactly 2.13.0), installed once
# into a virtual environment outside the checkout and reused by every later run.
SFR_TORCH_VERSION=2.13.0
SFR_CACHE="${SFR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sfr}"
SFR_VENV="$SFR_CACHE/venv-torch-$SFR_TORCH_VERSION"
export SFR_CACHE SFR_VENV
export LIBTORCH_USE_PYTORCH=1
export PATH="$SFR_VENV/bin:$PATH"
export PYTHON_SYS_EXECUTABLE="$SFR_VENV/bin/python"
