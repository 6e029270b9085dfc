/* Program behaviours that must keep working, byte for byte, under
 * `samepage run --merge-any` (issue: unmodified programs). Each mode checks
 * its own memory and prints one line "ok <mode> <digest>"; the digest is the
 * same with and without samepage (content is deterministic), and the exit
 * status is 0 only if every check passed.
 *
 *   behaviours mt-malloc SECONDS   4 threads malloc/realloc/free blocks of
 *                                  16 B - 1 MiB with duplicate content, and
 *                                  check every live block again and again
 *   behaviours fork-exec DEPTH     fill duplicate pages, fork a child that
 *                                  checks them and execs this program one
 *                                  level down, then the same through
 *                                  posix_spawn (vfork), check again
 *   (mt-malloc also takes a SIGALRM every 2 ms, SA_RESTART, on every thread)
 *   behaviours uffd                the program's own userfaultfd (missing
 *                                  faults served with UFFDIO_COPY by a
 *                                  thread of its own) next to duplicates
 *   behaviours seccomp             the program's own seccomp filter (getppid
 *                                  fails with EPERM), then duplicates
 *   behaviours madvise PAGES       PAGES duplicate pages (64 contents) marked
 *                                  madvise(MADV_MERGEABLE), as the kernel's
 *                                  KSM selftests do: the same program runs
 *                                  under ksmd or under `samepage run`; then
 *                                  a write to every 8th page (copy-on-write)
 *   behaviours fork-trim N         8 MiB of duplicates marked MADV_MERGEABLE;
 *                                  a thread mallocs and frees 256 KiB blocks
 *                                  from its own arena's heap, which glibc
 *                                  trims (MADV_DONTNEED) under the arena's
 *                                  lock, while the main thread forks N
 *                                  children (each checks the duplicates and
 *                                  exits)
 *   behaviours fork-brk N          the same with one arena (M_ARENA_MAX 1):
 *                                  the main heap, trimmed with brk
 *   behaviours fork-at-start N     fork N children, one every 100 us from
 *                                  the moment the program starts (while the
 *                                  library makes its engine); each marks 64
 *                                  duplicate pages MADV_MERGEABLE, checks
 *                                  them and exits; a child that hangs hangs
 *                                  the program
 *
 * Build: cc -O2 -pthread -o behaviours behaviours.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
static int failed;

static uint64_t mix(uint64_t x) {
	x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL;
	return x ^ (x >> 33);
}

/* Page `k` of the duplicate pattern: 64 distinct contents. */
static void fill_page(unsigned char *p, uint64_t k) {
	uint64_t *w = (uint64_t *)p;
	for (int i = 0; i < PAGE / 8; i++) w[i] = mix((k % 64) * 1000003 + i);
}

static int check_page(const unsigned char *p, uint64_t k) {
	const uint64_t *w = (const uint64_t *)p;
	for (int i = 0; i < PAGE / 8; i++)
		if (w[i] != mix((k % 64) * 1000003 + i)) return 0;
	return 1;
}

static uint64_t digest(const unsigned char *p, size_t n, uint64_t h) {
	for (size_t i = 0; i < n; i += 8) h = mix(h ^ *(const uint64_t *)(p + i));
	return h;
}

static void fail(const char *what) {
	fprintf(stderr, "FAILED: %s\n", what);
	failed = 1;
}

/* A region of `pages` duplicate pages, filled and checked. */
static unsigned char *dups(size_t pages) {
	unsigned char *p = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) { perror("mmap"); exit(2); }
	for (size_t i = 0; i < pages; i++) fill_page(p + i * PAGE, i);
	return p;
}

static void check_dups(const unsigned char *p, size_t pages, const char *what) {
	for (size_t i = 0; i < pages; i++)
		if (!check_page(p + i * PAGE, i)) { fail(what); return; }
}

/* Long enough for the engine to merge (its sweep runs every 500 ms). */
static void settle(double s) {
	struct timespec t = { (time_t)s, (long)((s - (time_t)s) * 1e9) };
	while (nanosleep(&t, &t) && errno == EINTR) {}
}

