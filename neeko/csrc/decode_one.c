/* Decode steps of a Llama-family model on the CPU: one row (`neeko_decode_one`) or
 * several (`neeko_decode_batch`, below).
 *
 * The batch-1 path of neeko.compiled.StaticDecoder: the same arithmetic as its `_forward`
 * (RMSNorm, fused q/k/v with optional bias, RoPE from the model's tables, grouped-query
 * attention over the row's cached columns plus its own, SiLU MLP, the blocks' low-rank
 * terms added to the projections they wrap), written so that one step is one OpenMP
 * parallel region: every weight matrix is streamed once, split by output rows over the
 * threads, with a few barriers per layer. Attention is split by cached columns over the
 * threads: each reads its columns' keys and values once for all heads of their group,
 * then merges the threads' partial softmaxes for itself (split-K, as "flash decoding"
 * does on GPUs). A decode step at batch 1 reads ~0.5 GB of weights for a few MFLOP, so
 * it is bound by memory bandwidth; the dot products keep independent vector accumulators
 * so the loads, not the add latency, set the pace, and each thread reads its fp32 rows as
 * four streams far apart (`rows_dot`), so that enough reads are in flight to keep memory
 * busy. Weights are fp32, or int8 with one scale per output row (a quarter of the bytes;
 * each weight is widened to fp32 in registers, and activations, norms, attention and the
 * blocks stay fp32).
 *
 * Built at first use by neeko/native.py with the system C compiler (-O3 -march=native
 * -fopenmp) and loaded with ctypes; OpenMP resolves to the runtime torch already loaded.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef float vf __attribute__((vector_size(64))); /* 16 lanes; narrower ISAs split it */
#define LANES 16

enum { Q, K, V, O, GATE, UP, DOWN, N_PROJ };

typedef struct {
    const float *a; /* (layers, kp, d_in), or NULL: no blocks on this projection */
    const float *b; /* (layers, kp, d_out) */
    const float *w; /* (kp,): each block's gate weight times alpha / rank, per rank */
    int64_t kp;
} Lora;

/* A weight matrix (out, in), row-major: fp32, or int8 with one fp32 scale per row. */
typedef struct {
    const void *w;
    const float *scale; /* (out,) for int8 weights, NULL for fp32 */
} Mat;

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, inter, vocab, window, threads;
    float eps;
    const Mat *qkv;               /* per layer (q + 2 kv, hidden) */
    const float *const *qkv_bias; /* per layer (q + 2 kv,), or NULL */
    const Mat *o;                 /* per layer (hidden, heads * head_dim) */
    const Mat *gate_up;           /* per layer (2 inter, hidden) */
    const Mat *down;              /* per layer (hidden, inter) */
    const float *const *ln_in;    /* per layer (hidden,) */
    const float *const *ln_post;  /* per layer (hidden,) */
    const float *norm, *embed;
    Mat head;                     /* (vocab, hidden) */
    Lora lora[N_PROJ];
} Model;

typedef struct {
    int64_t token, position;
    const float *cos, *sin; /* (head_dim,) at `position` */
    float *keys, *values;   /* the row's cache; columns [0, position) are valid */
    int64_t layer_stride, head_stride, column_stride; /* in floats; head_dim is contiguous */
    float *logits;          /* (vocab,) */
    float *new_k, *new_v;   /* (layers, kv_heads, head_dim) */
    int64_t write;          /* nonzero: also store the new keys and values in the cache, at
                             * column `position` */
} Step;

static inline float dot(const float *restrict w, const float *restrict x, int64_t n) {
    vf a0 = {0}, a1 = {0}, w0, w1, x0, x1;
    int64_t i = 0;
    for (; i + 2 * LANES <= n; i += 2 * LANES) {
        memcpy(&w0, w + i, sizeof w0);
        memcpy(&w1, w + i + LANES, sizeof w1);
        memcpy(&x0, x + i, sizeof x0);
        memcpy(&x1, x + i + LANES, sizeof x1);
        a0 += w0 * x0;
        a1 += w1 * x1;
    }
    a0 += a1;
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += a0[l];
    for (; i < n; i++) s += w[i] * x[i];
    return s;
}

/* An int8 row times fp32 x. GCC's vector extensions scalarise the int8 -> fp32 widening,
 * so the x86 paths use intrinsics; elsewhere a plain loop. */
static inline float dot_i8(const int8_t *restrict w, const float *restrict x, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        __m128i b0 = _mm_loadu_si128((const __m128i *)(w + i));
        __m128i b1 = _mm_loadu_si128((const __m128i *)(w + i + 16));
        a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b0)),
                             _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b1)),
                             _mm512_loadu_ps(x + i + 16), a1);
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
    for (; i + 32 <= n; i += 32)
        for (int k = 0; k < 4; k++) {
            __m128i b = _mm_loadl_epi64((const __m128i *)(w + i + 8 * k));
            a[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)),
                                   _mm256_loadu_ps(x + i + 8 * k), a[k]);
        }
    __m256 t = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    s = _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
#endif
    for (; i < n; i++) s += (float)w[i] * x[i];
    return s;
}

