"""Writes tests/fixtures/tokenizer_cases.json: tricky prompts and the 77 ids
transformers' CLIPTokenizer gives for them (padding="max_length",
max_length=77, truncation=True: exactly what SD1.x pipelines call).

The tokenizer is built from OpenAI's bpe_simple_vocab_16e6.txt.gz (shipped in
the open-clip-torch wheel) the way CLIP builds its vocabulary, written out as
vocab.json + merges.txt, then loaded with CLIPTokenizer.from_pretrained; that
is the same vocabulary openai/clip-vit-large-patch14 publishes (49408 tokens,
bos 49406, eos = pad = unk = 49407), checked below on known encodings.
Also checks the hand-made tiny vocabulary in tests/fixtures/tokenizer_tiny
against what tests/test_tokenizer.c expects of it.

Run from the repository root:
    /work/venv/bin/python tools/make_tokenizer_fixtures.py [path/to/bpe_simple_vocab_16e6.txt.gz]
(without a path it uses tests/fixtures/vocab/ or pip-downloads open-clip-torch)."""
import gzip, json, os, random, subprocess, sys, tempfile, zipfile
import transformers
from transformers import CLIPTokenizer

VOCAB_GZ = "tests/fixtures/vocab/bpe_simple_vocab_16e6.txt.gz"


