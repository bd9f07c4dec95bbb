/* nm_hf native CPU kernels: one pass over memory where the torch expressions take several.
 *
 * Built on first use by nm_hf/native/__init__.py with the system C compiler and loaded with ctypes.
 * Every function works on contiguous buffers and must give bit-identical results to the torch
 * path it replaces (tests/test_native.py compares them):
 *   nm_mask_*      the rank rule of nm_hf.masks.nm_mask: keys are IEEE bits with the sign cleared
 *                  (integer order = magnitude order, NaN above inf); an entry is kept when fewer than
 *                  n mates beat it, where an earlier mate beats it on >= and a later one on >.
 *                  Given a `masked` buffer (else NULL), also the masked weight in the same pass,
 *                  bit for bit what apply_mask_* makes of the weight and that mask.
 *   apply_mask_*   w where mask (keep=1) / where not mask (keep=0), exact +0.0 elsewhere (bit AND);
 *                  apply_mask_inplace_* the same (keep=1) in place.
 *   add_pruned_*   grad += alpha * (w - w*mask), with one fused multiply-add per entry, as torch's
 *                  vectorised `grad.add_(other, alpha=alpha)` computes it.
 *   masked_and_add_pruned_* both of the above at once: the masked weight and the decay term.
 *   pruned_nonzero_* whether any weight outside the mask is non-zero (`(w.abs() * ~mask).any()`).
 *
 * Built with -fopenmp where the compiler takes it, every exported kernel splits its work into one
 * contiguous piece per OpenMP thread once it covers at least `nm_parallel_min` elements. torch's CPU
 * build already loaded libgomp.so.1, so these are torch's own worker threads (spinning between torch's
 * ops, so they start at once) and torch.set_num_threads() sets their number. Each piece runs the same
 * serial loop, so results do not depend on the split. Without OpenMP the pragmas are ignored and
 * nm_hf/masks.py splits large tensors over its Python thread pool instead (ctypes releases the GIL).
 * nm_hf sets nm_parallel_min out of reach in a forked child (GNU libgomp's threads do not survive
 * fork()) and where another OpenMP runtime than torch's was loaded.
 */
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Elements a kernel must cover before it splits over threads (set from Python: nm_hf.native). */
int64_t nm_parallel_min = 1 << 16;
/* Fewest elements per piece (torch's grain for elementwise ops): many threads get no tiny pieces. */
#define PIECE_MIN 32768

/* 1 when the kernels split themselves over OpenMP threads. */
int nm_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Runs CALL once per piece of [0, TOTAL) with START and LEN in scope: in one piece below
 * nm_parallel_min elements (ELEMENTS: the work the call covers), else one piece per thread, with at
 * least PIECE_MIN elements each. */
#ifdef _OPENMP
#define SPLIT(TOTAL, ELEMENTS, CALL)                                                                 \
    do {                                                                                             \
        int64_t total_ = (TOTAL);                                                                    \
        int64_t elements_ = (ELEMENTS);                                                              \
        int threads_ = elements_ >= nm_parallel_min ? omp_get_max_threads() : 1;                     \
        if (threads_ > elements_ / PIECE_MIN) threads_ = (int)(elements_ / PIECE_MIN);               \
        if (threads_ > total_) threads_ = (int)total_;                                               \
        if (threads_ <= 1) {                                                                         \
            int64_t START = 0, LEN = total_;                                                         \
            (void)START;                                                                             \
            CALL;                                                                                    \
        } else {                                                                                     \
            _Pragma("omp parallel num_threads(threads_)")                                            \
            {                                                                                        \
                int64_t per_ = (total_ + omp_get_num_threads() - 1) / omp_get_num_threads();         \
                int64_t START = per_ * omp_get_thread_num();                                         \
                int64_t LEN = total_ - START < per_ ? total_ - START : per_;                         \
                if (LEN > 0) CALL;                                                                   \
            }                                                                                        \
        }                                                                                            \
    } while (0)
