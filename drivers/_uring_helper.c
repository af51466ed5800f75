/*
 * _uring_helper.c - the C half of iomux's io_uring layer.
 *
 * Python pays about 0.1 us for every call into C, so everything here is
 * batch-shaped: one call prepares a whole array of operation records, enters
 * the kernel once (submit + wait) and copies every available completion out
 * into a flat array that Python decodes with struct.iter_unpack.
 *
 * The ring (struct io_uring) stays opaque to Python: it only ever holds an
 * iomux_ring pointer.  Every function returns -errno on failure, like
 * liburing itself (which does not set errno).
 */
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <liburing.h>

/* liburing 2.3 is the oldest release with everything used below. */
#ifndef IORING_SETUP_DEFER_TASKRUN
#error "iomux's io_uring driver needs liburing 2.3 or newer (Debian/Ubuntu: apt-get install liburing-dev)"
#endif

/* Setup flags are exported to Python only if this header knows them: a flag
 * that liburing does not understand can make init "succeed" with rings that
 * liburing maps wrongly.  0 means "not available in this build". */
#define IOMUX_SETUP_CQSIZE IORING_SETUP_CQSIZE
#define IOMUX_SETUP_CLAMP IORING_SETUP_CLAMP
#define IOMUX_SETUP_SUBMIT_ALL IORING_SETUP_SUBMIT_ALL
#define IOMUX_SETUP_COOP_TASKRUN IORING_SETUP_COOP_TASKRUN
#define IOMUX_SETUP_TASKRUN_FLAG IORING_SETUP_TASKRUN_FLAG
#define IOMUX_SETUP_SINGLE_ISSUER IORING_SETUP_SINGLE_ISSUER
#define IOMUX_SETUP_DEFER_TASKRUN IORING_SETUP_DEFER_TASKRUN
#define IOMUX_SETUP_R_DISABLED IORING_SETUP_R_DISABLED

/* Kinds of operation record (struct iomux_op.op). */
enum {
    IOMUX_OP_NOP = 0,
    IOMUX_OP_POLL_ADD = 1,        /* one-shot poll: fd, arg = poll mask */
    IOMUX_OP_POLL_MULTISHOT = 2,  /* multishot poll: fd, arg = poll mask */
    IOMUX_OP_POLL_UPDATE = 3,     /* addr = old user_data, addr2 = new user_data,
                                     arg = poll mask, arg2 = IORING_POLL_* flags */
    IOMUX_OP_POLL_REMOVE = 4,     /* addr = user_data of the poll */
    IOMUX_OP_CANCEL = 5,          /* addr = user_data to cancel, arg = cancel flags */
    IOMUX_OP_CANCEL_FD = 6,       /* fd, arg = cancel flags (ALL by default) */
    IOMUX_OP_ACCEPT = 7,          /* fd, arg = accept4() flags */
    IOMUX_OP_ACCEPT_MULTISHOT = 8,/* fd, arg = accept4() flags */
    IOMUX_OP_RECV = 9,            /* fd, buf_group, arg = msg flags */
    IOMUX_OP_RECV_MULTISHOT = 10, /* fd, buf_group, arg = msg flags */
    IOMUX_OP_SEND = 11,           /* fd, addr = buffer, arg2 = length, arg = msg flags */
    IOMUX_OP_CLOSE = 12,          /* fd */
    IOMUX_OP_OPENAT = 13,         /* fd = dir fd, addr = path, arg = flags, arg2 = mode */
    IOMUX_OP_READ = 14,           /* fd, addr = buffer, arg2 = length, addr2 = offset */
    IOMUX_OP_WRITE = 15,          /* fd, addr = buffer, arg2 = length, addr2 = offset */
    IOMUX_OP_FSYNC = 16,          /* fd, arg = IORING_FSYNC_* flags */
    IOMUX_OP_STATX = 17,          /* fd = dir fd, addr = path, addr2 = struct statx,
                                     arg = AT_* flags, arg2 = STATX_* mask */
    IOMUX_OP_SPLICE = 18,         /* fd = in, arg = out fd, arg2 = length,
                                     addr = in offset, addr2 = out offset (-1: none),
                                     buf_group = SPLICE_F_* flags */
    IOMUX_OP_COUNT = 19
};

/* One operation record, 40 bytes, packed by Python as "=BBHiIIQQQ". */
struct iomux_op {
    uint8_t op;
    uint8_t sqe_flags;  /* IOSQE_* bits, e.g. IOSQE_CQE_SKIP_SUCCESS */
    uint16_t buf_group;
    int32_t fd;
    uint32_t arg;
    uint32_t arg2;
    uint64_t user_data;
    uint64_t addr;
    uint64_t addr2;
};

/* One completion as copied out to Python, 16 bytes: "=QiI". */
struct iomux_cqe {
    uint64_t user_data;
    int32_t res;
    uint32_t flags;
};

/* The layouts Python packs and unpacks (drivers/_uring.py checks them at import). */
#define IOMUX_OP_SIZE sizeof(struct iomux_op)
#define IOMUX_OP_OFF_USER_DATA offsetof(struct iomux_op, user_data)
#define IOMUX_OP_OFF_ADDR2 offsetof(struct iomux_op, addr2)
#define IOMUX_CQE_SIZE sizeof(struct iomux_cqe)
_Static_assert(sizeof(struct iomux_op) == 40 && offsetof(struct iomux_op, fd) == 4 &&
                   offsetof(struct iomux_op, user_data) == 16 &&
                   offsetof(struct iomux_op, addr2) == 32,
               "operation records are \"=BBHiIIQQQ\"");
