/*
 * _uring_streams.c - stream connections driven by the ring, for the event loop.
 *
 * Included by _uring_helper.c.  The loop's completion transports do not
 * queue io_uring operations themselves: per loop iteration, Python hands
 * this code one array of stream records (open, read, pause, send, shut
 * down, close, listen...) and the bytes its transports wrote, in the same
 * iomux_enter() call that waits.  This code keeps one connection table
 * indexed by slot, turns records into operations (a multishot receive into
 * a provided-buffer ring, one send in flight per connection with the rest
 * buffered here, a guard poll, a multishot accept per listener), reaps
 * their completions, copies received bytes into one data area and gives
 * the provided buffers back at once, and hands Python one compact array of
 * events (slot, kind, result, offset): one Python step per received
 * message, nothing per send.
 *
 * Every operation of a slot is counted while it is in the kernel; a slot
 * that is closing reports CLOSED only when that count is back to zero, so
 * no completion ever arrives for a slot Python has reused, and no
 * operation ever runs on a file descriptor number Python has closed.
 */

/* user_data of a stream operation: IOMUX_UD_STREAM | kind << 40 | slot. */
#define IOMUX_UD_STREAM (1ULL << 60)

/* Incremental consumption of provided buffers (kernel 6.12): a receive takes
 * only the bytes it needs from the buffer at the ring's head, which stays
 * there (IORING_CQE_F_BUF_MORE) until it is full, so small messages share a
 * buffer instead of taking one each.  liburing 2.3 knows neither name. */
#ifndef IOU_PBUF_RING_INC
#define IOU_PBUF_RING_INC 2
#endif
#ifndef IORING_CQE_F_BUF_MORE
#define IORING_CQE_F_BUF_MORE (1U << 4)
#endif
/* Receive bundles (kernel 6.10): one receive fills as many provided buffers
 * as the socket has bytes queued, the ring's next ones from its head, and
 * its completion names the first; liburing 2.3 knows neither name.  Used
 * with whole buffers only (see iomux_streams_new). */
#ifndef IORING_RECVSEND_BUNDLE
#define IORING_RECVSEND_BUNDLE (1U << 4)
#endif
#ifndef IORING_FEAT_RECVSEND_BUNDLE
#define IORING_FEAT_RECVSEND_BUNDLE (1U << 14)
#endif
enum { SK_RECV = 1, SK_SEND = 2, SK_GUARD = 3, SK_CANCEL = 4, SK_ACCEPT = 5 };

/* One record from Python (24 bytes).  Sends come apart, as (slot, length)
 * pairs of uint32 whose bytes follow one another in the stage: a record is
 * applied after the first sends_before sends, so the two keep Python's order
 * (a write, then write_eof(), shuts down after sending). */
struct iomux_sop {
    uint32_t kind;
    uint32_t slot;
    uint64_t arg;
    uint32_t sends_before;
    uint32_t len; /* SEND: bytes at arg (else 0) */
};
enum {
    IOMUX_SOP_OPEN = 1,    /* arg = fd of a connected socket (nothing armed yet) */
    IOMUX_SOP_READ = 2,    /* receive (again) */
    IOMUX_SOP_PAUSE = 3,   /* stop receiving */
    IOMUX_SOP_SEND = 4,    /* arg = address of len bytes to send, alive until this call
                              returns (long writes; short ones are send pairs) */
    IOMUX_SOP_SHUT_WR = 5, /* shutdown(SHUT_WR) once everything is sent */
    IOMUX_SOP_CLOSE = 6,   /* arg = 0: once everything is sent (DRAINED), 1: now */
    IOMUX_SOP_NOTIFY = 7,  /* arg = a sent total: report SENT when it is reached */
    IOMUX_SOP_LISTEN = 8,  /* arg = fd of a listening socket: accept (again, after
                              ACCEPT_END, on the same slot) */
    IOMUX_SOP_LIMIT = 9,   /* arg = the backlog above which BACKLOG is reported */
    IOMUX_SOP_COUNT = 10
};

/* One event to Python (16 bytes). */
struct iomux_sev {
    uint32_t slot;
    uint32_t kind;
    int32_t res;
    uint32_t off;
};
enum {
    IOMUX_SEV_DATA = 1,       /* res bytes at off in the data area */
    IOMUX_SEV_EOF = 2,        /* the peer ended its side */
    IOMUX_SEV_ERROR = 3,      /* res = -errno; off = what failed: IOMUX_ERR_* */
    IOMUX_SEV_SENT = 4,       /* the total NOTIFY asked for was sent */
    IOMUX_SEV_DRAINED = 5,    /* a CLOSE(0): everything was sent, the connection is over */
    IOMUX_SEV_CLOSED = 6,     /* nothing of the slot is left in the kernel */
    IOMUX_SEV_ACCEPTED = 7,   /* res = the new connection's fd */
    IOMUX_SEV_ACCEPT_END = 8, /* res = 0 or -errno: the multishot accept ended */
    IOMUX_SEV_BACKLOG = 9,    /* res = bytes written and not sent yet, now above the limit */
};

/* One short send (8 bytes): the slot and the length of the stage's next
 * bytes (iomux.completion.SEND_PAIR). */
struct iomux_send_pair {
    uint32_t slot;
    uint32_t len;
};

/* What an ERROR event's off says failed. */
enum { IOMUX_ERR_RECV = 0, IOMUX_ERR_SEND = 1, IOMUX_ERR_SHUTDOWN = 2, IOMUX_ERR_RECORD = 3 };

