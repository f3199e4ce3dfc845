# sdlora: LoRA fine-tuning for Stable Diffusion 1.x in plain C99.
#   make            build ./train and ./sample (OpenMP when the compiler has it; OMP=0 without)
#   make test       build and run every tests/test_*.c (Check)
#   make asan       the same tests under AddressSanitizer + UBSan
#   make check-assignments  the course assignments (assignments/README.md) build, fail as stubs, pass as reference
#   make bench      matmul GFLOP/s beside OpenBLAS SGEMM on the shapes SD uses (skipped,
#                   with a message, without OpenBLAS), and one SD1.5 UNet step beside
#                   PyTorch (tools/bench_unet.sh; SDLORA_PY=python)
#   make data       redraw the bundled datasets (data/, models/tiny/data/) with tools/make_data.c
#   make tiny-base  pre-train the bundled tiny model (models/tiny/) from scratch, about 45 minutes
#   make fuzz       build tests/fuzz/ with clang (libFuzzer + ASan + UBSan) and run each
#                   reader's harness FUZZ_SECONDS (default 60) seconds
#   make CUDA=1     also compile and link cuda/*.cu with nvcc
#   make MPI=1      ./train for mpirun -np N (data parallel, dist.c; built in build-mpi/)
#   make test-mpi   the 2-rank tests (tests/test_mpi.sh: byte identity with one process,
#                   a killed rank, a hung rank, Ctrl-C, resume into 1 rank); needs Open MPI
#   make CUDA=1 test-cuda   the GPU kernels' arithmetic checked on the host against the
#                   CPU code, and the whole UNet on a host-emulated device
#                   (cuda/test_cuda_host.cu; needs nvcc, not a GPU)
#   bash tools/gpu_check.sh   on a machine with an NVIDIA GPU: cuda against cpu, and timings
#   make clean

CC      ?= cc
MPI     ?= 0
# make MPI=1: ./train for mpirun -np N (dist.c), compiled by mpicc in its own folder
ifeq ($(MPI),1)
  MPICC ?= mpicc
  CC    := $(MPICC)
  BUILD ?= build-mpi
endif
OPT     ?= -O3 -march=native
CFLAGS  ?= $(OPT)
CFLAGS  += -std=c99 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -Wshadow -Wno-unused-parameter -fno-math-errno
LDLIBS  += -lm
ifeq ($(MPI),1)
  CFLAGS += -DSDLORA_MPI=1
endif
OMP     ?= 1
CUDA    ?= 0
BUILD   ?= build

# OpenMP only when the compiler accepts it
ifeq ($(OMP),1)
  ifeq ($(shell echo 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo yes),yes)
    CFLAGS += -fopenmp
    LDFLAGS += -fopenmp
  endif
endif

# the library: every top-level .c except the two programs
PROGS   := train sample
LIBSRC  := $(filter-out $(PROGS:=.c),$(wildcard *.c))
LIBOBJ  := $(LIBSRC:%.c=$(BUILD)/%.o)

