/*
 * echoload: a closed-loop load generator for echo and HTTP/1.1 keep-alive
 * servers on loopback, built on epoll.
 *
 * Each of C connections keeps `depth` requests in flight: when a reply
 * completes, the next request is sent at once. After a warm-up, requests are
 * counted for a measured window (or until a request count is reached) and
 * their latencies go into a log-linear histogram (about 3 % resolution).
 *
 * Client modes: "spin" polls with epoll_wait(0) and never sleeps (busy share =
 * the part of the window not spent in empty polls); "block" sleeps in
 * epoll_wait (busy share = own CPU time / window).
 *
 * --watch-pid P (repeatable) reads utime+stime of P from /proc at the start
 * and end of the window; --watch-cpu N reads CPU N's busy share from
 * /proc/stat. --idle N opens N connections, does one echo round trip on each,
 * prints a JSON line and holds them open until stdin closes (or --hold secs).
 *
 * The result is one JSON object on stdout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define MAX_SOURCES 64
#define MAX_WATCH 64
#define HIST_SIZE (64 + 58 * 32)
#define RXCAP 65536

typedef struct {
    int fd;
    int dead;
    int want_out;
    uint64_t *stamps; /* ring of send times, `depth` slots */
    uint32_t head, tail;
    size_t rx_have;   /* echo: bytes toward the current reply; http: bytes buffered */
    size_t tx_pending;
    size_t tx_pos;
    char *rxbuf;      /* http only */
} conn_t;

static const char *host = "127.0.0.1";
static int port = 0;
static int nconns = 1;
static int msg_size = 64;
static int depth = 1;
static double warmup = 1.0, duration = 5.0, hold = 600.0;
static long long max_requests = 0;
static int pin_cpu = -1, watch_cpu = -1;
static int spin = 1, http = 0, idle = 0;
static const char *path = "/";
static const char *sources[MAX_SOURCES];
static int nsources = 0;
static int watch_pids[MAX_WATCH];
static int nwatch = 0;

static char *tx_tmpl;
static size_t tx_len;
static char *txbuf;
static size_t txbuf_len;
static uint64_t hist[HIST_SIZE];
static long long completed = 0, errors = 0;
static int measuring = 0;
static int epfd;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int hist_index(uint64_t v) {
    if (v < 64) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - 5;
    return 64 + (msb - 6) * 32 + (int)((v >> shift) - 32);
}

static double hist_value(int idx) {
    if (idx < 64) return idx;
    int b = (idx - 64) / 32;
    uint64_t sub = (uint64_t)((idx - 64) % 32 + 32);
    int shift = b + 1;
    return ((double)(sub << shift) + (double)((sub + 1) << shift)) / 2.0;
}

static double percentile(double q) {
    uint64_t total = 0;
    for (int i = 0; i < HIST_SIZE; i++) total += hist[i];
    if (total == 0) return 0.0;
    uint64_t want = (uint64_t)(q * (double)total + 0.999999);
    if (want < 1) want = 1;
    uint64_t seen = 0;
    for (int i = 0; i < HIST_SIZE; i++) {
        seen += hist[i];
        if (seen >= want) return hist_value(i);
    }
    return hist_value(HIST_SIZE - 1);
}

static long long proc_ticks(int pid, long long *user_ticks) {
    char p[64], buf[2048];
    snprintf(p, sizeof p, "/proc/%d/stat", pid);
    FILE *f = fopen(p, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *s = strrchr(buf, ')');
    if (!s) return -1;
    unsigned long long ut = 0, st = 0;
    /* after ") ": state(3) ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime */
    if (sscanf(s + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &st) != 2)
        return -1;
    if (user_ticks) *user_ticks = (long long)ut;
    return (long long)(ut + st);
}

static int cpu_times(int cpu, unsigned long long *busy, unsigned long long *total) {
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return -1;
    char line[512], name[16];
    snprintf(name, sizeof name, "cpu%d ", cpu);
    int ok = -1;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, name, strlen(name)) == 0) {
            unsigned long long v[10] = {0};
            sscanf(line + strlen(name), "%llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1],
                   &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]);
            *total = 0;
            for (int i = 0; i < 8; i++) *total += v[i];
            *busy = *total - v[3] - v[4];
            ok = 0;
            break;
        }
    }
    fclose(f);
    return ok;
}

