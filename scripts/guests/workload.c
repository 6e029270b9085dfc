/*
 * samepage guest workload.
 *
 * Runs as a static binary inside a QEMU guest (started by the initramfs
 * /init).  It fills a configurable amount of guest memory with deterministic
 * content that is identical across guests except for a per-guest unique
 * share, so that a host-side KSM (the kernel's ksmd, or samepage) can merge
 * guest RAM across QEMU processes.  Then, every few seconds, it
 *   1. verifies every page against the expected per-page hash it keeps,
 *   2. rewrites ("churns") a small fraction of pages with new content,
 *   3. reads part of the disk with O_DIRECT into a buffer in its own memory
 *      and checks every block against the deterministic disk content,
 * and prints machine-readable lines ("SAMEPAGE-GUEST ...") on stdout, which
 * /init points at the serial console.
 *
 * Parameters come from /proc/cmdline as sp.KEY=VALUE (and may be overridden
 * by KEY=VALUE or sp.KEY=VALUE arguments, which is how the host-side
 * self-test drives it):
 *   sp.mem=192        MiB of workload memory
 *   sp.seed=1         per-guest seed (only the unique share depends on it)
 *   sp.zero=25        percent of pages that are zero
 *   sp.dup=50         percent of pages that are copies of sp.distinct pages
 *   sp.distinct=1000  number of distinct pages the dup share is made of
 *   sp.unique=10      percent of pages unique per guest (depend on sp.seed)
 *                     (the rest are "common": distinct within a guest but
 *                      identical across guests)
 *   sp.churn=0.1      percent of pages rewritten per round (0 = none)
 *   sp.interval=5     seconds to sleep between rounds
 *   sp.verify=100     percent of pages verified per round (rotating window)
 *   sp.disk=/dev/vda  disk to read with O_DIRECT ("none" to skip)
 *   sp.diskmb=8       MiB of disk read per round (rotating window)
 *   sp.bufkb=1024     size of the O_DIRECT buffer (KiB, multiple of 4)
 *   sp.rounds=0       stop after this many rounds (0 = run forever)
 *   sp.corrupt=-1     test hook: after round 1, flip one byte of this page
 *                     without updating its hash (round 2 must report FAIL)
 *
 * Other entry points (used by build.sh on the host):
 *   workload --gen-disk PATH MIB   write the deterministic disk image
 *   workload --selftest [KEY=VAL]  run a few fast rounds (no disk by default)
 *
 * Exit status: 0 after sp.rounds rounds without error, 1 if any check
 * failed, 2 on a setup error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)

#define TAG_DUP 0x4455500000000001ULL
#define TAG_COMMON 0x434f4d0000000002ULL
#define TAG_UNIQUE 0x554e490000000003ULL
#define TAG_DISK 0x4449534b00000004ULL
#define TAG_LAYOUT 0x4c41590000000005ULL
#define TAG_CHURN 0x4348520000000006ULL
#define POISON 0x504f49534f4e0000ULL /* "POISON" in the top bytes */

enum { C_ZERO = 0, C_DUP = 1, C_COMMON = 2, C_UNIQUE = 3 };
static const char *cls_name[] = {"zero", "dup", "common", "unique"};

/* ---------------------------------------------------------------- params */

struct params {
    uint64_t mem_mib;
    uint64_t seed;
    double zero, dup, unique;
    uint64_t distinct;
    double churn;
    double interval;
    double verify;
    char disk[256];
    uint64_t diskmb;
    uint64_t bufkb;
    uint64_t rounds;
    int64_t corrupt;
};

static struct params P = {
    .mem_mib = 192, .seed = 1, .zero = 25, .dup = 50, .unique = 10,
    .distinct = 1000, .churn = 0.1, .interval = 5, .verify = 100,
    .disk = "/dev/vda", .diskmb = 8, .bufkb = 1024, .rounds = 0,
    .corrupt = -1,
};