_Static_assert(sizeof(struct iomux_cqe) == 16 && offsetof(struct iomux_cqe, res) == 8,
               "completions are \"=QiI\"");

/* user_data values at or above this are the helper's own (liburing also
 * reserves (__u64)-1 for the internal timeout of old kernels); such
 * completions are consumed here and never copied out. */
#define IOMUX_UD_RESERVED 0xFFFFFFFFFFFFFF00ULL
#define IOMUX_UD_WAKE 0xFFFFFFFFFFFFFF01ULL
#define IOMUX_UD_CLOSE 0xFFFFFFFFFFFFFF02ULL

/* Level-triggered polls.  A poll whose user_data has one of these bits is
 * a multishot poll that the helper turns level-triggered: the kernel
 * reports a multishot poll once per new wake-up, not again while the fd
 * stays ready, so every fd such a poll reported is re-checked with one
 * poll(2) call at the start of the next iomux_enter(IOMUX_ENTER_RECHECK)
 * and reported again (as a completion with F_MORE) while it is still ready.
 * The low 32 bits of such a user_data are the fd. */
#define IOMUX_UD_LEVEL_IN (1ULL << 56)  /* re-check for POLLIN */
#define IOMUX_UD_LEVEL_OUT (1ULL << 57) /* re-check for POLLOUT */
#define IOMUX_UD_LEVEL (IOMUX_UD_LEVEL_IN | IOMUX_UD_LEVEL_OUT)

/* A poll report can be stale: a wake-up carries its readiness mask, and
 * with DEFER_TASKRUN the report is posted only at the next enter, by when
 * the data may have been read.  Reports of polls with this bit (or a
 * level bit) are checked with one poll(2) before they are handed out;
 * one found not ready any more is handed out with res 0. */
#define IOMUX_UD_VERIFY (1ULL << 58)
#define IOMUX_UD_NOT_A_POLL ((1ULL << 60) | (1ULL << 61) | (1ULL << 62))

/* Flags of iomux_enter(). */
#define IOMUX_ENTER_RECHECK 1   /* re-check the level polls reported last time */
#define IOMUX_ENTER_NEW_BATCH 2 /* the caller handled the stream events: start anew */

/* Bits of status[0] after iomux_enter(). */
#define IOMUX_ST_WOKEN 1     /* a wake-up (eventfd write) was consumed */
#define IOMUX_ST_TIMED_OUT 2 /* the wait ran to its deadline */
#define IOMUX_ST_MORE 4      /* more completions are ready than fitted */
#define IOMUX_ST_STREAMS_FULL 8 /* the stream events or data area are full */

/* A wait with no deadline is done in slices of this length. */
#define IOMUX_WAIT_SLICE_NS (3600LL * 1000000000LL)

/* What the helper remembers of one fd's level poll. */
struct iomux_level {
    uint64_t user_data; /* the level poll that last reported this fd (0: none) */
    uint64_t armed;     /* the level poll queued last for this fd (0: none) */
    uint32_t epoch;     /* the iomux_enter() call that last reported it */
    uint8_t hot;        /* in the list of fds to re-check */
};

typedef struct iomux_streams iomux_streams;

typedef struct iomux_ring {
    struct io_uring ring;
    iomux_streams *streams;    /* the event loop's stream connections, or NULL */
    struct iomux_level *level; /* indexed by fd, nlevel entries */
    unsigned nlevel;
    int *hot, *hot_next;       /* fds to re-check, this and the next call */
    unsigned nhot, nhot_next, hotcap;
    struct pollfd *pfds;
    struct pollfd *vfds;       /* poll reports to check (verify_polls) */
    unsigned *vidx, vcap;
    uint32_t epoch;
    unsigned setup_flags; /* flags the kernel accepted */
    int wake_fd;          /* eventfd polled for wake-ups from any thread */
    int wake_armed;       /* a multishot poll on wake_fd is queued or live */
    int enabled;          /* 0 while IORING_SETUP_R_DISABLED still holds */
    int want_registered;  /* register the ring fd when the ring is enabled */
    uint64_t reg_thread;  /* this_thread() of the registering thread (0: none) */
} iomux_ring;

typedef struct iomux_bufs {
    struct io_uring_buf_ring *br;
    size_t br_bytes;
    unsigned char *data; /* nbufs * size bytes, owned by Python */
    unsigned nbufs, size, mask, bgid;
} iomux_bufs;