static double own_cpu(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

static int open_conn(int i, int nonblock) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (nsources > 0) {
        struct sockaddr_in src = {0};
        src.sin_family = AF_INET;
        if (inet_pton(AF_INET, sources[i % nsources], &src.sin_addr) != 1) {
            fprintf(stderr, "echoload: bad source address %s\n", sources[i % nsources]);
            exit(2);
        }
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
            close(fd);
            return -1;
        }
    }
    struct sockaddr_in dst = {0};
    dst.sin_family = AF_INET;
    dst.sin_port = htons((uint16_t)port);
    inet_pton(AF_INET, host, &dst.sin_addr);
    if (connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0) {
        close(fd);
        return -1;
    }
    if (nonblock) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static void kill_conn(conn_t *c) {
    if (c->dead) return;
    c->dead = 1;
    errors++;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
}

static void set_out(conn_t *c, int on) {
    if (c->want_out == on) return;
    c->want_out = on;
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void flush(conn_t *c) {
    while (c->tx_pending > 0) {
        size_t off = c->tx_pos % tx_len;
        size_t n = txbuf_len - off;
        if (n > c->tx_pending) n = c->tx_pending;
        ssize_t w = send(c->fd, txbuf + off, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                set_out(c, 1);
                return;
            }
            if (errno == EINTR) continue;
            kill_conn(c);
            return;
        }
        c->tx_pending -= (size_t)w;
        c->tx_pos += (size_t)w;
    }
    set_out(c, 0);
}

static void send_one(conn_t *c, uint64_t t) {
    c->stamps[c->head % (uint32_t)depth] = t;
    c->head++;
    c->tx_pending += tx_len;
}

static void complete(conn_t *c, uint64_t t) {
    uint64_t sent = c->stamps[c->tail % (uint32_t)depth];
    c->tail++;
    if (measuring) {
        hist[hist_index(t - sent)]++;
        completed++;
    }
    send_one(c, t);
}

/* Parse whole HTTP responses out of c->rxbuf; return how many completed, -1 on error. */
static int http_parse(conn_t *c, uint64_t t) {
    int done = 0;
    size_t off = 0;
    for (;;) {
        char *start = c->rxbuf + off;
        size_t have = c->rx_have - off;
        char *end = memmem(start, have, "\r\n\r\n", 4);
        if (!end) break;
        size_t hdr = (size_t)(end - start) + 4;
        long clen = 0;
        for (char *p = start; p < end; p++) {
            if ((*p == '\n') && (size_t)(end - p) > 16 && strncasecmp(p + 1, "content-length:", 15) == 0) {
                clen = strtol(p + 16, NULL, 10);
                break;
            }
        }
        if (hdr + (size_t)clen > have) break;
        off += hdr + (size_t)clen;
        complete(c, t);
        done++;
    }
    if (off > 0) {
        memmove(c->rxbuf, c->rxbuf + off, c->rx_have - off);
        c->rx_have -= off;
    }
    if (c->rx_have >= RXCAP) return -1;
    return done;
}

static void on_readable(conn_t *c) {
    static char scratch[RXCAP];
    for (;;) {
        char *dst = http ? c->rxbuf + c->rx_have : scratch;
        size_t room = http ? RXCAP - c->rx_have : sizeof scratch;
        ssize_t r = recv(c->fd, dst, room, 0);
        if (r == 0) {
            kill_conn(c);
            return;
        }
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            if (errno == EINTR) continue;
            kill_conn(c);
            return;
        }
        uint64_t t = now_ns();
        c->rx_have += (size_t)r;
        if (http) {
            if (http_parse(c, t) < 0) {
                fprintf(stderr, "echoload: unparsable HTTP response\n");
                kill_conn(c);
                return;
            }
        } else {
            while (c->rx_have >= (size_t)msg_size) {
                c->rx_have -= (size_t)msg_size;
                complete(c, t);
            }
        }
        if ((size_t)r < room) break;
    }
    flush(c);
}

static void usage(void) {
    fprintf(stderr,
            "usage: echoload --port P [--host H] [--conns C] [--size B] [--depth D]\n"
            "  [--warmup S] [--duration S] [--requests N] [--cpu N] [--mode spin|block]\n"
            "  [--http [--path /]] [--source ADDR]... [--watch-pid PID]... [--watch-cpu N]\n"
            "  [--idle N [--hold S]]\n");
    exit(2);
}