static void set_param(const char *kv)
{
    if (strncmp(kv, "sp.", 3) == 0)
        kv += 3;
    const char *eq = strchr(kv, '=');
    if (!eq)
        return;
    size_t kl = (size_t)(eq - kv);
    const char *v = eq + 1;
#define K(name) (kl == strlen(name) && strncmp(kv, name, kl) == 0)
    if (K("mem")) P.mem_mib = strtoull(v, NULL, 0);
    else if (K("seed")) P.seed = strtoull(v, NULL, 0);
    else if (K("zero")) P.zero = strtod(v, NULL);
    else if (K("dup")) P.dup = strtod(v, NULL);
    else if (K("unique")) P.unique = strtod(v, NULL);
    else if (K("distinct")) P.distinct = strtoull(v, NULL, 0);
    else if (K("churn")) P.churn = strtod(v, NULL);
    else if (K("interval")) P.interval = strtod(v, NULL);
    else if (K("verify")) P.verify = strtod(v, NULL);
    else if (K("disk")) snprintf(P.disk, sizeof P.disk, "%s", v);
    else if (K("diskmb")) P.diskmb = strtoull(v, NULL, 0);
    else if (K("bufkb")) P.bufkb = strtoull(v, NULL, 0);
    else if (K("rounds")) P.rounds = strtoull(v, NULL, 0);
    else if (K("corrupt")) P.corrupt = strtoll(v, NULL, 0);
#undef K
}

static void read_cmdline(void)
{
    static char buf[4096];
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd < 0)
        return;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return;
    buf[n] = 0;
    for (char *save = NULL, *t = strtok_r(buf, " \t\n", &save); t;
         t = strtok_r(NULL, " \t\n", &save))
        if (strncmp(t, "sp.", 3) == 0)
            set_param(t);
}

/* ------------------------------------------------------------- helpers */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static double uptime_s(void)
{
    char b[64] = {0};
    int fd = open("/proc/uptime", O_RDONLY);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, b, sizeof b - 1);
    close(fd);
    return n > 0 ? strtod(b, NULL) : -1;
}

#define OUT(...)                                                             \
    do {                                                                     \
        printf("SAMEPAGE-GUEST " __VA_ARGS__);                               \
        fflush(stdout);                                                      \
    } while (0)

static inline uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline uint64_t mix2(uint64_t a, uint64_t b)
{
    uint64_t s = a ^ (b * 0xD6E8FEB86659FD93ULL);
    return splitmix(&s);
}

static inline uint64_t key4(uint64_t tag, uint64_t a, uint64_t b, uint64_t c)
{
    return mix2(mix2(mix2(tag, a), b), c);
}

static inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static void gen_page(uint64_t *p, uint64_t key)
{
    uint64_t s = key;
    for (int j = 0; j < WORDS; j++)
        p[j] = splitmix(&s);
}

/* Four independent lanes of h = (h ^ w) * odd: every step is a bijection of
 * h for a fixed w, so any single changed word changes the result. */
static uint64_t hash_page(const uint64_t *p)
{
    const uint64_t M = 0x9E3779B97F4A7C15ULL;
    uint64_t h0 = 1, h1 = 2, h2 = 3, h3 = 4;
    for (int j = 0; j < WORDS; j += 4) {
        h0 = (h0 ^ p[j]) * M;
        h1 = (h1 ^ p[j + 1]) * M;
        h2 = (h2 ^ p[j + 2]) * M;
        h3 = (h3 ^ p[j + 3]) * M;
    }
    return h0 + rotl(h1, 17) + rotl(h2, 31) + rotl(h3, 47);
}

/* ------------------------------------------------------------ workload */

static uint8_t *mem;        /* the workload memory */
static uint64_t npages;
static uint8_t *cls;        /* class per page */
static uint32_t *par;       /* dup pattern index, or unique version */
static uint64_t *expect;    /* expected hash per page */
static uint64_t *dup_hash;  /* hash of each distinct dup page */
static uint64_t zero_hash;
static uint64_t counts[4];

