/*
 * The dm-switch set_region_mappings encoder's core, compiled: plan and cut into messages.
 *
 * A line-for-line port of protocol/dmswitch_planner.py (lz_plan, RunsLayout,
 * count_runs, worth_matching) and of dmswitch_encoder._messages/_render:
 * same candidates, same tie-breaking, same parse, so the messages are
 * byte-identical to the pure-Python encoder's (the tests check both against
 * each other and against protocol.dmswitch_oracle). What numpy did in ~40
 * whole-map passes and a Python walk is here a handful of loops, which is
 * what makes the seed map take milliseconds instead of a quarter second.
 * protocol.dmswitch_encoder still validates the input, chooses what to
 * write (don't-care holes, the previous table) and draws the distance
 * sample; this file only plans and renders. Pure: no I/O, no globals.
 *
 * The entry point, encode(), documents its arguments in protocol/_dmswitch_encode.pyi.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { LIT = 0, EXP = 1, REP = 2 }; /* ":v", "idx:v", "R<d>,<m>" (dmswitch_planner) */

static const char PREFIX[] = "set_region_mappings ";
#define PREFIX_LEN ((int64_t)(sizeof(PREFIX) - 1))
#define NO_SAVING (-(INT64_C(1) << 30)) /* lz_plan's `none` */
#define MATCH_MAX_LEN 256               /* _kgram_matches' max_len */
#define WEIGHT_CAP 4096                 /* _dominant_distances' cap on one match's weight */
/* Per-region arrays are int32: more regions than this is not a table anyone loads. */
#define MAX_REGIONS (INT64_C(1) << 30)

/*
 * Hex digits of v >= 0 (1 for 0, as hexlen/hexlen1 give); no branch, it
 * sits in the hot loop. A negative v gives a meaningless count: only the
 * lengths savings() discards as "no copy" are ever negative.
 */