/* The layouts Python packs and unpacks (drivers/_uring.py checks them at import). */
#define IOMUX_SOP_SIZE sizeof(struct iomux_sop)
#define IOMUX_SOP_OFF_SENDS_BEFORE offsetof(struct iomux_sop, sends_before)
#define IOMUX_SEV_SIZE sizeof(struct iomux_sev)
#define IOMUX_SEV_OFF_KIND offsetof(struct iomux_sev, kind)
#define IOMUX_SEV_OFF_RES offsetof(struct iomux_sev, res)
#define IOMUX_SEV_OFF_OFF offsetof(struct iomux_sev, off)
#define IOMUX_SEND_PAIR_SIZE sizeof(struct iomux_send_pair)
#define IOMUX_SEND_PAIR_OFF_LEN offsetof(struct iomux_send_pair, len)
_Static_assert(sizeof(struct iomux_sop) == 24 && offsetof(struct iomux_sop, arg) == 8 &&
                   offsetof(struct iomux_sop, sends_before) == 16,
               "stream records are \"=IIQII\"");
_Static_assert(sizeof(struct iomux_sev) == 16 && offsetof(struct iomux_sev, kind) == 4 &&
                   offsetof(struct iomux_sev, res) == 8 && offsetof(struct iomux_sev, off) == 12,
               "stream events are \"=IIiI\"");
_Static_assert(sizeof(struct iomux_send_pair) == 8 && offsetof(struct iomux_send_pair, len) == 4,
               "send pairs are \"=II\"");

/* Connection flags. */
#define CF_USED 0x1         /* the slot is in use */
#define CF_READING 0x2      /* Python wants data */
#define CF_RECV 0x4         /* a multishot receive is in the kernel */
#define CF_RECV_CANCEL 0x8  /* ...and its cancellation was asked */
#define CF_SEND 0x10        /* a send is in the kernel */
#define CF_GUARD 0x20       /* the guard poll is in the kernel */
#define CF_SHUT_WR 0x40     /* shut down writing once everything is sent */
#define CF_CLOSING 0x80     /* CLOSE(0): report DRAINED once everything is sent */
#define CF_DYING 0x100      /* cancelling everything; CLOSED once nothing is left */
#define CF_LISTENER 0x200   /* a listening socket */
#define CF_ACCEPT 0x400     /* its multishot accept is in the kernel */
#define CF_ENDED 0x800      /* end of stream or an error was reported: no more receives */
#define CF_WRITE_FAILED 0x1000
#define CF_GUARDED 0x2000   /* the guard poll fired: one-shot receives from now on */
#define CF_DIRTY 0x4000     /* written to in this call: check its backlog at the end */
#define CF_BACKLOGGED 0x8000 /* BACKLOG was reported; again only after SENT or a drain */

/* The guard poll: the peer ended its side or the connection broke. */
#define GUARD_EVENTS (POLLRDHUP | POLLERR | POLLHUP)
/* The default backlog above which BACKLOG is reported (asyncio's high-water mark). */
#define DEFAULT_LIMIT 65536
/* A connection gives its send buffers back when everything is sent, so an
 * idle one holds none: those of up to KEEP_BUFFER bytes go to the ring's
 * pool (at most POOL_MAX of them, POOL_BYTES in all), which the next
 * connection to send takes from; the rest are freed. */
#define KEEP_BUFFER 16384
#define POOL_MAX 1024
#define POOL_BYTES (1U << 20)
/* Bytes one connection receives into one batch of events, at most (a
 * completion that would pass it waits for the next batch): no connection
 * takes a whole iteration, and a protocol that writes what it reads learns
 * of its backlog before it has read much more (the stream transports' read
 * size).  A bundle receive asks for no more (sqe->len, the kernel's
 * per-receive cap of a multishot receive). */
#define SLOT_BATCH_LIMIT 65536
/* Events, and SQEs, one stream record or completion can produce at most. */
#define EVENTS_PER_CQE 3
#define SQES_PER_STEP 4

struct iomux_conn {
    int fd;
    uint32_t flags;
    uint32_t inflight;   /* operations of this slot in the kernel */
    char *ibuf;          /* bytes of the send in flight: [ioff, ilen) not yet sent */
    size_t ilen, ioff, icap;
    char *pbuf;          /* bytes written while a send is in flight */
    size_t plen, pcap;
    uint64_t sent;       /* total bytes the kernel confirmed sending */
    uint64_t notify_at;  /* report SENT once sent >= this (0: not asked) */
    uint64_t limit;      /* report BACKLOG when more than this is not sent yet */
    uint32_t batch;      /* bytes received into the current batch of events */
    uint32_t batch_epoch;
};

struct iomux_streams {
    struct iomux_conn *conns;
    unsigned nconns;
    struct io_uring_buf_ring *br; /* the provided-buffer ring receives pick from */
    size_t br_bytes;
    unsigned char *bufs;          /* nbufs * bufsize bytes */
    unsigned nbufs, bufsize, bmask, bgid;
    unsigned recycled;            /* buffers added since the last advance */
    uint32_t *boff;               /* incremental buffers: bytes of each taken so far (else NULL) */
    uint16_t *bpos;               /* bundles: where in the ring each buffer was put (else NULL) */
    unsigned recv_cap;            /* bundles: bytes one receive asks for at most (0: no cap) */
    uint64_t receives, filled;    /* receive completions with bytes, and buffers they took */
    struct iomux_sev *ev;         /* the event array, ev_cap entries (Python's memory) */
    unsigned ev_cap, nev;
    unsigned call_ev;             /* events before this call's (maybe handed out already) */
    unsigned char *data;          /* the data area, data_cap bytes (Python's memory) */
    size_t data_cap, data_len;
    int guard;                    /* arm the guard poll on each connection */
    uint32_t *dirty;              /* slots written to in this call */
    unsigned ndirty, dirtycap;
    uint32_t epoch;               /* counts batches of events (see batch) */
    struct pooled { char *buf; size_t cap; } *pool; /* send buffers nobody holds */
    unsigned npool;
    size_t pool_bytes;
};

