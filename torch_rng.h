/* torch_rng.h: PyTorch's random number generators, reproduced bit for bit,
 * so that a seed gives the same starting noise (and the same ancestral step
 * noise) here as in diffusers and AUTOMATIC1111.
 *
 *  - CPU: torch.Generator("cpu").manual_seed(seed), i.e. mt19937, and
 *    torch.randn(shape, generator=g) for float32. torch.manual_seed(seed)
 *    seeds the default CPU generator the same way.
 *  - CUDA: torch.Generator("cuda").manual_seed(seed) and
 *    torch.randn(shape, generator=g, device="cuda") as AUTOMATIC1111 models
 *    it in modules/rng_philox.py ("NV" seeds): Philox4x32-10 keyed by the
 *    seed, counter (offset, 0, element index, 0), Box-Muller on the first two
 *    words, the offset advancing by one per randn call.
 */
#ifndef SDLORA_TORCH_RNG_H
#define SDLORA_TORCH_RNG_H

#include <stddef.h>
#include <stdint.h>

/* ---- torch's CPU generator ---------------------------------------------- */

#define TORCH_MT_N 624

/* torch's randn of 16 floats or more runs one of two compiled kernels, and
 * their last bits differ (about 2 floats in 5 differ by an ulp or a few):
 *  - AVX2: what torch uses on an x86 CPU with AVX2 but no AVX-512, its own
 *    polynomial log/sin/cos (avx_mathfun.h). Reproduced bit for bit.
 *  - LIBM: its portable kernel, used on CPUs without AVX2, on CPUs with
 *    AVX-512 (that build has no special case) and on ARM: libm's logf,
 *    cosf, sinf. Bit for bit when our libm is the one torch calls
 *    (glibc on Linux); ATEN_CPU_CAPABILITY=default forces it in torch. */
typedef enum { TORCH_CPU_KERNEL_AVX2 = 0, TORCH_CPU_KERNEL_LIBM = 1 } torch_cpu_kernel;

typedef struct {
    uint32_t mt[TORCH_MT_N];       /* mt19937 state */
    int mti;                       /* next word of mt[] to temper (TORCH_MT_N: regenerate) */
    /* torch caches the second Box-Muller value of its scalar (double) normal
     * sampler in the generator; randn of fewer than 16 floats uses it */
    int has_next_normal;
    double next_normal;
    torch_cpu_kernel kernel;       /* torch_cpu_seed sets AVX2; change it after seeding */
} torch_cpu_gen;

/* manual_seed(seed): mt19937 initialised from the low 32 bits of the seed,
 * cached normal cleared, kernel AVX2 */
void torch_cpu_seed(torch_cpu_gen *g, uint64_t seed);
uint32_t torch_cpu_u32(torch_cpu_gen *g);         /* one mt19937 draw */
/* torch.rand: (x & (2^24 - 1)) * 2^-24, one draw per float, in [0, 1) */
float torch_cpu_uniform(torch_cpu_gen *g);
/* torch.randn(n) for float32: n values, state advanced as torch does */
void torch_cpu_randn(torch_cpu_gen *g, float *out, size_t n);

/* ---- torch's CUDA generator (AUTOMATIC1111's reimplementation) --------------- */

typedef struct {
    uint64_t seed;                 /* the Philox key: low word, high word */
    uint32_t offset;               /* randn calls made so far */
} torch_philox_gen;

void torch_philox_seed(torch_philox_gen *g, uint64_t seed);
/* one Philox4x32-10 block: ctr (4 words) in, out (4 words); key = seed */
void philox4x32_10(uint32_t out[4], const uint32_t ctr[4], uint64_t key);
/* torch.randn(n, device="cuda") as A1111 reproduces it; n < 2^32 */
void torch_philox_randn(torch_philox_gen *g, float *out, size_t n);

/* ---- either one, chosen by name (sample.c --rng cpu|cuda) ----------------- */

typedef enum { TORCH_RNG_CPU = 0, TORCH_RNG_CPU_LIBM = 1, TORCH_RNG_CUDA = 2 } torch_rng_kind;

typedef struct {
    torch_rng_kind kind;
    torch_cpu_gen cpu;
    torch_philox_gen philox;
} torch_rng;

/* "cpu" / "cpu-libm" / "cuda" -> *kind; -1 with a message in err (256 bytes) otherwise */
int torch_rng_kind_from_name(const char *name, torch_rng_kind *kind, char *err);
void torch_rng_seed(torch_rng *r, torch_rng_kind kind, uint64_t seed);
/* one torch.randn(n) call on that generator */
void torch_rng_randn(torch_rng *r, float *out, size_t n);

#endif