#else
#define SPLIT(TOTAL, ELEMENTS, CALL)                                                                 \
    do {                                                                                             \
        int64_t START = 0, LEN = (TOTAL);                                                            \
        (void)START;                                                                                 \
        CALL;                                                                                        \
    } while (0)
#endif

#define MAX_M 16
#define TILE 256

/* Contiguous groups (inner == 1): a tile of groups is transposed into [m][tile] so that every
 * pairwise comparison runs as one vectorised loop over the tile, then transposed back. */
#define DEFINE_RANK_CONTIGUOUS(SUFFIX, T)                                                            \
static void rank_contiguous_##SUFFIX(const T *restrict keys, uint8_t *restrict out, int64_t rows,    \
                                     int64_t m, int64_t n, T sign_clear, T *restrict masked) {       \
    T kt[MAX_M][TILE];                                                                               \
    uint8_t beaten[MAX_M][TILE];                                                                     \
    for (int64_t r0 = 0; r0 < rows; r0 += TILE) {                                                    \
        int64_t len = rows - r0 < TILE ? rows - r0 : TILE;                                           \
        const T *g = keys + r0 * m;                                                                  \
        for (int64_t t = 0; t < len; t++)                                                            \
            for (int64_t i = 0; i < m; i++) kt[i][t] = g[t * m + i] & sign_clear;                    \
        for (int64_t i = 0; i < m; i++)                                                              \
            for (int64_t t = 0; t < len; t++) beaten[i][t] = 0;                                      \
        for (int64_t i = 0; i < m; i++)                                                              \
            for (int64_t j = i + 1; j < m; j++)                                                      \
                for (int64_t t = 0; t < len; t++) {                                                  \
                    uint8_t i_wins = kt[i][t] >= kt[j][t];                                           \
                    beaten[j][t] += i_wins;                                                          \
                    beaten[i][t] += 1 - i_wins;                                                      \
                }                                                                                    \
        uint8_t *o = out + r0 * m;                                                                   \
        for (int64_t t = 0; t < len; t++)                                                            \
            for (int64_t i = 0; i < m; i++) o[t * m + i] = beaten[i][t] < n;                         \
        if (masked)                                                                                  \
            for (int64_t t = 0; t < len * m; t++) masked[r0 * m + t] = g[t] & ((T)0 - (T)o[t]);      \
    }                                                                                                \
}