static struct iomux_conn *conn_at(struct iomux_streams *s, uint32_t slot)
{
    unsigned n;
    struct iomux_conn *grown;

    if (slot < s->nconns)
        return &s->conns[slot];
    if (slot > 0x3FFFFFFF)
        return NULL;
    n = s->nconns ? s->nconns : 64;
    while (n <= slot)
        n *= 2;
    grown = realloc(s->conns, n * sizeof *grown);
    if (!grown)
        return NULL;
    memset(grown + s->nconns, 0, (n - s->nconns) * sizeof *grown);
    s->conns = grown;
    s->nconns = n;
    return &s->conns[slot];
}

static uint64_t stream_ud(unsigned kind, uint32_t slot)
{
    return IOMUX_UD_STREAM | (uint64_t)kind << 40 | slot;
}

static void emit(struct iomux_streams *s, uint32_t slot, unsigned kind, int32_t res, uint32_t off)
{
    struct iomux_sev *e;

    if (s->nev == s->ev_cap)
        return; /* cannot happen: room is checked before each record and completion */
    e = &s->ev[s->nev++];
    e->slot = slot;
    e->kind = kind;
    e->res = res;
    e->off = off;
}

/* Publish the buffers given back since the last call to the kernel. */
static void streams_publish(struct iomux_streams *s)
{
    if (s && s->recycled) {
        io_uring_buf_ring_advance(s->br, (int)s->recycled);
        s->recycled = 0;
    }
}

static int arm_recv(iomux_ring *r, struct iomux_conn *c, uint32_t slot)
{
    struct io_uring_sqe *sqe;
    int err = 0;

    streams_publish(r->streams); /* buffers given back reach the kernel first */
    sqe = get_sqe(r, &err);
    if (!sqe)
        return err;
    /* Once the guard poll said the peer is done, only what is queued is left
     * to read: one-shot receives read it, then report the end or the error,
     * which a multishot receive can miss (a kernel race, liburing#1549). */
    if (c->flags & CF_GUARDED)
        io_uring_prep_recv(sqe, c->fd, NULL, 0, 0);
    else
        io_uring_prep_recv_multishot(sqe, c->fd, NULL, 0, 0);
    /* Bundles for the multishot receive only: a one-shot bundle receive
     * appends whatever more the socket holds to its completion, past any
     * cap (its sqe->len caps only the first part). */
    if (r->streams->bpos && !(c->flags & CF_GUARDED)) {
        sqe->ioprio |= IORING_RECVSEND_BUNDLE;
        sqe->len = r->streams->recv_cap;
    }
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = (uint16_t)r->streams->bgid;
    io_uring_sqe_set_data64(sqe, stream_ud(SK_RECV, slot));
    c->flags |= CF_RECV;
    c->inflight++;
    return 0;
}

static int arm_guard(iomux_ring *r, struct iomux_conn *c, uint32_t slot)
{
    struct io_uring_sqe *sqe;
    int err = 0;

    sqe = get_sqe(r, &err);
    if (!sqe)
        return err;
    io_uring_prep_poll_add(sqe, c->fd, GUARD_EVENTS);
    io_uring_sqe_set_data64(sqe, stream_ud(SK_GUARD, slot));
    c->flags |= CF_GUARD;
    c->inflight++;
    return 0;
}

static int cancel_recv(iomux_ring *r, struct iomux_conn *c, uint32_t slot)
{
    struct io_uring_sqe *sqe;
    int err = 0;

    sqe = get_sqe(r, &err);
    if (!sqe)
        return err;
    /* Only a failure completes (SKIP_SUCCESS); it is not counted in flight. */
    io_uring_prep_cancel64(sqe, stream_ud(SK_RECV, slot), 0);
    sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
    io_uring_sqe_set_data64(sqe, stream_ud(SK_CANCEL, slot));
    c->flags |= CF_RECV_CANCEL;
    return 0;
}

static int cancel_all(iomux_ring *r, struct iomux_conn *c, uint32_t slot)
{
    struct io_uring_sqe *sqe;
    int err = 0;

    sqe = get_sqe(r, &err);
    if (!sqe)
        return err;
    io_uring_prep_cancel_fd(sqe, c->fd, IORING_ASYNC_CANCEL_ALL);
    sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
    io_uring_sqe_set_data64(sqe, stream_ud(SK_CANCEL, slot));
    return 0;
}

static int submit_send(iomux_ring *r, struct iomux_conn *c, uint32_t slot)
{
    struct io_uring_sqe *sqe;
    size_t len = c->ilen - c->ioff;
    int err = 0;

    sqe = get_sqe(r, &err);
    if (!sqe)
        return err;
    if (len > (1U << 30))
        len = 1U << 30; /* a short send, as the kernel may make anyway */
    io_uring_prep_send(sqe, c->fd, c->ibuf + c->ioff, len, MSG_NOSIGNAL);
    io_uring_sqe_set_data64(sqe, stream_ud(SK_SEND, slot));
    c->flags |= CF_SEND;
    c->inflight++;
    return 0;
}

static int grow(char **buf, size_t *cap, size_t need)
{
    size_t n = *cap ? *cap : 256;
    char *b;

    if (need <= *cap)
        return 0;
    while (n < need)
        n *= 2;
    b = realloc(*buf, n);
    if (!b)
        return -ENOMEM;
    *buf = b;
    *cap = n;
    return 0;
}

/* Keep a drained send buffer for the next sender, or free it. */
static void pool_put(struct iomux_streams *s, char *buf, size_t cap)
{
    if (!buf)
        return;
    if (cap <= KEEP_BUFFER && s->npool < POOL_MAX && s->pool_bytes + cap <= POOL_BYTES) {
        if (!s->pool)
            s->pool = malloc(POOL_MAX * sizeof *s->pool);
        if (s->pool) {
            s->pool[s->npool].buf = buf;
            s->pool[s->npool].cap = cap;
            s->npool++;
            s->pool_bytes += cap;
            return;
        }
    }
    free(buf);
}