static inline uint64_t *page_at(uint64_t i) { return (uint64_t *)(mem + i * PAGE); }

static uint64_t content_key(uint64_t i)
{
    switch (cls[i]) {
    case C_DUP: return key4(TAG_DUP, par[i], 0, 0);
    case C_COMMON: return key4(TAG_COMMON, i, 0, 0);
    case C_UNIQUE: return key4(TAG_UNIQUE, P.seed, i, par[i]);
    }
    return 0;
}

/* Write page i's content according to cls/par and record its hash. */
static void write_page(uint64_t i)
{
    uint64_t *p = page_at(i);
    switch (cls[i]) {
    case C_ZERO:
        memset(p, 0, PAGE);
        expect[i] = zero_hash;
        break;
    case C_DUP:
        gen_page(p, content_key(i));
        expect[i] = dup_hash[par[i]];
        break;
    default:
        gen_page(p, content_key(i));
        expect[i] = hash_page(p);
        break;
    }
}

static void *xmmap(size_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) {
        OUT("error what=mmap bytes=%zu errno=%d (%s)\n", len, errno, strerror(errno));
        exit(2);
    }
    return p;
}

static void setup(void)
{
    npages = P.mem_mib * 1024 * 1024 / PAGE;
    if (npages == 0 || P.distinct == 0 || P.zero + P.dup + P.unique > 100.0001) {
        OUT("error what=params mem=%" PRIu64 " zero=%g dup=%g unique=%g distinct=%" PRIu64 "\n",
            P.mem_mib, P.zero, P.dup, P.unique, P.distinct);
        exit(2);
    }
    mem = xmmap(npages * PAGE);
    cls = xmmap(npages);
    par = xmmap(npages * sizeof *par);
    expect = xmmap(npages * sizeof *expect);
    dup_hash = xmmap(P.distinct * sizeof *dup_hash);

    static uint64_t scratch[WORDS];
    memset(scratch, 0, PAGE);
    zero_hash = hash_page(scratch);
    for (uint64_t k = 0; k < P.distinct; k++) {
        gen_page(scratch, key4(TAG_DUP, k, 0, 0));
        dup_hash[k] = hash_page(scratch);
    }

    /* Exact class counts, laid out by a fixed (seed-independent) shuffle. */
    uint64_t nz = (uint64_t)(npages * P.zero / 100.0);
    uint64_t nd = (uint64_t)(npages * P.dup / 100.0);
    uint64_t nu = (uint64_t)(npages * P.unique / 100.0);
    if (nz + nd + nu > npages)
        nu = npages - nz - nd;
    uint64_t nc = npages - nz - nd - nu;
    counts[C_ZERO] = nz; counts[C_DUP] = nd; counts[C_COMMON] = nc; counts[C_UNIQUE] = nu;
    uint64_t i = 0, d = 0;
    for (; i < nz; i++) cls[i] = C_ZERO;
    for (; i < nz + nd; i++) cls[i] = C_DUP;
    for (; i < nz + nd + nc; i++) cls[i] = C_COMMON;
    for (; i < npages; i++) cls[i] = C_UNIQUE;
    uint64_t s = TAG_LAYOUT;
    for (uint64_t j = npages - 1; j > 0; j--) {
        uint64_t r = splitmix(&s) % (j + 1);
        uint8_t t = cls[j]; cls[j] = cls[r]; cls[r] = t;
    }
    /* dup patterns round-robin over the dup pages: counts differ by <= 1 */
    for (i = 0; i < npages; i++)
        par[i] = cls[i] == C_DUP ? (uint32_t)(d++ % P.distinct) : 0;
    for (i = 0; i < npages; i++)
        write_page(i);
}

static uint64_t total_sum(void)
{
    uint64_t h = 0;
    for (uint64_t i = 0; i < npages; i++)
        h = rotl(h, 7) ^ (expect[i] + i);
    return h;
}

