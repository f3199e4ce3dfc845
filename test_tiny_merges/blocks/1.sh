tools/make-assignment 07 /tmp/hw7
cd /tmp/hw7 && make build/test_tokenizer && ./build/test_tokenizer
