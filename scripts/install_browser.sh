#!/bin/sh
# Installs Debian's Chromium and ChromeDriver for the end-to-end tests, as root (no sudo needed) or as a
# user with sudo; does nothing when both are already there.
set -e
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
as_root=""
[ "$(id -u)" -eq 0 ] || as_root="sudo"
$as_root apt-get update -qq
DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq chromium chromium-driver
