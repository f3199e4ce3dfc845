#!/usr/bin/env python3
"""make_corpus.py: write the seed corpus tests/fuzz/corpus/NAME/ for each
harness, from tests/fixtures and models/tiny (a few KB per harness), plus
the reproducers of the faults issue 16 fixed. Standard library only; the
output is the same bytes on every run. Run from the repository root.
Files named repro_fuzz_* were saved by fuzzing runs and are kept as they are
(this script does not remove anything)."""
import gzip, json, os, struct, zlib

OUT = "tests/fuzz/corpus"
IMG = "tests/fixtures/images/"


def put(name, fname, data):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, fname), "wb") as f:
        f.write(data)


def read(p):
    with open(p, "rb") as f:
        return f.read()


def st_file(tensors, meta=None, raw_header=None):
    """a safetensors file: tensors = [(name, dtype, shape, bytes)]"""
    h, off, blob = {}, 0, b""
    if meta is not None:
        h["__metadata__"] = meta
    for name, dt, shape, b in tensors:
        h[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(b)]}
        off += len(b)
        blob += b
    hj = raw_header if raw_header is not None else json.dumps(h, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)
    return struct.pack("<Q", len(hj)) + hj + blob


def chunk(t, d):
    return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)


# PNG: the file after its signature, first byte 1 = "recompute the CRCs"
for f in ["png_c0_d1_33x17.png", "png_c3_d4_i_13x11.png", "png_c6_d16_33x17.png",
          "png_c2_d8_i_13x11.png", "png_c0_d16_i_13x11.png"]:
    put("png", f, b"\x01" + read(IMG + f)[8:])
# reproducer: an empty first IDAT (memcpy from NULL)
p = read(IMG + "png_c3_d4_i_13x11.png")
ihdr_end = 8 + 25
put("png", "repro_empty_first_idat", b"\x00" + p[8:ihdr_end] + chunk(b"IDAT", b"") + p[ihdr_end:])

# JPEG: whole files
for f in ["jpg_420_33x17.jpg", "jpg_prog_420_33x17.jpg", "jpg_prog_restart_48x40.jpg",
          "jpg_exif6_40x24.jpg", "jpg_gray_prog_33x17.jpg", "jpg_restart_rows_33x17.jpg", "jpg_411_33x17.jpg"]:
    put("jpeg", f, read(IMG + f))
# reproducer: a progressive file with its last scans cut, closed by EOI
j = read(IMG + "jpg_prog_420_33x17.jpg")
sos = [i for i in range(len(j) - 1) if j[i] == 0xFF and j[i + 1] == 0xDA]
put("jpeg", "repro_progressive_cut", j[:sos[3]] + b"\xff\xd9")

# inflate: first byte 0 raw, 1 gzip, 2 zlib
put("inflate", "raw_text", b"\x00" + read("tests/fixtures/inflate_text.deflate"))
put("inflate", "gzip_flags", b"\x01" + read("tests/fixtures/inflate_text_allflags.gz"))
put("inflate", "gzip_2members", b"\x01" + read("tests/fixtures/inflate_text_2members.gz"))
put("inflate", "zlib_l1", b"\x02" + read("tests/fixtures/inflate_text_l1.zz"))
put("inflate", "zlib_small", b"\x02" + read("tests/fixtures/inflate_small.zz"))
put("inflate", "raw_stored", b"\x00" + zlib.compressobj(0, zlib.DEFLATED, -15).compress(b"stored block " * 20)
    + zlib.compressobj(0, zlib.DEFLATED, -15).flush())

# JSON
for f in ["models/tiny/unet/config.json", "models/tiny/vae/config.json",
          "models/tiny/scheduler/scheduler_config.json", "models/tiny/tokenizer/special_tokens_map.json",
          "tests/fixtures/tokenizer_tiny/vocab.json"]:
    put("json", f.replace("/", "_"), read(f))
put("json", "escapes", '{"s": "a\\u00e9\\ud83d\\ude00\\n\\"", "n": [-0.5e-3, 1E+2, 0, true, false, null], "o": {}}'.encode())
put("json", "repro_duplicate_key", b'{"__metadata__": {"a": "1"}, "__metadata__": {"b": "2", "c": "3"}}')

# safetensors
put("safetensors", "st_python", read("tests/fixtures/st_python.safetensors"))
put("safetensors", "meta_and_dtypes", st_file(
    [("a", "F32", [2], struct.pack("<2f", 1.5, -2)), ("b", "F16", [1, 2], b"\x00\x3c\x00\xc0"),
     ("c", "BF16", [], b"\x80\x3f"), ("d", "I64", [1], struct.pack("<q", 8)), ("e", "F64", [0], b""),
     ("f", "U8", [3], b"\x01\x02\x03")],
    meta={"format": "pt", "lora_adapter_metadata": '{"unet.lora_alpha": 8, "unet.r": 4}'}))
names = [l.strip() for l in read("tests/fixtures/ldm_tiny_names.txt").decode().splitlines() if l.strip()]
put("safetensors", "ldm_names", st_file([(n, "F16", [0], b"") for n in sorted(names)[:40]]))
put("safetensors", "repro_metadata_twice", st_file([], raw_header=
    b'{"__metadata__":{"k":"v"},"t":{"dtype":"F32","shape":[],"data_offsets":[0,0]},'
    b'"__metadata__":{"a":"1","b":"2","c":"3","d":"4","e":"5","f":"6"}}'))