static long pss_kib(void) {
	FILE *f = fopen("/proc/self/smaps_rollup", "r");
	char line[256];
	long v = -1;
	while (f && fgets(line, sizeof line, f))
		if (!strncmp(line, "Pss:", 4)) v = atol(line + 4);
	if (f) fclose(f);
	return v;
}

/* Waits `s` seconds and tells on stderr what merging freed: the Pss taken
 * before `pages` pages were filled (`base`), plus those pages, minus the Pss
 * now: "freed_kib N". */
static void settle_and_tell(long base, size_t pages, double s) {
	settle(s);
	fprintf(stderr, "freed_kib %ld\n", base + (long)(pages * PAGE / 1024) - pss_kib());
}

/* ---- mt-malloc ---- */
#define SLOTS 256
struct block { unsigned char *p; size_t n; uint64_t seed; };
static double mt_seconds;

static void fill_block(struct block *b) {
	for (size_t i = 0; i + 8 <= b->n; i += 8) *(uint64_t *)(b->p + i) = mix(b->seed * 131 + i / PAGE);
}

static int check_block(const struct block *b) {
	for (size_t i = 0; i + 8 <= b->n; i += 8)
		if (*(const uint64_t *)(b->p + i) != mix(b->seed * 131 + i / PAGE)) return 0;
	return 1;
}

static void *mt_thread(void *arg) {
	int id = (int)(intptr_t)arg;
	struct block slot[SLOTS] = { 0 };
	uint64_t r = mix(id + 1), ops = 0;
	struct timespec t0, t;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		clock_gettime(CLOCK_MONOTONIC, &t);
		if ((t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 > mt_seconds) break;
		for (int k = 0; k < 64; k++) {
			r = mix(r);
			struct block *b = &slot[r % SLOTS];
			int op = (r >> 20) % 4;
			size_t n = 16 << ((r >> 24) % 17); /* 16 B - 1 MiB */
			if (b->p && !check_block(b)) { fail("mt-malloc: a live block changed"); return NULL; }
			if (op == 0 && b->p) { free(b->p); b->p = NULL; }
			else if (op == 1 && b->p) {
				unsigned char *q = realloc(b->p, n);
				if (!q) { fail("realloc"); return NULL; }
				size_t keep = b->n < n ? b->n : n;
				b->p = q;
				struct block old = *b; old.n = keep & ~(size_t)7;
				if (!check_block(&old)) { fail("mt-malloc: realloc lost content"); return NULL; }
				b->n = n; fill_block(b);
			} else {
				if (b->p) free(b->p);
				b->p = malloc(n); b->n = n; b->seed = (r >> 40) % 32; /* duplicates */
				if (!b->p) { fail("malloc"); return NULL; }
				fill_block(b);
			}
			ops++;
		}
		if (ops % 4096 == 0) settle(0.01);
	}
	for (int i = 0; i < SLOTS; i++)
		if (slot[i].p) {
			if (!check_block(&slot[i])) fail("mt-malloc: final check");
			free(slot[i].p);
		}
	return NULL;
}

static volatile sig_atomic_t alarms;
static void on_alarm(int sig) { (void)sig; alarms++; }

static int mt_malloc(double seconds) {
	pthread_t th[4];
	mt_seconds = seconds;
	/* Signals every 2 ms land on the threads mid-call (a call stopped by
	 * samepage's filter is interrupted, and restarted: SA_RESTART). */
	struct sigaction sa = { 0 };
	sa.sa_handler = on_alarm;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGALRM, &sa, NULL);
	struct itimerval it = { { 0, 2000 }, { 0, 2000 } };
	setitimer(ITIMER_REAL, &it, NULL);
	for (int i = 0; i < 4; i++) pthread_create(&th[i], NULL, mt_thread, (void *)(intptr_t)i);
	for (int i = 0; i < 4; i++) pthread_join(th[i], NULL);
	struct itimerval off = { { 0, 0 }, { 0, 0 } };
	setitimer(ITIMER_REAL, &off, NULL);
	if (alarms < 10) fail("mt-malloc: the timer signals did not come");
	/* The final set of blocks depends on timing; the digest is of the
	 * pattern only, so it is the same with and without samepage. */
	long base = pss_kib();
	unsigned char *d = dups(256);
	settle_and_tell(base, 256, 1.5);
	check_dups(d, 256, "mt-malloc: duplicates");
	printf("ok mt-malloc %016llx\n", (unsigned long long)digest(d, 256 * PAGE, 0));
	return failed;
}

