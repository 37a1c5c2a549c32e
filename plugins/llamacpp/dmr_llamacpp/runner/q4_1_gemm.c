// A batched Q4_1 x Q8_1 matrix product for llama.cpp's CPU backend, put in front of
// `llamafile_sgemm` (runner/q4_1_gemm.py says how and when).
//
// llama.cpp's CPU backend hands each matrix product to `llamafile_sgemm` first, and
// where that declines, computes it one dot product per weight row and token
// (`ggml_vec_dot_q4_1_q8_1`). In llama.cpp's tinyBLAS kernels there is none for Q4_1
// weights, so a batch of 16 tokens costs almost 16 single-token products. This kernel
// computes a tile of rows x tokens at once: each weight block is unpacked once for all
// the tile's tokens, and the tile's independent sums keep the FMA units busy.
//
// Every output is computed with exactly the operations of `ggml_vec_dot_q4_1_q8_1`'s
// AVX2 path, in the same order (the block's integer dot product, d_x * d_y, one FMA
// into an 8-lane sum, the m_x * s_y term in its own fused sum, the same horizontal
// sum), so each result is bit-identical to llama.cpp's own, and greedy answers do not
// change. The loader checks that on this machine against the library's own function
// before it turns the kernel on.
//
// Everything else (other types, single tokens, and Q4_1 until `dmr_q41_enable`) goes
// to the library's own `llamafile_sgemm`.

#define _GNU_SOURCE
#include <dlfcn.h>
#include <immintrin.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

// ggml's block layouts (ggml-common.h) and type numbers (ggml.h).
typedef struct {
    uint16_t d, m;
    uint8_t qs[16];
} block_q4_1;
typedef struct {
    uint16_t d, s;
    int8_t qs[32];
} block_q8_1;
enum { TYPE_F32 = 0, TYPE_Q4_1 = 3, TYPE_Q8_1 = 9 };

// The head of ggml-cpu's `struct ggml_compute_params` (ggml-cpu-impl.h).
struct compute_params {
    int ith, nth;
    size_t wsize;
    void *wdata;
    void *threadpool;
};

typedef bool (*sgemm_fn)(const struct compute_params *, int64_t, int64_t, int64_t, const void *,
                         int64_t, const void *, int64_t, void *, int64_t, int, int, int);

static sgemm_fn library_sgemm;
bool llamafile_sgemm(const struct compute_params *, int64_t, int64_t, int64_t, const void *,
                     int64_t, const void *, int64_t, void *, int64_t, int, int, int);
static int kernel_variant;  // 0: off, 1: AVX2, 2: AVX-512 VNNI
// Products this kernel computed (counted by thread 0), for the runner's /metrics.
static int64_t products;

#define AI __attribute__((always_inline)) inline
// Rows and tokens of one job: the weight rows stay in L1 across the job's tokens.
#define JOB_ROWS 16
#define JOB_COLS 64
// A single token stays with llama.cpp: it reads each weight once, bound by memory, and
// the kernel was slower there (`python bench/q4_1_kernel.py`, in one process, SmolLM2
// with 100 tokens of context: 1.28x llama.cpp's time at one token, 0.86x at two, 0.81x
// at eight, 0.64x at thirty-two).
#ifndef MIN_TOKENS
#define MIN_TOKENS 2
#endif
static int min_tokens = MIN_TOKENS;

