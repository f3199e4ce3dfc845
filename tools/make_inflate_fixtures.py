"""Writes the small compressed fixtures tests/test_inflate.c decodes, all made
by Python's own gzip/zlib (the reference implementation of the formats).
Run from the repository root: python tools/make_inflate_fixtures.py"""
import gzip, io, struct, zlib

D = "tests/fixtures/"
words = [b"the", b"quick", b"brown", b"fox", b"jumps", b"over", b"lazy", b"dog,",
         b"LoRA", b"diffusion", b"1234", b"\xc3\xa9t\xc3\xa9", b"\n"]
# ~2 KB of text, varied enough that level 9 picks a dynamic-Huffman block
x, ws = 7, []
for i in range(400):
    x = (x * 1103515245 + 12345) & 0xffffffff
    ws.append(words[(x >> 16) % 13])
text = b" ".join(ws)
open(D + "inflate_text.txt", "wb").write(text)

def gz(data, level, name=b""):
    buf = io.BytesIO()
    with gzip.GzipFile(filename=name.decode(), mode="wb", fileobj=buf, compresslevel=level, mtime=0) as f:
        f.write(data)
    return buf.getvalue()

for lv in (0, 1, 9):
    open(D + f"inflate_text_l{lv}.gz", "wb").write(gz(text, lv))
    open(D + f"inflate_text_l{lv}.zz", "wb").write(zlib.compress(text, lv))
open(D + "inflate_text_named.gz", "wb").write(gz(text, 6, b"text.txt"))
c = zlib.compressobj(9, zlib.DEFLATED, -15)
open(D + "inflate_text.deflate", "wb").write(c.compress(text) + c.flush())
open(D + "inflate_empty.gz", "wb").write(gz(b"", 9))
open(D + "inflate_empty.zz", "wb").write(zlib.compress(b"", 9))

# every optional gzip header field: FEXTRA | FNAME | FCOMMENT | FHCRC
c = zlib.compressobj(9, zlib.DEFLATED, -15)
body = c.compress(text) + c.flush()
hdr = bytes([0x1f, 0x8b, 8, 0x1e]) + struct.pack("<I", 0) + bytes([2, 3])
hdr += struct.pack("<H", 4) + b"ab\x01\x02" + b"name.txt\x00" + b"a comment\x00"
hdr += struct.pack("<H", zlib.crc32(hdr) & 0xffff)
open(D + "inflate_text_allflags.gz", "wb").write(
    hdr + body + struct.pack("<II", zlib.crc32(text), len(text)))
# two concatenated members decode to their concatenation
open(D + "inflate_text_2members.gz", "wb").write(gz(text[:700], 9) + gz(text[700:], 1))

# 1 MiB: a 20000-byte block of LCG letters repeated, so the stream is mostly
# back-references at distance 20000 (test_inflate.c regenerates the same bytes)
x, blk = 12345, bytearray()
for i in range(20000):
    x = (x * 1103515245 + 12345) & 0xffffffff
    blk.append(ord("a") + ((x >> 16) & 3))
big = bytes(blk[i % 20000] for i in range(1 << 20))
open(D + "inflate_big.gz", "wb").write(gz(big, 9))

# a short input that zlib codes with the fixed Huffman table (block type 1)
small = zlib.compress(b"hello, hello, hello world", 9)
assert (small[2] >> 1) & 3 == 1
open(D + "inflate_small.zz", "wb").write(small)