static const char *iomux_liburing_version(void)
{
#ifdef IO_URING_VERSION_MAJOR
    static char buf[32];
    snprintf(buf, sizeof buf, "%d.%d", IO_URING_VERSION_MAJOR, IO_URING_VERSION_MINOR);
    return buf;
#else
    /* 2.4 added the version macros; 2.3 added DEFER_TASKRUN (checked above). */
    return "2.3";
#endif
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* A registered ring fd (IORING_REGISTER_RING_FDS, Linux 5.18) lets
 * io_uring_enter() skip looking the fd up.  The registration is kept in the
 * registering thread's io_uring context and names the ring by an index into
 * that thread's table: in any other thread the same index means whatever
 * ring that thread registered there, or nothing.  So only the registering
 * thread may enter by index or drop the registration.  Threads are told
 * apart by a token (not pthread_self(), which a new thread may reuse). */
static __thread uint64_t thread_token;
static uint64_t last_thread_token;

static uint64_t this_thread(void)
{
    if (!thread_token)
        thread_token = __atomic_add_fetch(&last_thread_token, 1, __ATOMIC_RELAXED);
    return thread_token;
}

/* Whether the calling thread is not the one that registered the ring fd:
 * liburing's calls would reach the ring by an index that means nothing, or
 * another ring, here.  The kernel refuses such a thread anyway (EEXIST:
 * only SINGLE_ISSUER rings are registered), so the helper says the same. */
static int foreign_thread(const iomux_ring *r)
{
    return r->reg_thread && r->reg_thread != this_thread();
}

static iomux_ring *iomux_ring_new(unsigned entries, unsigned cq_entries, unsigned flags,
                                  int register_fd, int wake_fd, int *err)
{
    struct io_uring_params p;
    iomux_ring *r = calloc(1, sizeof *r);
    int ret;

    if (!r) {
        *err = ENOMEM;
        return NULL;
    }
    memset(&p, 0, sizeof p);
    p.flags = flags;
    p.cq_entries = cq_entries;
    ret = io_uring_queue_init_params(entries, &r->ring, &p);
    if (ret < 0) {
        free(r);
        *err = -ret;
        return NULL;
    }
    r->setup_flags = flags;
    r->wake_fd = wake_fd;
    r->enabled = !(flags & IORING_SETUP_R_DISABLED);
    /* Only a ring bound to one thread (SINGLE_ISSUER, enabled by that
     * thread) may be entered by index: see this_thread(). */
    r->want_registered = register_fd && !r->enabled && (flags & IORING_SETUP_SINGLE_ISSUER);
    *err = 0;
    return r;
}

static unsigned iomux_ring_features(const iomux_ring *r) { return r->ring.features; }
static unsigned iomux_ring_sq_entries(const iomux_ring *r) { return r->ring.sq.ring_entries; }
static unsigned iomux_ring_cq_entries(const iomux_ring *r) { return r->ring.cq.ring_entries; }
static int iomux_ring_fd(const iomux_ring *r) { return r->ring.ring_fd; }
static int iomux_ring_registered(const iomux_ring *r) { return r->reg_thread != 0; }

/* Fill supported[op] with 1/0 for every opcode the kernel knows; returns the
 * number of entries written or -errno. */
static int iomux_ring_probe(iomux_ring *r, unsigned char *supported, unsigned n)
{
    struct io_uring_probe *p;
    unsigned i;

    if (foreign_thread(r))
        return -EEXIST;
    p = io_uring_get_probe_ring(&r->ring);
    if (!p)
        return -EOPNOTSUPP;
    for (i = 0; i < n; i++)
        supported[i] = (unsigned char)io_uring_opcode_supported(p, (int)i);
    io_uring_free_probe(p);
    return (int)n;
}

/* With SINGLE_ISSUER the kernel binds the ring to the thread that enables
 * it.  The ring is created disabled and enabled on first use, so the thread
 * that runs the loop owns it, not the one that happened to construct it. */
static int ensure_enabled(iomux_ring *r)
{
    int ret;

    if (r->enabled)
        return 0;
    /* liburing 2.3 declares io_uring_enable_rings() but its .so does not
     * export it: use the raw register call. */
    ret = io_uring_register((unsigned)r->ring.ring_fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0);
    if (ret < 0)
        return ret;
    r->enabled = 1;
    /* Not registered (kernel before 5.18, or this thread's table of 16 is
     * full): entering by fd works the same, a little slower. */
    if (r->want_registered && io_uring_register_ring_fd(&r->ring) == 1)
        r->reg_thread = this_thread();
    return 0;
}

/* Stop entering by index: unregister in the registering thread.  Elsewhere
 * (another thread, a forked child) the index is only forgotten, by one no
 * thread can have (the kernel's table holds 16), so that liburing's own
 * unregister in io_uring_queue_exit() fails harmlessly; the kernel drops
 * the registration when the registering thread exits. */
static void drop_registration(iomux_ring *r, int may_unregister)
{
    if (!r->reg_thread)
        return;
    if (!(may_unregister && r->reg_thread == this_thread() &&
          io_uring_unregister_ring_fd(&r->ring) == 1))
        r->ring.enter_ring_fd = INT_MAX;
    r->reg_thread = 0;
}

/* Completions parked on the overflow list, or, with tw, (DEFER/COOP_TASKRUN)
 * task work that will post completions once we enter the kernel.  The
 * kernel runs only so much task work per enter: the polls a call submits
 * may need a second enter to report (poll(0) right after register() must
 * see them).  Task work from wake-ups that came in after a wait returned
 * is better left to the next call, whose enter runs it anyway: flushing it
 * at once costs one more system call per loop iteration. */
static int needs_flush(const iomux_ring *r, int tw)
{
    unsigned kflags = IO_URING_READ_ONCE(*r->ring.sq.kflags);
    return (kflags & (IORING_SQ_CQ_OVERFLOW | (tw ? IORING_SQ_TASKRUN : 0))) != 0;
}

/* An SQE, submitting what is queued to make room when the SQ is full. */
static struct io_uring_sqe *get_sqe(iomux_ring *r, int *err)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&r->ring);
    int ret;

    if (sqe)
        return sqe;
    ret = io_uring_submit(&r->ring);
    if (ret < 0) {
        *err = ret;
        return NULL;
    }
    sqe = io_uring_get_sqe(&r->ring);
    if (!sqe)
        *err = -EBUSY;
    return sqe;
}

