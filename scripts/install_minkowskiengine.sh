#!/usr/bin/env bash
# Install MinkowskiEngine 0.5.4 (the optional `backend="minkowski"`) into the current Python environment.
#
#   . .venv/bin/activate && scripts/install_minkowskiengine.sh [--cpu | --cuda] [--rebuild] [--jobs N] [--sdist F]
#
# ME is built from the PyPI sdist against the torch already installed in the environment, in a throwaway build
# venv (the project's environment gets nothing but the finished wheel). The wheel is cached by torch version,
# Python version and CPU/CUDA, so a second install takes seconds:
#   ${FCMAE_CACHE_DIR:-~/.cache/fcmae}/minkowskiengine/<torch version>/<cp3XX>-<cpu|cudaXY>/MinkowskiEngine-*.whl
# A first build takes about 15 minutes on 2 cores for the CPU, about 50 for CUDA with one architecture
# (TORCH_CUDA_ARCH_LIST=9.0); run it under `nice` on a shared machine.
#
# Options:
#   --cpu        build the CPU-only extension (the default unless a CUDA toolkit and a GPU are both present)
#   --cuda       build the CUDA extension (needs nvcc matching torch's CUDA version)
#   --rebuild    ignore the cached wheel and build again
#   --jobs N     parallel compile jobs (default: the number of cores)
#   --python P   install into the environment of interpreter P (default: `python` on PATH)
#   --sdist F    build from this MinkowskiEngine-0.5.4.tar.gz instead of downloading it from PyPI (offline machines)
#
# What it patches in the 0.5.4 sources, and why (all checked: a patch that no longer applies stops the build):
#   - setup.py runs `pip uninstall MinkowskiEngine` on the PATH's pip: removed, it would reach outside the build.
#   - `from collections import Sequence` (gone in Python 3.10): from collections.abc.
#   - CUDA only: the thrust headers that CUDA 12+ no longer includes transitively, and NVTX compiled out (its
#     bundled ranges collide with CUDA 12.2+'s NVTX3): the fixes ME's issues #543, #601 and #614 and the
#     community forks apply; then scripts/minkowskiengine-0.5.4-cuda.patch for CUDA 13 (CCCL 3) and libstdc++ 12+.
#     On CUDA 13, whose toolkit keeps thrust in include/cccl, the host compiler gets that folder too.
# The build venv takes setuptools (>= 70.1) and ninja from the target environment when it has them, else installs
# current ones from the package index into itself. The sdist is fetched from the index's simple page (pip's
# index-url; PyPI by default) and checked against its SHA-256, as is a --sdist file.
# (A plain `pip install MinkowskiEngine` fails in numpy.distutils' BLAS search on modern setuptools and numpy; naming
# the BLAS, as this script does, skips that search, so no old setuptools or numpy is needed.)
# Offline (no package index): pass --sdist, and have setuptools >= 70.1 and ninja (on PATH) in the target environment.
# Needs a C++ compiler and OpenBLAS (Debian: libopenblas-dev; installed with apt-get when run as root). An OpenBLAS
# unpacked elsewhere works too: put its cblas.h folder on CPLUS_INCLUDE_PATH and its library folder on LIBRARY_PATH
# (and LD_LIBRARY_PATH, to import it).
set -euo pipefail

ME_VERSION=0.5.4
ME_SHA256=b1879c00d0b0b1d30ba622cce239886a7e3c78ee9da1064cdfe2f64c2ab15f94  # PyPI's MinkowskiEngine-0.5.4.tar.gz
here=$(cd "$(dirname "$0")" && pwd)
variant=auto rebuild=0 jobs=$(nproc 2>/dev/null || echo 2) python=python sdist=
die() { echo "error: $*" >&2; exit 1; }
check_sdist() {  # FILE: PyPI's sdist, or stop
    echo "$ME_SHA256  $1" | sha256sum --check --quiet - >/dev/null 2>&1 \
        || die "MinkowskiEngine-$ME_VERSION.tar.gz does not have PyPI's SHA-256 ($ME_SHA256)"
}
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) variant=cpu ;;
        --cuda) variant=cuda ;;
        --rebuild) rebuild=1 ;;
        --jobs) [ $# -ge 2 ] || die "--jobs needs a number"; jobs=$2; shift ;;
        --python) [ $# -ge 2 ] || die "--python needs an interpreter"; python=$2; shift ;;
        --sdist) [ $# -ge 2 ] || die "--sdist needs a file"; sdist=$2; shift
            [ -f "$sdist" ] || die "--sdist: no file $sdist"
            case "$(basename "$sdist")" in MinkowskiEngine-$ME_VERSION.tar.gz) ;;
                *) die "--sdist takes MinkowskiEngine-$ME_VERSION.tar.gz, got $(basename "$sdist")" ;; esac
            sdist=$(cd "$(dirname "$sdist")" && pwd)/$(basename "$sdist")
            check_sdist "$sdist" ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done