/* Row `o` of `m` times x (n inputs). */
static inline float row_dot(const Mat *m, int64_t o, const float *x, int64_t n) {
    if (m->scale) return m->scale[o] * dot_i8((const int8_t *)m->w + o * n, x, n);
    return dot((const float *)m->w + o * n, x, n);
}

#ifndef STREAMS
/* Row streams per thread in `rows_dot`. Side by side per step: 2 ran 1.10x slower than 4;
 * 6 and 8 were no faster (4 won four of five runs, by up to 1.12x). */
#define STREAMS 4
#endif
/* Rows per stream whose lanes `rows_dot` sums together, after streaming them. */
#define ROW_BLOCK 16
/* How far ahead (floats) each stream asks for its weights: the hardware's own prefetch
 * keeps too few reads in flight (0.5-2 KB ahead ran 1.03-1.04x faster side by side). */
#define PREFETCH 128

/* The sum of a vector's lanes, as a tree. */
static inline float lanes_sum(const vf *a) {
#if defined(__AVX512F__)
    __m512 v;
    memcpy(&v, a, sizeof v);
    return _mm512_reduce_add_ps(v);
#else
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += (*a)[l];
    return s;
#endif
}

/* part[k] = the lane-wise products of row w[k] and x over the whole vectors of the row,
 * summed (their lanes and the tail are the caller's): one vector of each of the STREAMS
 * rows per step, each into its own accumulator. */
static inline void dot_rows(const float *const w[STREAMS], const float *restrict x,
                            int64_t n, vf part[STREAMS]) {
    vf acc[STREAMS] = {{0}}, xv, wv;
    for (int64_t i = 0; i + LANES <= n; i += LANES) {
        memcpy(&xv, x + i, sizeof xv);
        for (int k = 0; k < STREAMS; k++) {
            __builtin_prefetch(w[k] + i + PREFETCH, 0, 2);
            memcpy(&wv, w[k] + i, sizeof wv);
            acc[k] += wv * xv;
        }
    }
    for (int k = 0; k < STREAMS; k++) part[k] = acc[k];
}

/* dst[o - lo] = row o of `m` times x, for o in [lo, hi). fp32 rows are read as STREAMS
 * streams far apart (rows lo + j, lo + q + j, ...): one sequential stream per thread
 * leaves memory idle on the machines we measure, where a read needs several in flight
 * (a plain array is read ~1.5x faster as four streams than as one). The rows' lanes are
 * summed after each ROW_BLOCK rows per stream, outside the loop that streams them: summed
 * at the end of every row, the reduction and its spills cost ~7% of the step. */
static void rows_dot(const Mat *m, const float *x, int64_t n, int64_t lo, int64_t hi,
                     float *dst) {
    const int64_t q = m->scale ? 0 : (hi - lo) / STREAMS;
    const int64_t whole = n / LANES * LANES;
    const float *w = (const float *)m->w + lo * n;
    vf part[ROW_BLOCK][STREAMS];
    for (int64_t j0 = 0; j0 < q; j0 += ROW_BLOCK) {
        const int64_t rows = q - j0 < ROW_BLOCK ? q - j0 : ROW_BLOCK;
        for (int64_t j = 0; j < rows; j++) {
            const float *row[STREAMS];
            for (int k = 0; k < STREAMS; k++) row[k] = w + (k * q + j0 + j) * n;
            dot_rows(row, x, n, part[j]);
        }
        for (int64_t j = 0; j < rows; j++)
            for (int k = 0; k < STREAMS; k++) {
                const float *row = w + (k * q + j0 + j) * n;
                float s = lanes_sum(&part[j][k]);
                for (int64_t i = whole; i < n; i++) s += row[i] * x[i];
                dst[k * q + j0 + j] = s;
            }
    }
    for (int64_t o = lo + STREAMS * q; o < hi; o++) dst[o - lo] = row_dot(m, o, x, n);
}

/* This thread's share [lo, hi) of `n` outputs: contiguous, as `omp for schedule(static)`. */
static inline void my_rows(int64_t n, int64_t *lo, int64_t *hi) {
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
    *lo = n * t / T;
    *hi = n * (t + 1) / T;
}

/* out = weight * x / rms(x), as LlamaRMSNorm computes it in fp32. */
static void rms_norm(const float *x, const float *weight, float eps, int64_t n, float *out) {
    float ss = 0.0f;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = weight[i] * (x[i] * r);
}

/* z[j] = w[j] * (A[j] . x) for row r's blocks of one projection in one layer, where the
 * blocks' tensors hold `slots` rows (the one-row step passes one). */
static void lora_in(const Lora *l, int64_t layer, int64_t slots, int64_t r, int64_t d_in,
                    const float *x, float *z) {
    const float *a = l->a + (layer * slots + r) * l->kp * d_in;
    for (int64_t j = 0; j < l->kp; j++) z[j] = l->w[r * l->kp + j] * dot(a + j * d_in, x, d_in);
}

/* The low-rank term of output `o` of a projection with `d_out` outputs. */
static inline float lora_out(const Lora *l, int64_t layer, int64_t d_out, const float *z,
                             int64_t o) {
    const float *b = l->b + layer * l->kp * d_out + o;
    float s = 0.0f;
    for (int64_t r = 0; r < l->kp; r++) s += z[r] * b[r * d_out];
    return s;
}