static uint64_t verify_pos;

/* Verify a rotating window of pages; returns the number of bad pages. */
static uint64_t verify(uint64_t round, uint64_t *checked)
{
    uint64_t n = (uint64_t)(npages * P.verify / 100.0 + 0.5);
    if (n == 0 || n > npages)
        n = npages;
    uint64_t bad = 0;
    static uint64_t scratch[WORDS];
    for (uint64_t k = 0; k < n; k++) {
        uint64_t i = verify_pos;
        verify_pos = (verify_pos + 1) % npages;
        uint64_t h = hash_page(page_at(i));
        if (h == expect[i])
            continue;
        if (++bad > 8)
            continue;
        /* Describe the damage: first differing word, how many differ, and
         * whether the page now looks like a zero page or some dup page. */
        const uint64_t *p = page_at(i);
        if (cls[i] == C_ZERO)
            memset(scratch, 0, PAGE);
        else
            gen_page(scratch, content_key(i));
        int first = -1, ndiff = 0;
        for (int j = 0; j < WORDS; j++)
            if (p[j] != scratch[j]) {
                if (first < 0) first = j;
                ndiff++;
            }
        char looks[48] = "other";
        if (h == zero_hash)
            snprintf(looks, sizeof looks, "zero");
        else
            for (uint64_t q = 0; q < P.distinct; q++)
                if (dup_hash[q] == h) {
                    snprintf(looks, sizeof looks, "dup:%" PRIu64, q);
                    break;
                }
        OUT("check FAIL round=%" PRIu64 " page=%" PRIu64 " class=%s par=%u "
            "expect=%016" PRIx64 " got=%016" PRIx64 " first_word=%d diff_words=%d "
            "word=%016" PRIx64 " want=%016" PRIx64 " looks_like=%s\n",
            round, i, cls_name[cls[i]], par[i], expect[i], h, first, ndiff,
            first >= 0 ? p[first] : 0, first >= 0 ? scratch[first] : 0, looks);
    }
    *checked = n;
    return bad;
}

static uint64_t churn(uint64_t round)
{
    if (P.churn <= 0)
        return 0;
    uint64_t n = (uint64_t)(npages * P.churn / 100.0);
    if (n == 0)
        n = 1;
    uint64_t s = key4(TAG_CHURN, P.seed, round, 0);
    for (uint64_t k = 0; k < n; k++) {
        uint64_t i = splitmix(&s) % npages;
        switch (cls[i]) {
        case C_DUP:
            if (P.distinct > 1)
                par[i] = (uint32_t)((par[i] + 1 + splitmix(&s) % (P.distinct - 1)) % P.distinct);
            break;
        case C_UNIQUE:
            par[i]++;
            break;
        default: /* zero and common pages are rewritten with the same content */
            break;
        }
        write_page(i);
    }
    return n;
}

/* -------------------------------------------------------------- disk */

static uint64_t disk_word0(uint64_t block) { return key4(TAG_DISK, block, 0, 0); }

static int disk_fd = -1;
static uint64_t disk_bytes, disk_pos;
static uint8_t *dbuf;
static size_t dbuf_len;