static void parse_args(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEXT() \
    do { \
        if (!v) usage(); \
        i++; \
    } while (0)
        if (!strcmp(a, "--host")) { NEXT(); host = v; }
        else if (!strcmp(a, "--port")) { NEXT(); port = atoi(v); }
        else if (!strcmp(a, "--conns")) { NEXT(); nconns = atoi(v); }
        else if (!strcmp(a, "--size")) { NEXT(); msg_size = atoi(v); }
        else if (!strcmp(a, "--depth")) { NEXT(); depth = atoi(v); }
        else if (!strcmp(a, "--warmup")) { NEXT(); warmup = atof(v); }
        else if (!strcmp(a, "--duration")) { NEXT(); duration = atof(v); }
        else if (!strcmp(a, "--requests")) { NEXT(); max_requests = atoll(v); }
        else if (!strcmp(a, "--cpu")) { NEXT(); pin_cpu = atoi(v); }
        else if (!strcmp(a, "--watch-cpu")) { NEXT(); watch_cpu = atoi(v); }
        else if (!strcmp(a, "--mode")) { NEXT(); spin = strcmp(v, "block") != 0; }
        else if (!strcmp(a, "--http")) { http = 1; }
        else if (!strcmp(a, "--path")) { NEXT(); path = v; }
        else if (!strcmp(a, "--idle")) { NEXT(); idle = atoi(v); }
        else if (!strcmp(a, "--hold")) { NEXT(); hold = atof(v); }
        else if (!strcmp(a, "--source")) {
            NEXT();
            if (nsources < MAX_SOURCES) sources[nsources++] = v;
        } else if (!strcmp(a, "--watch-pid")) {
            NEXT();
            if (nwatch < MAX_WATCH) watch_pids[nwatch++] = atoi(v);
        } else usage();
#undef NEXT
    }
    if (port <= 0 || nconns < 1 || msg_size < 1 || depth < 1) usage();
}