/* h += W x (+ its blocks' term), W (out, n); work shared inside the parallel region (ends
 * with a barrier). `z` and `d` are the calling thread's scratch for the blocks' inputs
 * and its rows' products. */
static void add_projection(const Mat *w, const float *x, int64_t n, const Lora *l,
                           int64_t layer, float *z, float *d, int64_t out, float *h) {
    if (l->a) lora_in(l, layer, 1, 0, n, x, z);
    int64_t lo, hi;
    my_rows(out, &lo, &hi);
    rows_dot(w, x, n, lo, hi, d);
    for (int64_t o = lo; o < hi; o++) {
        float v = d[o - lo];
        if (l->a) v += lora_out(l, layer, out, z, o);
        h[o] += v;
    }
#pragma omp barrier
}

/* A vector of c in every lane. */
#define SPLAT(c) ((vf){0} + (c))
typedef int32_t vi __attribute__((vector_size(64)));

/* *v = e^v in every lane, as Cephes' expf: 2^n times a polynomial of the remainder, within
 * a few ulp of expf; v is clamped to [-87.34, 88.37] (e^v from 2^-126 to just below
 * FLT_MAX), and NaN stays NaN. (In place: a 64-byte vector is not passed by value
 * portably.) */
static inline void vexp(vf *v) {
    vf x = *v;
    vi big = x > 88.3762626647949f, small = x < -87.3365447504f;
    x = (vf)(((vi)x & ~big) | ((vi)SPLAT(88.3762626647949f) & big));
    x = (vf)(((vi)x & ~small) | ((vi)SPLAT(-87.3365447504f) & small));
    vf f = x * 1.44269504088896341f + 0.5f;
    vi n = __builtin_convertvector(f, vi); /* toward zero; floor it: */
    n += (vi)(__builtin_convertvector(n, vf) > f);
    vf nf = __builtin_convertvector(n, vf);
    vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vf y = SPLAT(1.9875691500e-4f);
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + r + 1.0f;
    *v = y * (vf)((n + 127) << 23);
}

/* Up to this many vectors of a head's output stay in registers while the columns stream. */
#define OUT_VECTORS 8
/* Columns ahead whose keys and values `attend` asks for (one group's columns are one
 * stream per thread, too few reads in flight without it). */
#define AHEAD 8

/* One kv group's attention over columns [c0, c1) of its cache (column `pos` is the new
 * key and value): for each of the `g` heads sharing the group, the scores' maximum, the
 * sum of their exponentials and the values weighted by those, as `part[head]` = (max, sum,
 * out[d]). Keys and values are each read once for all heads of the group. `D` is a
 * constant where inlined, so the vector loops unroll into registers. */
static inline __attribute__((always_inline)) void attend(
    const float *restrict kc, const float *restrict vc, int64_t cs, int64_t pos,
    const float *restrict q, const float *restrict knew, const float *restrict vnew,
    int64_t g, int64_t c0, int64_t c1, float scale, float *restrict scores,
    float *restrict part, const int64_t D) {
    const int64_t n = c1 - c0, whole = D / LANES * LANES;
    for (int64_t j = 0; j < g; j++) part[j * (D + 2)] = -INFINITY;
    for (int64_t c = c0; c < c1; c++) {
        const float *k = c < pos ? kc + c * cs : knew;
        for (int64_t i = 0; i < D; i += LANES) __builtin_prefetch(kc + (c + AHEAD) * cs + i, 0, 3);
        for (int64_t j = 0; j < g; j++) {
            const float *qj = q + j * D;
            vf acc = {0}, kv, qv;
            for (int64_t i = 0; i < whole; i += LANES) {
                memcpy(&kv, k + i, sizeof kv);
                memcpy(&qv, qj + i, sizeof qv);
                acc += kv * qv;
            }
            float sc = lanes_sum(&acc);
            for (int64_t i = whole; i < D; i++) sc += k[i] * qj[i];
            sc *= scale;
            scores[j * n + c - c0] = sc;
            float *top = part + j * (D + 2);
            *top = sc > *top ? sc : *top;
        }
    }
    for (int64_t j = 0; j < g; j++) {
        float *sc = scores + j * n, *pj = part + j * (D + 2);
        const float top = pj[0];
        vf acc = {0}, v;
        int64_t c = 0;
        for (; c + LANES <= n; c += LANES) {
            memcpy(&v, sc + c, sizeof v);
            v -= top;
            vexp(&v);
            memcpy(sc + c, &v, sizeof v);
            acc += v;
        }
        float total = lanes_sum(&acc);
        for (; c < n; c++) total += sc[c] = expf(sc[c] - top);
        pj[1] = total;
        float *out = pj + 2;
        for (int64_t d0 = 0; d0 < whole; d0 += OUT_VECTORS * LANES) {
            const int64_t nv = (whole - d0) / LANES < OUT_VECTORS ? (whole - d0) / LANES
                                                                 : OUT_VECTORS;
            vf o[OUT_VECTORS] = {{0}};
            for (int64_t cc = c0; cc < c1; cc++) {
                const float *val = (cc < pos ? vc + cc * cs : vnew) + d0;
                if (j == 0) /* the first head reads the values from memory */
                    for (int64_t i = 0; i < nv * LANES; i += LANES)
                        __builtin_prefetch(val + AHEAD * cs + i, 0, 3);
                const float p = sc[cc - c0];
                for (int64_t i = 0; i < nv; i++) {
                    memcpy(&v, val + i * LANES, sizeof v);
                    o[i] += p * v;
                }
            }
            for (int64_t i = 0; i < nv; i++) memcpy(out + d0 + i * LANES, &o[i], sizeof v);
        }
        for (int64_t d = whole; d < D; d++) {
            float t = 0.0f;
            for (int64_t cc = c0; cc < c1; cc++)
                t += sc[cc - c0] * (cc < pos ? vc + cc * cs : vnew)[d];
            out[d] = t;
        }
    }
}