/* ---- fork-exec ---- */
static int fork_exec(const char *self, int depth) {
	size_t pages = 2048;
	long base = pss_kib();
	unsigned char *d = dups(pages);
	if (depth > 0) settle_and_tell(base, pages, 1.5);
	check_dups(d, pages, "fork-exec: before fork");
	uint64_t h = digest(d, pages * PAGE, depth);
	if (depth > 0) {
		char arg[16];
		snprintf(arg, sizeof arg, "%d", depth - 1);
		pid_t pid = fork();
		if (pid == 0) {
			check_dups(d, pages, "fork-exec: in the child");
			d[5] ^= 1; /* the child's write is its own */
			if (failed) _exit(1);
			int out = open("/dev/null", O_WRONLY);
			dup2(out, 1);
			execl(self, self, "fork-exec", arg, (char *)NULL);
			_exit(3);
		}
		int st;
		waitpid(pid, &st, 0);
		if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) fail("fork-exec: the child failed");
		/* posix_spawn (glibc: clone(CLONE_VM|CLONE_VFORK)): the child runs on
		 * this process's memory until it execs. */
		char *argv[] = { (char *)self, "fork-exec", arg, NULL };
		posix_spawn_file_actions_t fa;
		posix_spawn_file_actions_init(&fa);
		posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
		extern char **environ;
		if (posix_spawn(&pid, self, &fa, NULL, argv, environ)) fail("fork-exec: posix_spawn");
		else {
			waitpid(pid, &st, 0);
			if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) fail("fork-exec: the spawned child failed");
		}
		posix_spawn_file_actions_destroy(&fa);
	}
	check_dups(d, pages, "fork-exec: after the child");
	printf("ok fork-exec %016llx\n", (unsigned long long)h);
	return failed;
}

/* ---- uffd ---- */
static int uffd_fd;
static unsigned char *uffd_area;
static size_t uffd_pages = 64;

static void *uffd_server(void *arg) {
	(void)arg;
	unsigned char *src = aligned_alloc(PAGE, PAGE);
	for (;;) {
		struct pollfd pfd = { uffd_fd, POLLIN, 0 };
		if (poll(&pfd, 1, -1) < 0) continue;
		struct uffd_msg m;
		if (read(uffd_fd, &m, sizeof m) != sizeof m) return NULL;
		if (m.event != UFFD_EVENT_PAGEFAULT) continue;
		uint64_t at = m.arg.pagefault.address & ~(uint64_t)(PAGE - 1);
		fill_page(src, (at - (uint64_t)uffd_area) / PAGE + 7);
		struct uffdio_copy c = { at, (uint64_t)src, PAGE, 0, 0 };
		ioctl(uffd_fd, UFFDIO_COPY, &c);
	}
}

static int uffd(void) {
	uffd_fd = syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY);
	if (uffd_fd < 0) uffd_fd = syscall(SYS_userfaultfd, O_CLOEXEC);
	if (uffd_fd < 0) { perror("userfaultfd"); return 2; }
	struct uffdio_api api = { UFFD_API, 0, 0 };
	if (ioctl(uffd_fd, UFFDIO_API, &api)) { perror("UFFDIO_API"); return 2; }
	uffd_area = mmap(NULL, uffd_pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct uffdio_register reg = { { (uint64_t)uffd_area, uffd_pages * PAGE }, UFFDIO_REGISTER_MODE_MISSING, 0 };
	if (ioctl(uffd_fd, UFFDIO_REGISTER, &reg)) { perror("UFFDIO_REGISTER"); return 2; }
	pthread_t th;
	pthread_create(&th, NULL, uffd_server, NULL);
	long base = pss_kib();
	unsigned char *d = dups(1024);
	/* Half the area faulted in now, half after the engine had time to look. */
	for (size_t i = 0; i < uffd_pages / 2; i++)
		if (!check_page(uffd_area + i * PAGE, i + 7)) fail("uffd: a served page");
	settle_and_tell(base + (long)(uffd_pages / 2 * PAGE / 1024), 1024, 1.5);
	for (size_t i = 0; i < uffd_pages; i++)
		if (!check_page(uffd_area + i * PAGE, i + 7)) fail("uffd: a served page, later");
	check_dups(d, 1024, "uffd: duplicates");
	uint64_t h = digest(uffd_area, uffd_pages * PAGE, digest(d, 1024 * PAGE, 0));
	printf("ok uffd %016llx\n", (unsigned long long)h);
	return failed;
}