# LoRA files
z = lambda n: b"\x00" * (4 * n)
put("lora", "kohya_f32", st_file([
    ("lora_unet_down_blocks_0_attentions_0_proj_in.alpha", "F32", [], struct.pack("<f", 4)),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "F32", [2, 4, 1, 1], z(8)),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", "F32", [3, 2, 1, 1], z(6)),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", "F16", [2, 4], z(4)),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight", "F16", [4, 2], z(4))],
    meta={"ss_network_dim": "2"}))
put("lora", "kohya_int64_alpha", st_file([
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.alpha", "I64", [], struct.pack("<q", 8)),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight", "F32", [2, 4], z(8)),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight", "F32", [4, 2], z(8))]))
put("lora", "peft", st_file([
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight", "F32", [2, 4], z(8)),
    ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_B.weight", "F32", [4, 2], z(8)),
    ("text_encoder.text_model.encoder.layers.0.self_attn.out_proj.lora_A.weight", "BF16", [1, 4], z(2)),
    ("text_encoder.text_model.encoder.layers.0.self_attn.out_proj.lora_B.weight", "BF16", [4, 1], z(2))],
    meta={"lora_adapter_metadata": '{"unet.lora_alpha": 8, "text_encoder.lora_alpha": 2}'}))
put("lora", "old_processor", st_file([
    ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.down.weight", "F32", [1, 2], z(2)),
    ("unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight", "F32", [2, 1], z(2))]))

# model configs: first byte 0 text encoder, 1 UNet, 2 VAE, 3 scheduler
put("config", "clip", b"\x00" + read("models/tiny/text_encoder/config.json"))
put("config", "clip_full", b"\x00" + json.dumps({"text_config": {"hidden_size": 64, "num_attention_heads": 4,
                                                                 "hidden_act": "gelu", "layer_norm_eps": 1e-5}}).encode())
put("config", "unet", b"\x01" + read("models/tiny/unet/config.json"))
put("config", "vae", b"\x02" + read("models/tiny/vae/config.json"))
put("config", "scheduler", b"\x03" + read("models/tiny/scheduler/scheduler_config.json"))
# reproducer: a number beyond int's range was converted to int before any check
put("config", "repro_scheduler_huge_timesteps", b'\x03{"num_train_timesteps": 1e300, "steps_offset": 1}')

# tokenizer: vocab.json NUL merges.txt NUL text; no NUL = a .txt.gz vocabulary
put("tokenizer", "tiny_fixture", read("tests/fixtures/tokenizer_tiny/vocab.json") + b"\x00"
    + read("tests/fixtures/tokenizer_tiny/merges.txt") + b"\x00abc ab! it's \xc3\xa9")
put("tokenizer", "tiny_model", read("models/tiny/tokenizer/vocab.json") + b"\x00"
    + read("models/tiny/tokenizer/merges.txt") + b"\x00a photo of a red circle")
put("tokenizer", "tiny_model_map", read("models/tiny/tokenizer/vocab.json") + b"\x00"
    + read("models/tiny/tokenizer/merges.txt") + b"\x00a <|endoftext|> b\x00"
    + read("models/tiny/tokenizer/special_tokens_map.json"))
put("tokenizer", "clip_gz", gzip.compress(b"bpe_simple_vocab_16e6.txt#version: 0.2\ni n\nt h\na n\nr e\nth e</w>\n"
                                          * 3, mtime=0))

# captions.csv for the folder fuzz_captions builds (a.png b.jpg c.png+c.txt sub/d.png 3_style/e.jpg)
put("captions", "plain", b"file,caption\na.png,a cat\nb.jpg,\"a dog, \"\"big\"\"\"\nsub/d.png,x\n")
put("captions", "crlf_bom", b"\xef\xbb\xbfimage,text\r\n./a.png,one\r\n3_style\\e.jpg,two, three\r\nmissing.png,z\r\n")
put("captions", "quoted_newline", b"a.png,\"line one\nline two\"\nc.png,csv loses to c.txt\na.png,twice\n")
put("captions", "odd", b"\"a.png\",\"x\"\nsub/../b.jpg,y\n")

# dataset trees: records kind path NUL content NUL (d folder, f file, l symlink)
def tree(*recs):
    return b"".join(k + p + b"\x00" + c + b"\x00" for k, p, c in recs)
put("dataset", "kohya", tree((b"d", b"10_style", b""), (b"f", b"10_style/a.png", b""),
                             (b"f", b"10_style/a.txt", b"a caption\nsecond line\n"), (b"f", b"b.jpg", b""),
                             (b"f", b"b.caption", b"\xef\xbb\xbfbee"), (b"d", b"0_skip", b""),
                             (b"f", b"0_skip/c.png", b""), (b"f", b"d.webp", b"")) + b"\x00")
put("dataset", "csv_and_links", tree((b"d", b"s", b""), (b"f", b"s/x.PNG", b""), (b"l", b"s/loop", b"."),
                                     (b"l", b"y.jpeg", b"s/x.PNG"),
                                     (b"f", b"captions.csv", b"file,caption\ns/x.PNG,from csv\ny.jpeg,\"q\"\n"),
                                     (b"f", b"s/x.txt", b"\xff\xfe\x00")) + b"\x01")
put("dataset", "empty", b"\x02")