static int disk_open(void)
{
    if (strcmp(P.disk, "none") == 0 || P.disk[0] == 0)
        return 0;
    disk_fd = open(P.disk, O_RDONLY | O_DIRECT);
    if (disk_fd < 0) {
        OUT("error what=disk-open disk=%s errno=%d (%s)\n", P.disk, errno, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(disk_fd, &st) == 0 && S_ISBLK(st.st_mode)) {
        if (ioctl(disk_fd, BLKGETSIZE64, &disk_bytes) != 0)
            disk_bytes = 0;
    } else {
        disk_bytes = (uint64_t)lseek(disk_fd, 0, SEEK_END);
    }
    disk_bytes -= disk_bytes % PAGE;
    if (disk_bytes == 0) {
        OUT("error what=disk-size disk=%s\n", P.disk);
        return -1;
    }
    dbuf_len = (size_t)P.bufkb * 1024;
    dbuf_len -= dbuf_len % PAGE;
    if (dbuf_len == 0)
        dbuf_len = PAGE;
    if (dbuf_len > disk_bytes)
        dbuf_len = disk_bytes;
    dbuf = xmmap(dbuf_len); /* page-aligned, part of the workload's memory */
    return 0;
}

/* Read sp.diskmb MiB (rotating) with O_DIRECT and check every block.
 * Returns the number of bad blocks (or failed reads). */
static uint64_t disk_check(uint64_t round, uint64_t *off_out, uint64_t *bytes_out)
{
    uint64_t want = P.diskmb * 1024 * 1024;
    if (want == 0 || want > disk_bytes)
        want = disk_bytes;
    uint64_t done = 0, bad = 0;
    *off_out = disk_pos;
    while (done < want) {
        size_t len = dbuf_len;
        if (disk_pos + len > disk_bytes)
            len = (size_t)(disk_bytes - disk_pos);
        if (len > want - done)
            len = (size_t)(want - done);
        /* Poison the buffer (same bytes in every guest, so it is mergeable
         * too) so a read that silently did not land cannot pass. */
        uint64_t *w = (uint64_t *)dbuf;
        for (size_t j = 0; j < len / 8; j++)
            w[j] = POISON | (j & 0xffff);
        ssize_t n = pread(disk_fd, dbuf, len, (off_t)disk_pos);
        if (n != (ssize_t)len) {
            OUT("disk FAIL round=%" PRIu64 " what=pread off=%" PRIu64 " len=%zu ret=%zd errno=%d (%s)\n",
                round, disk_pos, len, n, n < 0 ? errno : 0, n < 0 ? strerror(errno) : "short");
            bad++;
        } else {
            for (size_t b = 0; b < len / PAGE; b++) {
                uint64_t block = disk_pos / PAGE + b;
                const uint64_t *p = (const uint64_t *)(dbuf + b * PAGE);
                uint64_t s = disk_word0(block);
                int first = -1, ndiff = 0;
                uint64_t got = 0, exp = 0;
                for (int j = 0; j < WORDS; j++) {
                    uint64_t e = splitmix(&s);
                    if (p[j] != e) {
                        if (first < 0) { first = j; got = p[j]; exp = e; }
                        ndiff++;
                    }
                }
                if (ndiff) {
                    if (++bad <= 8)
                        OUT("disk FAIL round=%" PRIu64 " block=%" PRIu64 " first_word=%d diff_words=%d "
                            "got=%016" PRIx64 " want=%016" PRIx64 " poison=%d\n",
                            round, block, first, ndiff, got, exp,
                            (got & 0xffffffffffff0000ULL) == POISON);
                }
            }
        }
        done += len;
        disk_pos = (disk_pos + len) % disk_bytes;
    }
    *bytes_out = done;
    return bad;
}

static int gen_disk(const char *path, uint64_t mib)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        perror(path);
        return 2;
    }
    static uint64_t buf[256 * WORDS]; /* 1 MiB */
    uint64_t blocks = mib * 1024 * 1024 / PAGE;
    for (uint64_t b = 0; b < blocks; b += 256) {
        for (int k = 0; k < 256; k++) {
            uint64_t s = disk_word0(b + k);
            for (int j = 0; j < WORDS; j++)
                buf[k * WORDS + j] = splitmix(&s);
        }
        if (write(fd, buf, sizeof buf) != (ssize_t)sizeof buf) {
            perror("write");
            return 2;
        }
    }
    if (close(fd) != 0) {
        perror("close");
        return 2;
    }
    return 0;
}

/* ---------------------------------------------------------------- main */