static void prep_op(struct io_uring_sqe *sqe, const struct iomux_op *op)
{
    switch (op->op) {
    case IOMUX_OP_NOP:
        io_uring_prep_nop(sqe);
        break;
    case IOMUX_OP_POLL_ADD:
        io_uring_prep_poll_add(sqe, op->fd, op->arg);
        break;
    case IOMUX_OP_POLL_MULTISHOT:
        io_uring_prep_poll_multishot(sqe, op->fd, op->arg);
        break;
    case IOMUX_OP_POLL_UPDATE:
        /* Older kernels replace the whole mask: a multishot poll turns
         * one-shot unless arg2 repeats IORING_POLL_ADD_MULTI. */
        io_uring_prep_poll_update(sqe, op->addr, op->addr2, op->arg, op->arg2);
        break;
    case IOMUX_OP_POLL_REMOVE:
        io_uring_prep_poll_remove(sqe, op->addr);
        break;
    case IOMUX_OP_CANCEL:
        io_uring_prep_cancel64(sqe, op->addr, (int)op->arg);
        break;
    case IOMUX_OP_CANCEL_FD:
        io_uring_prep_cancel_fd(sqe, op->fd, op->arg);
        break;
    case IOMUX_OP_ACCEPT:
        io_uring_prep_accept(sqe, op->fd, NULL, NULL, (int)op->arg);
        break;
    case IOMUX_OP_ACCEPT_MULTISHOT:
        io_uring_prep_multishot_accept(sqe, op->fd, NULL, NULL, (int)op->arg);
        break;
    case IOMUX_OP_RECV:
    case IOMUX_OP_RECV_MULTISHOT:
        if (op->op == IOMUX_OP_RECV)
            io_uring_prep_recv(sqe, op->fd, NULL, 0, (int)op->arg);
        else
            io_uring_prep_recv_multishot(sqe, op->fd, NULL, 0, (int)op->arg);
        sqe->flags |= IOSQE_BUFFER_SELECT;
        sqe->buf_group = op->buf_group;
        break;
    case IOMUX_OP_SEND:
        io_uring_prep_send(sqe, op->fd, (const void *)(uintptr_t)op->addr, op->arg2,
                           (int)op->arg);
        break;
    case IOMUX_OP_CLOSE:
        io_uring_prep_close(sqe, op->fd);
        break;
    case IOMUX_OP_OPENAT:
        io_uring_prep_openat(sqe, op->fd, (const char *)(uintptr_t)op->addr, (int)op->arg,
                             (mode_t)op->arg2);
        break;
    case IOMUX_OP_READ:
        io_uring_prep_read(sqe, op->fd, (void *)(uintptr_t)op->addr, op->arg2, op->addr2);
        break;
    case IOMUX_OP_WRITE:
        io_uring_prep_write(sqe, op->fd, (const void *)(uintptr_t)op->addr, op->arg2, op->addr2);
        break;
    case IOMUX_OP_FSYNC:
        io_uring_prep_fsync(sqe, op->fd, op->arg);
        break;
    case IOMUX_OP_STATX:
        io_uring_prep_statx(sqe, op->fd, (const char *)(uintptr_t)op->addr, (int)op->arg,
                            op->arg2, (struct statx *)(uintptr_t)op->addr2);
        break;
    case IOMUX_OP_SPLICE:
        io_uring_prep_splice(sqe, op->fd, (int64_t)op->addr, (int)op->arg, (int64_t)op->addr2,
                             op->arg2, op->buf_group);
        break;
    }
    sqe->flags |= op->sqe_flags;
    io_uring_sqe_set_data64(sqe, op->user_data);
}

/* The level state of fd, growing the table; NULL if out of memory. */
static struct iomux_level *level_slot(iomux_ring *r, int fd)
{
    unsigned n;
    struct iomux_level *grown;

    if (fd < 0)
        return NULL;
    if ((unsigned)fd < r->nlevel)
        return &r->level[fd];
    n = r->nlevel ? r->nlevel : 64;
    while (n <= (unsigned)fd)
        n *= 2;
    grown = realloc(r->level, n * sizeof *grown);
    if (!grown)
        return NULL;
    memset(grown + r->nlevel, 0, (n - r->nlevel) * sizeof *grown);
    r->level = grown;
    r->nlevel = n;
    return &r->level[fd];
}

/* Make room for n more fds in the next call's re-check list. */
static int hot_reserve(iomux_ring *r, unsigned n)
{
    unsigned cap = r->hotcap ? r->hotcap : 64;
    int *a, *b;
    struct pollfd *p;

    if (r->nhot_next + n <= r->hotcap)
        return 0;
    while (cap < r->nhot_next + n)
        cap *= 2;
    a = realloc(r->hot, cap * sizeof *a);
    if (!a)
        return -ENOMEM;
    r->hot = a;
    b = realloc(r->hot_next, cap * sizeof *b);
    if (!b)
        return -ENOMEM;
    r->hot_next = b;
    p = realloc(r->pfds, cap * sizeof *p);
    if (!p)
        return -ENOMEM;
    r->pfds = p;
    r->hotcap = cap;
    return 0;
}

#include "_uring_streams.c"

/* A level poll reported fd: re-check it at the next call. */
static void level_reported(iomux_ring *r, struct iomux_level *slot, int fd, uint64_t ud)
{
    slot->user_data = ud;
    slot->epoch = r->epoch;
    if (!slot->hot && hot_reserve(r, 1) == 0) {
        r->hot_next[r->nhot_next++] = fd;
        slot->hot = 1;
    }
}