static inline int hexlen(int64_t v)
{
    return ((63 - __builtin_clzll((uint64_t)v | 1)) >> 2) + 1;
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* ---------------------------------------------------------------- scratch */

/*
 * Every array a call needs, by role. The blocks stay allocated for the next
 * call: on a map of a million regions, faulting ~30 MiB of fresh pages in
 * costs as much as the work (measured: a third of the time). So a daemon
 * keeps about 25 bytes per region of the largest map it encoded.
 */
enum {
    S_T, S_LITC, S_NU, S_ACT, S_KEY, S_DIST, S_KLEN, S_LAST, S_EFF, S_BD, S_WEIGHT, S_SEEN,
    S_PLAN, /* 4 slots per plan (pos, val, cnt, kind), 2 plans */
    S_OUT = S_PLAN + 8,
    NSLOTS
};

typedef struct {
    void *p[NSLOTS];
    size_t cap[NSLOTS];
} arena_t;

/* A block of at least size bytes for slot; what it held is lost. */
static void *scratch(arena_t *a, int slot, size_t size)
{
    if (a->cap[slot] < size) {
        free(a->p[slot]);
        a->p[slot] = malloc(size ? size : 1);
        a->cap[slot] = a->p[slot] ? size : 0;
    }
    return a->p[slot];
}

/* Slot's block grown to at least size bytes, what it held kept. */
static void *scratch_grow(arena_t *a, int slot, size_t size)
{
    if (a->cap[slot] < size) {
        void *p = realloc(a->p[slot], size);
        if (!p)
            return NULL;
        a->p[slot] = p;
        a->cap[slot] = size;
    }
    return a->p[slot];
}

/* A zeroed block for slot, which its user leaves zeroed after use. */
static void *scratch_zeroed(arena_t *a, int slot, size_t size)
{
    if (a->cap[slot] < size) {
        free(a->p[slot]);
        a->p[slot] = calloc(size, 1);
        a->cap[slot] = a->p[slot] ? size : 0;
    }
    return a->p[slot];
}

static void arena_free(arena_t *a)
{
    for (int j = 0; j < NSLOTS; j++)
        free(a->p[j]);
    free(a);
}

/* The arena the last call left, or NULL; only touched with the GIL held. */
static arena_t *spare_arena;

/* ------------------------------------------------------------------ plans */

typedef struct {
    arena_t *arena;
    int slot; /* its 4 arena slots start here */
    int64_t *pos, *val, *cnt;
    int8_t *kind;
    int64_t len, cap;
    int64_t total; /* bytes, each token with its space (Plan.total) */
} plan_t;

static inline int64_t token_cost(int kind, int64_t pos, int64_t val, int64_t cnt)
{
    if (kind == REP)
        return 1 + hexlen(val) + 1 + hexlen(cnt) + 1;
    if (kind == EXP)
        return hexlen(pos) + 1 + hexlen(val) + 1;
    return 1 + hexlen(val) + 1;
}

static int plan_grow(plan_t *pl)
{
    int64_t cap = pl->cap ? 2 * pl->cap : 4096;
    size_t c = (size_t)cap;
    pl->pos = scratch_grow(pl->arena, pl->slot, c * sizeof *pl->pos);
    pl->val = scratch_grow(pl->arena, pl->slot + 1, c * sizeof *pl->val);
    pl->cnt = scratch_grow(pl->arena, pl->slot + 2, c * sizeof *pl->cnt);
    pl->kind = scratch_grow(pl->arena, pl->slot + 3, c * sizeof *pl->kind);
    if (!pl->pos || !pl->val || !pl->cnt || !pl->kind)
        return -1;
    pl->cap = cap;
    return 0;
}

static inline int plan_push(plan_t *pl, int kind, int64_t pos, int64_t val, int64_t cnt)
{
    if (pl->len == pl->cap && plan_grow(pl) < 0)
        return -1;
    int64_t i = pl->len++;
    pl->kind[i] = (int8_t)kind;
    pl->pos[i] = pos;
    pl->val[i] = val;
    pl->cnt[i] = cnt;
    pl->total += token_cost(kind, pos, val, cnt);
    return 0;
}

/* What every planner reads: the target map and the masks from _target. */
typedef struct {
    arena_t *arena;
    const int32_t *t;
    int64_t n;
    const uint8_t *need;    /* NULL: every region is written */
    const uint8_t *unknown; /* NULL: none */
    int32_t maxv;
    int small;            /* maxv < 16: every literal costs 3 bytes */
    const int64_t *litc;  /* !small: litc[i] = bytes of ":v" literals for t[0:i] */
} map_t;

/* Region i's path. */
static inline int32_t sym(const map_t *m, int64_t i) { return m->t[i]; }

/* Bytes of ":v" literals for t[a:b] (_lit_cost_sum). */
static inline int64_t lit_cost(const map_t *m, int64_t a, int64_t b)
{
    return m->small ? 3 * (b - a) : m->litc[b] - m->litc[a];
}

/* ------------------------------------------------------- K-gram matches */

/* Leading symbols two packed K-grams share, by their XOR's trailing zeros (_equal_symbols_table). */
typedef struct {
    int8_t by_ctz[17]; /* index 16: the XOR is 0, all K agree */
} eqsym_t;

static void eqsym_init(eqsym_t *q, int b, int k)
{
    for (int z = 0; z < 17; z++)
        q->by_ctz[z] = (int8_t)(z == 16 || z / b > k ? k : z / b);
}

static inline int64_t equal_symbols(const eqsym_t *q, unsigned x)
{
    return q->by_ctz[x ? __builtin_ctz(x) : 16];
}

/*
 * _kgram_matches: dist[i] the nearest earlier occurrence of the K-gram at i
 * (0: none), len[i] how far the match runs. A last-seen table per key gives
 * what the stable argsort's predecessor did; it also keeps the K-gram after
 * that occurrence, so the first extension reads no far-away key. Lengths
 * are filled from the end: a position inside a group of equal distances
 * takes its successor's + 1, as the Python's group ends do.
 */
static void kgram_matches(const map_t *m, int b, int k, uint16_t *key, int32_t *dist, int32_t *len, uint64_t *last)
{
    int64_t n = m->n;
    unsigned mask = (1u << (b * k)) - 1;
    /* key[i] = key[i + 2] << 2b | t[i + 1] << b | t[i]: two independent chains, half the latency. */
    unsigned ka = 0, kb = 0, above = 0; /* key[i + 2], key[i + 1], t[i + 1]; past the end read as 0 */
    int64_t i = n - 1;
    for (; i >= 1; i -= 2) {
        unsigned hi = (unsigned)sym(m, i), lo = (unsigned)sym(m, i - 1);
        ka = ((ka << (2 * b)) | (above << b) | hi) & mask;
        kb = ((kb << (2 * b)) | (hi << b) | lo) & mask;
        key[i] = (uint16_t)ka;
        key[i - 1] = (uint16_t)kb;
        above = lo;
    }
    if (i == 0)
        key[0] = (uint16_t)(((kb << b) | (unsigned)sym(m, 0)) & mask);
    eqsym_t q;
    eqsym_init(&q, b, k);
    int64_t mm = n - k;
    /* last[key] = (position + 1) << 16 | the K-gram after it; 0: not seen. */
    memset(last, 0, sizeof(uint64_t) << 16);
    int64_t nv = n - k + 1; /* positions with a whole K-gram */
    for (int64_t i = 0; i < nv; i++) {
        unsigned after = i + k < n ? key[i + k] : 0;
        uint64_t prev = last[key[i]];
        int32_t d = 0;
        int64_t add = 0;
        if (prev) {
            d = (int32_t)(i - ((int64_t)(prev >> 16) - 1));
            if (i < mm)
                add = equal_symbols(&q, after ^ (unsigned)(prev & 0xffff));
        }
        dist[i] = d;
        len[i] = (int32_t)add; /* the first extension; lengths below */
        last[key[i]] = ((uint64_t)(i + 1) << 16) | after;
    }
    for (int64_t i = nv; i < n; i++)
        dist[i] = len[i] = 0;

    int rounds = MATCH_MAX_LEN / k > 1 ? MATCH_MAX_LEN / k : 1;
    int next_live = 0;
    int32_t next_d = 0;
    for (int64_t i = n - 1; i >= 0; i--) {
        int32_t d = dist[i];
        if (d == 0) {
            len[i] = 0;
            next_live = 0;
            continue;
        }
        int64_t add = len[i];
        int64_t L = min64(k + add, n - i);
        int live = add == k;
        if (live) {
            if (next_live && next_d == d) {
                L = len[i + 1] + 1;
            } else {
                /* A group's last position: extend K symbols at a time, bounded. */
                int64_t ln = L, p = i + ln;
                for (int r = 0; r < rounds; r++) {
                    if (p >= n)
                        break;
                    int64_t got = equal_symbols(&q, key[p] ^ key[p - d]);
                    ln += got;
                    if (got != k)
                        break;
                    p += k;
                }
                L = min64(ln, n - i);
            }
        }
        len[i] = (int32_t)L;
        next_live = live;
        next_d = d;
    }
}

/*
 * _dominant_distances: up to two copy distances > 1 carrying >= 5 % of the
 * matched length over the sampled positions (all when sample is NULL),
 * heaviest first, ties to the shorter distance (a stable sort's order).
 */
static int dominant_distances(arena_t *a, const int32_t *dist, const int32_t *len, int64_t n,
                              const int64_t *sample, int64_t nsample, int32_t out[2])
{
    int64_t count = sample ? nsample : n;
    int64_t *weight = scratch_zeroed(a, S_WEIGHT, ((size_t)n + 1) * sizeof *weight);
    int32_t *seen = scratch(a, S_SEEN, (size_t)count * sizeof *seen);
    if (!weight || !seen)
        return -1;
    int64_t nseen = 0, total = 0;
    for (int64_t j = 0; j < count; j++) {
        if (sample && j + 16 < count) { /* the sample is random: fetch ahead */
            __builtin_prefetch(&dist[sample[j + 16]]);
            __builtin_prefetch(&len[sample[j + 16]]);
        }
        int64_t q = sample ? sample[j] : j;
        int32_t d = dist[q];
        if (d <= 1)
            continue;
        int64_t w = len[q] < WEIGHT_CAP ? len[q] : WEIGHT_CAP;
        if (weight[d] == 0)
            seen[nseen++] = d;
        weight[d] += w;
        total += w;
    }
    int32_t best[2] = {0, 0};
    int nbest = 0;
    for (int64_t j = 0; j < nseen; j++) {
        int32_t d = seen[j];
        int64_t w = weight[d];
        if (nbest == 0 || w > weight[best[0]] || (w == weight[best[0]] && d < best[0])) {
            best[1] = best[0];
            best[0] = d;
            nbest = nbest < 2 ? nbest + 1 : 2;
        } else if (nbest == 1 || w > weight[best[1]] || (w == weight[best[1]] && d < best[1])) {
            best[1] = d;
            nbest = 2;
        }
    }
    double floor = 0.05 * (double)total;
    int nout = 0;
    for (int j = 0; j < nbest; j++)
        if ((double)weight[best[j]] >= floor)
            out[nout++] = best[j];
    for (int64_t j = 0; j < nseen; j++)
        weight[seen[j]] = 0; /* zeroed for the next call */
    return nout;
}

/* ---------------------------------------------------------------- lz_plan */

/*
 * What savings() reads, copied into a value the hot loop keeps in
 * registers: its stores go through int8_t, which may alias anything, so
 * fields read through a pointer would be reloaded after every store.
 */
typedef struct {
    int64_t n, stop;
    int small;
    const int64_t *litc;
    const int32_t *nu; /* first unknown region at or after j; NULL: none */
} sav_t;

/* lz_plan's savings() for one region: bytes a copy from d back saves over literals, and its length. */
static inline int64_t savings(sav_t c, int64_t i, int64_t d, int64_t L, int dcost, int64_t *len)
{
    L = min64(L, c.stop - i);
    if (c.nu) {
        int64_t src = i - d < 0 ? 0 : i - d;
        int64_t stain = c.nu[src];
        if (stain < i)
            L = min64(L, stain - src); /* the copy would read an unknown region */
    }
    *len = L;
    /* Computed either way and then chosen: which one is as good as random on real maps. */
    int64_t lits = c.small ? 3 * L : c.litc[min64(i + L, c.n)] - c.litc[i];
    int64_t s = lits - (3 + dcost + hexlen(L));
    return L <= 0 ? NO_SAVING : s;
}

/*
 * lz_plan's per-region choices, in one pass from the end, into act (0
 * literal, 1 copy, 2 skip), eff (copy length) and bd (copy distance).
 * Always inlined, so each call below is compiled for its own constant
 * small / with_nu / with_need / nper, without the tests they make.
 * Returns count_runs for [start, stop).
 */
static inline __attribute__((always_inline)) int64_t
choose(const map_t *m, int64_t lo, int64_t stop, const int small, const int with_nu, const int32_t *nu,
       const int with_need, const uint8_t *need_mask, const int have_km, const int nper, const int32_t *periods,
       int8_t *act, int32_t *eff, int32_t *bd)
{
    int64_t n = m->n;
    /*
     * One pass from the end: each region's best candidate (run continuation,
     * nearest K-gram, copies one period back, strict > in that order), the
     * lazy-match test against the next region, and the skip/bridge choice.
     * The copy lengths run[], per[] are counted down the same way.
     */
    const sav_t c = {n, stop, small, m->litc, with_nu ? nu : NULL};
    const uint8_t *need = with_need ? need_mask : NULL;
    const int32_t *t = m->t;
    int64_t run = 0, per[2] = {0, 0};
    int64_t runs = 1; /* count_runs over [start, stop), for free */
    int64_t next_bs = NO_SAVING; /* the region after stop saves nothing: no room */
    int64_t nn = n;              /* first needed region at or after i */
    /* Counts as (cond ? x + 1 : 0) and picks as masks: the conditions are as good as random. */
    for (int64_t i = n - 1; i >= lo; i--) {
        int32_t ti = t[i];
        run = (run + 1) & -(int64_t)(ti == t[i - 1]);
        for (int q = 0; q < nper; q++)
            per[q] = (i >= periods[q] && ti == t[i - periods[q]]) ? per[q] + 1 : 0;
        if (need && need[i])
            nn = i;
        if (i >= stop)
            continue;
        runs += run == 0;
        int64_t bl, l, s;
        int64_t bs = savings(c, i, 1, run, 1, &bl);
        int32_t bdv = 1;
        if (have_km) { /* bd, eff hold the K-gram match (0: none, saves nothing) until overwritten below */
            int32_t d = bd[i];
            s = savings(c, i, d, eff[i], hexlen(d), &l);
            int better = s > bs;
            bs = better ? s : bs;
            bl = better ? l : bl;
            bdv = better ? d : bdv;
        }
        for (int q = 0; q < nper; q++) {
            s = savings(c, i, periods[q], per[q], hexlen(periods[q]), &l);
            int better = s > bs;
            bs = better ? s : bs;
            bl = better ? l : bl;
            bdv = better ? periods[q] : bdv;
        }
        int take = (bs > 0) & (next_bs <= bs); /* lazy: the next region starts a better match */
        next_bs = bs;
        int a = take;
        int64_t e = bl;
        if (need && !need[i]) {
            int64_t gap = nn - i;
            if (!(take && bl > gap)) {
                int64_t gap_lits = lit_cost(m, i, nn);
                int fits = bl >= gap;
                int64_t mcost = 3 + hexlen(bdv) + hexlen(gap);
                int64_t bridge = fits ? min64(mcost, gap_lits) : gap_lits;
                if (bridge >= hexlen(min64(nn, n - 1))) {
                    a = 2; /* jump ahead with a new explicit index */
                } else if (fits && mcost < gap_lits) {
                    a = 1; /* bridge the gap with the copy */
                    e = gap;
                } else {
                    a = 0;
                }
            }
        }
        act[i] = (int8_t)a;
        eff[i] = (int32_t)e;
        bd[i] = bdv;
    }
    return runs;

}

/* lz_plan: the greedy LZ77-style parse, read top-down as dmswitch_planner.lz_plan. */
static int lz_plan(const map_t *m, plan_t *pl, const int64_t *sample, int64_t nsample, int64_t *runs)
{
    int64_t n = m->n;
    const uint8_t *need = m->need;
    int64_t start = 0, stop = n;
    if (need) {
        int64_t first = -1, last = -1, w = 0;
        for (int64_t i = 0; i < n; i++)
            if (need[i]) {
                if (first < 0)
                    first = i;
                last = i;
                w++;
            }
        if (first < 0)
            return 0; /* nothing to write; _target never asks */
        start = first;
        stop = last + 1;
        if (2 * w >= stop - start)
            need = NULL; /* mostly changed: skips cannot pay off */
    }

    arena_t *a = m->arena;
    size_t sn = (size_t)n;
    int32_t *nu = NULL, *dist = NULL, *klen = NULL, *eff = NULL, *bd = NULL;
    int8_t *act = scratch(a, S_ACT, sn);
    if (!act)
        return -1;
    if (m->unknown) {
        nu = scratch(a, S_NU, sn * sizeof *nu);
        if (!nu)
            return -1;
        int32_t nx = (int32_t)n;
        for (int64_t i = n - 1; i >= 0; i--) {
            if (m->unknown[i])
                nx = (int32_t)i;
            nu[i] = nx;
        }
    }

    int b = 1;
    while ((m->maxv >> b) != 0)
        b++;
    int k = 16 / b < 8 ? 16 / b : 8;
    int have_km = !(k < 2 || n < 2 * k + 2);
    int32_t periods[2];
    int nper = 0;
    if (have_km) {
        uint16_t *key = scratch(a, S_KEY, sn * sizeof *key);
        dist = scratch(a, S_DIST, sn * sizeof *dist);
        klen = scratch(a, S_KLEN, sn * sizeof *klen);
        uint64_t *last = scratch(a, S_LAST, sizeof(uint64_t) << 16);
        if (!key || !dist || !klen || !last)
            return -1;
        kgram_matches(m, b, k, key, dist, klen, last);
        nper = dominant_distances(a, dist, klen, n, sample, nsample, periods);
        if (nper < 0)
            return -1;
    }
    /* The backward pass reads dist[i], klen[i] before it writes bd[i], eff[i]: share the memory. */
    if (have_km) {
        bd = dist;
        eff = klen;
    } else {
        eff = scratch(a, S_EFF, sn * sizeof *eff);
        bd = scratch(a, S_BD, sn * sizeof *bd);
        if (!eff || !bd)
            return -1;
    }

    int64_t lo = start + 1;
    const int simple = !need && !nu && m->small;
    if (simple && have_km && nper == 0) /* a full map of <= 16 paths without stripes: the seed map */
        *runs = choose(m, lo, stop, 1, 0, NULL, 0, NULL, 1, 0, periods, act, eff, bd);
    else if (simple)
        *runs = choose(m, lo, stop, 1, 0, NULL, 0, NULL, have_km, nper, periods, act, eff, bd);
    else
        *runs = choose(m, lo, stop, m->small, nu != NULL, nu, need != NULL, need, have_km, nper, periods, act, eff,
                       bd);

    /* The walk: literals up to each event, then the copy or the skip. */
    if (plan_push(pl, EXP, start, sym(m, start), 1) < 0)
        return -1;
    int64_t p = lo;
    while (p < stop) {
        int64_t e = p;
        while (e < stop && act[e] == 0)
            e++;
        for (int64_t j = p; j < e; j++)
            if (plan_push(pl, LIT, j, sym(m, j), 1) < 0)
                return -1;
        if (e >= stop)
            break;
        if (act[e] == 1) {
            if (plan_push(pl, REP, e, bd[e], eff[e]) < 0)
                return -1;
            p = e + eff[e];
        } else {
            int64_t nx = e;
            while (!need[nx])
                nx++;
            if (plan_push(pl, EXP, nx, sym(m, nx), 1) < 0)
                return -1;
            p = nx + 1;
        }
    }
    return 1;
}

/* ------------------------------------------------------------- RunsLayout */

/* One run's tokens: a literal (explicit at a span start), then R1 or literals for the rest. */
static inline int run_tokens(const map_t *m, int64_t head, int64_t end, int is_start, plan_t *pl, int64_t *total)
{
    int64_t v = sym(m, head), body = end - head - 1;
    int64_t lit = 2 + hexlen(v), rcost = 4 + hexlen(body);
    int use_r = rcost < body * lit;
    *total += lit + (is_start ? hexlen(head) : 0) + (use_r ? rcost : body * lit);
    if (!pl)
        return 0;
    if (plan_push(pl, is_start ? EXP : LIT, head, v, 1) < 0)
        return -1;
    if (use_r)
        return plan_push(pl, REP, head + 1, 1, body);
    for (int64_t j = 1; j <= body; j++)
        if (plan_push(pl, LIT, head + j, v, 1) < 0)
            return -1;
    return 0;
}

static int span_runs(const map_t *m, int64_t s, int64_t e, plan_t *pl, int64_t *total)
{
    for (int64_t i = s; i < e;) {
        int64_t j = i + 1;
        int32_t v = sym(m, i);
        while (j < e && sym(m, j) == v)
            j++;
        if (run_tokens(m, i, j, i == s, pl, total) < 0)
            return -1;
        i = j;
    }
    return 0;
}

/*
 * RunsLayout: total bytes (pl NULL) or the plan. Changed regions group
 * into spans; a gap is bridged with literals when they cost less than the
 * next span's explicit index.
 */
static int runs_layout(const map_t *m, plan_t *pl, int64_t *total)
{
    *total = 0;
    if (!m->need)
        return span_runs(m, 0, m->n, pl, total);
    int64_t s = -1, prev = -1;
    for (int64_t i = 0; i < m->n; i++) {
        if (!m->need[i])
            continue;
        if (s < 0) {
            s = i;
        } else if (lit_cost(m, prev + 1, i) >= hexlen(i)) {
            if (span_runs(m, s, prev + 1, pl, total) < 0)
                return -1;
            s = i;
        }
        prev = i;
    }
    return s < 0 ? 0 : span_runs(m, s, prev + 1, pl, total);
}

/* ------------------------------------------------------------- messages */

typedef struct {
    arena_t *arena;
    char *buf;
    int64_t len, cap;
} out_t;

static int out_room(out_t *o, int64_t more)
{
    if (o->len + more <= o->cap)
        return 0;
    int64_t cap = o->cap ? o->cap : 1 << 16;
    while (cap < o->len + more)
        cap *= 2;
    char *buf = scratch_grow(o->arena, S_OUT, (size_t)cap);
    if (!buf)
        return -1;
    o->buf = buf;
    o->cap = cap;
    return 0;
}

static inline void put_hex(out_t *o, int64_t v)
{
    static const char digits[] = "0123456789abcdef";
    char *p = o->buf + o->len;
    if (v < 16) { /* most paths, and most copy distances and counts */
        *p = digits[v];
        o->len++;
        return;
    }
    int L = hexlen(v);
    uint64_t u = (uint64_t)v;
    for (int j = L - 1; j >= 0; j--) {
        p[j] = digits[u & 15];
        u >>= 4;
    }
    o->len += L;
}

/* One token's text; there is room for it (out_room(o, 40)). */
static inline void put_token(out_t *o, int kind, int64_t pos, int64_t val, int64_t cnt)
{
    if (kind == REP) {
        o->buf[o->len++] = 'R';
        put_hex(o, val);
        o->buf[o->len++] = ',';
        put_hex(o, cnt);
        return;
    }
    if (kind == EXP)
        put_hex(o, pos);
    o->buf[o->len++] = ':';
    put_hex(o, val);
}

static int emit(PyObject *list, out_t *o)
{
    PyObject *s = PyUnicode_New(o->len, 127);
    if (!s)
        return -1;
    memcpy(PyUnicode_1BYTE_DATA(s), o->buf, (size_t)o->len);
    int rc = PyList_Append(list, s);
    Py_DECREF(s);
    o->len = 0;
    return rc;
}

/*
 * _messages: cut the plan into messages of at most `limit` bytes and
 * `max_tokens` argv entries, each opened by an explicit idx:v. Positions
 * are shifted by base here, as the encoder shifts the chosen plan.
 */
static PyObject *messages(const map_t *m, plan_t *pl, int64_t base, int64_t limit, int64_t max_tokens)
{
    int64_t ntok = pl->len;
    int64_t *pos = pl->pos, *val = pl->val, *cnt = pl->cnt;
    const int8_t *kind = pl->kind;
    int64_t maxend = 0;
    for (int64_t s = 0; s < ntok; s++) {
        pos[s] += base;
        int64_t end = pos[s] + cnt[s] - 1;
        if (end > maxend)
            maxend = end;
    }
    int64_t worst = hexlen(maxend) + 1 + hexlen(m->maxv);
    int64_t room0 = limit - PREFIX_LEN;
    if (worst > room0) {
        PyErr_Format(PyExc_ValueError, "max_message_bytes=%lld cannot hold even one token (needs %lld)",
                     (long long)limit, (long long)(PREFIX_LEN + worst));
        return NULL;
    }
    PyObject *list = PyList_New(0);
    out_t o = {m->arena, NULL, 0, 0};
    if (!list)
        return NULL;
    int64_t s = 0;
    while (s < ntok) {
        int64_t p = pos[s], hv = sym(m, p - base);
        int64_t budget = room0 - (hexlen(p) + 1 + hexlen(hv)); /* for " tok" pieces */
        int64_t nhead = 1;
        if (out_room(&o, PREFIX_LEN + 80) < 0)
            goto nomem;
        memcpy(o.buf, PREFIX, (size_t)PREFIX_LEN);
        o.len = PREFIX_LEN;
        put_token(&o, EXP, p, hv, 1);
        if (kind[s] == REP && cnt[s] > 1) {
            int64_t rc = 1 + hexlen(val[s]) + 1 + hexlen(cnt[s] - 1) + 1;
            if (rc > budget) {
                /* Only the opening token fits: the rest of the copy opens the next message. */
                pos[s] += 1;
                cnt[s] -= 1;
                if (emit(list, &o) < 0)
                    goto fail;
                continue;
            }
            o.buf[o.len++] = ' ';
            put_token(&o, REP, p + 1, val[s], cnt[s] - 1);
            budget -= rc;
            nhead = 2;
        }
        /* Tokens while they fit: each is written, and taken back if it went past the budget. */
        int64_t e = s + 1, end = o.len + (budget > 0 ? budget : 0);
        int64_t cap = min64(s + 1 + (max_tokens - 1 - nhead), ntok);
        while (e < cap) {
            if (out_room(&o, 64) < 0)
                goto nomem;
            int64_t mark = o.len;
            o.buf[o.len++] = ' ';
            put_token(&o, kind[e], pos[e], val[e], cnt[e]);
            if (o.len > end) {
                o.len = mark;
                break;
            }
            e++;
        }
        if (emit(list, &o) < 0)
            goto fail;
        s = e;
    }
    return list;
nomem:
    PyErr_NoMemory();
fail:
    Py_DECREF(list);
    return NULL;
}

/* ---------------------------------------------------------- entry point */

/* A 1-D C-contiguous buffer of `what`, or NULL with TypeError/ValueError set. */
static int get_buffer(PyObject *obj, Py_buffer *view, const char *what)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    if (view->ndim != 1) {
        PyErr_Format(PyExc_ValueError, "%s must be one-dimensional", what);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* Signed integer element of a buffer format ("b", "h", "i", "l", "q", optionally "<@="-prefixed). */
static int int_kind(const Py_buffer *v)
{
    const char *f = v->format ? v->format : "B";
    if (*f == '@' || *f == '=' || *f == '<')
        f++;
    if (f[1] != '\0' || !strchr("bhilq", f[0]))
        return 0;
    return (int)v->itemsize;
}

static int bool_mask(PyObject *obj, Py_buffer *view, int64_t n, const char *what, const uint8_t **out)
{
    *out = NULL;
    if (obj == Py_None)
        return 0;
    if (get_buffer(obj, view, what) < 0)
        return -1;
    if (view->itemsize != 1 || view->shape[0] != n) {
        PyErr_Format(PyExc_ValueError, "%s must be a bool array as long as the map", what);
        PyBuffer_Release(view);
        view->obj = NULL;
        return -1;
    }
    *out = view->buf;
    return 0;
}

PyDoc_STRVAR(encode_doc,
             "encode(t, need, unknown, base, max_message_bytes, max_tokens, sample) -> list[str]\n\n"
             "Plan and cut the messages for the target map t, as the pure-Python encoder does.\n"
             "See protocol/_dmswitch_encode.pyi.");

static PyObject *encode(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *t_obj, *need_obj, *unknown_obj, *sample_obj;
    long long base, limit, max_tokens;
    if (!PyArg_ParseTuple(args, "OOOLLLO:encode", &t_obj, &need_obj, &unknown_obj, &base, &limit, &max_tokens,
                          &sample_obj))
        return NULL;
    if (base < 0 || limit < 1 || max_tokens < 2) {
        PyErr_SetString(PyExc_ValueError, "base >= 0, max_message_bytes >= 1 and max_tokens >= 2");
        return NULL;
    }
    Py_buffer tv = {0}, nv = {0}, uv = {0}, sv = {0};
    PyObject *result = NULL;
    if (get_buffer(t_obj, &tv, "t") < 0)
        return NULL;
    arena_t *a = spare_arena ? spare_arena : calloc(1, sizeof *a);
    spare_arena = NULL;
    if (!a) {
        PyBuffer_Release(&tv);
        return PyErr_NoMemory();
    }
    plan_t lz = {a, S_PLAN, NULL, NULL, NULL, NULL, 0, 0, 0}, runs = {a, S_PLAN + 4, NULL, NULL, NULL, NULL, 0, 0, 0};
    map_t m = {0};
    m.arena = a;
    int width = int_kind(&tv);
    int64_t n = tv.shape[0];
    if (!width) {
        PyErr_SetString(PyExc_TypeError, "t must be a signed integer array");
        goto done;
    }
    if (n < 1 || n > MAX_REGIONS) {
        PyErr_Format(PyExc_ValueError, "t must hold 1 to %lld regions, not %lld", (long long)MAX_REGIONS,
                     (long long)n);
        goto done;
    }
    int32_t *t = scratch(a, S_T, (size_t)n * sizeof *t);
    if (!t) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t maxv = 0, minv = 0;
    if (width == 1) {
        /* Widened once: every loop below reads int32 without asking which width. */
        const int8_t *v8 = tv.buf;
        int32_t hi = 0, lo = 0;
        for (int64_t i = 0; i < n; i++) {
            t[i] = v8[i];
            hi = t[i] > hi ? t[i] : hi;
            lo = t[i] < lo ? t[i] : lo;
        }
        maxv = hi;
        minv = lo;
    } else {
        for (int64_t i = 0; i < n; i++) {
            int64_t v = width == 2 ? ((const int16_t *)tv.buf)[i]
                        : width == 4 ? ((const int32_t *)tv.buf)[i]
                                     : ((const int64_t *)tv.buf)[i];
            maxv = v > maxv ? v : maxv;
            minv = v < minv ? v : minv;
            t[i] = (int32_t)v;
        }
    }
    if (minv < 0 || maxv > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "t must hold paths (0 to 2**31-1), no holes");
        goto done;
    }
    if (bool_mask(need_obj, &nv, n, "need", &m.need) < 0 || bool_mask(unknown_obj, &uv, n, "unknown", &m.unknown) < 0)
        goto done;
    const int64_t *sample = NULL;
    int64_t nsample = 0;
    if (sample_obj != Py_None) {
        if (get_buffer(sample_obj, &sv, "sample") < 0)
            goto done;
        if (int_kind(&sv) != 8) {
            PyErr_SetString(PyExc_TypeError, "sample must be an int64 array");
            goto done;
        }
        sample = sv.buf;
        nsample = sv.shape[0];
        for (int64_t j = 0; j < nsample; j++)
            if (sample[j] < 0 || sample[j] >= n) {
                PyErr_SetString(PyExc_ValueError, "sample indexes a region beyond the map");
                goto done;
            }
    }
    m.t = t;
    m.n = n;
    m.maxv = (int32_t)maxv;
    m.small = maxv < 16;
    if (!m.small) {
        int64_t *litc = scratch(a, S_LITC, ((size_t)n + 1) * sizeof *litc);
        if (!litc) {
            PyErr_NoMemory();
            goto done;
        }
        litc[0] = 0;
        for (int64_t i = 0; i < n; i++)
            litc[i + 1] = litc[i] + 2 + hexlen(sym(&m, i));
        m.litc = litc;
    }

    int64_t nneed = n;
    if (m.need) {
        nneed = 0;
        for (int64_t i = 0; i < n; i++)
            nneed += m.need[i] != 0;
        if (nneed == 0) {
            result = PyList_New(0);
            goto done;
        }
    }
    /* Planning touches no Python object: other threads (the daemon's event loop) run meanwhile. */
    int have_lz = 0, failed = 0;
    int64_t nruns = 0;
    plan_t *plan = &lz;
    Py_BEGIN_ALLOW_THREADS;
    /* worth_matching: the match search does not repay a few changed pages of a big map. */
    if (!m.need || n <= 65536 || nneed * 32 >= n)
        have_lz = lz_plan(&m, &lz, sample, nsample, &nruns);
    failed = have_lz < 0;
    /* Each run start of the written range costs the runs plan at least 3 bytes. */
    if (!failed && (!have_lz || lz.total > 3 * nruns)) {
        int64_t total;
        runs_layout(&m, NULL, &total);
        if (!have_lz || total < lz.total) {
            failed = runs_layout(&m, &runs, &total) < 0;
            plan = &runs;
        }
    }
    Py_END_ALLOW_THREADS;
    if (failed) {
        PyErr_NoMemory();
        goto done;
    }
    result = messages(&m, plan, base, limit, max_tokens);
done:
    if (!spare_arena)
        spare_arena = a;
    else
        arena_free(a); /* another thread's call kept its own meanwhile */
    PyBuffer_Release(&tv);
    if (nv.obj)
        PyBuffer_Release(&nv);
    if (uv.obj)
        PyBuffer_Release(&uv);
    if (sv.obj)
        PyBuffer_Release(&sv);
    return result;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS, encode_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_dmswitch_encode",
    .m_doc = "The dm-switch set_region_mappings encoder's compiled core (see protocol.dmswitch_encoder).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__dmswitch_encode(void) { return PyModule_Create(&module); }
