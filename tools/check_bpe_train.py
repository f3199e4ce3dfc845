"""check_bpe_train.py: the vocabulary bpe_train.c writes, read by transformers.

Runs `build/make_data --vocab DIR` (build it with `make build/make_data`),
which trains a vocabulary on the base captions, writes DIR/vocab.json and
DIR/merges.txt, and prints each caption with the ids tokenizer.c gives it.
Then loads DIR with transformers' CLIPTokenizer (Python) and
CLIPTokenizerFast (Rust `tokenizers`) and checks both give the same ids.
Developer-only; CI never runs it.

    /work/venv/bin/python tools/check_bpe_train.py [build/make_data]
"""
import subprocess
import sys
import tempfile

from transformers import CLIPTokenizer, CLIPTokenizerFast


def main():
    exe = sys.argv[1] if len(sys.argv) > 1 else "build/make_data"
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run([exe, "--vocab", d], check=True, capture_output=True, text=True).stdout
        slow = CLIPTokenizer(f"{d}/vocab.json", f"{d}/merges.txt")
        fast = CLIPTokenizerFast.from_pretrained(d)  # converted from the slow files
        lines = [l for l in out.splitlines() if l]
        bad = 0
        for line in lines:
            caption, ids = line.split("\t")
            want = [int(x) for x in ids.split()]
            for name, tok in (("slow", slow), ("fast", fast)):
                got = tok(caption, add_special_tokens=False).input_ids
                if got != want:
                    bad += 1
                    print(f"MISMATCH ({name}) {caption!r}: C {want} vs transformers {got}")
        # the SD layout: BOS first, EOS after the text, padded with EOS to 77
        sd = slow(lines[0].split("\t")[0], padding="max_length", max_length=77).input_ids
        assert sd[0] == len(slow) - 2 and sd[-1] == len(slow) - 1, sd
        print(f"{len(lines)} captions, vocabulary {len(slow)}: {'all match' if not bad else f'{bad} mismatches'}")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