/* `attend` with the head size as a constant where it is a common one. */
static void attend_any(const float *kc, const float *vc, int64_t cs, int64_t pos,
                       const float *q, const float *knew, const float *vnew, int64_t g,
                       int64_t c0, int64_t c1, float scale, float *scores, float *part,
                       int64_t D) {
    if (D == 64)
        attend(kc, vc, cs, pos, q, knew, vnew, g, c0, c1, scale, scores, part, 64);
    else if (D == 128)
        attend(kc, vc, cs, pos, q, knew, vnew, g, c0, c1, scale, scores, part, 128);
    else
        attend(kc, vc, cs, pos, q, knew, vnew, g, c0, c1, scale, scores, part, D);
}

/* out[h] = head h's attention output from the threads' parts (`attend`, `T` of them, each
 * NH heads of D + 2 floats): the parts' sums and outputs rescaled to the largest maximum. */
static void merge_heads(const float *parts, int64_t T, int64_t NH, int64_t D, float *out) {
    for (int64_t h = 0; h < NH; h++) {
        float top = -INFINITY, total = 0.0f;
        for (int64_t t = 0; t < T; t++) {
            const float mt = parts[(t * NH + h) * (D + 2)];
            top = mt > top ? mt : top;
        }
        float *o = out + h * D;
        for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
        for (int64_t t = 0; t < T; t++) {
            const float *p = parts + (t * NH + h) * (D + 2);
            if (p[1] == 0.0f) continue; /* no columns */
            const float w = expf(p[0] - top);
            total += w * p[1];
            for (int64_t d = 0; d < D; d++) o[d] += w * p[2 + d];
        }
        for (int64_t d = 0; d < D; d++) o[d] /= total;
    }
}

static void rope(const float *x, const float *cos, const float *sin, int64_t d, float *out) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) out[i] = x[i] * cos[i] - x[i + half] * sin[i];
    for (int64_t i = half; i < d; i++) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* Floats of the shared scratch buffer: h, qkv, the threads' attention parts, MLP hidden. */
static int64_t shared_floats(const Model *m) {
    int64_t qd = m->heads * m->head_dim, kd = m->kv_heads * m->head_dim;
    return m->hidden + (qd + 2 * kd) + m->threads * m->heads * (m->head_dim + 2) + m->inter;
}

