/*
 * A program that knows nothing of samepage, in the manner of the kernel's
 * KSM selftests: it marks memory with madvise(MADV_MERGEABLE) and uses it
 * as any program would (writes, MADV_DONTNEED, munmap, mprotect,
 * MADV_UNMERGEABLE, fork), checking every byte. Run under
 * LD_PRELOAD=libsamepage_preload.so (samepage run): it waits until its
 * pages map the samepage pool (/proc/self/maps), so it fails if nothing
 * merges. Exit 0 when all of it held.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define P 4096
#define PAGES 256

static void fill(unsigned char *page, int content) {
    for (int j = 0; j < P; j++)
        page[j] = content < 0 ? 0 : (unsigned char)(content * 37 + j * 7 + 1);
}

static int want[PAGES];

static int check(unsigned char *mem, int from, int to) {
    unsigned char page[P];
    for (int i = from; i < to; i++) {
        fill(page, want[i]);
        if (memcmp(mem + (size_t)i * P, page, P) != 0) {
            fprintf(stderr, "page %d is wrong\n", i);
            return 0;
        }
    }
    return 1;
}

/* Bytes of [start, end) mapped from the samepage pool. */
static size_t pool_bytes(unsigned char *start, unsigned char *end) {
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    size_t n = 0;
    while (f && fgets(line, sizeof line, f)) {
        unsigned long s, e;
        if (strstr(line, "samepage-pool") && sscanf(line, "%lx-%lx", &s, &e) == 2 && s >= (unsigned long)start &&
            e <= (unsigned long)end)
            n += e - s;
    }
    if (f)
        fclose(f);
    return n;
}

#define FAIL(...) return fprintf(stderr, __VA_ARGS__), 1

int main(void) {
    unsigned char *a = mmap(NULL, (size_t)PAGES * P, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *shared = mmap(NULL, 16 * P, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED || shared == MAP_FAILED)
        FAIL("mmap\n");
    for (int i = 0; i < PAGES; i++) {
        want[i] = i % 4;
        fill(a + (size_t)i * P, want[i]);
    }
    if (madvise(a + 1, P, MADV_MERGEABLE) != -1 || errno != EINVAL)
        FAIL("an unaligned MADV_MERGEABLE did not fail with EINVAL\n");
    if (madvise(a, (size_t)PAGES * P, MADV_MERGEABLE) != 0)
        FAIL("MADV_MERGEABLE: %s\n", strerror(errno));
    /* Twice is no error, as in the kernel. */
    if (madvise(a, (size_t)PAGES * P, MADV_MERGEABLE) != 0)
        FAIL("MADV_MERGEABLE again: %s\n", strerror(errno));
    /* Shared memory cannot merge: left alone, no error. */
    if (madvise(shared, 16 * P, MADV_MERGEABLE) != 0)
        FAIL("MADV_MERGEABLE on shared memory: %s\n", strerror(errno));
    int tries = 0;
    while (pool_bytes(a, a + (size_t)PAGES * P) < (size_t)PAGES * P && tries++ < 3000)
        usleep(10000);
    if (pool_bytes(a, a + (size_t)PAGES * P) < (size_t)PAGES * P)
        FAIL("only %zu of %d pages merged\n", pool_bytes(a, a + (size_t)PAGES * P) / P, PAGES);
    printf("merged %d pages\n", PAGES);
    if (!check(a, 0, PAGES))
        return 1;
    /* A write to a merged page is the program's alone. */
    want[3] = 77;
    fill(a + 3 * P, 77);
    /* MADV_DONTNEED on a merged page: zeros, as on anonymous memory. */
    if (madvise(a + 10 * P, P, MADV_DONTNEED) != 0)
        FAIL("MADV_DONTNEED: %s\n", strerror(errno));
    want[10] = -1;
    if (!check(a, 0, PAGES))
        return 1;
    /* The second half goes away. */
    if (munmap(a + 128 * P, 128 * P) != 0)
        FAIL("munmap: %s\n", strerror(errno));
    /* The first quarter becomes read-only, content intact. */
    if (mprotect(a, 64 * P, PROT_READ) != 0)
        FAIL("mprotect: %s\n", strerror(errno));
    if (!check(a, 0, 128))
        return 1;
    /* MADV_UNMERGEABLE: the second quarter maps no pool page any more. */
    if (madvise(a + 64 * P, 64 * P, MADV_UNMERGEABLE) != 0)
        FAIL("MADV_UNMERGEABLE: %s\n", strerror(errno));
    if (pool_bytes(a + 64 * P, a + 128 * P) != 0)
        FAIL("MADV_UNMERGEABLE left %zu pool bytes\n", pool_bytes(a + 64 * P, a + 128 * P));
    if (!check(a, 0, 128))
        return 1;
    /* A forked child sees the same bytes. */
    pid_t pid = fork();
    if (pid == 0)
        _exit(check(a, 0, 128) ? 0 : 1);
    int status = 0;
    waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        FAIL("the child saw wrong memory\n");
    printf("ok\n");
    return 0;
}