int main(int argc, char **argv)
{
    if (argc >= 4 && strcmp(argv[1], "--gen-disk") == 0)
        return gen_disk(argv[2], strtoull(argv[3], NULL, 0));
    int selftest = argc >= 2 && strcmp(argv[1], "--selftest") == 0;
    if (selftest) {
        P.mem_mib = 16; P.interval = 0; P.rounds = 3; P.churn = 1;
        snprintf(P.disk, sizeof P.disk, "none");
    } else {
        read_cmdline();
    }
    for (int a = selftest ? 2 : 1; a < argc; a++)
        set_param(argv[a]);
    setvbuf(stdout, NULL, _IOLBF, 0);

    OUT("start seed=%" PRIu64 " mem_mib=%" PRIu64 " zero=%g dup=%g unique=%g distinct=%" PRIu64
        " churn=%g interval=%g verify=%g disk=%s diskmb=%" PRIu64 " uptime=%.2f\n",
        P.seed, P.mem_mib, P.zero, P.dup, P.unique, P.distinct, P.churn, P.interval,
        P.verify, P.disk, P.diskmb, uptime_s());
    double t0 = now_s();
    setup();
    double t1 = now_s();
    if (disk_open() != 0)
        return 2;
    OUT("ready seed=%" PRIu64 " pages=%" PRIu64 " zero=%" PRIu64 " dup=%" PRIu64
        " common=%" PRIu64 " unique=%" PRIu64 " distinct=%" PRIu64 " disk_bytes=%" PRIu64
        " sum=%016" PRIx64 " fill_ms=%.0f uptime=%.2f\n",
        P.seed, npages, counts[C_ZERO], counts[C_DUP], counts[C_COMMON], counts[C_UNIQUE],
        P.distinct, disk_bytes, total_sum(), (t1 - t0) * 1e3, uptime_s());

    uint64_t total_bad = 0;
    for (uint64_t round = 1; P.rounds == 0 || round <= P.rounds; round++) {
        double a = now_s();
        uint64_t checked = 0;
        uint64_t bad = verify(round, &checked);
        double b = now_s();
        if (bad)
            OUT("check FAIL round=%" PRIu64 " bad_pages=%" PRIu64 " checked=%" PRIu64 "\n",
                round, bad, checked);
        else
            OUT("check ok round=%" PRIu64 " checked=%" PRIu64 " ms=%.0f sum=%016" PRIx64 "\n",
                round, checked, (b - a) * 1e3, total_sum());
        uint64_t churned = churn(round);
        if (round == 1 && P.corrupt >= 0 && (uint64_t)P.corrupt < npages) {
            mem[(uint64_t)P.corrupt * PAGE + 123] ^= 0x5a;
            OUT("corrupted page=%" PRId64 " (test hook)\n", P.corrupt);
        }
        double c = now_s();
        if (churned)
            OUT("churn round=%" PRIu64 " pages=%" PRIu64 " ms=%.0f\n", round, churned, (c - b) * 1e3);
        total_bad += bad;
        if (disk_fd >= 0) {
            uint64_t off = 0, bytes = 0;
            uint64_t dbad = disk_check(round, &off, &bytes);
            double d = now_s();
            if (dbad)
                OUT("disk FAIL round=%" PRIu64 " bad_blocks=%" PRIu64 " off=%" PRIu64 " bytes=%" PRIu64 "\n",
                    round, dbad, off, bytes);
            else
                OUT("disk ok round=%" PRIu64 " off=%" PRIu64 " bytes=%" PRIu64 " ms=%.0f\n",
                    round, off, bytes, (d - c) * 1e3);
            total_bad += dbad;
        }
        if (P.interval > 0 && (P.rounds == 0 || round < P.rounds)) {
            struct timespec ts = {(time_t)P.interval,
                                  (long)((P.interval - (double)(time_t)P.interval) * 1e9)};
            while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
                ;
        }
    }
    OUT("done rounds=%" PRIu64 " failures=%" PRIu64 "\n", P.rounds, total_bad);
    return total_bad ? 1 : 0;
}
