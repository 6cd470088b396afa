/* What group commit can reach on this machine with no interpreter in the way.

   Not product code: a measurement for bench/ceiling.py. N processes append 256-byte
   records; every append is durable (fdatasync) before the producer's next one.

   raw   each process: pwrite + fdatasync into its own pre-zeroed file (bench.wal raw-N).
   group one pre-zeroed file shared by all: walstore's protocol, in C. A producer puts
         its record in its own slot of a shared mapping and, if the leader lock is free,
         leads: it waits briefly for as many slots as the last flush wrote (walstore's
         adaptive gather), frames every ready slot (20-byte header, CRC32C), writes them
         with one pwrite, makes them durable with one fdatasync, marks them written, and
         wakes every waiter with one futex broadcast. Otherwise it sleeps on the futex
         word until its slot is written and durable, or until it can lead.

   Usage: [GATHER_NS=100000 GATHER_TRIES=2] [WORK_NS=0] group_commit raw|group PROCS SECONDS DIR
   (the gather: up to TRIES sleeps of NS nanoseconds; the defaults are walstore's. WORK_NS:
   CPU a producer burns before each append, standing in for a Python caller's own code)
   Prints one JSON line: {"rate": appends/s, "cpu_us": CPU microseconds per append}. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#ifdef __SSE4_2__
#include <nmmintrin.h>
#endif
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define REC 256
#define HDR 20
#define MAXP 64
#define FILE_BYTES (64L << 20)
#define FREE 0
#define READY 1
#define WRITTEN 2

struct slot {
    _Atomic uint32_t state;
    uint64_t lsn; /* the record's LSN, set by the leader before WRITTEN */
    char data[REC];
};

struct shared {
    _Atomic uint32_t lock;  /* the leader lock: 0 free */
    _Atomic uint32_t word;  /* futex: bumped after every flush */
    _Atomic uint64_t synced;  /* the high water mark */
    uint64_t next_lsn, offset;  /* leader only */
    uint32_t last_gather;
    _Atomic int go;
    struct slot slots[MAXP];
    uint64_t count[MAXP];
    double cpu[MAXP];
};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

#ifdef __SSE4_2__
static uint32_t crc32c(uint32_t crc, const char *p, size_t n) {  /* as the crc32c package */
    crc = ~crc;
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        crc = (uint32_t)_mm_crc32_u64(crc, v);
    }
    for (; n; n--, p++) crc = _mm_crc32_u8(crc, (uint8_t)*p);
    return ~crc;
}
#else
static uint32_t crc32c(uint32_t crc, const char *p, size_t n) {  /* bitwise: other CPUs */
    crc = ~crc;
    for (; n; n--, p++) {
        crc ^= (uint8_t)*p;
        for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0x82F63B78u & -(crc & 1));
    }
    return ~crc;
}
#endif

static void futex_wait(_Atomic uint32_t *w, uint32_t seen) {
    struct timespec ts = {0, 20 * 1000 * 1000};  /* as walstore's FOLLOWER_WAIT */
    syscall(SYS_futex, w, FUTEX_WAIT, seen, &ts, NULL, 0);
}

static void futex_wake_all(_Atomic uint32_t *w) {
    syscall(SYS_futex, w, FUTEX_WAKE, INT32_MAX, NULL, NULL, 0);
}

static void payload(char *buf, int proc, uint64_t n) {
    int k = snprintf(buf, REC, "{\"purchase_id\": \"p%d-%lu\", \"customer\": \"bench\"}", proc,
                     (unsigned long)n);
    memset(buf + k, ' ', REC - 1 - k);
    buf[REC - 1] = '\n';
}

static void must(int ok, const char *what) {
    if (!ok) {
        perror(what);
        _exit(2);
    }
}

static long gather_ns = 100 * 1000, work_ns = 0;
static int gather_tries = 2;

static void lead(struct shared *s, int procs, int fd) {
    static char buf[MAXP * (HDR + REC)];
    uint32_t want = s->last_gather > 1 ? s->last_gather - 1 : 0;
    for (int tries = 0; tries < gather_tries && want >= 2; tries++) {
        uint32_t ready = 0;
        for (int i = 0; i < procs; i++)
            ready += atomic_load_explicit(&s->slots[i].state, memory_order_acquire) == READY;
        if (ready >= want) break;
        struct timespec ts = {0, gather_ns};  /* walstore's GATHER_WAIT / 2 */
        nanosleep(&ts, NULL);
    }
    size_t len = 0;
    int taken[MAXP], n = 0;
    for (int i = 0; i < procs; i++) {
        struct slot *sl = &s->slots[i];
        if (atomic_load_explicit(&sl->state, memory_order_acquire) != READY) continue;
        char *rec = buf + len;
        uint32_t size = REC;
        uint64_t lsn = s->next_lsn++;
        memset(rec, 0, HDR);
        memcpy(rec + 4, &size, 4);
        memcpy(rec + 8, &lsn, 8);
        rec[16] = 1;
        memcpy(rec + HDR, sl->data, REC);
        uint32_t c = crc32c(crc32c(0x5a17, rec + 4, HDR - 4), sl->data, REC);
        memcpy(rec, &c, 4);
        sl->lsn = lsn;
        taken[n++] = i;
        len += HDR + REC;
    }
    if (s->offset + len > FILE_BYTES) s->offset = 0;  /* round and round, as raw */
    if (n) {
        must(pwrite(fd, buf, len, s->offset) == (ssize_t)len, "pwrite");
        s->offset += len;
        must(fdatasync(fd) == 0, "fdatasync");
    }
    atomic_store_explicit(&s->synced, s->next_lsn, memory_order_release);
    for (int k = 0; k < n; k++)
        atomic_store_explicit(&s->slots[taken[k]].state, WRITTEN, memory_order_release);
    s->last_gather = n;
    atomic_store_explicit(&s->lock, 0, memory_order_release);
    atomic_fetch_add_explicit(&s->word, 1, memory_order_acq_rel);
    futex_wake_all(&s->word);
}

