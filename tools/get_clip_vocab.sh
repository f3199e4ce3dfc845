#!/bin/sh
# Fetches OpenAI CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz, MIT
# licensed, shipped inside the open-clip-torch wheel) into
# tests/fixtures/vocab/, where tests/test_tokenizer.c looks for it.
# Not committed: it is 1.3 MB and someone else's file.
set -eu
cd "$(dirname "$0")/.."
dest=tests/fixtures/vocab
name=bpe_simple_vocab_16e6.txt.gz
if [ -s "$dest/$name" ]; then echo "$dest/$name already present"; exit 0; fi
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download --no-deps --quiet open-clip-torch -d "$tmp"
whl=$(ls "$tmp"/open_clip_torch-*.whl | head -n 1)
mkdir -p "$dest"
# a wheel is a zip; Python's zipfile avoids needing unzip
"$PY" - "$whl" "$dest/$name" <<'PYEOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as f:
    f.write(z.read("open_clip/bpe_simple_vocab_16e6.txt.gz"))
PYEOF
echo "wrote $dest/$name"