/* ---- seccomp ---- */
static int own_seccomp(void) {
	struct sock_filter f[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getppid, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = { sizeof f / sizeof f[0], f };
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) { perror("no_new_privs"); return 2; }
	if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog)) { perror("seccomp"); return 2; }
	errno = 0;
	if (syscall(SYS_getppid) != -1 || errno != EPERM) fail("seccomp: the program's own filter");
	long base = pss_kib();
	unsigned char *d = dups(1024);
	settle_and_tell(base, 1024, 1.5);
	check_dups(d, 1024, "seccomp: duplicates");
	munmap(d + 512 * PAGE, 256 * PAGE); /* still seen by samepage's filter */
	check_dups(d, 512, "seccomp: after munmap");
	printf("ok seccomp %016llx\n", (unsigned long long)digest(d, 512 * PAGE, 0));
	return failed;
}

/* ---- madvise ---- */
static int mergeable(size_t pages) {
	long base = pss_kib();
	unsigned char *d = dups(pages);
	if (madvise(d, pages * PAGE, MADV_MERGEABLE)) { perror("madvise(MADV_MERGEABLE)"); return 2; }
	settle_and_tell(base, pages, 3);
	check_dups(d, pages, "madvise: merged");
	for (size_t i = 0; i < pages; i += 8) {
		d[i * PAGE + 1] ^= 0xff; /* a copy-on-write break */
		d[i * PAGE + 1] ^= 0xff;
	}
	check_dups(d, pages, "madvise: after writes");
	if (madvise(d, pages * PAGE, MADV_UNMERGEABLE)) { perror("madvise(MADV_UNMERGEABLE)"); return 2; }
	check_dups(d, pages, "madvise: unmerged");
	printf("ok madvise %016llx\n", (unsigned long long)digest(d, pages * PAGE, 0));
	return failed;
}

/* ---- discard ---- */
#ifndef MADV_DONTNEED_LOCKED
#define MADV_DONTNEED_LOCKED 24
#endif
/* Merged pages discarded with MADV_DONTNEED and MADV_DONTNEED_LOCKED read
 * zeros afterwards, as anonymous memory does; the pages between keep their
 * content. */
static int discard(size_t pages) {
	long base = pss_kib();
	unsigned char *d = dups(pages);
	if (madvise(d, pages * PAGE, MADV_MERGEABLE)) { perror("madvise(MADV_MERGEABLE)"); return 2; }
	settle_and_tell(base, pages, 3);
	check_dups(d, pages, "discard: merged");
	size_t q = pages / 4;
	const int advice[2] = { MADV_DONTNEED, MADV_DONTNEED_LOCKED };
	for (int k = 0; k < 2; k++) {
		unsigned char *at = d + (2 * k) * q * PAGE;
		if (madvise(at, q * PAGE, advice[k])) { perror("madvise(discard)"); return 2; }
		for (size_t i = 0; i < q * PAGE; i++)
			if (at[i]) { fail(k ? "discard: MADV_DONTNEED_LOCKED page not zero" : "discard: MADV_DONTNEED page not zero"); break; }
		for (size_t i = (2 * k + 1) * q; i < (2 * k + 2) * q; i++)
			if (!check_page(d + i * PAGE, i)) { fail("discard: a page beside lost its content"); break; }
	}
	printf("ok discard %016llx\n", (unsigned long long)digest(d, pages * PAGE, 0));
	return failed;
}