/* Returns 0, or -1 if scratch memory could not be allocated. */
int neeko_decode_one(const Model *m, const Step *s) {
    const int64_t H = m->hidden, D = m->head_dim, NH = m->heads, NKV = m->kv_heads;
    const int64_t QD = NH * D, KD = NKV * D, QKV = QD + 2 * KD, I = m->inter;
    const int64_t pos = s->position;
    const int64_t start = m->window > 0 && pos - m->window + 1 > 0 ? pos - m->window + 1 : 0;
    const int64_t group = NH / NKV;
    const float scale = 1.0f / sqrtf((float)D);
    int64_t zn = 0;
    for (int p = 0; p < N_PROJ; p++) zn += m->lora[p].a ? m->lora[p].kp : 0;
    /* per thread: the normed input, the blocks' inputs z, the roped q and new k, the
     * attention output, one kv group's scores, its rows' products (at most a whole up or
     * down projection's) */
    const int64_t private_n = H + zn + QD + KD + QD + group * (pos + 1) + (I > H ? I : H);
    float *shared = malloc(sizeof(float) * shared_floats(m));
    float *private_all = malloc(sizeof(float) * private_n * m->threads);
    if (!shared || !private_all) {
        free(shared);
        free(private_all);
        return -1;
    }
    float *h = shared, *qkv = h + H, *parts = qkv + QKV, *y = parts + m->threads * NH * (D + 2);
    memcpy(h, m->embed + s->token * H, sizeof(float) * H);

#pragma omp parallel num_threads(m->threads)
    {
        const int tid = omp_get_thread_num();
        float *x = private_all + tid * private_n, *zbase = x + H, *qrot = zbase + zn;
        float *knew = qrot + QD, *attn = knew + KD, *scores = attn + QD;
        float *d = scores + group * (pos + 1);
        /* this thread's columns of the attention */
        int64_t c0, c1;
        my_rows(pos + 1 - start, &c0, &c1);
        c0 += start;
        c1 += start;
        float *z[N_PROJ];
        {
            float *next = zbase;
            for (int p = 0; p < N_PROJ; p++) {
                z[p] = next;
                next += m->lora[p].a ? m->lora[p].kp : 0;
            }
        }
        const Lora *L = m->lora;
        for (int64_t layer = 0; layer < m->layers; layer++) {
            /* attention: q/k/v with their blocks */
            rms_norm(h, m->ln_in[layer], m->eps, H, x);
            for (int p = Q; p <= V; p++)
                if (L[p].a) lora_in(&L[p], layer, 1, 0, H, x, z[p]);
            const Mat *w = &m->qkv[layer];
            const float *bias = m->qkv_bias ? m->qkv_bias[layer] : NULL;
            int64_t lo, hi;
            my_rows(QKV, &lo, &hi);
            rows_dot(w, x, H, lo, hi, qkv + lo);
            for (int64_t o = lo; o < hi; o++) {
                float v = qkv[o] + (bias ? bias[o] : 0.0f);
                if (o < QD) {
                    if (L[Q].a) v += lora_out(&L[Q], layer, QD, z[Q], o);
                } else if (o < QD + KD) {
                    if (L[K].a) v += lora_out(&L[K], layer, KD, z[K], o - QD);
                } else if (L[V].a) {
                    v += lora_out(&L[V], layer, KD, z[V], o - QD - KD);
                }
                qkv[o] = v;
            }
#pragma omp barrier
            /* every thread ropes q and the new keys for itself; thread 0 returns them */
            for (int64_t j = 0; j < NH; j++) rope(qkv + j * D, s->cos, s->sin, D, qrot + j * D);
            for (int64_t g = 0; g < NKV; g++)
                rope(qkv + QD + g * D, s->cos, s->sin, D, knew + g * D);
            const float *vnew = qkv + QD + KD;
            if (tid == 0) { /* no other thread reads column `pos` of the cache */
                memcpy(s->new_k + layer * KD, knew, sizeof(float) * KD);
                memcpy(s->new_v + layer * KD, vnew, sizeof(float) * KD);
                for (int64_t g = 0; g < NKV && s->write; g++) {
                    const int64_t at = layer * s->layer_stride + g * s->head_stride +
                                       pos * s->column_stride;
                    memcpy(s->keys + at, knew + g * D, sizeof(float) * D);
                    memcpy(s->values + at, vnew + g * D, sizeof(float) * D);
                }
            }
            /* attention split by columns over the threads, merged by each for itself */
            for (int64_t g = 0; g < NKV; g++)
                attend_any(s->keys + layer * s->layer_stride + g * s->head_stride,
                           s->values + layer * s->layer_stride + g * s->head_stride,
                           s->column_stride, pos, qrot + g * group * D, knew + g * D,
                           vnew + g * D, group, c0, c1, scale, scores,
                           parts + (tid * NH + g * group) * (D + 2), D);
#pragma omp barrier
            merge_heads(parts, omp_get_num_threads(), NH, D, attn);
            add_projection(&m->o[layer], attn, QD, &L[O], layer, z[O], d, H, h);
            /* MLP: gate and up of one output together, then down */
            rms_norm(h, m->ln_post[layer], m->eps, H, x);
            for (int p = GATE; p <= UP; p++)
                if (L[p].a) lora_in(&L[p], layer, 1, 0, H, x, z[p]);
            w = &m->gate_up[layer];
            my_rows(I, &lo, &hi);
            rows_dot(w, x, H, lo, hi, y + lo);
            rows_dot(w, x, H, I + lo, I + hi, d);
            for (int64_t o = lo; o < hi; o++) {
                float g = y[o], u = d[o - lo];
                if (L[GATE].a) g += lora_out(&L[GATE], layer, I, z[GATE], o);
                if (L[UP].a) u += lora_out(&L[UP], layer, I, z[UP], o);
                y[o] = silu(g) * u;
            }
#pragma omp barrier
            add_projection(&m->down[layer], y, I, &L[DOWN], layer, z[DOWN], d, H, h);
        }
        rms_norm(h, m->norm, m->eps, H, x);
        int64_t lo, hi;
        my_rows(m->vocab, &lo, &hi);
        rows_dot(&m->head, x, H, lo, hi, s->logits + lo);
    }
    free(shared);
    free(private_all);
    return 0;
}

/* Reads every float of `n` arrays once, array after array, as a decode step streams its
 * weights (one parallel region; each thread's contiguous share of an array read as
 * STREAMS streams, each asking PREFETCH floats ahead, as `rows_dot` reads rows; a barrier
 * after each array); returns their sum so the reads cannot be skipped. The benchmarks'
 * floor for the step. */