case "$jobs" in ''|*[!0-9]*|0) die "--jobs must be a positive integer, got '$jobs'" ;; esac

# What we build against: the target environment's interpreter and torch.
command -v "$python" >/dev/null || die "no interpreter '$python' (activate the project's venv, or pass --python)"
info=$("$python" - <<'EOF' 2>/dev/null
import sys, sysconfig
import torch
# Where its packages come from: its site-packages, and whatever a --system-site-packages venv or a .pth file adds.
stdlib = {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]}
paths = [p for p in sys.path if p not in stdlib and p.endswith(("site-packages", "dist-packages"))]
print(torch.__version__, f"cp{sys.version_info[0]}{sys.version_info[1]}", torch.version.cuda or "none",
      int(torch.cuda.is_available()), ":".join(dict.fromkeys(paths)))
EOF
) || die "torch is not importable by '$python': install the project first (pip install -c constraints.txt -e .)"
read -r torch_version py_tag torch_cuda has_gpu target_paths <<<"$info"
if [ "$variant" = auto ]; then
    variant=cpu
    if command -v nvcc >/dev/null && [ "$torch_cuda" != none ] && [ "$has_gpu" = 1 ]; then variant=cuda; fi
fi
if [ "$variant" = cuda ]; then
    [ "$torch_cuda" != none ] || die "torch $torch_version is a CPU build: --cuda needs a CUDA build of torch"
    command -v nvcc >/dev/null || die "--cuda needs nvcc (a CUDA toolkit) on PATH"
    nvcc_version=$(nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
    [ "$nvcc_version" = "$torch_cuda" ] || echo "warning: nvcc is CUDA $nvcc_version, torch was built with $torch_cuda" >&2
    flavor=cuda$torch_cuda
else
    flavor=cpu
fi

cache=${FCMAE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fcmae}/minkowskiengine/$torch_version/$py_tag-$flavor

install_wheel() {
    echo "installing $1 into $("$python" -c 'import sys; print(sys.prefix)')"
    "$python" -m pip install -q --no-deps --force-reinstall "$1"
    # Import from another directory: ME's own source tree must not shadow the installed package.
    (cd / && "$python" -c "import MinkowskiEngine as ME; print('MinkowskiEngine', ME.__version__, 'imports')") \
        || die "MinkowskiEngine was installed but does not import (see above); rebuild with --rebuild"
}

# The wheel's name is MinkowskiEngine-... from setuptools < 75.8, minkowskiengine-... from newer ones.
wheel=$(ls "$cache"/[Mm]inkowski[Ee]ngine-"$ME_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$wheel" ] && [ "$rebuild" = 0 ]; then
    echo "using the cached wheel for torch $torch_version ($py_tag, $flavor)"
    install_wheel "$wheel"
    exit 0
fi

# Build prerequisites.
command -v "${CXX:-g++}" >/dev/null || die "no C++ compiler (Debian: apt-get install g++)"
have_cblas() {  # where the compiler looks: the system folders, and those on CPLUS_INCLUDE_PATH / CPATH
    local dir
    for dir in /usr/include /usr/include/* /usr/include/*/openblas* ${CPLUS_INCLUDE_PATH:+${CPLUS_INCLUDE_PATH//:/ }} ${CPATH:+${CPATH//:/ }}; do
        [ -f "$dir/cblas.h" ] && return 0; done; return 1; }
if ! have_cblas; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing OpenBLAS (apt-get install libopenblas-dev)"
        apt-get install -y -q libopenblas-dev >/dev/null || { apt-get update -q >/dev/null && \
            apt-get install -y -q libopenblas-dev >/dev/null; } || die "apt-get install libopenblas-dev failed"
    else
        die "OpenBLAS headers (cblas.h) not found: install Debian's libopenblas-dev (sudo apt-get install" \
            "libopenblas-dev), or put an unpacked one's folders on CPLUS_INCLUDE_PATH and LIBRARY_PATH"
    fi
fi

build=$(mktemp -d "${TMPDIR:-/tmp}/fcmae-me-build.XXXXXX")
trap 'rm -rf "$build"' EXIT
echo "building MinkowskiEngine $ME_VERSION ($flavor) for torch $torch_version, $py_tag, $jobs jobs, in $build"

# The throwaway build venv sees the target's packages (torch, pip, and its build tools if it has them) through a .pth
# file, after its own: what the build needs and the target lacks is installed into the build venv, never the target.
# No pip or setuptools of its own: an old bundled setuptools would shadow the target's.
"$python" -m venv --without-pip "$build/venv"
bpy=$build/venv/bin/python
bsite=$("$bpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
tr ':' '\n' <<<"$target_paths" > "$bsite/zz_fcmae_target_env.pth"
missing=$("$bpy" - <<'EOF'
import importlib.metadata, re, shutil
try:
    setuptools = tuple(map(int, re.match(r"(\d+)\.(\d+)", importlib.metadata.version("setuptools")).groups()))
except (importlib.metadata.PackageNotFoundError, AttributeError):
    setuptools = (0, 0)
need = []
if setuptools < (70, 1):  # bdist_wheel built in; an older one with whatever `wheel` is there is not what we test
    need.append("setuptools>=70.1")
if shutil.which("ninja") is None:  # torch looks for it on PATH
    need.append("ninja")  # parallel compiles
print(" ".join(need))
EOF
)
if [ -n "$missing" ]; then
    echo "build venv: installing $missing"
    "$bpy" -m pip install -q --disable-pip-version-check --ignore-installed $missing \
        || die "could not install $missing into the build venv (offline? install them into the target environment)"
fi

# The sdist: given, or fetched as a file from the index's simple page. (Not `pip download`: that runs setup.py to
# read its metadata, without --blas, so numpy.distutils' BLAS search runs and fails on current setuptools / numpy.)
if [ -n "$sdist" ]; then
    cp "$sdist" "$build/"
else
    index=${PIP_INDEX_URL:-$("$bpy" -m pip config get global.index-url 2>/dev/null || echo https://pypi.org/simple)}
    "$bpy" - "$index" "MinkowskiEngine-$ME_VERSION.tar.gz" "$build" <<'EOF' \
        || die "could not download MinkowskiEngine-$ME_VERSION.tar.gz (offline? pass --sdist)"
import re, sys, urllib.parse, urllib.request
index, name, folder = sys.argv[1:]
page_url = index.rstrip("/") + "/minkowskiengine/"
page = urllib.request.urlopen(page_url, timeout=60).read().decode()
links = [urllib.parse.urljoin(page_url, href) for href in re.findall(r'href="([^"]+)"', page)
         if urllib.parse.urlparse(href).path.endswith("/" + name) or href.split("#")[0] == name]
if not links:
    sys.exit(f"{name} is not on {page_url}")
with urllib.request.urlopen(links[0].split("#")[0], timeout=300) as response, open(f"{folder}/{name}", "wb") as out:
    out.write(response.read())
EOF
    check_sdist "$build/MinkowskiEngine-$ME_VERSION.tar.gz"  # a --sdist file was checked when given
fi
tar -xzf "$build/MinkowskiEngine-$ME_VERSION.tar.gz" -C "$build"
src=$build/MinkowskiEngine-$ME_VERSION

# patch FILE SED-EXPRESSION GREP-AFTER: apply, then check that the result is there (else the sources changed).
patch_file() {
    sed -i "$2" "$src/$1"
    grep -q -- "$3" "$src/$1" || die "patch of $1 did not apply ($2)"
}
patch_file setup.py '/run_command("pip", "uninstall"/d' 'run_command("rm", "-rf", "build")'
! grep -q 'run_command("pip"' "$src/setup.py" || die "patch of setup.py did not apply"
for f in MinkowskiCoordinateManager.py MinkowskiTensorField.py MinkowskiCommon.py utils/quantization.py; do
    patch_file "MinkowskiEngine/$f" 's/^from collections import Sequence$/from collections.abc import Sequence/' \
        '^from collections.abc import Sequence$'
done
patch_file MinkowskiEngine/MinkowskiKernelGenerator.py \
    's/^from collections import Sequence, namedtuple$/from collections import namedtuple\nfrom collections.abc import Sequence/' \
    '^from collections.abc import Sequence$'
! grep -rq '^from collections import .*Sequence' "$src/MinkowskiEngine" || die "a collections.Sequence import is left"

if [ "$variant" = cuda ]; then
    # CUDA 12+ thrust no longer includes these through its other headers ("namespace thrust has no member ...").
    add_includes() {  # FILE HEADER...: insert the includes above the file's first #include
        local file=$src/$1; shift
        local lines; lines=$(printf '#include <%s>\\n' "$@")
        sed -i "0,/^#include/s||${lines}#include|" "$file"
        grep -q "^#include <$1>" "$file" || die "patch of $file did not apply"
    }
    add_includes src/3rdparty/concurrent_unordered_map.cuh thrust/execution_policy.h
    add_includes src/convolution_kernel.cuh thrust/execution_policy.h
    add_includes src/coordinate_map_gpu.cu thrust/unique.h thrust/remove.h
    # spmm.cu includes ATen/cuda/CUDAUtils.h before anything defines at::Tensor, which torch 2.14's headers need.
    add_includes src/spmm.cu ATen/core/Tensor.h thrust/execution_policy.h thrust/reduce.h thrust/sort.h
    # CUDA 13 / CCCL 3 and libstdc++ 12+: the source patch next to this script says what and why.
    patch -d "$src" -p1 --forward --quiet < "$here/minkowskiengine-$ME_VERSION-cuda.patch" \
        || die "scripts/minkowskiengine-$ME_VERSION-cuda.patch did not apply"
    # The bundled cudf NVTX ranges collide with the NVTX3 headers of CUDA 12.2+: compile them out.
    patch_file setup.py 's/^NVCC_FLAGS += \["--expt-relaxed-constexpr", "--expt-extended-lambda"\]$/&\nNVCC_FLAGS += ["-DNVTX_DISABLE"]\nCC_FLAGS += ["-DNVTX_DISABLE"]/' \
        '^NVCC_FLAGS += \["-DNVTX_DISABLE"\]$'
    build_flag=--force_cuda
    cuda_home=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
    if [ -d "$cuda_home/include/cccl" ]; then  # CUDA 13 keeps thrust there: nvcc looks, g++ must be told
        export CPLUS_INCLUDE_PATH=$cuda_home/include/cccl${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}
    fi
else
    build_flag=--cpu_only
fi

(cd "$src" && PATH="$build/venv/bin:$PATH" MAX_JOBS=$jobs "$bpy" setup.py -q bdist_wheel "$build_flag" --blas=openblas \
    > "$build/build.log" 2>&1) || { grep -m 20 -B 2 -A 6 ' error' "$build/build.log" >&2 || tail -n 60 "$build/build.log" >&2
    mkdir -p "$cache" && cp "$build/build.log" "$cache/build-failed.log"
    die "the MinkowskiEngine build failed: its first errors are above, the whole log is $cache/build-failed.log"; }
built=$(ls "$src"/dist/[Mm]inkowski[Ee]ngine-"$ME_VERSION"-*.whl 2>/dev/null) || { mkdir -p "$cache"
    cp "$build/build.log" "$cache/build-failed.log"; die "setup.py made no wheel in dist/: see $cache/build-failed.log"; }

mkdir -p "$cache"
rm -f "$cache"/[Mm]inkowski[Ee]ngine-"$ME_VERSION"-*.whl  # a --rebuild's old wheel, whatever its name's case
cp "$built" "$cache/.partial.whl" && mv "$cache/.partial.whl" "$cache/$(basename "$built")"  # never half a wheel
echo "cached $cache/$(basename "$built")"
install_wheel "$cache/$(basename "$built")"
