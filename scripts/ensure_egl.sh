#!/usr/bin/env bash
# Installs Mesa's EGL (software rendering) where it is missing, so MUJOCO_GL=egl works without a GPU.
set -euo pipefail
missing=()
for pkg in libegl1 libegl-mesa0 libgl1-mesa-dri; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "damvla: EGL packages missing (${missing[*]}) and no apt-get: install Mesa EGL by hand" >&2; exit 1
fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "damvla: installing ${missing[*]} for headless rendering"
$SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