/* A send buffer of at least need bytes, from the pool if *buf is none yet. */
static int pool_take(struct iomux_streams *s, char **buf, size_t *cap, size_t need)
{
    if (!*buf && s->npool) {
        s->npool--;
        *buf = s->pool[s->npool].buf;
        *cap = s->pool[s->npool].cap;
        s->pool_bytes -= *cap;
    }
    return grow(buf, cap, need);
}

static void pool_free(struct iomux_streams *s)
{
    while (s->npool)
        free(s->pool[--s->npool].buf);
    free(s->pool);
    s->pool = NULL;
    s->pool_bytes = 0;
}

static void free_buffers(struct iomux_conn *c)
{
    free(c->ibuf);
    free(c->pbuf);
    c->ibuf = c->pbuf = NULL;
    c->ilen = c->ioff = c->icap = c->plen = c->pcap = 0;
}

/* Nothing of the slot left in the kernel: report it, free the slot. */
static void maybe_closed(struct iomux_streams *s, struct iomux_conn *c, uint32_t slot)
{
    if (!(c->flags & CF_DYING) || c->inflight)
        return;
    free_buffers(c);
    c->flags = 0;
    c->notify_at = 0; /* sent stays readable until the slot is given out again */
    emit(s, slot, IOMUX_SEV_CLOSED, 0, 0);
}

static int start_dying(iomux_ring *r, struct iomux_conn *c, uint32_t slot)
{
    int err = 0;

    if (c->flags & CF_DYING)
        return 0;
    c->flags |= CF_DYING;
    c->flags &= ~(CF_READING | CF_CLOSING | CF_SHUT_WR);
    c->plen = 0;
    if (c->inflight)
        err = cancel_all(r, c, slot);
    maybe_closed(r->streams, c, slot);
    return err;
}

/* Everything written is sent: half-close or finish a graceful close. */
static int on_drained(iomux_ring *r, struct iomux_conn *c, uint32_t slot)
{
    struct iomux_streams *s = r->streams;

    pool_put(s, c->ibuf, c->icap);
    pool_put(s, c->pbuf, c->pcap);
    c->ibuf = c->pbuf = NULL;
    c->icap = c->pcap = 0;
    if (c->flags & CF_SHUT_WR) {
        c->flags &= ~CF_SHUT_WR;
        if (shutdown(c->fd, SHUT_WR) < 0 && errno != ENOTCONN)
            emit(s, slot, IOMUX_SEV_ERROR, -errno, IOMUX_ERR_SHUTDOWN);
    }
    if (c->flags & CF_CLOSING) {
        c->flags &= ~CF_CLOSING;
        /* Everything is sent: end the connection now (the peer sees the end
         * of stream at once); the fd itself closes when the slot is CLOSED. */
        shutdown(c->fd, SHUT_RDWR);
        emit(s, slot, IOMUX_SEV_DRAINED, 0, 0);
        return start_dying(r, c, slot);
    }
    return 0;
}

static void check_notify(struct iomux_streams *s, struct iomux_conn *c, uint32_t slot)
{
    if (c->notify_at && c->sent >= c->notify_at) {
        c->notify_at = 0;
        c->flags &= ~CF_BACKLOGGED;
        emit(s, slot, IOMUX_SEV_SENT, 0, 0);
    }
}

static size_t backlog_of(const struct iomux_conn *c)
{
    return c->plen + (c->ilen - c->ioff);
}

/* Remember that slot was written to in this call. */
static void mark_dirty(struct iomux_streams *s, struct iomux_conn *c, uint32_t slot)
{
    uint32_t *grown;
    unsigned n;

    if (c->flags & CF_DIRTY)
        return;
    if (s->ndirty == s->dirtycap) {
        n = s->dirtycap ? s->dirtycap * 2 : 64;
        grown = realloc(s->dirty, n * sizeof *grown);
        if (!grown)
            return; /* not checked this time: flow control reports it later */
        s->dirty = grown;
        s->dirtycap = n;
    }
    s->dirty[s->ndirty++] = slot;
    c->flags |= CF_DIRTY;
}

/* At the end of a call, once the kernel took what it could: report the slots
 * written to whose backlog is above their limit.  A send the kernel could
 * take completed in the same call, so what is left is what it refused. */
static void streams_check_backlogs(struct iomux_streams *s)
{
    unsigned i, keep = 0;

    if (!s)
        return;
    for (i = 0; i < s->ndirty; i++) {
        uint32_t slot = s->dirty[i];
        struct iomux_conn *c = &s->conns[slot];
        size_t backlog;

        if (s->nev == s->ev_cap) {
            s->dirty[keep++] = slot; /* no room: checked at the next call */
            continue;
        }
        c->flags &= ~CF_DIRTY;
        if (!(c->flags & CF_USED) || (c->flags & (CF_DYING | CF_BACKLOGGED)))
            continue;
        backlog = backlog_of(c);
        if (backlog > c->limit) {
            c->flags |= CF_BACKLOGGED;
            emit(s, slot, IOMUX_SEV_BACKLOG, backlog > 0x7FFFFFFF ? 0x7FFFFFFF : (int32_t)backlog,
                 0);
        }
    }
    s->ndirty = keep;
}