/* Level poll ud was queued for its fd: it replaces any earlier one. */
static void level_armed(iomux_ring *r, uint64_t ud)
{
    struct iomux_level *slot;

    if (!(ud & IOMUX_UD_LEVEL))
        return;
    slot = level_slot(r, (int)(ud & 0xFFFFFFFFu));
    if (slot)
        slot->armed = ud;
}

/* A removal of poll ud was queued: it must not be re-checked any more. */
static void level_removed(iomux_ring *r, uint64_t ud)
{
    int fd = (int)(ud & 0xFFFFFFFFu);

    if (!(ud & IOMUX_UD_LEVEL) || (unsigned)fd >= r->nlevel)
        return;
    if (r->level[fd].user_data == ud)
        r->level[fd].user_data = 0;
    if (r->level[fd].armed == ud)
        r->level[fd].armed = 0;
}

/* Re-check the fds level polls reported last time: one poll(2) call; the
 * ones still ready are reported again into out (at most cap).  Returns the
 * number reported. */
static unsigned level_recheck(iomux_ring *r, struct iomux_cqe *out, unsigned cap)
{
    unsigned i, k, m = 0, n = 0, ready = 0, emit;
    int *tmp;

    /* This call's list starts empty; the fds left over come first in it,
     * then those reported again (so that no fd starves when out is full). */
    tmp = r->hot;
    r->hot = r->hot_next;
    r->hot_next = tmp;
    r->nhot = r->nhot_next;
    r->nhot_next = 0;
    for (i = 0; i < r->nhot; i++) {
        int fd = r->hot[i];
        struct iomux_level *slot = &r->level[fd];
        uint64_t ud = slot->user_data;

        if (!ud) {
            slot->hot = 0;
            continue;
        }
        r->pfds[m].fd = fd;
        r->pfds[m].events = (short)(((ud & IOMUX_UD_LEVEL_IN) ? POLLIN : 0) |
                                    ((ud & IOMUX_UD_LEVEL_OUT) ? POLLOUT : 0));
        r->pfds[m].revents = 0;
        m++;
    }
    if (m == 0)
        return 0;
    if (poll(r->pfds, m, 0) < 0) {
        /* EINTR or ENOMEM: keep every fd for the next call. */
        for (i = 0; i < m; i++)
            r->hot_next[r->nhot_next++] = r->pfds[i].fd;
        return 0;
    }
    for (i = 0; i < m; i++) {
        if (r->pfds[i].revents)
            ready++;
        else
            r->level[r->pfds[i].fd].hot = 0; /* drained: its poll reports the next wake-up */
    }
    emit = ready < cap ? ready : cap;
    /* The ready fds that do not fit come first in the next call's list. */
    for (i = 0, k = 0; i < m; i++) {
        if (!r->pfds[i].revents)
            continue;
        if (k++ >= emit)
            r->hot_next[r->nhot_next++] = r->pfds[i].fd;
    }
    for (i = 0, k = 0; i < m && n < emit; i++) {
        struct iomux_level *slot = &r->level[r->pfds[i].fd];

        if (!r->pfds[i].revents)
            continue;
        out[n].user_data = slot->user_data;
        out[n].res = r->pfds[i].revents;
        out[n].flags = IORING_CQE_F_MORE;
        n++;
        slot->epoch = r->epoch;
        r->hot_next[r->nhot_next++] = r->pfds[i].fd;
    }
    return n;
}

/* Check the poll reports out[0..n) hold with one poll(2) (see
 * IOMUX_UD_VERIFY): each gets what the fd is ready for now, or 0. */
static void verify_polls(iomux_ring *r, struct iomux_cqe *out, unsigned n)
{
    unsigned i, m = 0;

    for (i = 0; i < n; i++) {
        uint64_t ud = out[i].user_data;

        if (out[i].res <= 0 || ud >= IOMUX_UD_RESERVED || (ud & IOMUX_UD_NOT_A_POLL) ||
            !(ud & (IOMUX_UD_VERIFY | IOMUX_UD_LEVEL)))
            continue;
        if (m == r->vcap) {
            unsigned cap = r->vcap ? 2 * r->vcap : 64;
            struct pollfd *f = realloc(r->vfds, cap * sizeof *f);
            unsigned *x;

            if (!f)
                return; /* out of memory: hand the reports out as they are */
            r->vfds = f;
            x = realloc(r->vidx, cap * sizeof *x);
            if (!x)
                return;
            r->vidx = x;
            r->vcap = cap;
        }
        r->vfds[m].fd = (int)(ud & 0xFFFFFFFFu);
        r->vfds[m].events = (short)(out[i].res & (POLLIN | POLLOUT | POLLPRI));
        r->vfds[m].revents = 0;
        r->vidx[m++] = i;
    }
    if (m == 0 || poll(r->vfds, m, 0) < 0)
        return; /* (EINTR, ENOMEM: the reports go out unchecked) */
    for (i = 0; i < m; i++)
        out[r->vidx[i]].res = r->vfds[i].revents;
}