double neeko_read(const float *const *arrays, const int64_t *sizes, int64_t n,
                  int64_t threads) {
    double total = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        for (int64_t k = 0; k < n; k++) {
            const float *a = arrays[k];
            int64_t lo, hi;
            my_rows(sizes[k], &lo, &hi);
            const int64_t q = (hi - lo) / (STREAMS * LANES) * LANES; /* floats per stream */
            vf acc[STREAMS] = {{0}}, v;
            for (int64_t i = 0; i < q; i += LANES)
                for (int s = 0; s < STREAMS; s++) {
                    __builtin_prefetch(a + lo + s * q + i + PREFETCH, 0, 2);
                    memcpy(&v, a + lo + s * q + i, sizeof v);
                    acc[s] += v;
                }
            for (int s = 1; s < STREAMS; s++) acc[0] += acc[s];
            float sum = 0.0f;
            for (int l = 0; l < LANES; l++) sum += acc[0][l];
            for (int64_t i = lo + STREAMS * q; i < hi; i++) sum += a[i];
            total += sum;
#pragma omp barrier
        }
    }
    return total;
}

/* ---- many rows ----------------------------------------------------------------------
 *
 * A decode step of several rows (a batch of turns, each with its own position, cache slot
 * and blocks) is bound by arithmetic, not by memory, from a handful of rows on: 16 rows do
 * 16 multiply-adds per weight read. Here each matrix product keeps the rows in the lanes
 * of a vector: the step's input to a matrix is transposed into (inputs, rows), and one
 * weight, broadcast, multiplies all rows of a chunk in a single FMA (a tile of TILE output
 * rows holds TILE accumulators), so no lane sums are needed and every weight is read from
 * memory once per step. The per-row work between the products (norms, blocks, RoPE,
 * attention over the row's own cache) is split by rows over the threads. */

typedef struct {
    int64_t rows;  /* rows computed: the first `rows` of `slots` */
    int64_t slots; /* rows of the outputs and of the blocks' tensors */
    const int64_t *tokens, *positions; /* (rows,) */
    const float *cos, *sin;            /* (positions, head_dim) tables */
    float *keys, *values; /* row r's cache is slot r: columns [0, position) are valid */
    int64_t layer_stride, slot_stride, head_stride, column_stride; /* in floats */
    float *logits;        /* (slots, vocab) */
    float *new_k, *new_v; /* (layers, slots, kv_heads, head_dim) */
    int64_t write;        /* nonzero: also store the new keys and values in the cache */
    Lora lora[N_PROJ];    /* a: (layers, slots, kp, d_in), b: (layers, slots, kp, d_out),
                           * w: (slots, kp); `a` NULL: no blocks on the projection */
} Batch;

/* Output rows of a matrix per tile: TILE accumulators, each FMA fed by one broadcast. */
#ifndef TILE
#define TILE 8
#endif


typedef float vf8 __attribute__((vector_size(32)));

/* y[r * ys + o] = w[o] . x[r] for o in [lo, hi) and r < m, where `xt` holds x transposed
 * in chunks of VL rows, (chunks, n, VL) (lanes past m are zero), and w is (out, n): fp32,
 * or int8 with row scales, widened a tile at a time into `wide` (TILE * n floats). While
 * a tile is multiplied, the next tile's rows are fetched ahead, a line of each per 16
 * inputs. */
#define DEFINE_MATMUL(NAME, VT, VL)                                                          \
    static void NAME(const Mat *mat, int64_t n, int64_t lo, int64_t hi,                     \
                     const float *restrict xt, int64_t m, float *restrict y, int64_t ys,    \
                     float *restrict wide) {                                                \
        const int64_t chunks = (m + VL - 1) / VL;                                            \
        for (int64_t o = lo; o < hi; o += TILE) {                                           \
            const int64_t t = hi - o < TILE ? hi - o : TILE;                                \
            const float *wr = (const float *)mat->w + o * n, *next = NULL;                  \
            if (mat->scale) {                                                               \
                const int8_t *w8 = (const int8_t *)mat->w + o * n;                          \
                for (int64_t i = 0; i < t * n; i++) wide[i] = (float)w8[i];                 \
                wr = wide;                                                                  \
            } else if (o + 2 * TILE <= hi) {                                                \
                next = wr + TILE * n;                                                       \
            }                                                                               \
            for (int64_t c = 0; c < chunks; c++) {                                          \
                const float *xc = xt + c * n * VL;                                          \
                VT acc[TILE] = {{0}}, xv;                                                   \
                if (t == TILE) {                                                            \
                    for (int64_t i0 = 0; i0 < n; i0 += LANES) {                             \
                        const int64_t i1 = i0 + LANES < n ? i0 + LANES : n;                 \
                        if (next && c == 0)                                                 \
                            for (int k = 0; k < TILE; k++)                                  \
                                __builtin_prefetch(next + k * n + i0, 0, 1);                \
                        for (int64_t i = i0; i < i1; i++) {                                 \
                            memcpy(&xv, xc + i * VL, sizeof xv);                            \
                            for (int k = 0; k < TILE; k++) acc[k] += xv * wr[k * n + i];    \
                        }                                                                   \
                    }                                                                       \
                } else {                                                                    \
                    for (int64_t i = 0; i < n; i++) {                                       \
                        memcpy(&xv, xc + i * VL, sizeof xv);                                \
                        for (int64_t k = 0; k < t; k++) acc[k] += xv * wr[k * n + i];       \
                    }                                                                       \
                }                                                                           \
                const int64_t r0 = c * VL, rn = m - r0 < VL ? m - r0 : VL;                  \
                for (int64_t k = 0; k < t; k++) {                                           \
                    const float sc = mat->scale ? mat->scale[o + k] : 1.0f;                 \
                    for (int64_t r = 0; r < rn; r++) y[(r0 + r) * ys + o + k] = sc * acc[k][r];\
                }                                                                           \
            }                                                                               \
        }                                                                                   \
    }