/* Append n bytes of data to the slot's writes; send them if nothing is in flight. */
static int stream_send(iomux_ring *r, struct iomux_conn *c, uint32_t slot,
                       const unsigned char *data, size_t n)
{
    int err;

    if (c->flags & (CF_DYING | CF_WRITE_FAILED))
        return 0; /* dropped: the connection is going */
    mark_dirty(r->streams, c, slot);
    if (c->flags & CF_SEND) {
        err = pool_take(r->streams, &c->pbuf, &c->pcap, c->plen + n);
        if (err) {
            c->flags |= CF_WRITE_FAILED;
            return err;
        }
        memcpy(c->pbuf + c->plen, data, n);
        c->plen += n;
        /* A send from an earlier call is still in the kernel: it refused
         * bytes. Report it now, before this call's data reaches Python. */
        if (backlog_of(c) > c->limit && !(c->flags & CF_BACKLOGGED)) {
            c->flags |= CF_BACKLOGGED;
            emit(r->streams, slot, IOMUX_SEV_BACKLOG,
                 backlog_of(c) > 0x7FFFFFFF ? 0x7FFFFFFF : (int32_t)backlog_of(c), 0);
        }
        return 0;
    }
    err = pool_take(r->streams, &c->ibuf, &c->icap, n);
    if (err) {
        c->flags |= CF_WRITE_FAILED;
        return err;
    }
    memcpy(c->ibuf, data, n);
    c->ilen = n;
    c->ioff = 0;
    return submit_send(r, c, slot);
}