/* Turn records into SQEs; *done counts the records consumed. */
static int queue_ops(iomux_ring *r, const struct iomux_op *ops, unsigned nops, int64_t *done)
{
    struct io_uring_sqe *sqe;
    int err = 0;
    unsigned i;

    if (r->wake_fd >= 0 && !r->wake_armed) {
        sqe = get_sqe(r, &err);
        if (!sqe)
            return err;
        io_uring_prep_poll_multishot(sqe, r->wake_fd, POLLIN);
        io_uring_sqe_set_data64(sqe, IOMUX_UD_WAKE);
        r->wake_armed = 1;
    }
    for (i = 0; i < nops; i++) {
        sqe = get_sqe(r, &err);
        if (!sqe) {
            *done = i;
            return err;
        }
        prep_op(sqe, &ops[i]);
        if (ops[i].op == IOMUX_OP_POLL_REMOVE)
            level_removed(r, ops[i].addr);
        else if (ops[i].op == IOMUX_OP_POLL_MULTISHOT)
            level_armed(r, ops[i].user_data);
        else if (ops[i].op == IOMUX_OP_POLL_UPDATE)
            level_armed(r, ops[i].addr2);
    }
    *done = nops;
    return 0;
}

static void internal_cqe(iomux_ring *r, const struct io_uring_cqe *cqe, int64_t *status)
{
    uint64_t counter;
    ssize_t got;

    if (cqe->user_data != IOMUX_UD_WAKE)
        return; /* close-time cancel, or liburing's own timeout */
    /* Reset the eventfd so the next write is a new wake-up.  A write that
     * lands between the poll firing and this read is folded into this one;
     * EAGAIN (already reset) is fine. */
    got = read(r->wake_fd, &counter, sizeof counter);
    (void)got;
    if (!(cqe->flags & IORING_CQE_F_MORE))
        r->wake_armed = 0; /* the multishot poll ended: re-armed on next enter */
    status[0] |= IOMUX_ST_WOKEN;
}

/* Copy up to cap completions out and advance the CQ past them.  Whatever
 * does not fit stays in the CQ (or the kernel's overflow list) for the next
 * call: nothing is dropped. */
static unsigned copy_out(iomux_ring *r, struct iomux_cqe *out, unsigned cap, int64_t *status,
                         int flush_tw)
{
    struct io_uring_cqe *cqe;
    unsigned n = 0, head, seen;
    int stopped = 0;

    for (;;) {
        seen = 0;
        io_uring_for_each_cqe(&r->ring, head, cqe) {
            if ((cqe->user_data & IOMUX_UD_STREAM) && cqe->user_data < IOMUX_UD_RESERVED &&
                r->streams) {
                if (!stream_cqe_fits(r, cqe)) {
                    stopped = 1; /* no room: the rest waits for the next call */
                    status[0] |= IOMUX_ST_STREAMS_FULL;
                    break;
                }
                seen++;
                stream_cqe(r, cqe);
                continue;
            }
            if (n == cap)
                break;
            seen++;
            if (cqe->user_data >= IOMUX_UD_RESERVED) {
                internal_cqe(r, cqe, status);
                continue;
            }
            if (cqe->user_data & IOMUX_UD_LEVEL) {
                int fd = (int)(cqe->user_data & 0xFFFFFFFFu);
                struct iomux_level *slot = level_slot(r, fd);

                /* A replaced poll whose removal is still in flight can
                 * report after its successor: it must not take the fd's
                 * slot, or the re-checks would report the stale poll. */
                if (slot && slot->armed != cqe->user_data)
                    slot = NULL;
                if (slot && (cqe->flags & IORING_CQE_F_MORE) && cqe->res > 0) {
                    if (slot->user_data == cqe->user_data && slot->epoch == r->epoch)
                        continue; /* reported by this call's re-check already */
                    level_reported(r, slot, fd, cqe->user_data);
                } else if (slot && slot->user_data == cqe->user_data) {
                    slot->user_data = 0; /* the poll ended: the caller re-arms it */
                }
            }
            out[n].user_data = cqe->user_data;
            out[n].res = cqe->res;
            out[n].flags = cqe->flags;
            n++;
        }
        io_uring_cq_advance(&r->ring, seen);
        streams_publish(r->streams);
        if (n == cap || stopped || !needs_flush(r, flush_tw))
            break;
        /* One enter with GETEVENTS moves overflowed completions into the
         * CQ and runs deferred task work. */
        if (io_uring_get_events(&r->ring) < 0 || io_uring_cq_ready(&r->ring) == 0)
            break;
    }
    if ((n == cap || stopped) && (io_uring_cq_ready(&r->ring) || needs_flush(r, 1)))
        status[0] |= IOMUX_ST_MORE;
    return n;
}

static int enter(iomux_ring *r, const void *ops_buf, unsigned nops, void *out_buf, unsigned cap,
                 unsigned min_complete, int64_t timeout_ns, unsigned flags, const void *sops,
                 unsigned nsops, const void *sends, unsigned nsends, const void *stage,
                 size_t stage_len, int64_t *status);

/*
 * Queue nops records (and nsops stream records, with the stage they take the
 * bytes of SEND records from), submit everything pending, wait for at least
 * min_complete (0 or 1) completions for at most timeout_ns (-1: no limit,
 * 0: do not wait), then copy all available completions into out (up to cap).
 *
 * Returns the number copied, or -errno.  status[0] gets IOMUX_ST_* bits,
 * status[1] the number of records consumed (the rest must be passed again),
 * status[2] on -EINTR the nanoseconds left of the timeout (-1: no limit), on
 * -EINVAL the index of the malformed record (none of them is consumed).
 *
 * status[3] the number of stream records consumed, status[4] the send pairs
 * and status[5] the stage bytes they took, status[6] the number of stream
 * events in the event array and status[7] the bytes of the data area they
 * use (both count from the last call with IOMUX_ENTER_NEW_BATCH).  Stream events make the call return
 * without waiting.
 *
 * A positive timeout never ends early: returning 0 before the deadline
 * happens only for a wake-up (IOMUX_ST_WOKEN), stream events, and -EINTR
 * only for a signal.
 */