DEFINE_MATMUL(matmul16, vf, 16)
DEFINE_MATMUL(matmul8, vf8, 8)

/* x (m, n) row-major into xt (chunks, n, vl), zero past row m. */
static void transpose_rows(const float *x, int64_t m, int64_t n, int64_t vl, float *xt) {
    const int64_t chunks = (m + vl - 1) / vl;
    for (int64_t c = 0; c < chunks; c++) {
        float *xc = xt + c * n * vl;
        for (int64_t i = 0; i < n; i++)
            for (int64_t l = 0; l < vl; l++) {
                const int64_t r = c * vl + l;
                xc[i * vl + l] = r < m ? x[r * n + i] : 0.0f;
            }
    }
}

/* y (m, out) = x (m, n) times w (out, n) transposed, this thread's share of the outputs;
 * `xt` and `wide` are the calling thread's scratch. No barrier. Every thread transposes
 * the whole of x for itself (at most 16 x 1,536 floats per product, against a share of
 * ~10^5-10^6 FMAs): a shared copy would need a barrier more per product, and threads
 * writing their rows' lanes into it would share every cache line. */
static void matmul_rows(const Mat *w, const float *x, int64_t m, int64_t n, int64_t out,
                        float *xt, float *wide, float *y, int64_t ys) {
    const int64_t vl = m <= 8 ? 8 : 16;
    transpose_rows(x, m, n, vl, xt);
    int64_t lo, hi;
    my_rows(out, &lo, &hi);
    if (vl == 8)
        matmul8(w, n, lo, hi, xt, m, y, ys, wide);
    else
        matmul16(w, n, lo, hi, xt, m, y, ys, wide);
}

/* y += B z for row r's blocks of one projection in one layer. */
static void lora_add_row(const Lora *l, int64_t layer, int64_t slots, int64_t r,
                         int64_t d_out, const float *z, float *y) {
    const float *b = l->b + (layer * slots + r) * l->kp * d_out;
    for (int64_t j = 0; j < l->kp; j++)
        for (int64_t o = 0; o < d_out; o++) y[o] += z[j] * b[j * d_out + o];
}