/* keys [rows, m, inner]; out [rows, m, inner] as 0/1 bytes */
#define DEFINE_NM_MASK(SUFFIX, T)                                                                    \
DEFINE_RANK_CONTIGUOUS(SUFFIX, T)                                                                    \
static void nm_mask_rows_##SUFFIX(const T *restrict keys, uint8_t *restrict out, int64_t rows,       \
                                  int64_t m, int64_t inner, int64_t n, T sign_clear,                 \
                                  T *restrict masked) {                                              \
    if (inner == 1) {                                                                                \
        rank_contiguous_##SUFFIX(keys, out, rows, m, n, sign_clear, masked);                         \
        return;                                                                                      \
    }                                                                                                \
    uint8_t beaten[TILE];                                                                            \
    for (int64_t r = 0; r < rows; r++) {                                                             \
        const T *g = keys + r * m * inner;                                                           \
        uint8_t *o = out + r * m * inner;                                                            \
        for (int64_t start = 0; start < inner; start += TILE) {                                      \
            int64_t len = inner - start < TILE ? inner - start : TILE;                               \
            for (int64_t i = 0; i < m; i++) {                                                        \
                const T *ki = g + i * inner + start;                                                 \
                for (int64_t t = 0; t < len; t++) beaten[t] = 0;                                     \
                for (int64_t j = 0; j < m; j++) {                                                    \
                    if (j == i) continue;                                                            \
                    const T *kj = g + j * inner + start;                                             \
                    if (j < i)                                                                       \
                        for (int64_t t = 0; t < len; t++)                                            \
                            beaten[t] += (kj[t] & sign_clear) >= (ki[t] & sign_clear);               \
                    else                                                                             \
                        for (int64_t t = 0; t < len; t++)                                            \
                            beaten[t] += (kj[t] & sign_clear) > (ki[t] & sign_clear);                \
                }                                                                                    \
                uint8_t *oi = o + i * inner + start;                                                 \
                for (int64_t t = 0; t < len; t++) oi[t] = beaten[t] < n;                             \
                if (masked) {                                                                        \
                    T *mi = masked + r * m * inner + i * inner + start;                              \
                    for (int64_t t = 0; t < len; t++) mi[t] = ki[t] & ((T)0 - (T)oi[t]);             \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    }                                                                                                \
}                                                                                                    \
void nm_mask_##SUFFIX(const T *restrict keys, uint8_t *restrict out, int64_t rows, int64_t m,        \
                      int64_t inner, int64_t n, T sign_clear, T *restrict masked) {                  \
    int64_t group = m * inner;                                                                       \
    SPLIT(rows, rows * group,                                                                        \
          nm_mask_rows_##SUFFIX(keys + START * group, out + START * group, LEN, m, inner, n,         \
                                sign_clear, masked ? masked + START * group : masked));              \
}

DEFINE_NM_MASK(i16, int16_t)
DEFINE_NM_MASK(i32, int32_t)
DEFINE_NM_MASK(i64, int64_t)

/* 2:4 along contiguous groups (nn.Linear's layout), the hot case: written out so it vectorises; with
 * `masked` (not NULL) it also writes the masked weight (the keys' bits where kept, +0.0 elsewhere) in
 * the same pass. Inlined twice with a constant `with_masked`, so each loop vectorises on its own. */
static inline void rank_2of4(const int32_t *restrict keys, uint8_t *restrict out, int32_t *restrict masked,
                             int64_t groups, const int with_masked) {
    for (int64_t r = 0; r < groups; r++) {
        int32_t a = keys[4 * r] & 0x7FFFFFFF, b = keys[4 * r + 1] & 0x7FFFFFFF;
        int32_t c = keys[4 * r + 2] & 0x7FFFFFFF, d = keys[4 * r + 3] & 0x7FFFFFFF;
        int ab = a >= b, ac = a >= c, ad = a >= d, bc = b >= c, bd = b >= d, cd = c >= d;
        /* beaten counts: a by later mates with >, i.e. !(a >= x); b by a on >= (!ab), later on > ... */
        int keep_a = (1 - ab) + (1 - ac) + (1 - ad) < 2;
        int keep_b = ab + (1 - bc) + (1 - bd) < 2;
        int keep_c = ac + bc + (1 - cd) < 2;
        int keep_d = ad + bd + cd < 2;
        out[4 * r] = keep_a;
        out[4 * r + 1] = keep_b;
        out[4 * r + 2] = keep_c;
        out[4 * r + 3] = keep_d;
        if (with_masked) {
            masked[4 * r] = keys[4 * r] & -keep_a;
            masked[4 * r + 1] = keys[4 * r + 1] & -keep_b;
            masked[4 * r + 2] = keys[4 * r + 2] & -keep_c;
            masked[4 * r + 3] = keys[4 * r + 3] & -keep_d;
        }
    }
}

static void nm_mask_2of4_range(const int32_t *restrict keys, uint8_t *restrict out, int64_t groups,
                               int32_t *restrict masked) {
    if (masked)
        rank_2of4(keys, out, masked, groups, 1);
    else
        rank_2of4(keys, out, masked, groups, 0);
}

void nm_mask_2of4_i32(const int32_t *restrict keys, uint8_t *restrict out, int64_t groups,
                      int32_t *restrict masked) {
    SPLIT(groups, groups * 4,
          nm_mask_2of4_range(keys + 4 * START, out + 4 * START, LEN, masked ? masked + 4 * START : masked));
}

#define DEFINE_APPLY_MASK(SUFFIX, T)                                                                 \
static void apply_mask_range_##SUFFIX(const T *restrict w, const uint8_t *restrict mask,             \
                                      T *restrict out, int64_t count, int64_t keep) {                \
    T flip = keep ? (T)0 : (T)-1;                                                                    \
    for (int64_t i = 0; i < count; i++) out[i] = w[i] & (((T)0 - (T)(mask[i] != 0)) ^ flip);         \
}                                                                                                    \
void apply_mask_##SUFFIX(const T *restrict w, const uint8_t *restrict mask, T *restrict out,         \
                         int64_t count, int64_t keep) {                                              \
    SPLIT(count, count, apply_mask_range_##SUFFIX(w + START, mask + START, out + START, LEN, keep)); \
}

/* The same in place with keep=1: w = w where mask, +0.0 elsewhere. */
#define DEFINE_APPLY_MASK_INPLACE(SUFFIX, T)                                                         \
static void apply_mask_inplace_range_##SUFFIX(T *restrict w, const uint8_t *restrict mask,           \
                                              int64_t count) {                                       \
    for (int64_t i = 0; i < count; i++) w[i] &= (T)0 - (T)(mask[i] != 0);                            \
}                                                                                                    \
void apply_mask_inplace_##SUFFIX(T *restrict w, const uint8_t *restrict mask, int64_t count) {       \
    SPLIT(count, count, apply_mask_inplace_range_##SUFFIX(w + START, mask + START, LEN));            \
}

