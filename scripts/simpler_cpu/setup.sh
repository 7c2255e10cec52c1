#!/usr/bin/env bash
# SIMPLER on a CPU (Debian bookworm): Mesa 25 lavapipe from bookworm-backports in a private prefix (the system's
# Mesa, which Meta-World's EGL rendering uses, is not touched), the layer that drops
# VK_KHR_external_semaphore_fd, and a wrapper interpreter for --simpler-python. docs/simpler.md explains why.
#
#   bash scripts/simpler_cpu/setup.sh PREFIX SIMPLER_PYTHON
#   damvla eval ... --simpler-python PREFIX/python --simpler-shader ibl
#
# PREFIX: a folder for the extracted packages (~60 MB); SIMPLER_PYTHON: the venv Python that has simpler_env.
set -euo pipefail
PREFIX=$(realpath -m "${1:?usage: setup.sh PREFIX SIMPLER_PYTHON}")
PY="${2:?usage: setup.sh PREFIX SIMPLER_PYTHON}"
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute, but not resolved: a venv's python is a symlink
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$PREFIX"/apt/lists/partial "$PREFIX"/apt/archives/partial "$PREFIX"/mesa "$PREFIX"/vkdev "$PREFIX"/layer

# apt with its own lists and cache: the system's sources and package state stay as they are.
cat > "$PREFIX/apt/sources.list" <<EOF
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-backports main
EOF
APT=(-o "Dir::Etc::SourceList=$PREFIX/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o "Dir::State::Lists=$PREFIX/apt/lists" -o "Dir::Cache::Archives=$PREFIX/apt/archives")
apt-get "${APT[@]}" update
(cd "$PREFIX/apt/archives" &&
 apt-get "${APT[@]}" download mesa-vulkan-drivers/bookworm-backports libdrm2/bookworm-backports \
     libdrm-amdgpu1/bookworm-backports libvulkan1 libvulkan-dev)
for deb in "$PREFIX"/apt/archives/*.deb; do
    case "$deb" in *libvulkan-dev*) dpkg -x "$deb" "$PREFIX/vkdev" ;; *) dpkg -x "$deb" "$PREFIX/mesa" ;; esac
done

cc -shared -fPIC -O2 -I"$PREFIX/vkdev/usr/include" "$HERE/vk_drop_ext.c" -o "$PREFIX/layer/libVkLayer_damvla_drop_ext.so"
cp "$HERE/VkLayer_damvla_drop_ext.json" "$PREFIX/layer/"

LIB="$PREFIX/mesa/usr/lib/x86_64-linux-gnu"
cat > "$PREFIX/python" <<EOF
#!/usr/bin/env bash
# SimplerEnv's Python with Mesa 25 lavapipe and the damvla layer (scripts/simpler_cpu/setup.sh).
export LD_LIBRARY_PATH="$LIB\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export VK_ICD_FILENAMES="$PREFIX/mesa/usr/share/vulkan/icd.d/lvp_icd.json"
export VK_LAYER_PATH="$PREFIX/layer"
export VK_INSTANCE_LAYERS=VK_LAYER_DAMVLA_drop_ext
export LP_NUM_THREADS="\${LP_NUM_THREADS:-1}"
exec "$PY" "\$@"
EOF
chmod +x "$PREFIX/python"
"$PREFIX/python" -c "import sapien.core as s; e = s.Engine(); r = s.SapienRenderer(offscreen_only=True); print('sapien renders with', r)"
echo "done: damvla eval ... --simpler-python $PREFIX/python --simpler-shader ibl"
