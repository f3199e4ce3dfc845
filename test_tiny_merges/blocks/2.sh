cc -O2 -std=c99 -D_POSIX_C_SOURCE=200809L -I. assignments/07-bpe-merges/tokens.c \
   tokenizer.c inflate.c json.c -lm -o /tmp/tokens
cat data/0*.txt | /tmp/tokens models/tiny/tokenizer