static int iomux_enter(iomux_ring *r, const void *ops_buf, unsigned nops, void *out_buf,
                       unsigned cap, unsigned min_complete, int64_t timeout_ns,
                       unsigned flags, const void *sops, unsigned nsops, const void *sends,
                       unsigned nsends, const void *stage, size_t stage_len, int64_t *status)
{
    int ret = enter(r, ops_buf, nops, out_buf, cap, min_complete, timeout_ns, flags, sops,
                    nsops, sends, nsends, stage, stage_len, status);

    streams_check_backlogs(r->streams);

    status[6] = r->streams ? r->streams->nev : 0;
    status[7] = r->streams ? (int64_t)r->streams->data_len : 0;
    return ret;
}

static int enter(iomux_ring *r, const void *ops_buf, unsigned nops, void *out_buf, unsigned cap,
                 unsigned min_complete, int64_t timeout_ns, unsigned flags, const void *sops,
                 unsigned nsops, const void *sends, unsigned nsends, const void *stage,
                 size_t stage_len, int64_t *status)
{
    const struct iomux_op *ops = ops_buf;
    struct iomux_cqe *out = out_buf;
    struct io_uring_cqe *cqe;
    struct __kernel_timespec ts;
    int64_t deadline, slice_end, now;
    int ret, qerr;
    unsigned n, rechecked = 0;

    status[0] = 0;
    status[1] = 0;
    status[2] = -1;
    status[3] = status[4] = status[5] = 0;
    if (foreign_thread(r))
        return -EEXIST;
    for (n = 0; n < nops; n++) {
        if (ops[n].op >= IOMUX_OP_COUNT || ops[n].user_data >= IOMUX_UD_RESERVED ||
            (r->streams && (ops[n].user_data & IOMUX_UD_STREAM))) {
            status[2] = n; /* a malformed record: nothing is done */
            return -EINVAL;
        }
    }
    if ((nsops || nsends) && !r->streams)
        return -EINVAL;
    if (r->streams && (flags & IOMUX_ENTER_NEW_BATCH)) {
        r->streams->nev = 0;
        r->streams->data_len = 0;
        r->streams->epoch++;
    }
    if (r->streams)
        r->streams->call_ev = r->streams->nev; /* Python may have taken those */
    ret = ensure_enabled(r);
    if (ret < 0)
        return ret;
    qerr = queue_ops(r, ops, nops, &status[1]);
    if (qerr == 0 && (nsops || nsends))
        stream_records(r, sops, nsops, sends, nsends, stage, stage_len, &status[3]);
    r->epoch++;
    if (flags & IOMUX_ENTER_RECHECK)
        rechecked = level_recheck(r, out, cap);

    if (min_complete == 0 || timeout_ns == 0 || qerr < 0 || rechecked ||
        (r->streams && r->streams->nev) || io_uring_cq_ready(&r->ring)) {
        /* No waiting.  Enter only if there is something to submit or the
         * kernel holds completions back (overflow, deferred task work). */
        ret = 0;
        if (io_uring_sq_ready(&r->ring) || needs_flush(r, 1))
            ret = io_uring_submit_and_get_events(&r->ring);
        n = copy_out(r, out + rechecked, cap - rechecked, status, 1);
        verify_polls(r, out + rechecked, n); /* (the re-checked ones are fresh) */
        n += rechecked;
        if (n || (r->streams && r->streams->nev))
            return (int)n;
        if (ret < 0)
            return ret;
        /* A full SQ the kernel cannot drain right now (-EBUSY/-EAGAIN) is
         * not an error: the records not consumed are passed again. */
        if (qerr < 0 && qerr != -EBUSY && qerr != -EAGAIN)
            return qerr;
        if (min_complete && !(status[0] & IOMUX_ST_WOKEN))
            status[0] |= IOMUX_ST_TIMED_OUT;
        return 0;
    }

    now = now_ns();
    /* Negative or absurdly long: no deadline (and no int64 overflow). */
    deadline = timeout_ns < 0 || timeout_ns > INT64_MAX - now ? INT64_MAX : now + timeout_ns;
    for (;;) {
        now = now_ns();
        if (now >= deadline) {
            status[0] |= IOMUX_ST_TIMED_OUT;
            return 0;
        }
        slice_end = deadline - now > IOMUX_WAIT_SLICE_NS ? now + IOMUX_WAIT_SLICE_NS : deadline;
        ts.tv_sec = (slice_end - now) / 1000000000LL;
        ts.tv_nsec = (slice_end - now) % 1000000000LL;
        /* With IORING_FEAT_EXT_ARG the timespec is read during this call;
         * without it liburing queues a timeout SQE and submits it here too. */
        ret = io_uring_submit_and_wait_timeout(&r->ring, &cqe, 1, &ts, NULL);
        n = copy_out(r, out, cap, status, nops > 0);
        verify_polls(r, out, n);
        if (n || (status[0] & IOMUX_ST_WOKEN) || (r->streams && r->streams->nev))
            return (int)n;
        now = now_ns();
        if (ret == -EINTR || (ret > 0 && now < slice_end)) {
            /* When the same enter also submitted SQEs, the kernel reports
             * the submit count and swallows -EINTR/-ETIME of the wait (and
             * liburing 2.3 then does not report -ETIME either).  Before the
             * deadline, that can only have been a signal. */
            status[2] = deadline == INT64_MAX ? -1 : (deadline > now ? deadline - now : 0);
            return -EINTR;
        }
        if (ret < 0 && ret != -ETIME)
            return ret;
        /* -ETIME, or a slice of an unlimited wait ran out: wait again for
         * whatever is left (a kernel timer never fires early, this clock
         * check just makes sure of it). */
    }
}

