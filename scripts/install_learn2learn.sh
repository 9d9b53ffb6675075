#!/usr/bin/env bash
# Builds learn2learn 0.2.0 into its own virtual environment, with metarun installed beside it
# (editable), so that the two can be timed and compared in one process:
#
#   bash scripts/install_learn2learn.sh                  # -> .venv-learn2learn/ in this checkout
#   L2L_VENV=DIR bash scripts/install_learn2learn.sh     # elsewhere
#   L2L_REBUILD=1 bash scripts/install_learn2learn.sh    # rebuild learn2learn even if it imports
#
# learn2learn is a peer we measure against, never a dependency of metarun: its last release does
# not install from the registry on current Pythons, and it imports torchvision at import time.
# Re-running skips the steps that are done. About 3-5 minutes on 2 cores.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${L2L_VENV:-$REPO/.venv-learn2learn}"
BUILD="${L2L_BUILD:-$REPO/build/learn2learn}"
PYTHON="${PYTHON:-python3}"
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)
L2L_VERSION=0.2.0
TV_VERSION=0.16.2
GYM_VERSION=0.26.2
# The Makefile's rule: machines without an NVIDIA GPU stay on the CPU build of torch.
if command -v nvidia-smi >/dev/null 2>&1; then CONSTRAINTS=(); else CONSTRAINTS=(-c "$REPO/constraints-cpu.txt"); fi

log() { printf '[install_learn2learn] %s\n' "$*"; }

# 1. A separate environment: learn2learn's pins (and torchvision's) must never reach metarun's .venv.
if [ ! -x "$PY" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "${PIP[@]}" install --upgrade pip
fi
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version'

# 2. torch first, under the same constraints as metarun's own environment, so that nothing installed
#    later (learn2learn's or torchvision's requirements) can pull in another torch.
log "installing torch ${CONSTRAINTS[*]:+(${CONSTRAINTS[*]})}"
"${PIP[@]}" install "${CONSTRAINTS[@]}" torch

# 3. What learn2learn imports and what its build needs; a current Cython is the point of the exercise.
log "installing numpy scipy tqdm requests pillow cython setuptools wheel"
"${PIP[@]}" install "${CONSTRAINTS[@]}" numpy scipy tqdm requests pillow cython setuptools wheel

l2l_built() {
  "$PY" - <<'EOF' 2>/dev/null
import importlib.util, os, sys
spec = importlib.util.find_spec("learn2learn")
if spec is None:
    sys.exit(1)
data = os.path.join(os.path.dirname(spec.origin), "data")
tag = f"cpython-{sys.version_info.major}{sys.version_info.minor}"
needed = ("meta_dataset", "task_dataset", "transforms")
sys.exit(0 if all(any(f.startswith(f"{n}.{tag}") for f in os.listdir(data)) for n in needed) else 1)
EOF
}

# 4. learn2learn from its source distribution. The sdist ships .c files that an old Cython generated
#    and that no longer compile against current CPython (learn2learn issue #413), so they are deleted
#    and its setup.py, which cythonizes the .pyx files when 'build_ext' is on its command line,
#    regenerates them with the Cython installed above. The wheel is installed without its
#    requirements: they would pull torchvision, gym, qpth and gsutil, and through them another torch.
#    Its setup.py packages its own test suite as a top-level `tests` package, which would shadow this
#    checkout's tests/ (`from tests.conftest import ...`): it is left out of the wheel.
if [ "${L2L_REBUILD:-0}" = 1 ] || ! l2l_built; then
  log "building learn2learn $L2L_VERSION from the sdist with its Cython extensions regenerated"
  rm -rf "$BUILD" && mkdir -p "$BUILD"
  "${PIP[@]}" download --no-deps --no-binary :all: "learn2learn==$L2L_VERSION" -d "$BUILD"
  tar xzf "$BUILD/learn2learn-$L2L_VERSION.tar.gz" -C "$BUILD"
  SRC="$BUILD/learn2learn-$L2L_VERSION"
  rm -f "$SRC"/learn2learn/data/{meta_dataset,task_dataset,transforms}.c
  sed -i.orig 's/packages=find_packages(),/packages=find_packages(exclude=["tests", "tests.*"]),/' "$SRC/setup.py"
  (cd "$SRC" && "$PY" setup.py build_ext bdist_wheel -d "$BUILD/dist" >"$BUILD/build.log" 2>&1) || {
    tail -40 "$BUILD/build.log"
    exit 1
  }
  log "cythonized with Cython $("$PY" -c 'import Cython; print(Cython.__version__)')"
  "${PIP[@]}" install --no-deps --force-reinstall "$BUILD"/dist/learn2learn-"$L2L_VERSION"-*.whl
fi

# An environment built before the exclusion above holds learn2learn's `tests` package: removed.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if grep -qs '^tests/__init__.py,' "$SITE"/learn2learn-*.dist-info/RECORD && [ -d "$SITE/tests" ]; then
  log "removing learn2learn's own top-level tests package from $SITE (it shadows this checkout's tests/)"
  rm -rf "$SITE/tests"
fi

# 5. `import learn2learn` imports learn2learn.vision, which imports torchvision's datasets and
#    transforms (pure Python; no path we measure calls torchvision). The registry's torchvision
#    builds that match a current torch need CUDA libraries at import; 0.16.2 guards the registration
#    of its compiled operators, so it imports beside any torch 2.x with those operators unavailable.
#    Installed without requirements: its pin of torch 2.1.2 is ignored on purpose.
if ! "$PY" -c "import torchvision" 2>/dev/null; then
  log "installing torchvision $TV_VERSION without requirements (its compiled operators stay unavailable)"
  "${PIP[@]}" install --no-deps "torchvision==$TV_VERSION"
fi

# 6. learn2learn/__init__ also imports learn2learn.gym, which imports gym; only its Python code is needed.
if ! "$PY" -c "import gym" 2>/dev/null; then
  log "installing gym $GYM_VERSION without requirements (+ cloudpickle, gym_notices)"
  "${PIP[@]}" install --no-deps "gym==$GYM_VERSION" cloudpickle gym_notices
fi

# 7. metarun itself, editable, with its test extras, so the parity test and the bench run here.
log "installing metarun (editable) from $REPO"
"${PIP[@]}" install "${CONSTRAINTS[@]}" -e "$REPO[dev]"

# 8. The check: learn2learn and metarun import in one process, and a MAML clone/adapt step runs.
log "checking: import learn2learn"
"$PY" -W ignore - <<'EOF'
import torch
import learn2learn as l2l
import metarun

model = l2l.vision.models.OmniglotCNN(5)
learner = l2l.algorithms.MAML(model, lr=0.4).clone()
x = torch.randn(5, 1, 28, 28)
learner.adapt(torch.nn.functional.cross_entropy(learner(x), torch.arange(5)))
print(f"learn2learn {l2l.__version__} and metarun {metarun.__version__} import with torch {torch.__version__}; "
      f"MAML clone/adapt gives logits {tuple(learner(x).shape)}")
EOF
log "done: $PY -m pytest tests/algorithms/test_learn2learn_parity.py"