static int run_idle(void) {
    char *msg = malloc((size_t)msg_size), *reply = malloc((size_t)msg_size);
    memset(msg, 'x', (size_t)msg_size);
    int *fds = calloc((size_t)idle, sizeof(int));
    uint64_t t0 = now_ns();
    int opened = 0;
    for (int i = 0; i < idle; i++) {
        int fd = open_conn(i, 0);
        if (fd < 0) {
            fprintf(stderr, "echoload: idle connection %d: %s\n", i, strerror(errno));
            break;
        }
        fds[opened++] = fd;
        struct timeval tv = {.tv_sec = 10};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        if (send(fd, msg, (size_t)msg_size, MSG_NOSIGNAL) != msg_size) break;
        ssize_t got = 0;
        while (got < msg_size) {
            ssize_t r = recv(fd, reply + got, (size_t)(msg_size - got), 0);
            if (r <= 0) break;
            got += r;
        }
        if (got < msg_size) {
            fprintf(stderr, "echoload: idle connection %d got no echo\n", i);
            break;
        }
    }
    double setup = (double)(now_ns() - t0) / 1e9;
    printf("{\"idle\": %d, \"requested\": %d, \"setup_s\": %.6f}\n", opened, idle, setup);
    fflush(stdout);
    struct pollfd pfd = {.fd = 0, .events = POLLIN};
    uint64_t until = now_ns() + (uint64_t)(hold * 1e9);
    char buf[256];
    while (now_ns() < until) {
        int r = poll(&pfd, 1, 200);
        if (r > 0 && read(0, buf, sizeof buf) <= 0) break;
    }
    for (int i = 0; i < opened; i++) close(fds[i]);
    return opened == idle ? 0 : 1;
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    prctl(PR_SET_PDEATHSIG, SIGTERM); /* end with whoever started us */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    if (pin_cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(pin_cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set) < 0) perror("echoload: sched_setaffinity");
    }
    if (idle > 0) return run_idle();

    if (http) {
        tx_tmpl = malloc(512);
        snprintf(tx_tmpl, 512, "GET %s HTTP/1.1\r\nHost: %s:%d\r\n\r\n", path, host, port);
        tx_len = strlen(tx_tmpl);
    } else {
        tx_tmpl = malloc((size_t)msg_size);
        memset(tx_tmpl, 'x', (size_t)msg_size);
        tx_len = (size_t)msg_size;
    }
    txbuf_len = tx_len * (size_t)depth;
    txbuf = malloc(txbuf_len);
    for (int d = 0; d < depth; d++) memcpy(txbuf + (size_t)d * tx_len, tx_tmpl, tx_len);

    epfd = epoll_create1(0);
    conn_t *conns = calloc((size_t)nconns, sizeof(conn_t));
    for (int i = 0; i < nconns; i++) {
        conn_t *c = &conns[i];
        c->fd = open_conn(i, 1);
        if (c->fd < 0) {
            fprintf(stderr, "echoload: connect %d to %s:%d: %s\n", i, host, port, strerror(errno));
            return 1;
        }
        c->stamps = calloc((size_t)depth, sizeof(uint64_t));
        if (http) c->rxbuf = malloc(RXCAP);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
    }
    uint64_t t = now_ns();
    for (int i = 0; i < nconns; i++) {
        for (int d = 0; d < depth; d++) send_one(&conns[i], t);
        flush(&conns[i]);
    }

    struct epoll_event evs[512];
    uint64_t t_measure = t + (uint64_t)(warmup * 1e9);
    uint64_t t_end = t_measure + (uint64_t)(duration * 1e9);
    uint64_t t0 = 0, t1 = 0, empty_ns = 0;
    long long ticks0[MAX_WATCH] = {0}, ticks1[MAX_WATCH] = {0};
    long long uticks0[MAX_WATCH] = {0}, uticks1[MAX_WATCH] = {0};
    unsigned long long cb0 = 0, ct0 = 0, cb1 = 0, ct1 = 0;
    double cpu0 = 0, cpu1 = 0;
    int live = nconns;
    for (;;) {
        uint64_t before = now_ns();
        if (!measuring && before >= t_measure) {
            measuring = 1;
            completed = 0;
            memset(hist, 0, sizeof hist);
            for (int i = 0; i < nwatch; i++) ticks0[i] = proc_ticks(watch_pids[i], &uticks0[i]);
            if (watch_cpu >= 0) cpu_times(watch_cpu, &cb0, &ct0);
            cpu0 = own_cpu();
            t0 = now_ns();
            before = t0;
        }
        if (measuring && (before >= t_end || (max_requests > 0 && completed >= max_requests))) {
            t1 = before;
            for (int i = 0; i < nwatch; i++) ticks1[i] = proc_ticks(watch_pids[i], &uticks1[i]);
            if (watch_cpu >= 0) cpu_times(watch_cpu, &cb1, &ct1);
            cpu1 = own_cpu();
            break;
        }
        int timeout = 0;
        if (!spin) {
            uint64_t next = measuring ? t_end : t_measure;
            timeout = next > before ? (int)((next - before) / 1000000ull) + 1 : 0;
            if (timeout > 100) timeout = 100;
        }
        int n = epoll_wait(epfd, evs, 512, timeout);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("echoload: epoll_wait");
            return 1;
        }
        if (n == 0 && spin && measuring) empty_ns += now_ns() - before;
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (c->dead) continue;
            if (evs[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(c);
            else if (evs[i].events & EPOLLOUT) flush(c);
        }
        live = 0;
        for (int i = 0; i < nconns && errors > 0; i++) live += !conns[i].dead;
        if (errors > 0 && live == 0) {
            fprintf(stderr, "echoload: every connection was closed by the server\n");
            return 1;
        }
    }
    double window = (double)(t1 - t0) / 1e9;
    long clk = sysconf(_SC_CLK_TCK);
    long long ticks = 0, uticks = 0;
    int ticks_ok = nwatch > 0;
    for (int i = 0; i < nwatch; i++) {
        if (ticks0[i] < 0 || ticks1[i] < 0) ticks_ok = 0;
        else {
            ticks += ticks1[i] - ticks0[i];
            uticks += uticks1[i] - uticks0[i];
        }
    }
    double busy = spin ? 1.0 - (double)empty_ns / 1e9 / window : (cpu1 - cpu0) / window;
    printf("{\"mode\": \"%s\", \"proto\": \"%s\", \"conns\": %d, \"depth\": %d, \"size\": %d, "
           "\"window_s\": %.6f, \"requests\": %lld, \"rps\": %.1f, "
           "\"p50_us\": %.2f, \"p90_us\": %.2f, \"p99_us\": %.2f, \"p999_us\": %.2f, "
           "\"max_us\": %.2f, \"client_busy\": %.4f, \"client_cpu_s\": %.4f, \"errors\": %lld",
           spin ? "spin" : "block", http ? "http" : "echo", nconns, depth, msg_size, window,
           completed, (double)completed / window, percentile(0.5) / 1e3, percentile(0.9) / 1e3,
           percentile(0.99) / 1e3, percentile(0.999) / 1e3, percentile(1.0) / 1e3, busy,
           cpu1 - cpu0, errors);
    if (ticks_ok)
        printf(", \"server_cpu_s\": %.4f, \"server_user_s\": %.4f", (double)ticks / (double)clk,
               (double)uticks / (double)clk);
    else
        printf(", \"server_cpu_s\": null, \"server_user_s\": null");
    if (watch_cpu >= 0 && ct1 > ct0)
        printf(", \"server_cpu_busy\": %.4f", (double)(cb1 - cb0) / (double)(ct1 - ct0));
    else
        printf(", \"server_cpu_busy\": null");
    printf("}\n");
    return 0;
}