/* Cancel everything in flight, wait (bounded) until the kernel confirms,
 * then tear the ring down.  cancel = 0 (e.g. in a forked child, or from a
 * thread the ring is not bound to) skips straight to the teardown. */
static void iomux_ring_close(iomux_ring *r, int cancel)
{
    struct io_uring_sqe *sqe;
    struct io_uring_cqe *cqe;
    struct __kernel_timespec ts = {0, 100 * 1000000LL};
    int err = 0, done = 0, ret, tries;
    unsigned head, seen;

    if (foreign_thread(r))
        cancel = 0; /* it would fail with EEXIST */
    if (cancel && r->enabled && (sqe = get_sqe(r, &err))) {
        io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY | IORING_ASYNC_CANCEL_ALL);
        io_uring_sqe_set_data64(sqe, IOMUX_UD_CLOSE);
        for (tries = 0; tries < 20 && !done; tries++) {
            ret = io_uring_submit_and_wait_timeout(&r->ring, &cqe, 1, &ts, NULL);
            seen = 0;
            io_uring_for_each_cqe(&r->ring, head, cqe) {
                seen++;
                if (cqe->user_data == IOMUX_UD_CLOSE)
                    done = 1;
            }
            io_uring_cq_advance(&r->ring, seen);
            if (ret < 0 && ret != -ETIME && ret != -EINTR)
                break; /* e.g. -EEXIST: not the ring's thread */
        }
    }
    drop_registration(r, cancel);
    streams_free(r, 1);
    io_uring_queue_exit(&r->ring);
    free(r->level);
    free(r->hot);
    free(r->hot_next);
    free(r->pfds);
    free(r->vfds);
    free(r->vidx);
    free(r);
}

/*
 * A provided-buffer ring of nbufs buffers of size bytes each, carved out of
 * data (Python-owned, nbufs * size bytes).  liburing 2.4+ has
 * io_uring_setup_buf_ring(); 2.3 does not, so it is done by hand:
 * page-aligned ring memory, register it, publish every buffer.
 */
static iomux_bufs *iomux_bufs_new(iomux_ring *r, unsigned bgid, unsigned nbufs, unsigned size,
                                  void *data, int *err)
{
    struct io_uring_buf_reg reg;
    long page = sysconf(_SC_PAGESIZE);
    iomux_bufs *b;
    unsigned i;
    int ret;

    if (nbufs == 0 || nbufs > 32768 || (nbufs & (nbufs - 1)) || size == 0 || bgid > 0xFFFF) {
        *err = EINVAL;
        return NULL;
    }
    if (foreign_thread(r)) {
        *err = EEXIST;
        return NULL;
    }
    b = calloc(1, sizeof *b);
    if (!b) {
        *err = ENOMEM;
        return NULL;
    }
    b->br_bytes = (nbufs * sizeof(struct io_uring_buf) + (size_t)page - 1) & ~((size_t)page - 1);
    b->br = mmap(NULL, b->br_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (b->br == MAP_FAILED) {
        *err = errno;
        free(b);
        return NULL;
    }
    memset(&reg, 0, sizeof reg);
    reg.ring_addr = (uint64_t)(uintptr_t)b->br;
    reg.ring_entries = nbufs;
    reg.bgid = (uint16_t)bgid;
    ret = io_uring_register_buf_ring(&r->ring, &reg, 0);
    if (ret < 0) {
        munmap(b->br, b->br_bytes);
        free(b);
        *err = -ret;
        return NULL;
    }
    b->data = data;
    b->nbufs = nbufs;
    b->size = size;
    b->bgid = bgid;
    b->mask = (unsigned)io_uring_buf_ring_mask(nbufs);
    io_uring_buf_ring_init(b->br);
    for (i = 0; i < nbufs; i++)
        io_uring_buf_ring_add(b->br, b->data + (size_t)i * size, size, (unsigned short)i,
                              (int)b->mask, (int)i);
    io_uring_buf_ring_advance(b->br, (int)nbufs);
    *err = 0;
    return b;
}

/* Hand n buffers back to the kernel in one step.  Returns 0, or -EINVAL if
 * some ids were out of range (those are skipped, the others recycled). */
static int iomux_bufs_recycle(iomux_bufs *b, const uint16_t *bids, unsigned n)
{
    unsigned i, k = 0;

    for (i = 0; i < n; i++) {
        if (bids[i] >= b->nbufs)
            continue;
        io_uring_buf_ring_add(b->br, b->data + (size_t)bids[i] * b->size, b->size, bids[i],
                              (int)b->mask, (int)k);
        k++;
    }
    io_uring_buf_ring_advance(b->br, (int)k);
    return k == n ? 0 : -EINVAL;
}

/* r = NULL once the ring itself is gone (the kernel dropped the group). */
static void iomux_bufs_free(iomux_ring *r, iomux_bufs *b)
{
    if (r && !foreign_thread(r))
        io_uring_unregister_buf_ring(&r->ring, (int)b->bgid);
    munmap(b->br, b->br_bytes);
    free(b);
}