static void producer(struct shared *s, int me, int procs, int group, const char *dir,
                     double seconds) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s%d", dir, group ? "log" : "raw", group ? 0 : me);
    int fd = open(path, O_RDWR);
    must(fd >= 0, "open");
    while (!atomic_load(&s->go)) usleep(200);
    double cpu = cpu_seconds(), stop = now() + seconds;
    uint64_t n = 0, off = 0;
    char rec[REC];
    struct slot *sl = &s->slots[me];
    while (now() < stop) {
        if (work_ns) {
            double until = now() + work_ns / 1e9;
            while (now() < until) {
            }
        }
        payload(rec, me, n);
        if (!group) {
            must(pwrite(fd, rec, REC, off) == REC, "pwrite");
            must(fdatasync(fd) == 0, "fdatasync");
            off = (off + REC) % FILE_BYTES;
        } else {
            memcpy(sl->data, rec, REC);
            atomic_store_explicit(&sl->state, READY, memory_order_release);
            for (;;) {
                uint32_t seen = atomic_load_explicit(&s->word, memory_order_acquire);
                if (atomic_load_explicit(&sl->state, memory_order_acquire) == WRITTEN &&
                    atomic_load_explicit(&s->synced, memory_order_acquire) > sl->lsn) {
                    atomic_store_explicit(&sl->state, FREE, memory_order_release);
                    break;
                }
                uint32_t free_ = 0;
                if (atomic_compare_exchange_strong(&s->lock, &free_, 1))
                    lead(s, procs, fd);
                else
                    futex_wait(&s->word, seen);
            }
        }
        n++;
    }
    s->count[me] = n;
    s->cpu[me] = cpu_seconds() - cpu;
    close(fd);
}

static void prezero(const char *path) {
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    must(fd >= 0, "create");
    char *zeros = calloc(1, 1 << 20);
    for (long off = 0; off < FILE_BYTES; off += 1 << 20)
        must(pwrite(fd, zeros, 1 << 20, off) == 1 << 20, "pwrite zeros");
    must(fsync(fd) == 0, "fsync");
    free(zeros);
    close(fd);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s raw|group PROCS SECONDS DIR\n", argv[0]);
        return 2;
    }
    int group = strcmp(argv[1], "group") == 0, procs = atoi(argv[2]);
    if (getenv("GATHER_NS")) gather_ns = atol(getenv("GATHER_NS"));
    if (getenv("GATHER_TRIES")) gather_tries = atoi(getenv("GATHER_TRIES"));
    if (getenv("WORK_NS")) work_ns = atol(getenv("WORK_NS"));
    double seconds = atof(argv[3]);
    const char *dir = argv[4];
    if (procs < 1 || procs > MAXP || seconds <= 0) return 2;
    char path[4096];
    for (int i = 0; i < (group ? 1 : procs); i++) {
        snprintf(path, sizeof path, "%s/%s%d", dir, group ? "log" : "raw", i);
        prezero(path);
    }
    struct shared *s = mmap(NULL, sizeof *s, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                            -1, 0);
    must(s != MAP_FAILED, "mmap");
    memset(s, 0, sizeof *s);
    for (int i = 0; i < procs; i++) {
        pid_t pid = fork();
        must(pid >= 0, "fork");
        if (pid == 0) {
            producer(s, i, procs, group, dir, seconds);
            _exit(0);
        }
    }
    usleep(300 * 1000);  /* every process at the barrier */
    atomic_store(&s->go, 1);
    int failed = 0;
    for (int i = 0; i < procs; i++) {
        int status;
        wait(&status);
        failed |= !WIFEXITED(status) || WEXITSTATUS(status);
    }
    if (failed) return 1;
    uint64_t total = 0;
    double cpu = 0;
    for (int i = 0; i < procs; i++) total += s->count[i], cpu += s->cpu[i];
    printf("{\"rate\": %.1f, \"cpu_us\": %.2f}\n", total / seconds, cpu / (total ? total : 1) * 1e6);
    return 0;
}
