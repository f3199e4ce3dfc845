#!/usr/bin/env python3
"""Fixtures for tests/test_image.c: real PNG and JPEG files plus what Pillow
decodes them to, in tests/fixtures/images/.

  /work/venv/bin/python tools/make_image_fixtures.py           # (re)write fixtures
  /work/venv/bin/python tools/make_image_fixtures.py --check-png out.png [rgb.raw W H]
      open a PNG written by image.c with Pillow, print its text chunks, and
      (given the raw RGB that was encoded) check the pixels are identical.

The PNG files come from a small independent writer below (zlib + struct; it
is not image.c's encoder) because Pillow cannot write every colour type and
bit depth, nor Adam7. Each row uses filter (row % 5) so every file exercises
all five filters, and the zlib stream is split over several IDAT chunks.
The JPEG files come from Pillow (libjpeg-turbo), a few from cjpeg when it is
installed (apt-get install libjpeg-turbo-progs: 4:4:0 and arithmetic coding),
and a few are hand-patched copies whose SOF marker claims a kind we refuse.

The reference for every file is Pillow's Image.open(f).convert("RGB"), after
ImageOps.exif_transpose for JPEGs; it is stored as U8 tensors [h, w, 3] in
expected.safetensors under the file's name. Resize references (Image.resize
with LANCZOS / BOX) are stored under "resize_*".
"""
import io
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
from PIL import Image, ImageOps

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "images")


# ---------------------------------------------------------------- PNG writer
def chunk(typ, data):
    c = struct.pack(">I", len(data)) + typ + data
    return c + struct.pack(">I", zlib.crc32(typ + data) & 0xFFFFFFFF)


def paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def filter_rows(rows, bpp):
    """rows: list of bytes (one pass); row y gets filter y % 5"""
    out = bytearray()
    prev = bytes(len(rows[0])) if rows else b""
    for y, row in enumerate(rows):
        ft = y % 5
        f = bytearray(len(row))
        for i in range(len(row)):
            a = row[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            pred = [0, a, b, (a + b) // 2, paeth(a, b, c)][ft]
            f[i] = (row[i] - pred) & 255
        out.append(ft)
        out += f
        prev = row
    return bytes(out)


def pack_row(samples, depth):
    """samples: 1-D int array of one row's samples -> bytes, MSB first"""
    if depth == 16:
        return b"".join(struct.pack(">H", int(v)) for v in samples)
    if depth == 8:
        return bytes(int(v) for v in samples)
    per = 8 // depth
    out = bytearray((len(samples) + per - 1) // per)
    for i, v in enumerate(samples):
        out[i // per] |= int(v) << (8 - depth - (i % per) * depth)
    return bytes(out)


ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def write_png(path, arr, ctype, depth, interlace=False, plte=None, trns=None, idat_size=97,
              extra_chunks=()):
    """arr: uint16/uint8 array [h, w, channels] of raw sample values"""
    h, w, ch = arr.shape
    assert ch == CHANNELS[ctype]
    bpp = max(1, ch * depth // 8)
    raw = b""
    passes = ADAM7 if interlace else [(0, 0, 1, 1)]
    for (x0, y0, dx, dy) in passes:
        sub = arr[y0::dy, x0::dx]
        if sub.shape[0] == 0 or sub.shape[1] == 0:
            continue
        rows = [pack_row(sub[y].reshape(-1), depth) for y in range(sub.shape[0])]
        raw += filter_rows(rows, bpp)
    z = zlib.compress(raw, 9)
    out = b"\x89PNG\r\n\x1a\n"
    out += chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 1 if interlace else 0))
    for c in extra_chunks:
        out += c
    if plte is not None:
        out += chunk(b"PLTE", bytes(plte))
    if trns is not None:
        out += chunk(b"tRNS", bytes(trns))
    for i in range(0, len(z), idat_size):
        out += chunk(b"IDAT", z[i:i + idat_size])
        if i == 0:
            out += chunk(b"IDAT", b"")     # an empty IDAT between two full ones is legal
    out += chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(out)


# ---------------------------------------------------------------- content
def photo(w, h, seed):
    """smooth colour gradients, a few hard edges and a little noise: the kind
    of content JPEG is for, with enough detail to exercise every coefficient"""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(x / 7.0 + seed) * np.cos(y / 11.0)
    g = 128 + 90 * np.cos((x + y) / 9.0)
    b = 255 * x / max(w - 1, 1)
    img = np.stack([r, g, b], -1)
    img[(x - w * 0.6) ** 2 + (y - h * 0.4) ** 2 < (min(w, h) * 0.25) ** 2] = [250, 40, 30]
    img[int(h * 0.7):, : w // 3] = [20, 200, 60]
    img += rng.normal(0, 6, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- main
def pil_rgb(path, transpose=False):
    im = Image.open(path)
    im.load()
    if transpose:
        im = ImageOps.exif_transpose(im)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def make():
    from safetensors.numpy import save_file
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    rng = np.random.default_rng(1234)
    expected = {}
    notes = []

    def p(name):
        return os.path.join(OUT, name)

    # ---- PNG: every colour type and depth, plain and Adam7
    def rnd(h, w, ch, depth):
        hi = (1 << depth)
        return rng.integers(0, hi, size=(h, w, ch), dtype=np.int64).astype(np.uint16)

    def smooth(h, w, ch, depth):
        # gradients: Paeth / Average predictions pay off, values cover the range
        y, x = np.mgrid[0:h, 0:w]
        maxv = (1 << depth) - 1
        chans = [(x * 37 + y * 11 + c * 50) % (maxv + 1) if depth <= 8 else
                 (x * 2003 + y * 977 + c * 13001) % (maxv + 1) for c in range(ch)]
        a = np.stack(chans, -1).astype(np.int64)
        a = (a + rng.integers(0, 2, size=a.shape)) % (maxv + 1)
        return a.astype(np.uint16)

    pngs = []
    for (ctype, depths) in [(0, [1, 2, 4, 8, 16]), (2, [8, 16]), (3, [1, 2, 4, 8]), (4, [8, 16]), (6, [8, 16])]:
        for depth in depths:
            for interlace in (False, True):
                for (w, h) in ([(33, 17)] if not interlace else [(13, 11)]):
                    name = f"png_c{ctype}_d{depth}{'_i' if interlace else ''}_{w}x{h}.png"
                    plte = trns = None
                    if ctype == 3:
                        n = 1 << depth
                        ncol = max(1, n - (1 if depth > 1 else 0))  # one index past PLTE when possible
                        plte = rng.integers(0, 256, size=ncol * 3).tolist()
                        arr = rng.integers(0, ncol, size=(h, w, 1)).astype(np.uint16)
                        trns = rng.integers(0, 256, size=min(ncol, 3)).tolist()
                    else:
                        ch = CHANNELS[ctype]
                        arr = smooth(h, w, ch, depth) if (w * h) % 2 else rnd(h, w, ch, depth)
                    pngs.append((name, arr, ctype, depth, interlace, plte, trns))
    # tRNS on gray and RGB (ignored by convert("RGB"))
    pngs.append(("png_c0_d8_trns_20x9.png", rnd(9, 20, 1, 8), 0, 8, False, None, [0, 77]))
    pngs.append(("png_c2_d8_trns_20x9.png", rnd(9, 20, 3, 8), 2, 8, False, None, [0, 1, 0, 2, 0, 3]))
    # 16-bit gray with small values: shows Pillow's I;16 -> L clipping, not >> 8
    small = rng.integers(0, 400, size=(8, 12, 1)).astype(np.uint16)
    pngs.append(("png_c0_d16_small_12x8.png", small, 0, 16, False, None, None))
    # tiny: 1x1, and 3x2 Adam7 (several passes empty)
    pngs.append(("png_c2_d8_1x1.png", rnd(1, 1, 3, 8), 2, 8, False, None, None))
    pngs.append(("png_c6_d16_i_1x1.png", rnd(1, 1, 4, 16), 6, 16, True, None, None))
    pngs.append(("png_c0_d1_i_3x2.png", rnd(2, 3, 1, 1), 0, 1, True, None, None))
    pngs.append(("png_c2_d8_i_5x3.png", rnd(3, 5, 3, 8), 2, 8, True, None, None))
    # a palette index past the PLTE (Pillow gives black)
    arr = np.full((4, 6, 1), 5, np.uint16); arr[0, 0, 0] = 0
    pngs.append(("png_c3_d8_pastplte_6x4.png", arr, 3, 8, False, [10, 20, 30, 40, 50, 60], None))

    for (name, arr, ctype, depth, interlace, plte, trns) in pngs:
        write_png(p(name), arr, ctype, depth, interlace, plte, trns)
        expected[name] = pil_rgb(p(name))
    # an ancillary chunk we do not know, before the image data
    write_png(p("png_unknown_chunk_7x5.png"), rnd(5, 7, 3, 8), 2, 8,
              extra_chunks=[chunk(b"tEXt", b"Comment\0hello"), chunk(b"zzZz", b"whatever")])
    expected["png_unknown_chunk_7x5.png"] = pil_rgb(p("png_unknown_chunk_7x5.png"))

    # Pillow's own PNG writer too
    ph = photo(40, 30, 7)
    Image.fromarray(ph).save(p("png_pil_rgb_40x30.png"))
    Image.fromarray(ph).convert("P", palette=Image.ADAPTIVE, colors=40).save(p("png_pil_p_40x30.png"))
    Image.fromarray(ph).convert("LA").save(p("png_pil_la_40x30.png"))
    for n in ("png_pil_rgb_40x30.png", "png_pil_p_40x30.png", "png_pil_la_40x30.png"):
        expected[n] = pil_rgb(p(n))

    # 16-bit gray: record what Pillow does so the C side can match it
    g16 = Image.open(p("png_c0_d16_small_12x8.png"))
    notes.append(f"16-bit gray opens as {g16.mode}; values 0..399 -> convert('RGB') gives "
                 f"{sorted(set(np.asarray(g16.convert('RGB'))[..., 0].reshape(-1).tolist()))[:8]}... "
                 f"(min(v,255) would be identical: "
                 f"{bool((np.minimum(small[..., 0], 255) == np.asarray(g16.convert('RGB'))[..., 0]).all())})")

    # ---- JPEG from Pillow
    base = photo(48, 40, 3)
    odd = photo(33, 17, 5)
    jpgs = [
        ("jpg_q75_48x40.jpg", base, dict(quality=75)),
        ("jpg_q95_48x40.jpg", base, dict(quality=95)),
        ("jpg_444_48x40.jpg", base, dict(quality=90, subsampling=0)),
        ("jpg_422_48x40.jpg", base, dict(quality=90, subsampling=1)),
        ("jpg_420_48x40.jpg", base, dict(quality=90, subsampling=2)),
        ("jpg_444_33x17.jpg", odd, dict(quality=85, subsampling=0)),
        ("jpg_422_33x17.jpg", odd, dict(quality=85, subsampling=1)),
        ("jpg_420_33x17.jpg", odd, dict(quality=85, subsampling=2)),
        ("jpg_prog_48x40.jpg", base, dict(quality=85, progressive=True)),
        ("jpg_prog_444_33x17.jpg", odd, dict(quality=85, progressive=True, subsampling=0)),
        ("jpg_prog_420_33x17.jpg", odd, dict(quality=60, progressive=True, subsampling=2)),
        ("jpg_optimize_48x40.jpg", base, dict(quality=80, optimize=True)),
        ("jpg_restart_48x40.jpg", base, dict(quality=80, restart_marker_blocks=1)),
        ("jpg_restart_rows_33x17.jpg", odd, dict(quality=80, restart_marker_rows=1, subsampling=0)),
        ("jpg_prog_restart_48x40.jpg", base, dict(quality=80, progressive=True, restart_marker_blocks=2)),
        ("jpg_1x1.jpg", base[:1, :1], dict(quality=90)),
        ("jpg_prog_1x1.jpg", base[:1, :1], dict(quality=90, progressive=True)),
        ("jpg_q20_64x48.jpg", photo(64, 48, 11), dict(quality=20)),
    ]
    for (name, arr, kw) in jpgs:
        Image.fromarray(arr).save(p(name), "JPEG", **kw)
        expected[name] = pil_rgb(p(name), True)
    gray = np.asarray(Image.fromarray(base).convert("L"))
    Image.fromarray(gray).save(p("jpg_gray_48x40.jpg"), quality=85)
    Image.fromarray(gray[:17, :33]).save(p("jpg_gray_prog_33x17.jpg"), quality=85, progressive=True)
    # RGB stored as is (Adobe APP14 transform 0), no YCbCr conversion
    Image.fromarray(odd).save(p("jpg_adobe_rgb_33x17.jpg"), quality=90, keep_rgb=True)
    for n in ("jpg_gray_48x40.jpg", "jpg_gray_prog_33x17.jpg", "jpg_adobe_rgb_33x17.jpg"):
        expected[n] = pil_rgb(p(n), True)

    # EXIF orientation, all eight, on a non-square picture so rotations show
    rect = photo(40, 24, 9)
    for o in range(1, 9):
        ex = Image.Exif()
        ex[0x0112] = o
        name = f"jpg_exif{o}_40x24.jpg"
        Image.fromarray(rect).save(p(name), quality=90, exif=ex.tobytes())
        expected[name] = pil_rgb(p(name), True)
        assert Image.open(p(name)).getexif().get(0x0112) == o
    # big-endian EXIF (Pillow writes little-endian): build the TIFF by hand
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">H", 1) + \
        struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + struct.pack(">I", 0)
    Image.fromarray(rect).save(p("jpg_exif6be_40x24.jpg"), quality=90, exif=b"Exif\x00\x00" + tiff)
    expected["jpg_exif6be_40x24.jpg"] = pil_rgb(p("jpg_exif6be_40x24.jpg"), True)

    # ---- from cjpeg: 4:4:0 sampling; arithmetic coding (refused)
    cjpeg = shutil.which("cjpeg")
    if cjpeg:
        ppm = p("tmp.ppm")
        Image.fromarray(base).save(ppm)
        subprocess.run([cjpeg, "-quality", "85", "-sample", "1x2,1x1,1x1", "-outfile",
                        p("jpg_440_48x40.jpg"), ppm], check=True)
        expected["jpg_440_48x40.jpg"] = pil_rgb(p("jpg_440_48x40.jpg"), True)
        Image.fromarray(odd).save(ppm)
        subprocess.run([cjpeg, "-quality", "85", "-sample", "1x2,1x1,1x1", "-progressive", "-outfile",
                        p("jpg_prog_440_33x17.jpg"), ppm], check=True)
        expected["jpg_prog_440_33x17.jpg"] = pil_rgb(p("jpg_prog_440_33x17.jpg"), True)
        subprocess.run([cjpeg, "-quality", "85", "-sample", "2x1,1x1,1x1", "-restart", "1", "-outfile",
                        p("jpg_422_restartrow_33x17.jpg"), ppm], check=True)
        expected["jpg_422_restartrow_33x17.jpg"] = pil_rgb(p("jpg_422_restartrow_33x17.jpg"), True)
        subprocess.run([cjpeg, "-quality", "85", "-sample", "4x1,1x1,1x1", "-outfile",
                        p("jpg_411_33x17.jpg"), ppm], check=True)      # 4:1:1: chroma replicated, not fancy
        expected["jpg_411_33x17.jpg"] = pil_rgb(p("jpg_411_33x17.jpg"), True)
        r = subprocess.run([cjpeg, "-arithmetic", "-outfile", p("bad_arith.jpg"), ppm])
        if r.returncode != 0:
            notes.append("cjpeg has no -arithmetic: bad_arith.jpg not written")
        os.remove(ppm)
    else:
        notes.append("cjpeg not installed: 4:4:0 and arithmetic fixtures skipped")

    # ---- kinds we refuse
    Image.fromarray(base).convert("CMYK").save(p("bad_cmyk.jpg"), quality=80)
    good = open(p("jpg_q75_48x40.jpg"), "rb").read()
    sof = good.index(b"\xff\xc0")

    def patched(name, marker, precision=None):
        b = bytearray(good)
        b[sof + 1] = marker
        if precision is not None:
            b[sof + 4] = precision
        open(p(name), "wb").write(bytes(b))
    patched("bad_12bit.jpg", 0xC1, 12)     # extended sequential, 12-bit samples
    patched("bad_sof9.jpg", 0xC9)          # arithmetic coding
    patched("bad_lossless.jpg", 0xC3)      # lossless
    patched("bad_hier.jpg", 0xC5)          # differential (hierarchical)
    open(p("bad_notimage.txt"), "wb").write(b"GIF89a not an image we read\n")

    # ---- resize references
    src = photo(64, 48, 21)
    expected["resize_src"] = src
    im = Image.fromarray(src)
    for (w, h) in [(32, 24), (19, 15), (96, 72), (40, 60), (64, 20), (7, 5)]:
        expected[f"resize_lanczos_{w}x{h}"] = np.asarray(im.resize((w, h), Image.LANCZOS))
        expected[f"resize_box_{w}x{h}"] = np.asarray(im.resize((w, h), Image.BOX))
    # the training crop: short side 48 -> 32 gives 42x32 (floor(32*64/48)), centre 32x32
    # at x = round((42-32)/2) = 5; and an explicit offset (3, 0) 24x24 crop
    scaled = im.resize((42, 32), Image.LANCZOS)
    expected["crop_centre_32"] = np.asarray(scaled.crop((5, 0, 37, 32)))
    expected["crop_off3_24"] = np.asarray(scaled.crop((3, 0, 27, 24)))

    tensors = {k: np.ascontiguousarray(v.astype(np.uint8)) for k, v in expected.items()}
    save_file(tensors, os.path.join(OUT, "expected.safetensors"))
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"{len(os.listdir(OUT))} files, {total} bytes in {OUT}")
    for n in notes:
        print("note:", n)


def check_png(path, raw=None, w=None, h=None):
    im = Image.open(path)
    im.load()
    print(f"{path}: mode {im.mode}, size {im.size}, text: {dict(im.text)}")
    if raw:
        want = np.fromfile(raw, dtype=np.uint8).reshape(int(h), int(w), 3)
        got = np.asarray(im.convert("RGB"))
        same = got.shape == want.shape and bool((got == want).all())
        print("pixels identical to the encoded RGB:", same)
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--check-png":
        sys.exit(check_png(*sys.argv[2:]))
    make()