DEFINE_APPLY_MASK_INPLACE(u16, uint16_t)
DEFINE_APPLY_MASK_INPLACE(u32, uint32_t)
DEFINE_APPLY_MASK_INPLACE(u64, uint64_t)

DEFINE_APPLY_MASK(u16, uint16_t)
DEFINE_APPLY_MASK(u32, uint32_t)
DEFINE_APPLY_MASK(u64, uint64_t)

#define DEFINE_ADD_PRUNED(SUFFIX, T, FMA)                                                            \
static void add_pruned_range_##SUFFIX(T *restrict grad, const T *restrict w,                         \
                                      const uint8_t *restrict mask, int64_t count, T alpha) {        \
    for (int64_t i = 0; i < count; i++) {                                                            \
        T kept = mask[i] ? w[i] : (T)0;                                                              \
        grad[i] = FMA(alpha, w[i] - kept, grad[i]);                                                  \
    }                                                                                                \
}                                                                                                    \
void add_pruned_##SUFFIX(T *restrict grad, const T *restrict w, const uint8_t *restrict mask,        \
                         int64_t count, T alpha) {                                                   \
    SPLIT(count, count, add_pruned_range_##SUFFIX(grad + START, w + START, mask + START, LEN, alpha));\
}

DEFINE_ADD_PRUNED(f32, float, fmaf)
DEFINE_ADD_PRUNED(f64, double, fma)

/* Both backward passes of SR-STE's gradient mode in one: masked = apply_mask(w, mask) (for the input
 * gradient) and grad += alpha * (w - masked), as apply_mask_* and add_pruned_* compute them. */
#define DEFINE_MASKED_AND_ADD_PRUNED(SUFFIX, T, FMA)                                                 \
static void masked_and_add_pruned_range_##SUFFIX(const T *restrict w, const uint8_t *restrict mask,  \
                                                 T *restrict masked, T *restrict grad,               \
                                                 int64_t count, T alpha) {                           \
    for (int64_t i = 0; i < count; i++) {                                                            \
        T kept = mask[i] ? w[i] : (T)0;                                                              \
        masked[i] = kept;                                                                            \
        grad[i] = FMA(alpha, w[i] - kept, grad[i]);                                                  \
    }                                                                                                \
}                                                                                                    \
void masked_and_add_pruned_##SUFFIX(const T *restrict w, const uint8_t *restrict mask,               \
                                    T *restrict masked, T *restrict grad, int64_t count, T alpha) {  \
    SPLIT(count, count, masked_and_add_pruned_range_##SUFFIX(w + START, mask + START, masked + START,\
                                                             grad + START, LEN, alpha));             \
}

DEFINE_MASKED_AND_ADD_PRUNED(f32, float, fmaf)
DEFINE_MASKED_AND_ADD_PRUNED(f64, double, fma)

