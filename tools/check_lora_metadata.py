"""Check a LoRA file written by ./train against kohya's own computations,
re-implemented here in Python from sd-scripts (library/train_util.py):

  sshs_model_hash, sshs_legacy_hash  precalculate_safetensors_hashes: the
      tensors saved by the real safetensors library with only the ss_* keys,
      sha256 of the bytes after the header / of 64 KiB at offset 1 MiB
  ss_tag_frequency  set_tag_frequency over the captions, json.dumps'd
  ss_dataset_dirs   {folder: {"n_repeats", "img_count"}}, json.dumps'd

The captions are read as this project reads them (NAME.txt beside each image,
or --caption-ext), one folder level as kohya's DreamBooth subsets.

    /work/venv/bin/python tools/check_lora_metadata.py OUT/lora.safetensors DATA_DIR [.txt]
"""
import hashlib
import json
import os
import re
import sys

from safetensors import safe_open
from safetensors.torch import save


def kohya_hashes(tensors, metadata):
    md = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = save(tensors, md)
    n = int.from_bytes(b[:8], "little")
    return hashlib.sha256(b[8 + n:]).hexdigest(), hashlib.sha256(b[0x100000:0x110000]).hexdigest()[:8]


def dataset(data_dir, ext):
    """{folder: (repeats, [captions])} as kohya's DreamBooth subsets see it,
    in this project's order (image paths sorted; kohya's own folder order is
    the file system's)"""
    out = {}
    root = os.path.normpath(data_dir)
    imgs = []
    for dirpath, dirs, files in os.walk(root):
        for f in files:
            if f.lower().endswith((".png", ".jpg", ".jpeg")):
                imgs.append(os.path.relpath(os.path.join(dirpath, f), root))
    for rel in sorted(imgs):
        parts = rel.split(os.sep)
        key = parts[0] if len(parts) > 1 else os.path.basename(root)
        m = re.match(r"^(\d+)_(.*)$", key) if len(parts) > 1 else None
        rep = int(m.group(1)) if m else 1
        if rep == 0:
            continue
        cap_path = os.path.splitext(os.path.join(root, rel))[0] + ext
        cap = open(cap_path, encoding="utf-8").readline().strip() if os.path.exists(cap_path) else ""
        out.setdefault(key, (rep, []))[1].append(cap)
    return out


def main():
    path, data = sys.argv[1], sys.argv[2]
    ext = sys.argv[3] if len(sys.argv) > 3 else ".txt"
    with safe_open(path, "pt") as f:
        md = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    ok = True

    def check(key, want):
        nonlocal ok
        got = md.get(key)
        good = got == want
        ok &= good
        print(f"{'ok  ' if good else 'DIFF'} {key}: {got[:100] if got else got}" + ("" if good else f"\n     kohya: {want[:100]}"))

    mh, lh = kohya_hashes(tensors, md)
    check("sshs_model_hash", mh)
    check("sshs_legacy_hash", lh)
    ds = dataset(data, ext)
    freq = {}
    for key, (rep, caps) in ds.items():          # kohya's set_tag_frequency
        fd = freq.setdefault(key, {})
        for cap in caps:
            for tag in cap.split(","):
                tag = tag.strip()
                if tag:
                    tag = tag.lower()
                    fd[tag] = fd.get(tag, 0) + 1
    check("ss_tag_frequency", json.dumps(freq))
    check("ss_dataset_dirs", json.dumps({k: {"n_repeats": r, "img_count": len(c)} for k, (r, c) in ds.items()}))
    print("all as kohya computes them" if ok else "DIFFERENCES")
    sys.exit(0 if ok else 1)


main()
