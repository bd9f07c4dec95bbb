#!/usr/bin/env bash
# Make sure the Ding dictionary (Debian package trans-de-en) is installed: the demo's default data.
set -euo pipefail
DING=/usr/share/trans/de-en
if [ -f "$DING" ]; then exit 0; fi
echo "Installing the Ding English-German dictionary (Debian package trans-de-en) for the demo data..."
if [ "$(id -u)" = "0" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq trans-de-en
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq trans-de-en
else
    echo "error: $DING is missing and this user cannot install packages." >&2
    echo "Install it with:  sudo apt-get install trans-de-en   (Debian/Ubuntu)" >&2
    echo "or run the recipe on your own data: --train_file ... (see README)." >&2
    exit 1
fi
[ -f "$DING" ] || { echo "error: trans-de-en installed but $DING not found" >&2; exit 1; }