/* The same for a weight stored transposed (GPT-2 Conv1D: w and mask are [cols, rows] in memory while
 * grad is [rows, cols]; `stride` is the stored row length, as a part of grad may be given), over
 * 32 x 32 tiles so both layouts are read a cache line at a time. */
#define DEFINE_ADD_PRUNED_T(SUFFIX, T, FMA)                                                          \
static void add_pruned_t_rows_##SUFFIX(T *restrict grad, const T *restrict w,                        \
                                       const uint8_t *restrict mask, int64_t rows, int64_t cols,     \
                                       int64_t stride, T alpha) {                                    \
    for (int64_t r0 = 0; r0 < rows; r0 += 32)                                                        \
        for (int64_t c0 = 0; c0 < cols; c0 += 32) {                                                  \
            int64_t r1 = r0 + 32 < rows ? r0 + 32 : rows, c1 = c0 + 32 < cols ? c0 + 32 : cols;      \
            for (int64_t c = c0; c < c1; c++)                                                        \
                for (int64_t r = r0; r < r1; r++) {                                                  \
                    T value = w[c * stride + r];                                                     \
                    T kept = mask[c * stride + r] ? value : (T)0;                                    \
                    grad[r * cols + c] = FMA(alpha, value - kept, grad[r * cols + c]);               \
                }                                                                                    \
        }                                                                                            \
}                                                                                                    \
void add_pruned_t_##SUFFIX(T *restrict grad, const T *restrict w, const uint8_t *restrict mask,      \
                           int64_t rows, int64_t cols, int64_t stride, T alpha) {                    \
    /* pieces are blocks of grad rows, which are columns of the stored weight and mask */            \
    SPLIT(rows, rows * cols, add_pruned_t_rows_##SUFFIX(grad + START * cols, w + START, mask + START,\
                                                        LEN, cols, stride, alpha));                  \
}

DEFINE_ADD_PRUNED_T(f32, float, fmaf)
DEFINE_ADD_PRUNED_T(f64, double, fma)

/* 1 if any weight outside the mask has one of the bits in `magnitude` set (all but the sign bit: -0.0
 * counts as zero; every bit: only +0.0 does), else 0: one read of both, OR-reduced so it vectorises. */
#define DEFINE_PRUNED_NONZERO(SUFFIX, T)                                                             \
static T pruned_bits_##SUFFIX(const T *restrict w, const uint8_t *restrict mask, int64_t count) {    \
    T seen = 0;                                                                                      \
    for (int64_t i = 0; i < count; i++) seen |= w[i] & ((T)(mask[i] != 0) - (T)1);                   \
    return seen;                                                                                     \
}                                                                                                    \
int64_t pruned_nonzero_##SUFFIX(const T *restrict w, const uint8_t *restrict mask, int64_t count,    \
                                T magnitude) {                                                       \
    T seen = 0;                                                                                      \
    SPLIT(count, count, {                                                                            \
        T piece = pruned_bits_##SUFFIX(w + START, mask + START, LEN);                                \
        _Pragma("omp atomic") seen |= piece;                                                         \
    });                                                                                              \
    return (seen & magnitude) != 0;                                                                  \
}

DEFINE_PRUNED_NONZERO(u16, uint16_t)
DEFINE_PRUNED_NONZERO(u32, uint32_t)
DEFINE_PRUNED_NONZERO(u64, uint64_t)

/* How many of `count` bytes differ between `a` and `b` (masks are 0/1 bytes): one read of both, no
 * temporary, where `count_nonzero(a ^ b)` writes and reads a third tensor. */
static int64_t changed_range(const uint8_t *restrict a, const uint8_t *restrict b, int64_t count) {
    int64_t changed = 0;
    for (int64_t i = 0; i < count; i++) changed += a[i] != b[i];
    return changed;
}
int64_t count_changed_u8(const uint8_t *restrict a, const uint8_t *restrict b, int64_t count) {
    int64_t changed = 0;
    SPLIT(count, count, {
        int64_t piece = changed_range(a + START, b + START, LEN);
        _Pragma("omp atomic") changed += piece;
    });
    return changed;
}