/* Returns 0, or -1 if scratch memory could not be allocated. */
int neeko_decode_batch(const Model *m, const Batch *s) {
    const int64_t H = m->hidden, D = m->head_dim, NH = m->heads, NKV = m->kv_heads;
    const int64_t QD = NH * D, KD = NKV * D, QKV = QD + 2 * KD, I = m->inter;
    const int64_t M = s->rows, S = s->slots, group = NH / NKV;
    const float scale = 1.0f / sqrtf((float)D);
    const Lora *L = s->lora;
    int64_t zn = 0, longest = 0, widest = H > QD ? H : QD;
    for (int p = 0; p < N_PROJ; p++) zn += L[p].a ? L[p].kp : 0;
    for (int64_t r = 0; r < M; r++) longest = s->positions[r] > longest ? s->positions[r] : longest;
    widest = widest > I ? widest : I;
    /* shared: h, x, the step's rows of qkv, attention, a product's output, gate/up, y, z */
    const int64_t shared_n = M * (H + H + QKV + QD + H + 2 * I + I + zn);
    /* per thread: the transposed input of a product, roped q and k, one group's scores,
     * the heads' attention parts */
    const int64_t chunks = (M + 15) / 16;
    const int64_t private_n =
        chunks * 16 * widest + TILE * widest + QD + KD + group * (longest + 1) + NH * (D + 2);
    float *shared = malloc(sizeof(float) * shared_n);
    float *private_all = malloc(sizeof(float) * private_n * m->threads);
    if (!shared || !private_all) {
        free(shared);
        free(private_all);
        return -1;
    }
    float *h = shared, *x = h + M * H, *qkv = x + M * H, *attn = qkv + M * QKV;
    float *tmp = attn + M * QD, *gu = tmp + M * H, *y = gu + M * 2 * I, *zall = y + M * I;
    for (int64_t r = 0; r < M; r++) memcpy(h + r * H, m->embed + s->tokens[r] * H, sizeof(float) * H);

#pragma omp parallel num_threads(m->threads)
    {
        const int tid = omp_get_thread_num();
        float *xt = private_all + tid * private_n, *wide = xt + chunks * 16 * widest;
        float *qrot = wide + TILE * widest;
        float *knew = qrot + QD, *scores = knew + KD, *parts = scores + group * (longest + 1);
        int64_t r0, r1; /* this thread's rows */
        my_rows(M, &r0, &r1);
        int64_t zoff[N_PROJ]; /* where each projection's blocks' inputs sit in a row's z */
        for (int p = 0, at = 0; p < N_PROJ; p++) {
            zoff[p] = at;
            at += L[p].a ? L[p].kp : 0;
        }
#define ZROW(p, r) (zall + (r) * zn + zoff[p])
        for (int64_t layer = 0; layer < m->layers; layer++) {
            for (int64_t r = r0; r < r1; r++) {
                rms_norm(h + r * H, m->ln_in[layer], m->eps, H, x + r * H);
                for (int p = Q; p <= V; p++)
                    if (L[p].a) lora_in(&L[p], layer, S, r, H, x + r * H, ZROW(p, r));
            }
#pragma omp barrier
            matmul_rows(&m->qkv[layer], x, M, H, QKV, xt, wide, qkv, QKV);
#pragma omp barrier
            const float *bias = m->qkv_bias ? m->qkv_bias[layer] : NULL;
            for (int64_t r = r0; r < r1; r++) {
                float *row = qkv + r * QKV;
                if (bias)
                    for (int64_t o = 0; o < QKV; o++) row[o] += bias[o];
                if (L[Q].a) lora_add_row(&L[Q], layer, S, r, QD, ZROW(Q, r), row);
                if (L[K].a) lora_add_row(&L[K], layer, S, r, KD, ZROW(K, r), row + QD);
                if (L[V].a) lora_add_row(&L[V], layer, S, r, KD, ZROW(V, r), row + QD + KD);
                const int64_t pos = s->positions[r];
                const int64_t start =
                    m->window > 0 && pos - m->window + 1 > 0 ? pos - m->window + 1 : 0;
                const float *cos = s->cos + pos * D, *sin = s->sin + pos * D;
                for (int64_t j = 0; j < NH; j++) rope(row + j * D, cos, sin, D, qrot + j * D);
                for (int64_t g = 0; g < NKV; g++) rope(row + QD + g * D, cos, sin, D, knew + g * D);
                const float *vnew = row + QD + KD;
                memcpy(s->new_k + (layer * S + r) * KD, knew, sizeof(float) * KD);
                memcpy(s->new_v + (layer * S + r) * KD, vnew, sizeof(float) * KD);
                float *kc = s->keys + layer * s->layer_stride + r * s->slot_stride;
                float *vc = s->values + layer * s->layer_stride + r * s->slot_stride;
                for (int64_t g = 0; g < NKV && s->write; g++) {
                    const int64_t at = g * s->head_stride + pos * s->column_stride;
                    memcpy(kc + at, knew + g * D, sizeof(float) * D);
                    memcpy(vc + at, vnew + g * D, sizeof(float) * D);
                }
                for (int64_t g = 0; g < NKV; g++)
                    attend_any(kc + g * s->head_stride, vc + g * s->head_stride,
                               s->column_stride, pos, qrot + g * group * D, knew + g * D,
                               vnew + g * D, group, start, pos + 1, scale, scores,
                               parts + g * group * (D + 2), D);
                merge_heads(parts, 1, NH, D, attn + r * QD);
                if (L[O].a) lora_in(&L[O], layer, S, r, QD, attn + r * QD, ZROW(O, r));
            }
#pragma omp barrier
            matmul_rows(&m->o[layer], attn, M, QD, H, xt, wide, tmp, H);
#pragma omp barrier
            for (int64_t r = r0; r < r1; r++) {
                if (L[O].a) lora_add_row(&L[O], layer, S, r, H, ZROW(O, r), tmp + r * H);
                for (int64_t i = 0; i < H; i++) h[r * H + i] += tmp[r * H + i];
                rms_norm(h + r * H, m->ln_post[layer], m->eps, H, x + r * H);
                for (int p = GATE; p <= UP; p++)
                    if (L[p].a) lora_in(&L[p], layer, S, r, H, x + r * H, ZROW(p, r));
            }
#pragma omp barrier
            matmul_rows(&m->gate_up[layer], x, M, H, 2 * I, xt, wide, gu, 2 * I);
#pragma omp barrier
            for (int64_t r = r0; r < r1; r++) {
                float *g = gu + r * 2 * I, *u = g + I, *yr = y + r * I;
                if (L[GATE].a) lora_add_row(&L[GATE], layer, S, r, I, ZROW(GATE, r), g);
                if (L[UP].a) lora_add_row(&L[UP], layer, S, r, I, ZROW(UP, r), u);
                for (int64_t i = 0; i < I; i++) yr[i] = silu(g[i]) * u[i];
                if (L[DOWN].a) lora_in(&L[DOWN], layer, S, r, I, yr, ZROW(DOWN, r));
            }
#pragma omp barrier
            matmul_rows(&m->down[layer], y, M, I, H, xt, wide, tmp, H);
#pragma omp barrier
            for (int64_t r = r0; r < r1; r++) {
                if (L[DOWN].a) lora_add_row(&L[DOWN], layer, S, r, H, ZROW(DOWN, r), tmp + r * H);
                for (int64_t i = 0; i < H; i++) h[r * H + i] += tmp[r * H + i];
            }
        }
#undef ZROW
        for (int64_t r = r0; r < r1; r++) rms_norm(h + r * H, m->norm, m->eps, H, x + r * H);
#pragma omp barrier
        matmul_rows(&m->head, x, M, H, m->vocab, xt, wide, s->logits, m->vocab);
    }
    free(shared);
    free(private_all);
    return 0;
}