#define DEFINE_KERNEL(NAME, TARGET, RM, RN, DOT)                                                   \
    static AI __attribute__((target(TARGET))) float NAME##_hsum(__m256 x) {                        \
        __m128 res = _mm256_extractf128_ps(x, 1);                                                  \
        res = _mm_add_ps(res, _mm256_castps256_ps128(x));                                          \
        res = _mm_add_ps(res, _mm_movehl_ps(res, res));                                            \
        res = _mm_add_ss(res, _mm_movehdup_ps(res));                                               \
        return _mm_cvtss_f32(res);                                                                 \
    }                                                                                              \
    static AI __attribute__((target(TARGET))) void NAME##_tile(                                    \
        const int rm, const int rn, int64_t k, const block_q4_1 *A, int64_t lda,                   \
        const block_q8_1 *B, int64_t ldb, float *C, int64_t ldc) {                                 \
        __m256 acc[4][4]; /* the largest tile of TILE_CASES */                                     \
        float summs[4][4];                                                                         \
        for (int i = 0; i < rm; ++i)                                                               \
            for (int j = 0; j < rn; ++j) {                                                         \
                acc[i][j] = _mm256_setzero_ps();                                                   \
                summs[i][j] = 0.0f;                                                                \
            }                                                                                      \
        const __m256i low = _mm256_set1_epi8(0xF);                                                 \
        for (int64_t l = 0; l < k; ++l) {                                                          \
            __m256i qy[4];                                                                         \
            __m256 dy[4];                                                                          \
            float sy[4];                                                                           \
            for (int j = 0; j < rn; ++j) {                                                         \
                const block_q8_1 *y = B + ldb * j + l;                                             \
                qy[j] = _mm256_loadu_si256((const __m256i *)y->qs);                                \
                dy[j] = _mm256_set1_ps(_cvtsh_ss(y->d));                                           \
                sy[j] = _cvtsh_ss(y->s);                                                           \
            }                                                                                      \
            for (int i = 0; i < rm; ++i) {                                                         \
                const block_q4_1 *x = A + lda * i + l;                                             \
                const __m128i t = _mm_loadu_si128((const __m128i *)x->qs);                         \
                const __m256i qx =                                                                 \
                    _mm256_and_si256(low, _mm256_set_m128i(_mm_srli_epi16(t, 4), t));              \
                const __m256 dx = _mm256_set1_ps(_cvtsh_ss(x->d));                                 \
                const float mx = _cvtsh_ss(x->m);                                                  \
                for (int j = 0; j < rn; ++j) {                                                     \
                    acc[i][j] = _mm256_fmadd_ps(_mm256_mul_ps(dx, dy[j]), DOT(qx, qy[j]),          \
                                                acc[i][j]);                                        \
                    summs[i][j] = __builtin_fmaf(mx, sy[j], summs[i][j]);                          \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
        for (int i = 0; i < rm; ++i)                                                               \
            for (int j = 0; j < rn; ++j) C[ldc * j + i] = NAME##_hsum(acc[i][j]) + summs[i][j];    \
    }                                                                                              \
    static __attribute__((target(TARGET))) void NAME##_block(                                      \
        int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t k, const block_q4_1 *A,            \
        int64_t lda, const block_q8_1 *B, int64_t ldb, float *C, int64_t ldc) {                    \
        /* one or two tokens: one row after another, which streams the weights best */          \
        const int64_t step = (c1 - c0) < 3 ? 1 : RM;                                               \
        for (int64_t ii = r0; ii < r1; ii += step) {                                               \
            const int rm = (r1 - ii) < step ? (int)(r1 - ii) : (int)step;                          \
            for (int64_t jj = c0; jj < c1; jj += RN) {                                             \
                const int rn = (c1 - jj) < RN ? (int)(c1 - jj) : RN;                               \
                const block_q4_1 *a = A + lda * ii;                                                \
                const block_q8_1 *b = B + ldb * jj;                                                \
                float *c = C + ldc * jj + ii;                                                      \
                switch (rm * 8 + rn) {                                                             \
                    TILE_CASES(NAME)                                                               \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }

// Every tile shape up to 4 x 4 as a case of `rm * 8 + rn`, so that the edges of a
// product (fewer rows or tokens than a full tile) keep their sums in registers too.
#define TILE_CASE(NAME, R, C)                                                                      \
    case R * 8 + C:                                                                                \
        NAME##_tile(R, C, k, a, lda, b, ldb, c, ldc);                                              \
        break;
#define TILE_CASES(NAME)                                                                           \
    TILE_CASE(NAME, 1, 1) TILE_CASE(NAME, 1, 2) TILE_CASE(NAME, 1, 3) TILE_CASE(NAME, 1, 4)        \
    TILE_CASE(NAME, 2, 1) TILE_CASE(NAME, 2, 2) TILE_CASE(NAME, 2, 3) TILE_CASE(NAME, 2, 4)        \
    TILE_CASE(NAME, 3, 1) TILE_CASE(NAME, 3, 2) TILE_CASE(NAME, 3, 3) TILE_CASE(NAME, 3, 4)        \
    TILE_CASE(NAME, 4, 1) TILE_CASE(NAME, 4, 2) TILE_CASE(NAME, 4, 3) TILE_CASE(NAME, 4, 4)

// The integer part of a block's dot product: 8 lanes, each the sum of 4 adjacent
// unsigned x signed byte products, as ggml's `mul_sum_us8_pairs_float` computes it.
static AI __attribute__((target("avx2,fma,f16c,avx512vl,avx512vnni"))) __m256 dot_vnni(
    __m256i ax, __m256i sy) {
    return _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy));
}
static AI __attribute__((target("avx2,fma,f16c"))) __m256 dot_avx2(__m256i ax, __m256i sy) {
    const __m256i pairs = _mm256_maddubs_epi16(ax, sy);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_set1_epi16(1), pairs));
}

// AVX-512VL has 32 vector registers: a 4 x 4 tile keeps its 16 sums in registers.
DEFINE_KERNEL(vnni, "avx2,fma,f16c,avx512vl,avx512vnni", 4, 4, dot_vnni)
// AVX2 has 16: a 3 x 2 tile.
DEFINE_KERNEL(avx2, "avx2,fma,f16c", 3, 2, dot_avx2)

static void compute_block(int variant, int64_t r0, int64_t r1, int64_t c0, int64_t c1, int64_t k,
                          const void *A, int64_t lda, const void *B, int64_t ldb, float *C,
                          int64_t ldc) {
    if (variant == 2)
        vnni_block(r0, r1, c0, c1, k, A, lda, B, ldb, C, ldc);
    else
        avx2_block(r0, r1, c0, c1, k, A, lda, B, ldb, C, ldc);
}

// `C[i + j*ldc] = A[i] . B[j]` for the m rows of A and n columns of B, each k blocks
// long, with a given kernel variant on one thread (the self-check uses it).
void dmr_q41_gemm(int variant, int64_t m, int64_t n, int64_t k, const void *A, int64_t lda,
                  const void *B, int64_t ldb, float *C, int64_t ldc) {
    compute_block(variant, 0, m, 0, n, k, A, lda, B, ldb, C, ldc);
}

// Which variants this CPU can run: 1 AVX2 (with FMA and F16C), 2 AVX-512 VNNI too.
int dmr_q41_best_variant(void) {
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")))
        return 0;
    if (__builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        return 2;
    return 1;
}

// The library's own `llamafile_sgemm` (the loader reads its address from libggml-cpu).
void dmr_q41_set_library(void *sgemm) {
    __atomic_store_n(&library_sgemm, (sgemm_fn)sgemm, __ATOMIC_RELEASE);
}

void dmr_q41_enable(int variant) { kernel_variant = variant; }

// The fewest tokens the kernel takes (bench/q4_1_kernel.py measures below MIN_TOKENS).
void dmr_q41_set_min_tokens(int tokens) { min_tokens = tokens; }

int64_t dmr_q41_products(void) { return __atomic_load_n(&products, __ATOMIC_RELAXED); }

// The library's own `llamafile_sgemm`: the one the loader handed over, else (a loader
// that could not finish, and a libggml-cpu it did not find) the one in the library
// whose code called this, so that its other products keep their tinyBLAS kernels.
static sgemm_fn own_sgemm(const void *caller) {
    sgemm_fn found = __atomic_load_n(&library_sgemm, __ATOMIC_ACQUIRE);
    if (found)
        return found;
    Dl_info info;
    if (!dladdr(caller, &info) || !info.dli_fname)
        return NULL;
    void *handle = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (!handle)
        return NULL;
    found = (sgemm_fn)dlsym(handle, "llamafile_sgemm");
    dlclose(handle);
    if (found == (sgemm_fn)llamafile_sgemm)
        return NULL;
    __atomic_store_n(&library_sgemm, found, __ATOMIC_RELEASE);
    return found;
}

bool llamafile_sgemm(const struct compute_params *params, int64_t m, int64_t n, int64_t k,
                     const void *A, int64_t lda, const void *B, int64_t ldb, void *C, int64_t ldc,
                     int Atype, int Btype, int Ctype) {
    const int variant = kernel_variant;
    // The params' head as this file reads it (a llama.cpp whose struct differs fails
    // this, and keeps its own kernels; the SmolLM2 tests compare logits bit for bit).
    const bool params_sane = params->nth >= 1 && params->ith >= 0 && params->ith < params->nth;
    if (!(variant && params_sane && n >= min_tokens && Atype == TYPE_Q4_1 &&
          Btype == TYPE_Q8_1 && Ctype == TYPE_F32)) {
        const sgemm_fn own = own_sgemm(__builtin_return_address(0));
        return own && own(params, m, n, k, A, lda, B, ldb, C, ldc, Atype, Btype, Ctype);
    }
    // Jobs of JOB_ROWS x JOB_COLS outputs, every nth to each thread. A shared counter,
    // as llama.cpp's own kernels use, needs a barrier of its own before each product,
    // and that cost more than it balanced (bench/q4_1_kernel.py: 0.86, 0.90 and 0.80x
    // llama.cpp's time at 2, 3 and 4 tokens without it, 0.86, 0.95 and 0.86x with it);
    // the runner already computes with fewer threads while other processes keep cores
    // busy.
    const int64_t row_jobs = (m + JOB_ROWS - 1) / JOB_ROWS;
    const int64_t col_jobs = (n + JOB_COLS - 1) / JOB_COLS;
    const int64_t jobs = row_jobs * col_jobs;
    if (params->ith == 0)
        __atomic_fetch_add(&products, 1, __ATOMIC_RELAXED);
    for (int64_t job = params->ith; job < jobs; job += params->nth) {
        const int64_t r0 = (job % row_jobs) * JOB_ROWS;
        const int64_t c0 = (job / row_jobs) * JOB_COLS;
        const int64_t r1 = r0 + JOB_ROWS < m ? r0 + JOB_ROWS : m;
        const int64_t c1 = c0 + JOB_COLS < n ? c0 + JOB_COLS : n;
        compute_block(variant, r0, r1, c0, c1, k, A, lda, B, ldb, (float *)C, ldc);
    }
    return true;
}
