/*
 * A C program merging its own memory through samepage.h, as the kernel's
 * KSM selftests do with madvise(MADV_MERGEABLE): 256 pages holding 4
 * contents, registered, merged at full speed; it waits for the kernel's
 * counters (4 pages shared, 252 sharing), checks every byte, writes to a
 * merged page, discards one, and prints its counters as
 * /sys/kernel/mm/ksm names them. Exit 0 when all of it held.
 *
 *   cc -I crates/capi/include crates/capi/examples/merge.c \
 *      -L target/release -lsamepage_c -Wl,-rpath,target/release -o merge
 */
#include <samepage.h>

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGES 256

static void fill(unsigned char *page, int content) {
    for (int j = 0; j < 4096; j++)
        page[j] = (unsigned char)(content * 37 + j * 7 + 1);
}

static int check(unsigned char *mem, const int *want) {
    unsigned char page[4096];
    for (int i = 0; i < PAGES; i++) {
        if (want[i] < 0)
            memset(page, 0, sizeof page);
        else
            fill(page, want[i]);
        if (memcmp(mem + (size_t)i * 4096, page, 4096) != 0) {
            fprintf(stderr, "page %d is wrong\n", i);
            return 0;
        }
    }
    return 1;
}

int main(void) {
    size_t len = (size_t)PAGES * 4096;
    unsigned char *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return perror("mmap"), 1;
    int want[PAGES];
    for (int i = 0; i < PAGES; i++) {
        want[i] = i % 4;
        fill(mem + (size_t)i * 4096, want[i]);
    }
    samepage_engine *e = samepage_new();
    if (!e)
        return fprintf(stderr, "samepage_new: %s\n", samepage_last_error()), 1;
    /* The kernel's refusals: max_page_sharing must be 2 or more. */
    int r = samepage_set(e, "max_page_sharing", "1");
    if (r != -EINVAL)
        return fprintf(stderr, "max_page_sharing=1 gave %d: %s\n", r, samepage_last_error()), 1;
    printf("refused: %s\n", samepage_last_error());
    if (samepage_set(e, "pages_to_scan", "1000") || samepage_set(e, "sleep_millisecs", "0") ||
        samepage_set(e, "run", "1"))
        return fprintf(stderr, "samepage_set: %s\n", samepage_last_error()), 1;
    char value[32];
    if (samepage_get(e, "pages_to_scan", value, sizeof value))
        return fprintf(stderr, "samepage_get: %s\n", samepage_last_error()), 1;
    printf("pages_to_scan %s\n", value);
    uint32_t region;
    if (samepage_register(e, mem + 1, len, &region) != -EINVAL)
        return fprintf(stderr, "an unaligned range was accepted\n"), 1;
    if (samepage_register(e, mem, len, &region))
        return fprintf(stderr, "samepage_register: %s\n", samepage_last_error()), 1;
    samepage_counters c = {0};
    for (int tries = 0; tries < 3000; tries++) {
        samepage_counters_get(e, &c);
        if (c.pages_shared == 4 && c.pages_sharing == PAGES - 4)
            break;
        usleep(10000);
    }
    if (c.pages_shared != 4 || c.pages_sharing != PAGES - 4)
        return fprintf(stderr, "never merged: shared %lu sharing %lu\n", (unsigned long)c.pages_shared,
                       (unsigned long)c.pages_sharing), 1;
    if (!check(mem, want))
        return 1;
    /* A write to a merged page is the program's alone. */
    want[5] = 9;
    fill(mem + 5 * 4096, 9);
    /* A discarded merged page reads zeros, as anonymous memory does. */
    if (samepage_discard(e, mem + 6 * 4096, 4096, MADV_DONTNEED))
        return fprintf(stderr, "samepage_discard: %s\n", samepage_last_error()), 1;
    want[6] = -1;
    if (!check(mem, want))
        return 1;
    /* The written page's copy-on-write break and the discard leave 250
     * pages sharing the 4 stable pages once the engine has seen them. */
    for (int tries = 0; tries < 300; tries++) {
        samepage_counters_get(e, &c);
        if (c.pages_sharing == PAGES - 6)
            break;
        usleep(10000);
    }
    printf("pages_shared %lu\npages_sharing %lu\nfull_scans %lu\ngeneral_profit %ld\n", (unsigned long)c.pages_shared,
           (unsigned long)c.pages_sharing, (unsigned long)c.full_scans, (long)c.general_profit);
    if (samepage_unregister(e, region))
        return fprintf(stderr, "samepage_unregister: %s\n", samepage_last_error()), 1;
    if (!check(mem, want))
        return 1;
    samepage_free(e);
    munmap(mem, len);
    printf("ok\n");
    return 0;
}