def find_vocab():
    if len(sys.argv) > 1: return sys.argv[1]
    if os.path.exists(VOCAB_GZ): return VOCAB_GZ
    d = tempfile.mkdtemp()
    subprocess.check_call([sys.executable, "-m", "pip", "download", "--no-deps", "open-clip-torch", "-d", d])
    whl = [f for f in os.listdir(d) if f.endswith(".whl")][0]
    with zipfile.ZipFile(os.path.join(d, whl)) as z:
        z.extract("open_clip/bpe_simple_vocab_16e6.txt.gz", d)
    return os.path.join(d, "open_clip/bpe_simple_vocab_16e6.txt.gz")


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_hf_files(gz, outdir):
    lines = gzip.open(gz).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(outdir, "vocab.json"), "w") as f:
        json.dump({v: i for i, v in enumerate(vocab)}, f)
    with open(os.path.join(outdir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    with open(os.path.join(outdir, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, f)


def prompts():
    P = [
        "", " ", "   ", "\t\n", "a", "A", "a photo of a cat", "A Photo Of A CAT",
        "an astronaut riding a horse on mars, highly detailed, 8k",
        "masterpiece, best quality, 1girl, solo, looking at viewer",
        "(masterpiece:1.2), (best quality:1.1), [blurry], {red|blue} hair",
        "<lora:x:0.5> a dog", "<lora:my_style_v2:0.75>, portrait", "<hypernet:foo:1>",
        "((((extremely detailed))))", "[[[low quality]]]", "cat AND dog", "BREAK", "a BREAK b",
        "embedding:bad_prompt_v2", "score_9, score_8_up, score_7_up",
        "3.14", "1,000", "1,000,000 dollars", "2024-01-01", "12:30pm", "1e-5", "$100", "50%",
        "v1.5", "sd-v1-4.ckpt", "0.18215", "-1", "+42", "#hashtag", "@user", "a_b_c", "snake_case_words",
        "it's", "don't", "they're", "I've", "I'm", "we'll", "he'd", "'s", "'t", "''s", "'sand", "'S",
        "IT'S DON'T", "rock'n'roll", "o'clock", "’s curly apostrophe", "can’t", "``quoted''",
        "\"double quotes\"", "'single quotes'", "l'été", "aujourd'hui",
        "café", "naïve", "Ãber", "über straße", "mañana", "São Paulo", "Zürich", "Ærøskøbing",
        "e\u0301", "cafe\u0301", "u\u0308ber", "n\u0303", "a\u0323\u0302", "a\u0302\u0323",
        "\u1100\u1161\u11a8", "한국어 프롬프트", "\u0130stanbul", "İI ıi", "ΣΑΣ ΟΔΟΣ σς", "ΆΈΉ",
        "Straße STRASSE", "ﬁnal ﬂow", "Ａｂｃ １２３", "x² + y³", "½ cup", "Ⅻ Ⅷ ⅻ", "٣٤٥ ١٢", "१२३ हिन्दी",
        "日本語のプロンプト", "猫が好き", "中文提示词，高质量", "한글", "ไทย", "עברית", "العربية", "русский ТЕКСТ",
        "Ελληνικά", "Tiếng Việt", "ქართული", "հայերեն", "ᚠᚢᚦ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𝓜𝓪𝓽𝓱", "𝟙𝟚𝟛",
        "🐱", "a 🐱 cat", "🤖🚀✨", "👩‍💻", "👍🏽", "🇫🇷🇯🇵", "❤️", "☕︎", "⭐️⭐️⭐️", "🏳️‍🌈 flag",
        "zero\u200bwidth", "non\u00a0breaking", "ideographic\u3000space", "nel\u0085line", "vt\x0bff\x0c",
        "cr\rlf\r\nend", "tabs\t\tand    spaces", "  leading and trailing  ", "line1\nline2\n\nline3",
        "en\u2002em\u2003thin\u2009", "\u2028\u2029", "\x1c\x1d\x1e\x1f", "ctrl\x01\x02\x7f",
        "!!!", "...", "?!?!", "a...b", "---", "***", "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
        "a,b,c", "a, b, c", "a;b:c", "(a)", "[a]", "{a}", "<a>", "a/b\\c", "a|b", "a~b", "a^b", "a=b+c",
        "&amp; &lt; &gt;", "&#39;", "<br>", "http://example.com/path?q=1&r=2", "user@example.com",
        "C++ C# F#", "¿qué?", "¡hola!", "«guillemets»", "“smart quotes”", "—dash–", "…",
        "<|startoftext|>", "<|endoftext|>", "<|startoftext|>a cat<|endoftext|>", "a<|endoftext|>b",
        "<|EndOfText|>", "<|ENDOFTEXT|> x", "<|endoftext|", "<|endoftext", "<<|endoftext|>>",
        "x<|startoftext|>y", "<|endoftext|><|endoftext|>", "startoftext endoftext",
        "Mixed CaSe WoRdS", "CamelCaseWord", "HTTPServer", "iPhone", "McDonald's", "O'Reilly",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "supercalifragilisticexpialidocious", "pneumonoultramicroscopicsilicovolcanoconiosis",
        "antidisestablishmentarianism" * 5, "ab" * 200, "xyzzy" * 60,
        "0123456789" * 10, "1 2 3 4 5 6 7 8 9 10 11 12",
        "photorealistic", "hyperrealistic", "unreal engine", "octane render", "artstation", "greg rutkowski",
        "by alphonse mucha and artgerm", "trending on artstation, 4k uhd", "bokeh, depth of field, f/1.8",
        "ultra-detailed", "high-res", "well-lit", "self-portrait", "sci-fi", "t-shirt",
    ]
    long = ("a highly detailed portrait of a wizard wearing a flowing cloak of stars, standing in a misty "
            "forest at dawn, volumetric lighting, intricate embroidery, golden hour, cinematic composition, "
            "sharp focus, illustration by a famous artist, concept art, matte painting, 8k resolution, "
            "award winning photograph, extremely detailed face and hands, dramatic shadows")
    P += [long, long.upper(), long + " " + long, ", ".join(["tag%d" % i for i in range(100)]),
          " ".join(["word"] * 74), " ".join(["word"] * 75), " ".join(["word"] * 76), " ".join(["word"] * 80),
          "🐱" * 40, "é" * 100, "日本" * 60]
    # random mixtures of fragments, seeded
    frags = ["cat", "Dog", " ", "  ", "\t", "\n", ",", "!", "'s", "'ll", "(", ")", ":1.2", "<lora:a:1>",
             "3.5", "1,000", "é", "e\u0301", "Ü", "ß", "İ", "Σ", "日本", "🐱", "👩‍💻", "—", "…", "\u00a0",
             "\u3000", "x²", "٣", "ﬁ", "Ａ", "<|endoftext|>", "<|startoftext|>", "the", "quick", "BROWN",
             "fox's", "don't", "RE", "ve", "'", "''", "\"", "a_b", "-", "...", "9", "42", "𝔘"]
    rng = random.Random(1234)
    while len(P) < 320:
        P.append("".join(rng.choice(frags) for _ in range(rng.randint(1, 40))))
    return P


def main():
    gz = find_vocab()
    d = tempfile.mkdtemp()
    build_hf_files(gz, d)
    tok = CLIPTokenizer.from_pretrained(d)
    assert len(tok) == 49408 and tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    assert tok.pad_token_id == 49407 and tok.unk_token_id == 49407
    # well-known encodings from openai/clip-vit-large-patch14
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("a diagram")["input_ids"] == [49406, 320, 22697, 49407]

    cases = []
    for p in prompts():
        ids = tok(p, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert len(ids) == 77
        cases.append({"text": p, "ids": ids})
    meta = {"source": "transformers %s CLIPTokenizer from bpe_simple_vocab_16e6.txt.gz" % transformers.__version__,
            "call": "tok(text, padding='max_length', max_length=77, truncation=True)"}
    with open("tests/fixtures/tokenizer_cases.json", "w") as f:
        f.write('{"meta": %s,\n "cases": [\n' % json.dumps(meta))
        f.write(",\n".join(json.dumps(c, ensure_ascii=True, separators=(",", ":")) for c in cases))
        f.write("\n]}\n")
    print("wrote %d cases" % len(cases))

    # the tiny hand-made vocabulary: confirm the ids test_tokenizer.c expects
    tiny = CLIPTokenizer.from_pretrained("tests/fixtures/tokenizer_tiny")
    expect = {"abc": [9], "bc": [10], "abab": [8, 2, 6], "ababc": [8, 9], "ABC abc": [9, 9],
              "d": [1], "'s": [16], "\u00e9": [21], "e\u0301": [21], "ab!": [2, 6, 13], "a<|endoftext|>b": [5, 1, 6]}
    for text, ids in expect.items():
        got = tiny(text, add_special_tokens=False)["input_ids"]
        assert got == ids, (text, got, ids)
    print("tiny vocabulary: %d expectations confirmed" % len(expect))


if __name__ == "__main__":
    main()