# One virtual architecture, as PTX only: nvcc then skips ptxas (the slow
# half of a CUDA compile) and the driver JIT-compiles the PTX once, on the
# first run, for whatever GPU it finds from Ampere (sm_80) on, and caches
# it. CUDA_ARCH="-arch=sm_90" would ship machine code for Hopper instead.
ifeq ($(CUDA),1)
  NVCC      ?= nvcc
  CUDA_ARCH ?= -gencode arch=compute_80,code=compute_80
  NVFLAGS   ?= -O3 -std=c++17 $(CUDA_ARCH) -Xcompiler -Wall
  NVFLAGS   += -DSDLORA_CUDA=1
  CUSRC     := $(filter-out cuda/test_%.cu,$(wildcard cuda/*.cu))
  LIBOBJ    += $(CUSRC:cuda/%.cu=$(BUILD)/cuda_%.o)
  CFLAGS    += -DSDLORA_CUDA=1
  CUDA_HOME ?= $(or $(patsubst %/bin/nvcc,%,$(shell command -v $(NVCC))),/usr/local/cuda)
  LDLIBS    += -L$(CUDA_HOME)/lib64 -L$(CUDA_HOME)/targets/x86_64-linux/lib -lcudart -lcublas -lstdc++
endif
# CUDA=1 MPI=1: the gradient sum over NCCL (cuda/dist_nccl.cu; NCCL ships with the toolkit here)
ifeq ($(CUDA)$(MPI),11)
  NVFLAGS   += -DSDLORA_MPI=1
  LDLIBS    += -lnccl
endif

# Check, for the tests
CHECK_CFLAGS := $(shell pkg-config --cflags check 2>/dev/null)
CHECK_LIBS   := $(shell pkg-config --libs check 2>/dev/null || echo -lcheck -lsubunit -lrt -lpthread -lm)

TESTSRC := $(wildcard tests/test_*.c)
TESTBIN := $(TESTSRC:tests/%.c=$(BUILD)/%)

.PHONY: all test asan bench clean test-mpi
all: $(PROGS)

$(BUILD):
	@mkdir -p $(BUILD)

$(BUILD)/%.o: %.c $(wildcard *.h) | $(BUILD)
	$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/cuda_%.o: cuda/%.cu $(wildcard cuda/*.h cuda/*.cuh *.h) | $(BUILD)
	$(NVCC) $(NVFLAGS) -c $< -o $@
# AdamW rounds every product as optim.c does (no fused multiply-add), so the
# GPU's update is the CPU's bit for bit
$(BUILD)/cuda_optim.o: NVFLAGS += -fmad=false

# the kernels' arithmetic on the host, beside the CPU code (no GPU needed);
# nvcc compiles it, cc links it with the library as the programs are linked
.PHONY: test-cuda
ifeq ($(CUDA),1)
test-cuda: $(BUILD)/test_cuda_host
	./$(BUILD)/test_cuda_host
$(BUILD)/test_cuda_host.o: cuda/test_cuda_host.cu $(wildcard cuda/*.h cuda/*.cuh *.h) | $(BUILD)
	$(NVCC) $(NVFLAGS) -I. -c $< -o $@
$(BUILD)/test_cuda_host: $(BUILD)/test_cuda_host.o $(LIBOBJ)
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)
else
test-cuda:
	@echo "error: test-cuda: exists only in the CUDA build (run make CUDA=1 test-cuda BUILD=build-cuda)"; exit 1
endif

# cuda against cpu on models/tiny and a random SD1.5, and timings (tools/gpu_check.sh)
$(BUILD)/gpu_check: tools/gpu_check.c $(LIBOBJ)
	$(CC) $(CFLAGS) -I. $< $(LIBOBJ) -o $@ $(LDFLAGS) $(LDLIBS)

# the programs are built in $(BUILD) (so `make asan` has sanitised ones for
# tests/test_programs.c) and copied to the top for users
$(PROGS): %: $(BUILD)/%
	cp $< $@

$(PROGS:%=$(BUILD)/%): $(BUILD)/%: $(BUILD)/%.o $(LIBOBJ)
	$(CC) $(LDFLAGS) $^ -o $@ $(LDLIBS)

$(BUILD)/test_%: tests/test_%.c tests/testutil.h $(LIBOBJ) $(wildcard *.h)
	$(CC) $(CFLAGS) $(CHECK_CFLAGS) -DSDLORA_BUILD='"$(BUILD)"' -I. $< $(LIBOBJ) -o $@ $(LDFLAGS) $(CHECK_LIBS) $(LDLIBS)
# the kernel variants compile matmul.c and test_matmul.c into themselves
$(BUILD)/test_matmul_portable $(BUILD)/test_matmul_avx2: tests/test_matmul.c matmul.c
# test_tiny_base includes the pre-training program itself
$(BUILD)/test_tiny_base: tools/tiny_base.c

# each test binary runs from the repository root so fixture paths are stable;
# Check's default 4 s per-test timeout is too short for a loaded machine or ASan
export CK_DEFAULT_TIMEOUT ?= 600
# idle OpenMP threads sleep instead of spinning, so a loaded machine stays fast
export OMP_WAIT_POLICY ?= passive
test: $(TESTBIN) $(PROGS:%=$(BUILD)/%)
	@fail=0; for t in $(TESTBIN); do echo "== $$t"; ./$$t || fail=1; done; \
	if [ $$fail -ne 0 ]; then echo "some tests FAILED"; exit 1; fi

# MPI: the data-parallel trainer against the single-process one (tests/test_mpi.sh)
test-mpi:
	$(MAKE) --no-print-directory MPI=1 BUILD=build-mpi build-mpi/train
	$(MAKE) --no-print-directory MPI=0 BUILD=build build/train
	bash tests/test_mpi.sh build-mpi/train build/train

# the same tests, sanitised, in their own build folder
asan:
	$(MAKE) test BUILD=build-asan OMP=0 OPT="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all" \
	  LDFLAGS="-fsanitize=address,undefined"

# every course assignment: its tests pass here, and its student copy
# (tools/make-assignment) builds with -Werror and fails them (assignments/README.md)
.PHONY: check-assignments
check-assignments:
	MAKE="$(MAKE)" CC="$(CC)" BUILD="$(BUILD)" tools/check-assignments.sh

# the GEMM comparison needs OpenBLAS (its cblas.h and library, found by
# pkg-config or in the default paths); without it only that part is skipped
BLAS_CFLAGS = $(shell pkg-config --cflags openblas 2>/dev/null)
BLAS_LIBS   = $(shell pkg-config --libs openblas 2>/dev/null || echo -lopenblas)
bench: $(BUILD)/bench_unet
	@if printf '#include <cblas.h>\nint main(void){openblas_set_num_threads(1);return 0;}\n' | \
	    $(CC) $(BLAS_CFLAGS) -x c - -o $(BUILD)/.have_openblas $(BLAS_LIBS) >/dev/null 2>&1; then \
	  rm -f $(BUILD)/.have_openblas; \
	  $(MAKE) --no-print-directory $(BUILD)/bench_matmul && ./$(BUILD)/bench_matmul || exit 1; \
	else \
	  echo "bench_matmul: skipped: OpenBLAS not found (no cblas.h with openblas_set_num_threads, or no -lopenblas;"; \
	  echo "              install libopenblas-dev, or openblas-devel); the GEMM comparison is not run"; \
	fi
	sh tools/bench_unet.sh $(BUILD)

# one SD1.5 UNet step (inference, LoRA training) beside PyTorch; needs
# SDLORA_PY (default /work/venv/bin/python) with torch/diffusers/peft, else skipped
$(BUILD)/bench_unet: tools/bench_unet.c $(LIBOBJ)
	$(CC) $(CFLAGS) -I. $< $(LIBOBJ) -o $@ $(LDFLAGS) $(LDLIBS)

$(BUILD)/bench_matmul: tools/bench_matmul.c $(LIBOBJ)
	$(CC) $(CFLAGS) $(BLAS_CFLAGS) -I. $< $(LIBOBJ) -o $@ $(LDFLAGS) $(BLAS_LIBS) $(LDLIBS)

# the bundled datasets; the output is the same bytes on every machine
.PHONY: data
data: $(BUILD)/make_data
	./$(BUILD)/make_data

$(BUILD)/make_data: tools/make_data.c $(LIBOBJ)
	$(CC) $(CFLAGS) -I. $< $(LIBOBJ) -o $@ $(LDFLAGS) $(LDLIBS)

# full fine-tuning vs LoRA, measured (tools/compare.sh)
.PHONY: compare
compare: $(PROGS)
	bash tools/compare.sh

clean:
	rm -rf build build-asan build-cuda build-mpi build-cuda-mpi build-fuzz $(PROGS)

# the bundled tiny model (models/tiny/), pre-trained from scratch by
# tools/tiny_base.c: tokenizer, VAE, then text encoder + UNet. The VAE also
# trains on build/vae_data, 3000 pictures make_data draws (not committed)
.PHONY: tiny-base
tiny-base: $(BUILD)/tiny_base $(BUILD)/make_data
	./$(BUILD)/make_data --base 0 --style 0 --vae 3000 --vae-dir $(BUILD)/vae_data
	./$(BUILD)/tiny_base --vae-data $(BUILD)/vae_data

$(BUILD)/tiny_base: tools/tiny_base.c $(LIBOBJ)
	$(CC) $(CFLAGS) -I. $< $(LIBOBJ) -o $@ $(LDFLAGS) $(LDLIBS)

# libFuzzer harnesses, one per reader (tests/fuzz/, README "Hardening"),
# built with clang in their own folder and run one after another for
# FUZZ_SECONDS each from the seed corpus tests/fuzz/corpus/NAME; what they
# find goes to build-fuzz/corpus/NAME, a crash to build-fuzz/crash-NAME-*
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 60
FUZZ_BUILD   := build-fuzz
FUZZ_NAMES   := png jpeg inflate json safetensors lora config tokenizer captions dataset
FUZZ_CFLAGS  := -std=c99 -D_POSIX_C_SOURCE=200809L -O1 -g -fno-omit-frame-pointer \
                -fsanitize=address,undefined -fno-sanitize-recover=all
FUZZ_LIBOBJ  := $(LIBSRC:%.c=$(FUZZ_BUILD)/%.o)
.PHONY: fuzz
fuzz: $(FUZZ_NAMES:%=$(FUZZ_BUILD)/fuzz_%)
	@for t in $(FUZZ_NAMES); do \
	  mkdir -p $(FUZZ_BUILD)/corpus/$$t; rm -f $(FUZZ_BUILD)/crash-$$t-*; \
	  echo "== fuzz_$$t, $(FUZZ_SECONDS) s"; \
	  ./$(FUZZ_BUILD)/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -timeout=20 -rss_limit_mb=2048 \
	    -print_final_stats=1 -artifact_prefix=$(FUZZ_BUILD)/crash-$$t- \
	    $(FUZZ_BUILD)/corpus/$$t tests/fuzz/corpus/$$t 2>&1 | grep -E '^stat::number_of_executed_units|ERROR|SUMMARY|runtime error|Test unit written'; \
	  if ls $(FUZZ_BUILD)/crash-$$t-* >/dev/null 2>&1; then f=$$(ls $(FUZZ_BUILD)/crash-$$t-* | head -1); \
	    echo "fuzz_$$t FOUND A FAULT, input $$f (see it again: ./$(FUZZ_BUILD)/fuzz_$$t $$f)"; exit 1; fi; \
	done

.SECONDARY: $(FUZZ_LIBOBJ)
$(FUZZ_BUILD)/%.o: %.c $(wildcard *.h)
	@mkdir -p $(FUZZ_BUILD)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -c $< -o $@

# fuzz_config includes model.c itself (for its static scheduler reader)
$(FUZZ_BUILD)/fuzz_%: tests/fuzz/fuzz_%.c tests/fuzz/fuzz_util.h $(FUZZ_LIBOBJ) model.c $(wildcard *.h)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer -I. $< \
	  $(if $(filter config,$*),$(filter-out $(FUZZ_BUILD)/model.o,$(FUZZ_LIBOBJ)),$(FUZZ_LIBOBJ)) -o $@ -lm