/* ---- fork-trim ---- */
#include <malloc.h>
static volatile int trimming = 1;
static void *trimmer(void *arg) {
	(void)arg;
	while (trimming) {
		unsigned char *b = malloc(256 << 10);
		if (!b) continue;
		memset(b, 7, 256 << 10);
		free(b); /* the top chunk above the threshold: systrim, brk shrinks */
	}
	return NULL;
}

static int fork_trim(int n, int brk) {
	/* Blocks of 256 KiB from the heap (not mmap), trimmed at once; with
	 * brk, every thread in the main arena. */
	if (brk) mallopt(M_ARENA_MAX, 1);
	mallopt(M_MMAP_THRESHOLD, 1 << 20);
	mallopt(M_TRIM_THRESHOLD, 64 << 10);
	unsigned char *d = dups(2048);
	if (madvise(d, 2048 * PAGE, MADV_MERGEABLE)) { perror("madvise(MADV_MERGEABLE)"); return 2; }
	pthread_t t;
	pthread_create(&t, NULL, trimmer, NULL);
	for (int i = 0; i < n; i++) {
		pid_t pid = fork();
		if (pid < 0) { perror("fork"); return 2; }
		if (pid == 0) {
			check_dups(d, 2048, "fork-trim: child");
			_exit(failed);
		}
		int st;
		if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st)) fail("fork-trim: a child failed");
	}
	trimming = 0;
	pthread_join(t, NULL);
	check_dups(d, 2048, "fork-trim: after");
	printf("ok fork-%s %d\n", brk ? "brk" : "trim", n);
	return failed;
}

/* ---- fork-at-start ---- */
static int fork_at_start(int n) {
	pid_t pids[256];
	if (n > 256) n = 256;
	/* A fork every 100 us for the first n / 10 ms: some land while the
	 * engine is being made. */
	for (int i = 0; i < n; i++) {
		pids[i] = fork();
		if (pids[i] < 0) { perror("fork"); return 2; }
		if (pids[i] == 0) {
			unsigned char *d = dups(64);
			if (madvise(d, 64 * PAGE, MADV_MERGEABLE)) { perror("madvise(MADV_MERGEABLE)"); _exit(2); }
			check_dups(d, 64, "fork-at-start: child");
			_exit(failed);
		}
		usleep(100);
	}
	for (int i = 0; i < n; i++) {
		int st;
		if (waitpid(pids[i], &st, 0) != pids[i] || !WIFEXITED(st) || WEXITSTATUS(st)) fail("fork-at-start: a child failed");
	}
	printf("ok fork-at-start %d\n", n);
	return failed;
}

int main(int argc, char **argv) {
	if (argc < 2) { fprintf(stderr, "usage: %s mt-malloc SECONDS | fork-exec DEPTH | uffd | seccomp | madvise PAGES | discard PAGES\n", argv[0]); return 2; }
	if (!strcmp(argv[1], "mt-malloc")) return mt_malloc(argc > 2 ? atof(argv[2]) : 3);
	if (!strcmp(argv[1], "fork-exec")) return fork_exec("/proc/self/exe", argc > 2 ? atoi(argv[2]) : 3);
	if (!strcmp(argv[1], "uffd")) return uffd();
	if (!strcmp(argv[1], "seccomp")) return own_seccomp();
	if (!strcmp(argv[1], "madvise")) return mergeable(argc > 2 ? (size_t)atol(argv[2]) : 4096);
	if (!strcmp(argv[1], "fork-trim")) return fork_trim(argc > 2 ? atoi(argv[2]) : 200, 0);
	if (!strcmp(argv[1], "fork-brk")) return fork_trim(argc > 2 ? atoi(argv[2]) : 200, 1);
	if (!strcmp(argv[1], "fork-at-start")) return fork_at_start(argc > 2 ? atoi(argv[2]) : 8);
	if (!strcmp(argv[1], "discard")) return discard(argc > 2 ? (size_t)atol(argv[2]) : 4096);
	fprintf(stderr, "unknown mode %s\n", argv[1]);
	return 2;
}