/* Apply one record.  Returns 0 or -errno (the record is then dropped). */
static int stream_record(iomux_ring *r, const struct iomux_sop *op)
{
    struct iomux_streams *s = r->streams;
    struct iomux_conn *c = conn_at(s, op->slot);
    struct io_uring_sqe *sqe;
    int err = 0;

    if (!c)
        return -ENOMEM;
    switch (op->kind) {
    case IOMUX_SOP_OPEN:
    case IOMUX_SOP_LISTEN:
        if (op->kind == IOMUX_SOP_LISTEN && (c->flags & CF_LISTENER) &&
            !(c->flags & (CF_ACCEPT | CF_DYING)) && (uint64_t)c->fd == op->arg) {
            /* Accept again after the multishot accept ended. */
            sqe = get_sqe(r, &err);
            if (!sqe)
                return err;
            io_uring_prep_multishot_accept(sqe, c->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
            io_uring_sqe_set_data64(sqe, stream_ud(SK_ACCEPT, op->slot));
            c->flags |= CF_ACCEPT;
            c->inflight++;
            return 0;
        }
        if (c->flags & CF_USED)
            return -EBUSY; /* a slot still in use: reported as an error */
        memset(c, 0, sizeof *c);
        c->fd = (int)op->arg;
        c->flags = CF_USED;
        c->limit = DEFAULT_LIMIT;
        if (op->kind == IOMUX_SOP_LISTEN) {
            c->flags |= CF_LISTENER | CF_ACCEPT;
            sqe = get_sqe(r, &err);
            if (!sqe)
                return err;
            io_uring_prep_multishot_accept(sqe, c->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
            io_uring_sqe_set_data64(sqe, stream_ud(SK_ACCEPT, op->slot));
            c->inflight++;
        } else if (s->guard) {
            err = arm_guard(r, c, op->slot);
        }
        return err;
    case IOMUX_SOP_READ:
        if (!(c->flags & CF_USED) || (c->flags & (CF_DYING | CF_LISTENER)))
            return 0;
        c->flags |= CF_READING;
        if (!(c->flags & (CF_RECV | CF_ENDED)))
            err = arm_recv(r, c, op->slot);
        /* CF_RECV_CANCEL: the old receive's last completion re-arms it. */
        return err;
    case IOMUX_SOP_PAUSE:
        if (!(c->flags & CF_USED))
            return 0;
        c->flags &= ~CF_READING;
        if ((c->flags & CF_RECV) && !(c->flags & CF_RECV_CANCEL))
            err = cancel_recv(r, c, op->slot);
        return err;
    case IOMUX_SOP_SHUT_WR:
        if (!(c->flags & CF_USED) || (c->flags & CF_DYING))
            return 0;
        c->flags |= CF_SHUT_WR;
        if (!(c->flags & CF_SEND))
            return on_drained(r, c, op->slot);
        return 0;
    case IOMUX_SOP_CLOSE:
        if (!(c->flags & CF_USED) || (c->flags & CF_DYING))
            return 0;
        c->flags &= ~CF_READING;
        if (op->arg || (c->flags & (CF_LISTENER | CF_WRITE_FAILED)))
            return start_dying(r, c, op->slot);
        c->flags |= CF_CLOSING;
        if ((c->flags & CF_RECV) && !(c->flags & CF_RECV_CANCEL))
            err = cancel_recv(r, c, op->slot);
        if (!err && !(c->flags & CF_SEND))
            err = on_drained(r, c, op->slot);
        return err;
    case IOMUX_SOP_SEND:
        if (!(c->flags & CF_USED) || (c->flags & CF_LISTENER))
            return 0;
        return stream_send(r, c, op->slot, (const unsigned char *)(uintptr_t)op->arg, op->len);
    case IOMUX_SOP_NOTIFY:
        if (!(c->flags & CF_USED))
            return 0;
        c->notify_at = op->arg;
        check_notify(s, c, op->slot);
        return 0;
    case IOMUX_SOP_LIMIT:
        if (!(c->flags & CF_USED))
            return 0;
        c->limit = op->arg;
        c->flags &= ~CF_BACKLOGGED;
        mark_dirty(s, c, op->slot);
        return 0;
    }
    return -EINVAL;
}

/* Room for what one more record or completion may produce: a few events,
 * and a few SQEs (submitting what is queued to make room), so that the
 * operations a step queues can always be had. */
static int stream_room(iomux_ring *r)
{
    if (r->streams->nev + EVENTS_PER_CQE > r->streams->ev_cap)
        return 0;
    if (io_uring_sq_space_left(&r->ring) >= SQES_PER_STEP)
        return 1;
    io_uring_submit(&r->ring);
    return io_uring_sq_space_left(&r->ring) >= SQES_PER_STEP;
}

/* Apply one send pair: n bytes of the stage at *stage_off for slot. */
static void stream_send_pair(iomux_ring *r, uint32_t slot, uint32_t n, const unsigned char *stage,
                             size_t stage_len, size_t *stage_off)
{
    struct iomux_conn *c;
    int err;

    if (n > stage_len - *stage_off) {
        emit(r->streams, slot, IOMUX_SEV_ERROR, -EINVAL, IOMUX_ERR_RECORD);
        *stage_off = stage_len;
        return;
    }
    c = conn_at(r->streams, slot);
    if (c && (c->flags & CF_USED)) {
        err = stream_send(r, c, slot, stage + *stage_off, n);
        if (err < 0)
            emit(r->streams, slot, IOMUX_SEV_ERROR, err, IOMUX_ERR_RECORD);
    }
    *stage_off += n;
}

/* Apply the records and the send pairs in their order; done[0] counts the
 * records consumed, done[1] the send pairs, done[2] the stage bytes.  Stops
 * early when there is no room for what the next one may produce (the rest
 * is passed again). */
static void stream_records(iomux_ring *r, const struct iomux_sop *ops, unsigned nops,
                           const struct iomux_send_pair *sends, unsigned nsends,
                           const unsigned char *stage, size_t stage_len, int64_t *done)
{
    size_t off = 0;
    unsigned i = 0, k = 0;
    int err;

    for (;;) {
        unsigned upto = i < nops ? ops[i].sends_before : nsends;

        if (upto > nsends)
            upto = nsends;
        while (k < upto) {
            if (!stream_room(r))
                goto out;
            stream_send_pair(r, sends[k].slot, sends[k].len, stage, stage_len, &off);
            k++;
        }
        if (i == nops)
            break;
        if (!stream_room(r))
            goto out;
        err = stream_record(r, &ops[i]);
        if (err < 0)
            emit(r->streams, ops[i].slot, IOMUX_SEV_ERROR, err, IOMUX_ERR_RECORD);
        i++;
    }
out:
    done[0] = i;
    done[1] = k;
    done[2] = (int64_t)off;
}

static void recycle(struct iomux_streams *s, unsigned bid)
{
    if (s->bpos)
        s->bpos[bid] = (uint16_t)(s->br->tail + s->recycled);
    io_uring_buf_ring_add(s->br, s->bufs + (size_t)bid * s->bufsize, s->bufsize,
                          (unsigned short)bid, (int)s->bmask, (int)s->recycled);
    s->recycled++;
}

/* Can this stream completion be handled with the room left?  A receive needs
 * its bytes in the data area, and every completion a few event slots. */
static int stream_cqe_fits(iomux_ring *r, const struct io_uring_cqe *cqe)
{
    struct iomux_streams *s = r->streams;

    if (!stream_room(r))
        return 0;
    if (((cqe->user_data >> 40) & 0xFF) == SK_RECV && cqe->res > 0) {
        uint32_t slot = (uint32_t)(cqe->user_data & 0xFFFFFFFFu);

        if (s->data_len + (size_t)cqe->res > s->data_cap)
            return 0;
        if (slot < s->nconns && s->conns[slot].batch_epoch == s->epoch &&
            s->conns[slot].batch + (uint32_t)cqe->res > SLOT_BATCH_LIMIT)
            return 0;
    }
    return 1;
}

/* Copy a receive's res bytes out of the provided buffers it filled into the
 * data area (unless the slot is dying) and give back each buffer it used
 * up.  The first is bid, from the bytes taken of it before (incremental
 * buffers); a bundle goes on with the ring's next entries, which are the
 * buffers put after it, as the kernel took them from the ring's head. */
static void take_received(struct iomux_streams *s, struct iomux_conn *c, uint32_t slot,
                          unsigned bid, int res)
{
    size_t left = res > 0 ? (size_t)res : 0;
    size_t start = s->data_len;
    uint16_t pos = s->bpos ? s->bpos[bid] : 0;
    int deliver = !(c->flags & CF_DYING);

    if (left == 0) {
        /* A receive of nothing took nothing, whatever the flags say (kernels
         * before the fix for liburing#1553 report the buffer as used up);
         * a whole buffer goes back. */
        if (!s->boff)
            recycle(s, bid);
        return;
    }
    s->receives++;
    for (;;) {
        uint32_t at = s->boff ? s->boff[bid] : 0;
        size_t room = s->bufsize - at;
        size_t n = left < room ? left : room;

        if (deliver) {
            memcpy(s->data + s->data_len, s->bufs + (size_t)bid * s->bufsize + at, n);
            s->data_len += n;
        }
        left -= n;
        s->filled++;
        if (s->boff && n < room) {
            /* Incremental: the rest of this buffer stays at the ring's head
             * (the completion says IORING_CQE_F_BUF_MORE). */
            s->boff[bid] = at + (uint32_t)n;
            break;
        }
        if (s->boff)
            s->boff[bid] = 0;
        recycle(s, bid);
        if (left == 0 || !s->bpos)
            break;
        pos++;
        bid = s->br->bufs[pos & s->bmask].bid;
        if (bid >= s->nbufs)
            break; /* cannot happen: the ring holds only ids this code put there */
    }
    if (deliver && s->data_len > start) {
        struct iomux_sev *last = s->nev > s->call_ev ? &s->ev[s->nev - 1] : NULL;
        uint32_t got = (uint32_t)(s->data_len - start);

        /* The connection's previous event of this call is the receive that
         * ends where this one starts: extend it, so that Python makes one
         * data_received call for both (a bulk transfer's completions come one
         * buffer, or one bundle, at a time).  Only this call's: Python may
         * have taken the earlier ones already. */
        if (last && last->kind == IOMUX_SEV_DATA && last->slot == slot &&
            (size_t)last->off + (size_t)last->res == start)
            last->res += (int32_t)got;
        else
            emit(s, slot, IOMUX_SEV_DATA, (int32_t)got, (uint32_t)start);
        if (c->batch_epoch != s->epoch) {
            c->batch_epoch = s->epoch;
            c->batch = 0;
        }
        c->batch += got;
    }
}

/* Handle one completion of a stream operation. */
static void stream_cqe(iomux_ring *r, const struct io_uring_cqe *cqe)
{
    struct iomux_streams *s = r->streams;
    uint32_t slot = (uint32_t)(cqe->user_data & 0xFFFFFFFFu);
    unsigned kind = (unsigned)((cqe->user_data >> 40) & 0xFF);
    struct iomux_conn *c;
    int more = (cqe->flags & IORING_CQE_F_MORE) != 0;
    int res = cqe->res;

    if (slot >= s->nconns)
        return;
    c = &s->conns[slot];
    switch (kind) {
    case SK_RECV:
        if ((cqe->flags & IORING_CQE_F_BUFFER) &&
            (cqe->flags >> IORING_CQE_BUFFER_SHIFT) < s->nbufs)
            take_received(s, c, slot, cqe->flags >> IORING_CQE_BUFFER_SHIFT, res);
        if (more)
            return;
        c->inflight--;
        c->flags &= ~(CF_RECV | CF_RECV_CANCEL);
        if (c->flags & CF_DYING) {
            maybe_closed(s, c, slot);
        } else if (res == 0) {
            c->flags |= CF_ENDED;
            emit(s, slot, IOMUX_SEV_EOF, 0, 0);
        } else if (res == -EINVAL && s->recv_cap) {
            /* A kernel with bundles but without a multishot receive's cap
             * (it takes sqe->len as an error): receives go uncapped from
             * now on, whole bundles at a time (the data area holds them). */
            s->recv_cap = 0;
            if ((c->flags & CF_READING) && !(c->flags & CF_ENDED))
                arm_recv(r, c, slot);
        } else if (res < 0 && res != -ENOBUFS && res != -ECANCELED) {
            c->flags |= CF_ENDED;
            emit(s, slot, IOMUX_SEV_ERROR, res, IOMUX_ERR_RECV);
        } else if ((c->flags & CF_READING) && !(c->flags & CF_ENDED)) {
            /* Out of buffers, cancelled by a pause that was taken back, a
             * guard restart, or ended by the kernel after data. */
            arm_recv(r, c, slot);
        }
        return;
    case SK_SEND:
        c->inflight--;
        c->flags &= ~CF_SEND;
        if (c->flags & CF_DYING) {
            maybe_closed(s, c, slot);
            return;
        }
        if (res < 0) {
            c->flags |= CF_WRITE_FAILED;
            c->plen = 0;
            c->ilen = c->ioff = 0;
            emit(s, slot, IOMUX_SEV_ERROR, res, IOMUX_ERR_SEND);
            return;
        }
        c->sent += (uint64_t)res;
        c->ioff += (size_t)res;
        if (c->ioff < c->ilen) {
            submit_send(r, c, slot); /* a short send: the rest */
            /* The kernel refused bytes: report it before this batch's data. */
            if (backlog_of(c) > c->limit && !(c->flags & CF_BACKLOGGED)) {
                c->flags |= CF_BACKLOGGED;
                emit(s, slot, IOMUX_SEV_BACKLOG,
                     backlog_of(c) > 0x7FFFFFFF ? 0x7FFFFFFF : (int32_t)backlog_of(c), 0);
            }
        } else if (c->plen) {
            char *b = c->ibuf;
            size_t cap = c->icap;

            c->ibuf = c->pbuf;
            c->icap = c->pcap;
            c->ilen = c->plen;
            c->ioff = 0;
            c->pbuf = b;
            c->pcap = cap;
            c->plen = 0;
            submit_send(r, c, slot);
        } else {
            c->ilen = c->ioff = 0;
            c->flags &= ~CF_BACKLOGGED;
        }
        check_notify(s, c, slot);
        if (!(c->flags & CF_SEND))
            on_drained(r, c, slot);
        return;
    case SK_GUARD:
        c->inflight--;
        c->flags &= ~CF_GUARD;
        if (c->flags & CF_DYING) {
            maybe_closed(s, c, slot);
            return;
        }
        c->flags |= CF_GUARDED;
        /* A multishot receive can miss the wake-up of a peer's reset or end
         * of stream and then wait forever: replace it by one-shot receives
         * (see arm_recv), which read what is left, then report the end. */
        if (res > 0 && (c->flags & CF_RECV) && !(c->flags & CF_RECV_CANCEL))
            cancel_recv(r, c, slot);
        return;
    case SK_CANCEL:
        /* Only failures complete.  EALREADY: the operation was running; it
         * completes soon, but a multishot one may go on: ask again. */
        if (res != -EALREADY)
            return;
        if (c->flags & CF_DYING) {
            if (c->inflight)
                cancel_all(r, c, slot);
        } else if (c->flags & CF_RECV_CANCEL) {
            cancel_recv(r, c, slot);
        }
        return;
    case SK_ACCEPT:
        if (res >= 0) {
            if (c->flags & CF_DYING)
                close(res); /* accepted while closing: nobody will serve it */
            else
                emit(s, slot, IOMUX_SEV_ACCEPTED, res, 0);
        }
        if (more)
            return;
        c->inflight--;
        c->flags &= ~CF_ACCEPT;
        if (c->flags & CF_DYING)
            maybe_closed(s, c, slot);
        else
            emit(s, slot, IOMUX_SEV_ACCEPT_END, res < 0 ? res : 0, 0);
        return;
    }
}

static iomux_streams *iomux_streams_new(iomux_ring *r, unsigned nbufs, unsigned bufsize,
                                        unsigned bgid, void *events, unsigned ev_cap,
                                        void *data, size_t data_cap, int guard, int incremental,
                                        int bundles, int *err)
{
    struct io_uring_buf_reg reg;
    uint16_t reg_flags = incremental ? IOU_PBUF_RING_INC : 0;
    long page = sysconf(_SC_PAGESIZE);
    iomux_streams *s;
    unsigned i;
    int ret;

    if (r->streams) {
        *err = EBUSY;
        return NULL;
    }
    if (foreign_thread(r)) {
        *err = EEXIST;
        return NULL;
    }
    if (nbufs == 0 || nbufs > 32768 || (nbufs & (nbufs - 1)) || bufsize == 0 ||
        bgid > 0xFFFF || ev_cap < 4 * EVENTS_PER_CQE || data_cap < bufsize) {
        *err = EINVAL;
        return NULL;
    }
    s = calloc(1, sizeof *s);
    if (!s) {
        *err = ENOMEM;
        return NULL;
    }
    s->bufs = malloc((size_t)nbufs * bufsize);
    s->br_bytes = (nbufs * sizeof(struct io_uring_buf) + (size_t)page - 1) & ~((size_t)page - 1);
    s->br = mmap(NULL, s->br_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (!s->bufs || s->br == MAP_FAILED) {
        if (s->br != MAP_FAILED)
            munmap(s->br, s->br_bytes);
        free(s->bufs);
        free(s);
        *err = ENOMEM;
        return NULL;
    }
    memset(&reg, 0, sizeof reg);
    reg.ring_addr = (uint64_t)(uintptr_t)s->br;
    reg.ring_entries = nbufs;
    reg.bgid = (uint16_t)bgid;
    /* The 16 bits after bgid are the flags (liburing 2.3 calls them "pad"). */
    memcpy((char *)&reg.bgid + sizeof reg.bgid, &reg_flags, sizeof reg_flags);
    ret = io_uring_register_buf_ring(&r->ring, &reg, 0);
    if (ret == -EINVAL && reg_flags) {
        /* A kernel before 6.12: whole buffers, one per receive. */
        reg_flags = 0;
        memcpy((char *)&reg.bgid + sizeof reg.bgid, &reg_flags, sizeof reg_flags);
        ret = io_uring_register_buf_ring(&r->ring, &reg, 0);
    }
    if (ret == 0 && reg_flags) {
        s->boff = calloc(nbufs, sizeof *s->boff);
        if (!s->boff) {
            io_uring_unregister_buf_ring(&r->ring, (int)bgid);
            ret = -ENOMEM;
        }
    }
    /* Bundles only with whole buffers: where receives take part of a buffer
     * (incremental), one already takes up to a whole big buffer, and bundles
     * measured slower (bench/README.md).  And only where the data area holds
     * every buffer: a completion that could never fit would stall its
     * connection. */
    if (ret == 0 && bundles && !s->boff && (r->ring.features & IORING_FEAT_RECVSEND_BUNDLE) &&
        data_cap >= (size_t)nbufs * bufsize) {
        s->bpos = malloc(nbufs * sizeof *s->bpos);
        s->recv_cap = SLOT_BATCH_LIMIT;
        if (!s->bpos) {
            io_uring_unregister_buf_ring(&r->ring, (int)bgid);
            ret = -ENOMEM;
        }
    }
    if (ret < 0) {
        free(s->boff);
        munmap(s->br, s->br_bytes);
        free(s->bufs);
        free(s);
        *err = -ret;
        return NULL;
    }
    s->nbufs = nbufs;
    s->bufsize = bufsize;
    s->bgid = bgid;
    s->bmask = (unsigned)io_uring_buf_ring_mask(nbufs);
    io_uring_buf_ring_init(s->br);
    for (i = 0; i < nbufs; i++) {
        io_uring_buf_ring_add(s->br, s->bufs + (size_t)i * bufsize, bufsize, (unsigned short)i,
                              (int)s->bmask, (int)i);
        if (s->bpos)
            s->bpos[i] = (uint16_t)i;
    }
    io_uring_buf_ring_advance(s->br, (int)nbufs);
    s->ev = events;
    s->ev_cap = ev_cap;
    s->data = data;
    s->data_cap = data_cap;
    s->guard = guard;
    r->streams = s;
    *err = 0;
    return s;
}

/* Whether receives consume the provided buffers incrementally. */
static int iomux_streams_incremental(iomux_ring *r) { return r->streams && r->streams->boff; }

/* Whether receives fill several provided buffers at once (bundles). */
static int iomux_streams_bundles(iomux_ring *r) { return r->streams && r->streams->bpos; }

/* Receive completions that carried bytes, and the provided buffers they
 * filled (a buffer an incremental receive took part of counts once per
 * receive), since the connections were set up. */
static void iomux_streams_counts(iomux_ring *r, uint64_t *out)
{
    out[0] = r->streams ? r->streams->receives : 0;
    out[1] = r->streams ? r->streams->filled : 0;
}

/* The total bytes of slot the kernel confirmed sending. */
static uint64_t iomux_stream_sent(iomux_ring *r, uint32_t slot)
{
    struct iomux_streams *s = r->streams;

    if (!s || slot >= s->nconns)
        return 0;
    return s->conns[slot].sent;
}

static void streams_free(iomux_ring *r, int ring_alive)
{
    struct iomux_streams *s = r->streams;
    unsigned i;

    if (!s)
        return;
    if (ring_alive)
        io_uring_unregister_buf_ring(&r->ring, (int)s->bgid);
    for (i = 0; i < s->nconns; i++)
        free_buffers(&s->conns[i]);
    pool_free(s);
    free(s->conns);
    free(s->dirty);
    free(s->boff);
    free(s->bpos);
    munmap(s->br, s->br_bytes);
    free(s->bufs);
    free(s);
    r->streams = NULL;
}
