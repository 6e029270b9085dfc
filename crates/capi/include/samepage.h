/*
 * samepage.h: the samepage engine (Kernel Samepage Merging in userspace)
 * from C. Link with -lsamepage_c (libsamepage_c.so, built by the workspace:
 * `cargo build --release -p samepage-capi`).
 *
 * Every function returning int returns 0 on success or a negative errno
 * (-EINVAL for a bad argument, as the kernel's madvise/sysfs would);
 * samepage_last_error() then describes the failure of the calling thread's
 * last call. Tunables and counters carry the kernel's names and meanings
 * (Documentation/admin-guide/mm/ksm.rst).
 */
#ifndef SAMEPAGE_H
#define SAMEPAGE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* An engine: a scanner thread merging the memory registered with it. */
typedef struct samepage_engine samepage_engine;

/* The counters of /sys/kernel/mm/ksm, for this engine (or, connected to a
 * daemon, this process). */
typedef struct samepage_counters {
    uint64_t pages_shared;
    uint64_t pages_sharing;
    uint64_t pages_unshared;
    uint64_t pages_volatile;
    uint64_t pages_scanned;
    uint64_t pages_skipped;
    uint64_t full_scans;
    uint64_t stable_node_chains;
    uint64_t stable_node_dups;
    uint64_t ksm_zero_pages;
    int64_t general_profit;
} samepage_counters;

/* An engine of this process's own, with the kernel's default tunables
 * (run=0: nothing merges until samepage_set(e, "run", "1");
 * pages_to_scan=100, sleep_millisecs=20, max_page_sharing=256).
 * NULL on failure (errno set; samepage_last_error() says why). */
samepage_engine *samepage_new(void);

/* An engine merging with other processes through `samepage daemon` at
 * `socket` (NULL: the default socket) in trust domain `domain`.
 * NULL on failure (errno ENOENT or ECONNREFUSED: no daemon there). */
samepage_engine *samepage_connect(const char *socket, uint32_t domain);

/* Stops the engine; merged pages stay correct copy-on-write mappings. */
void samepage_free(samepage_engine *engine);

/* madvise(MADV_MERGEABLE): registers [addr, addr + len), private anonymous
 * read-write memory, page aligned. The memory must stay mapped, and not be
 * munmap'ed, mremap'ed or mprotect'ed, until unregistered. */
int samepage_register(samepage_engine *engine, void *addr, size_t len, uint32_t *region);

/* madvise(MADV_UNMERGEABLE) of a whole region: its pages become private
 * again, content intact. */
int samepage_unregister(samepage_engine *engine, uint32_t region);

/* Takes part of a region back, so the program may munmap, mremap or
 * mprotect it: its merged pages become private with their content intact. */
int samepage_unregister_range(samepage_engine *engine, void *addr, size_t len);

/* madvise(MADV_DONTNEED / MADV_FREE / MADV_REMOVE) on registered memory,
 * with the kernel's semantics on merged pages too (they read zeros after). */
int samepage_discard(samepage_engine *engine, void *addr, size_t len, int advice);

/* Merges [addr, addr + len) of registered memory now, whatever `run` says;
 * reports the pages merged and the bytes that saved (either may be NULL). */
int samepage_merge_now(samepage_engine *engine, void *addr, size_t len, uint64_t *pages, uint64_t *saved_bytes);

/* Writes a tunable by its /sys/kernel/mm/ksm name ("pages_to_scan",
 * "run", "max_page_sharing", ...), validated as the kernel does. */
int samepage_set(samepage_engine *engine, const char *name, const char *value);

/* Reads a tunable as its sysfs file shows it, NUL-terminated into buf;
 * -ERANGE if it does not fit, -ENOENT for an unknown name. */
int samepage_get(samepage_engine *engine, const char *name, char *buf, size_t len);

/* The counters now. */
int samepage_counters_get(samepage_engine *engine, samepage_counters *out);

/* What the calling thread's last failed call said (valid until its next
 * call into the library), or "" after a success. */
const char *samepage_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* SAMEPAGE_H */
