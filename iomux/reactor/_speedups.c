/*
 * iomux.reactor._speedups: the loop's event dispatch and scheduling in C.
 *
 * A completion port hands the loop, per iteration, a table of 16-byte
 * event records (slot, kind, result, offset) and the data area that DATA
 * events point into. Almost every event is a DATA event for a transport
 * that is reading, has no deadlines and a plain Protocol: for those,
 * Dispatcher makes the bytes and calls protocol.data_received(bytes) in the
 * transport's contextvars context, the one Python call per received
 * message. Every other event, in the same order, goes to the Python
 * handler the dispatcher was made with, which is also what runs when
 * this module is not built.
 *
 * ReadyDispatcher does the same for readiness (epoll, poll, select): for
 * a readable plain stream transport it reads the socket once and calls
 * data_received, what the transport's _on_event would do in Python; any
 * other event goes to the transport's _on_event through the handler.
 * WriteMethod is a readiness stream transport's write(): where nothing
 * waits to be sent, it writes the bytes to the socket at once, and hands
 * what the socket did not take, and every other case, to Python.
 * StageWriteMethod is a completion stream transport's write(): it appends
 * the bytes to the port's stage and (slot, length) to its send pairs, which
 * the next enter submits, and hands every other case to Python.
 * LoopMethod is one of the loop's scheduling methods (call_soon, call_at,
 * call_later, a timer's cancel, create_task, get_debug, the run of the
 * ready callbacks): it makes and runs asyncio's own handles as the loop's
 * Python code does outside debug mode, and hands every other case to it.
 *
 * The transports' attributes are read at the offsets of their class's
 * __slots__ member descriptors, and only for objects of exactly that
 * class: a subclass may override anything, so its events take the
 * Python handler.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <structmember.h>
#include <time.h>
#if PY_VERSION_HEX < 0x030B0000
#include <longintrepr.h> /* the digits of an int (included by Python.h from 3.11) */
#endif
#include <unistd.h>

struct event_record {
    uint32_t slot;
    uint32_t kind;
    int32_t res;
    uint32_t off;
};
_Static_assert(sizeof(struct event_record) == 16, "an event record is 16 bytes (=IIiI)");

#define KIND_DATA 1
#define MASK_READ 1
#define MAX_ATTRS 10
#define MAX_REFS 4

/* Both dispatchers: the transport class, the offsets of the attributes
 * they read, and the objects they call (which differ per type). */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyTypeObject *cls;
    PyObject *refs[MAX_REFS];
    Py_ssize_t read_size;
    /* ReadyDispatcher reads into this, read_size bytes, then copies what
     * came into a bytes object of its size: no large allocation per read. */
    char *read_buffer;
    Py_ssize_t offset[MAX_ATTRS];
} Dispatcher;

/* Dispatcher (completion): refs and attributes. */
enum { C_SLOTS, C_HANDLE, C_FAILED };
enum { C_READING, C_DEADLINES, C_BUFFERED, C_CONTEXT, C_DATA_RECEIVED, C_PROTOCOL, C_COUNT };
static const char *const completion_attrs[C_COUNT] = {
    "_reading", "_deadlines", "_buffered", "_context", "_data_received", "_protocol",
};

/* ReadyDispatcher (readiness): refs and attributes. */
enum { R_HANDLE, R_READ_FAILED, R_FAILED, R_NAME };
enum {
    R_CLOSING, /* R_CLOSING..R_BUFFERED: False for the fast path */
    R_PAUSED,
    R_READ_EOF,
    R_EDGE,
    R_BUFFERED,
    R_DEADLINES,
    R_SOCK_FD,
    R_CONTEXT,
    R_PROTOCOL,
    R_COUNT
};
static const char *const ready_attrs[R_COUNT] = {
    "_closing", "_paused", "_read_eof", "_edge", "_buffered",
    "_deadlines", "_sock_fd", "_context", "_protocol",
};
/* WriteMethod (a readiness transport's write): refs and attributes. */
enum { W_SLOW, W_REST, W_FAILED };
enum { W_BUFFER, W_CONN_LOST, W_EOF, W_EMPTY_WAITER, W_DEADLINES, W_SOCK_FD, W_COUNT };
static const char *const write_attrs[W_COUNT] = {
    "_buffer", "_conn_lost", "_eof", "_empty_waiter", "_deadlines", "_sock_fd",
};
/* StageWriteMethod (a completion transport's write): refs and attributes. */
enum { S_SLOW, S_CHECK_PAUSE };
enum { S_BLOCKED, S_DEADLINES, S_STAGE_MAX, S_STAGE, S_SENDS, S_SLOT, S_WRITTEN, S_ACKED,
       S_PAUSE_ABOVE, S_PROTOCOL_PAUSED, S_COUNT };
static const char *const stage_attrs[S_COUNT] = {
    "_blocked", "_deadlines", "_stage_max", "_stage",        "_sends",
    "_slot",    "_written",   "_acked",     "_pause_above", "_protocol_paused",
};
/* One staged send in the port's send pairs (iomux.completion.SEND_PAIR, =II). */
struct send_pair {
    uint32_t slot;
    uint32_t len;
};
_Static_assert(sizeof(struct send_pair) == 8, "a send pair is 8 bytes (=II)");
_Static_assert(C_COUNT <= MAX_ATTRS && R_COUNT <= MAX_ATTRS && W_COUNT <= MAX_ATTRS &&
                   S_COUNT <= MAX_ATTRS,
               "MAX_ATTRS");

static inline PyObject *slot_value(PyObject *obj, Py_ssize_t offset) {
    return *(PyObject **)((char *)obj + offset);
}

/* The offsets of cls's __slots__ attributes names[0..n) in its instances. */
static int slot_offsets(PyObject *cls, const char *const *names, int n, Py_ssize_t *offset,
                        const char *what) {
    for (int i = 0; i < n; i++) {
        PyObject *descr = PyObject_GetAttrString(cls, names[i]);
        if (descr == NULL)
            return -1;
        int ok = Py_IS_TYPE(descr, &PyMemberDescr_Type) &&
                 ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX;
        if (ok)
            offset[i] = ((PyMemberDescrObject *)descr)->d_member->offset;
        Py_DECREF(descr);
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "%s: %s.%s is not a __slots__ attribute", what,
                         ((PyTypeObject *)cls)->tp_name, names[i]);
            return -1;
        }
    }
    return 0;
}

/* Take cls, the offsets of its __slots__ attributes names[0..n), and
 * refs[0..nrefs) (each must be callable from callable_from on). */
static int setup(Dispatcher *self, PyObject *cls, const char *const *names, int n,
                 PyObject **refs, int nrefs, int callable_from, const char *what) {
    for (int i = callable_from; i < nrefs; i++) {
        if (!PyCallable_Check(refs[i])) {
            PyErr_Format(PyExc_TypeError, "%s: %R is not callable", what, refs[i]);
            return -1;
        }
    }
    if (slot_offsets(cls, names, n, self->offset, what) < 0)
        return -1;
    Py_INCREF(cls);
    Py_XSETREF(self->cls, (PyTypeObject *)cls);
    for (int i = 0; i < nrefs; i++) {
        Py_INCREF(refs[i]);
        Py_XSETREF(self->refs[i], refs[i]);
    }
    return 0;
}

static int dispatcher_traverse(Dispatcher *self, visitproc visit, void *arg) {
    Py_VISIT(self->cls);
    for (int i = 0; i < MAX_REFS; i++)
        Py_VISIT(self->refs[i]);
    return 0;
}

static int dispatcher_clear(Dispatcher *self) {
    Py_CLEAR(self->cls); /* calls are refused from here on: check_call */
    PyMem_RawFree(self->read_buffer);
    self->read_buffer = NULL;
    for (int i = 0; i < MAX_REFS; i++)
        Py_CLEAR(self->refs[i]);
    return 0;
}

/* Every type here: untrack, clear (its tp_clear), free. */
static void gc_dealloc(PyObject *self) {
    PyObject_GC_UnTrack(self);
    Py_TYPE(self)->tp_clear(self);
    Py_TYPE(self)->tp_free(self);
}

/* The exception set is SystemExit or KeyboardInterrupt: it goes on up. */
static inline int exiting(void) {
    return PyErr_ExceptionMatches(PyExc_SystemExit) ||
           PyErr_ExceptionMatches(PyExc_KeyboardInterrupt);
}

/* A call raised: SystemExit and KeyboardInterrupt go on up (-1); anything
 * else goes to failed(transport, exc) (0, or -1 if that raised). */
static int report_failure(PyObject *failed, PyObject *owner) {
    if (exiting())
        return -1;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL)
        PyException_SetTraceback(value, tb);
    PyObject *args[2] = {owner, value != NULL ? value : Py_None};
    PyObject *result = PyObject_Vectorcall(failed, args, 2, NULL);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

/* The attributes a call runs with, held from before the bytes are made
 * until it returns: it may close the transport, drop it from its slot, or
 * change its protocol. */
struct held {
    PyObject *owner, *context, *func, *protocol;
};

static inline struct held hold(PyObject *owner, PyObject *context, PyObject *func,
                               PyObject *protocol) {
    Py_INCREF(owner);
    Py_INCREF(context);
    Py_XINCREF(func);
    Py_INCREF(protocol);
    return (struct held){owner, context, func, protocol};
}

static inline void release(struct held *h) {
    Py_DECREF(h->protocol);
    Py_XDECREF(h->func);
    Py_DECREF(h->context);
    Py_DECREF(h->owner);
}

/* data_received(data) of the held protocol, in the held context:
 * func(protocol, data) where func is given, else protocol.<name>(data).
 * Takes the references of h and data. A failure goes to report_failure.
 * 1: done; -1: an exception to propagate. */
static int data_received(PyObject *failed, struct held *h, PyObject *name, PyObject *data) {
    PyObject *owner = h->owner, *context = h->context, *func = h->func, *protocol = h->protocol;
    PyObject *result = NULL;
    if (PyContext_Enter(context) == 0) {
        PyObject *args[3] = {NULL, protocol, data};
        if (func != NULL)
            result = PyObject_Vectorcall(func, args + 1, 2, NULL);
        else
            result = PyObject_VectorcallMethod(name, args + 1, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                               NULL);
        if (PyContext_Exit(context) != 0)
            Py_CLEAR(result);
    }
    int rc = 1;
    if (result != NULL)
        Py_DECREF(result);
    else if (report_failure(failed, owner) < 0)
        rc = -1;
    Py_DECREF(data);
    release(h);
    return rc;
}

/* A dispatcher's call takes nargs positional arguments (usage says which). */
static int check_call(Dispatcher *self, size_t nargsf, PyObject *kwnames, Py_ssize_t nargs,
                      const char *usage) {
    if (PyVectorcall_NARGS(nargsf) != nargs || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_Format(PyExc_TypeError, "%s: wrong arguments", usage);
        return -1;
    }
    if (self->cls == NULL) {
        PyErr_Format(PyExc_RuntimeError, "%s: the dispatcher was not initialised", usage);
        return -1;
    }
    return 0;
}

static PyObject *dispatcher_new(PyTypeObject *type, PyObject *args, PyObject *kwds);
static PyTypeObject WriteMethodType;
static PyTypeObject StageWriteMethodType;

/* -- completion ------------------------------------------------------------------ */

static int completion_init(Dispatcher *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"cls", "slots", "handle", "failed", NULL};
    PyObject *cls, *refs[3];
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!OO:Dispatcher", kwlist, &PyType_Type, &cls,
                                     &PyList_Type, &refs[C_SLOTS], &refs[C_HANDLE],
                                     &refs[C_FAILED]))
        return -1;
    return setup(self, cls, completion_attrs, C_COUNT, refs, 3, C_HANDLE, "Dispatcher");
}

/* The Python handler for one event; -1 when it raised (the loop stops). */
static int handle_event(Dispatcher *self, const struct event_record *ev) {
    PyObject *args[4] = {PyLong_FromUnsignedLong(ev->slot), PyLong_FromUnsignedLong(ev->kind),
                         PyLong_FromLong(ev->res), PyLong_FromUnsignedLong(ev->off)};
    PyObject *result = NULL;
    if (args[0] && args[1] && args[2] && args[3])
        result = PyObject_Vectorcall(self->refs[C_HANDLE], args, 4, NULL);
    for (int i = 0; i < 4; i++)
        Py_XDECREF(args[i]);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

/* One DATA event for an owner of exactly the transport class. 1: handled
 * here; 0: not for the fast path; -1: an exception to propagate. */
static int deliver_data(Dispatcher *self, PyObject *owner, const struct event_record *ev,
                        const char *area, Py_ssize_t area_len) {
    const Py_ssize_t *at = self->offset;
    PyObject *context = slot_value(owner, at[C_CONTEXT]);
    PyObject *func = slot_value(owner, at[C_DATA_RECEIVED]);
    PyObject *protocol = slot_value(owner, at[C_PROTOCOL]);
    if (slot_value(owner, at[C_READING]) != Py_True ||
        slot_value(owner, at[C_DEADLINES]) != Py_None ||
        slot_value(owner, at[C_BUFFERED]) != Py_False || context == NULL ||
        !PyContext_CheckExact(context) || func == NULL || func == Py_None || protocol == NULL ||
        ev->res < 0 || (Py_ssize_t)ev->off + ev->res > area_len)
        return 0;
    struct held h = hold(owner, context, func, protocol);
    PyObject *data = PyBytes_FromStringAndSize(area + ev->off, ev->res);
    if (data == NULL) {
        release(&h);
        return -1;
    }
    return data_received(self->refs[C_FAILED], &h, NULL, data);
}

static PyObject *completion_call(Dispatcher *self, PyObject *const *args, size_t nargsf,
                                 PyObject *kwnames) {
    if (check_call(self, nargsf, kwnames, 2, "Dispatcher(records, data)") < 0)
        return NULL;
    Py_buffer records, data;
    if (PyObject_GetBuffer(args[0], &records, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[1], &data, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&records);
        return NULL;
    }
    PyObject *ret = Py_None;
    if (records.len % (Py_ssize_t)sizeof(struct event_record)) {
        PyErr_Format(PyExc_ValueError, "event records must be a multiple of %d bytes, not %zd",
                     (int)sizeof(struct event_record), records.len);
        ret = NULL;
    }
    const struct event_record *ev = records.buf;
    Py_ssize_t n = ret == NULL ? 0 : records.len / (Py_ssize_t)sizeof(struct event_record);
    PyObject *slots = self->refs[C_SLOTS];
    for (Py_ssize_t i = 0; i < n; i++, ev++) {
        int rc = 0;
        if (ev->kind == KIND_DATA && (Py_ssize_t)ev->slot < PyList_GET_SIZE(slots)) {
            PyObject *owner = PyList_GET_ITEM(slots, ev->slot);
            if (Py_IS_TYPE(owner, self->cls))
                rc = deliver_data(self, owner, ev, data.buf, data.len);
        }
        if (rc == 0)
            rc = handle_event(self, ev) < 0 ? -1 : 1;
        if (rc < 0) {
            ret = NULL;
            break;
        }
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&records);
    Py_XINCREF(ret);
    return ret;
}

/* -- readiness ------------------------------------------------------------------- */

static int ready_init(Dispatcher *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"cls", "handle", "read_failed", "failed", "read_size", NULL};
    PyObject *cls, *refs[4];
    Py_ssize_t read_size;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OOOn:ReadyDispatcher", kwlist, &PyType_Type,
                                     &cls, &refs[R_HANDLE], &refs[R_READ_FAILED], &refs[R_FAILED],
                                     &read_size))
        return -1;
    if (read_size <= 0) {
        PyErr_Format(PyExc_ValueError, "ReadyDispatcher: read_size must be positive, not %zd",
                     read_size);
        return -1;
    }
    refs[R_NAME] = PyUnicode_InternFromString("data_received");
    if (refs[R_NAME] == NULL)
        return -1;
    char *buffer = PyMem_RawMalloc((size_t)read_size);
    int rc = buffer != NULL
                 ? setup(self, cls, ready_attrs, R_COUNT, refs, 3, R_HANDLE, "ReadyDispatcher")
                 : (PyErr_NoMemory(), -1);
    if (rc == 0) {
        Py_XSETREF(self->refs[R_NAME], refs[R_NAME]);
        self->read_size = read_size;
        PyMem_RawFree(self->read_buffer);
        self->read_buffer = buffer;
    } else {
        PyMem_RawFree(buffer);
        Py_DECREF(refs[R_NAME]);
    }
    return rc;
}

/* One read event of a plain stream transport: read once, then data_received,
 * as the transport's _read does. 1: handled; 0: for the Python handler
 * (the transport is not in the plain reading state, or the peer ended
 * the stream, which the handler's own read sees again); -1: an exception
 * to propagate. */
static int ready_read(Dispatcher *self, PyObject *target) {
    const Py_ssize_t *at = self->offset;
    /* Reading, level-triggered, plain Protocol, no deadlines. */
    for (int flag = R_CLOSING; flag <= R_BUFFERED; flag++)
        if (slot_value(target, at[flag]) != Py_False)
            return 0;
    PyObject *fdobj = slot_value(target, at[R_SOCK_FD]);
    PyObject *context = slot_value(target, at[R_CONTEXT]);
    PyObject *protocol = slot_value(target, at[R_PROTOCOL]);
    if (slot_value(target, at[R_DEADLINES]) != Py_None || fdobj == NULL ||
        !PyLong_CheckExact(fdobj) || context == NULL || !PyContext_CheckExact(context) ||
        protocol == NULL)
        return 0;
    long fd = PyLong_AsLong(fdobj);
    if (fd < 0 || fd > INT32_MAX)
        return PyErr_Occurred() ? -1 : 0;
    struct held h = hold(target, context, NULL, protocol);
    ssize_t n = read((int)fd, self->read_buffer, (size_t)self->read_size);
    if (n <= 0) {
        int err = errno;
        release(&h);
        if (n == 0)
            return 0;
        if (err == EAGAIN || err == EWOULDBLOCK)
            return 1; /* readiness can be stale */
        if (err == EINTR) {
            /* What os.read does first: run the signal handlers; the fd,
             * still readable, is reported again. */
            if (PyErr_CheckSignals() == 0)
                return 1;
        } else {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
        }
        return report_failure(self->refs[R_READ_FAILED], target) < 0 ? -1 : 1;
    }
    PyObject *data = PyBytes_FromStringAndSize(self->read_buffer, n);
    if (data == NULL) {
        release(&h);
        return -1;
    }
    return data_received(self->refs[R_FAILED], &h, self->refs[R_NAME], data);
}

static PyObject *ready_call(Dispatcher *self, PyObject *const *args, size_t nargsf,
                            PyObject *kwnames) {
    if (check_call(self, nargsf, kwnames, 1, "ReadyDispatcher(events)") < 0)
        return NULL;
    PyObject *events = PySequence_Fast(args[0], "ReadyDispatcher: events must be a sequence");
    if (events == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(events);
    PyObject **items = PySequence_Fast_ITEMS(events);
    PyObject *ret = Py_None;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *event = items[i];
        if (!PyTuple_CheckExact(event) || PyTuple_GET_SIZE(event) != 3) {
            PyErr_Format(PyExc_TypeError,
                         "ReadyDispatcher: an event must be a (fd, mask, target) tuple, not %R",
                         event);
            ret = NULL;
            break;
        }
        PyObject *mask = PyTuple_GET_ITEM(event, 1);
        PyObject *target = PyTuple_GET_ITEM(event, 2);
        int rc = 0;
        if (Py_IS_TYPE(target, self->cls) && PyLong_CheckExact(mask) &&
            PyLong_AsLong(mask) == MASK_READ)
            rc = ready_read(self, target);
        if (rc == 0) {
            PyObject *call_args[2] = {target, mask};
            PyObject *result = PyObject_Vectorcall(self->refs[R_HANDLE], call_args, 2, NULL);
            rc = result == NULL ? -1 : 1;
            Py_XDECREF(result);
        }
        if (rc < 0) {
            ret = NULL;
            break;
        }
    }
    Py_DECREF(events);
    Py_XINCREF(ret);
    return ret;
}

/* -- a readiness transport's write() ---------------------------------------------- */

static int write_init(Dispatcher *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"cls", "slow", "rest", "failed", NULL};
    PyObject *cls, *refs[3];
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OOO:WriteMethod", kwlist, &PyType_Type, &cls,
                                     &refs[W_SLOW], &refs[W_REST], &refs[W_FAILED]))
        return -1;
    return setup(self, cls, write_attrs, W_COUNT, refs, 3, W_SLOW, "WriteMethod");
}

/* write(transport, data) where nothing waits to be sent: 1 done; 0 for the
 * Python write; -1 an exception to propagate. */
static int write_now(Dispatcher *self, PyObject *transport, PyObject *data) {
    const Py_ssize_t *at = self->offset;
    PyObject *buffer = slot_value(transport, at[W_BUFFER]);
    PyObject *conn_lost = slot_value(transport, at[W_CONN_LOST]);
    PyObject *fdobj = slot_value(transport, at[W_SOCK_FD]);
    Py_ssize_t len = PyBytes_GET_SIZE(data);
    if (len == 0 || buffer == NULL || conn_lost == NULL || fdobj == NULL ||
        !PyLong_CheckExact(fdobj) || slot_value(transport, at[W_EOF]) != Py_False ||
        slot_value(transport, at[W_EMPTY_WAITER]) != Py_None ||
        slot_value(transport, at[W_DEADLINES]) != Py_None)
        return 0;
    /* Nothing buffered (the shared b"" or an empty bytearray), no loss. */
    if ((PyBytes_CheckExact(buffer) ? PyBytes_GET_SIZE(buffer)
         : PyByteArray_CheckExact(buffer) ? PyByteArray_GET_SIZE(buffer)
                                          : 1) != 0 ||
        !PyLong_CheckExact(conn_lost) || PyObject_IsTrue(conn_lost) != 0)
        return 0;
    long fd = PyLong_AsLong(fdobj);
    if (fd < 0 || fd > INT32_MAX)
        return PyErr_Occurred() ? -1 : 0;
    ssize_t n = write((int)fd, PyBytes_AS_STRING(data), (size_t)len);
    if (n == len)
        return 1;
    if (n < 0) {
        int err = errno;
        if (err == EINTR && PyErr_CheckSignals() < 0)
            return report_failure(self->refs[W_FAILED], transport) < 0 ? -1 : 1;
        if (err != EAGAIN && err != EWOULDBLOCK && err != EINTR) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            return report_failure(self->refs[W_FAILED], transport) < 0 ? -1 : 1;
        }
        n = 0; /* the socket is full: buffer it all */
    }
    /* rest(transport, data, sent): buffer what the socket did not take. */
    PyObject *sent = PyLong_FromSsize_t(n);
    if (sent == NULL)
        return -1;
    PyObject *args[3] = {transport, data, sent};
    PyObject *result = PyObject_Vectorcall(self->refs[W_REST], args, 3, NULL);
    Py_DECREF(sent);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 1;
}

/* As a class attribute it is a method: transport.write is bound to the transport. */
static PyObject *write_get(PyObject *self, PyObject *obj, PyObject *type) {
    if (obj == NULL || obj == Py_None) {
        Py_INCREF(self);
        return self;
    }
    return PyMethod_New(self, obj);
}

/* Both write methods: refs[0] is the Python write. */
_Static_assert(W_SLOW == 0 && S_SLOW == 0, "the Python write is refs[0]");
static PyObject *write_doc(Dispatcher *self, void *closure) {
    if (self->refs[W_SLOW] == NULL)
        Py_RETURN_NONE;
    return PyObject_GetAttrString(self->refs[W_SLOW], "__doc__");
}

static PyGetSetDef write_getset[] = {
    {"__doc__", (getter)write_doc, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

/* -- a completion transport's write() --------------------------------------------- */

static int stage_init(Dispatcher *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"cls", "slow", "check_pause", NULL};
    PyObject *cls, *refs[2];
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OO:StageWriteMethod", kwlist, &PyType_Type,
                                     &cls, &refs[S_SLOW], &refs[S_CHECK_PAUSE]))
        return -1;
    return setup(self, cls, stage_attrs, S_COUNT, refs, 2, S_SLOW, "StageWriteMethod");
}

/* A small int attribute as a C integer: 0 with *value set; 1 where it is not one. */
static inline int small_int(PyObject *obj, long long *value) {
    if (obj == NULL || !PyLong_CheckExact(obj))
        return 1;
#if PY_VERSION_HEX >= 0x030C0000
    if (PyUnstable_Long_IsCompact((PyLongObject *)obj)) {
        *value = PyUnstable_Long_CompactValue((PyLongObject *)obj);
        return 0;
    }
#else
    Py_ssize_t digits = Py_SIZE(obj); /* one digit or none: read it */
    if (digits >= -1 && digits <= 1) {
        *value = digits * (long long)((PyLongObject *)obj)->ob_digit[0];
        return 0;
    }
#endif
    int overflow;
    *value = PyLong_AsLongLongAndOverflow(obj, &overflow);
    return overflow != 0 || (*value == -1 && PyErr_Occurred());
}

/* Append n bytes to a bytearray. PyByteArray_Resize grows a small buffer
 * to the exact size asked for, which would be a realloc per send: grow it
 * to twice what is needed, then set the size (within the allocation, and
 * at least half of it, which does not reallocate). */
static int append(PyObject *array, const void *bytes, Py_ssize_t n) {
    PyByteArrayObject *a = (PyByteArrayObject *)array;
    Py_ssize_t size = Py_SIZE(a), need = size + n;
    if (need + (a->ob_start - a->ob_bytes) + 1 > a->ob_alloc &&
        PyByteArray_Resize(array, 2 * need) < 0)
        return -1;
    if (PyByteArray_Resize(array, need) < 0)
        return -1;
    memcpy(PyByteArray_AS_STRING(array) + size, bytes, (size_t)n);
    return 0;
}

/* write(transport, data) onto the port's stage: 1 done; 0 for the Python
 * write; -1 an exception to propagate. */
static int stage_now(Dispatcher *self, PyObject *transport, PyObject *data) {
    const Py_ssize_t *at = self->offset;
    PyObject *stage = slot_value(transport, at[S_STAGE]);
    PyObject *sends = slot_value(transport, at[S_SENDS]);
    long long stage_max, slot, written, acked, pause_above;
    Py_ssize_t len = PyBytes_GET_SIZE(data);
    if (slot_value(transport, at[S_BLOCKED]) != Py_False ||
        slot_value(transport, at[S_DEADLINES]) != Py_None || stage == NULL || sends == NULL ||
        !PyByteArray_CheckExact(stage) || !PyByteArray_CheckExact(sends) ||
        small_int(slot_value(transport, at[S_STAGE_MAX]), &stage_max) ||
        small_int(slot_value(transport, at[S_SLOT]), &slot) ||
        small_int(slot_value(transport, at[S_WRITTEN]), &written) ||
        small_int(slot_value(transport, at[S_ACKED]), &acked) ||
        small_int(slot_value(transport, at[S_PAUSE_ABOVE]), &pause_above) || len <= 0 ||
        len >= stage_max || slot < 0 || slot > UINT32_MAX || written > LLONG_MAX - len) {
        PyErr_Clear();
        return 0;
    }
    Py_ssize_t staged = PyByteArray_GET_SIZE(stage);
    if (append(stage, PyBytes_AS_STRING(data), len) < 0)
        return -1; /* e.g. BufferError: the stage is exported, as += would say */
    struct send_pair pair = {(uint32_t)slot, (uint32_t)len};
    if (append(sends, &pair, sizeof pair) < 0) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        (void)PyByteArray_Resize(stage, staged); /* nothing half-queued */
        PyErr_Restore(type, value, tb);
        return -1;
    }
    PyObject *total = PyLong_FromLongLong(written + len);
    if (total == NULL)
        return -1;
    Py_XSETREF(*(PyObject **)((char *)transport + at[S_WRITTEN]), total);
    if (written + len - acked > pause_above &&
        slot_value(transport, at[S_PROTOCOL_PAUSED]) == Py_False) {
        PyObject *result = PyObject_Vectorcall(self->refs[S_CHECK_PAUSE], &transport, 1, NULL);
        if (result == NULL)
            return -1;
        Py_DECREF(result);
    }
    return 1;
}

/* Both write methods' call: the C path for bytes written to a transport of
 * exactly cls, where its state allows; the Python write (refs[0]) otherwise. */
static PyObject *write_method_call(Dispatcher *self, PyObject *const *args, size_t nargsf,
                                   PyObject *kwnames) {
    if (check_call(self, nargsf, kwnames, 2, "write(transport, data)") < 0)
        return NULL;
    int rc = 0;
    if (Py_IS_TYPE(args[0], self->cls) && PyBytes_CheckExact(args[1]))
        rc = (Py_IS_TYPE(self, &StageWriteMethodType) ? stage_now : write_now)(self, args[0],
                                                                                args[1]);
    if (rc < 0)
        return NULL;
    if (rc == 0)
        return PyObject_Vectorcall(self->refs[0], args, 2, NULL);
    Py_RETURN_NONE;
}

/* -- the loop's callbacks and timers ---------------------------------------------- */

/* LoopMethod(kind, loop_cls, handle_cls, timer_cls, slow, helper) is one of
 * the loop's scheduling methods, as a method of loop_cls (or, for "cancel",
 * of timer_cls). It fills asyncio's Handle and the loop's TimerHandle
 * subclass at their __slots__ offsets, as BaseReactor's Python code does
 * outside debug mode, and hands every other case (a closed loop, debug
 * mode, a task factory, arguments it does not take) to slow, the Python
 * method it replaces. Loop attributes are read at the offsets of
 * BaseReactor's __slots__, which every subclass keeps. */
enum { L_READY, L_SCHEDULED, L_CLOSED, L_DEBUG, L_TIMER_NUMBER, L_CANCELLED, L_TASK_FACTORY,
       L_COUNT };
static const char *const loop_attrs[L_COUNT] = {
    "_ready",         "_scheduled", "_closed", "_debug", "_timer_number", "_timer_cancelled_count",
    "_task_factory",
};
/* Handle's fields, then TimerHandle's own two. */
enum { H_CALLBACK, H_ARGS, H_CANCELLED, H_LOOP, H_TRACEBACK, H_REPR, H_CONTEXT, H_WHEN, H_SCHEDULED,
       H_COUNT };
#define HANDLE_FIELDS H_WHEN
static const char *const handle_attrs[H_COUNT] = {
    "_callback", "_args",    "_cancelled", "_loop",      "_source_traceback",
    "_repr",     "_context", "_when",      "_scheduled",
};
/* What each kind is; helper is deque.append, heapq.heappush, deque.popleft,
 * the Task class, or None. */
enum { K_CALL_SOON, K_CALL_AT, K_CALL_LATER, K_CANCEL, K_RUN_READY, K_CREATE_TASK, K_GET_DEBUG,
       K_COUNT };
static const char *const kinds[K_COUNT] = {
    "call_soon", "call_at", "call_later", "cancel", "_run_ready", "create_task", "get_debug",
};

/* The objects a LoopMethod holds: the classes, then what it calls. */
enum { M_LOOP_CLS, M_HANDLE_CLS, M_TIMER_CLS, M_SLOW, M_HELPER, M_COUNT };

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    int kind;
    union {
        PyObject *refs[M_COUNT];
        struct {
            PyTypeObject *loop_cls, *handle_cls, *timer_cls;
            PyObject *slow, *helper;
        };
    };
    Py_ssize_t loop_at[L_COUNT];
    Py_ssize_t handle_at[H_COUNT];
} LoopMethod;
_Static_assert(offsetof(LoopMethod, helper) == offsetof(LoopMethod, refs[M_HELPER]),
               "LoopMethod's named references are its refs");

/* The keyword names create_task passes to Task: loop, and name and context where given
 * (task_kwnames[2] is ("loop", "context"), interned). */
static PyObject *task_kwnames[4];

static inline PyObject *loop_get(LoopMethod *self, PyObject *loop, int i) {
    return slot_value(loop, self->loop_at[i]);
}

static inline PyObject *handle_get(LoopMethod *self, PyObject *handle, int i) {
    return slot_value(handle, self->handle_at[i]);
}

/* Store a new reference in a slot, dropping what it held. */
static inline void slot_set(PyObject *obj, Py_ssize_t offset, PyObject *value) {
    Py_XSETREF(*(PyObject **)((char *)obj + offset), value);
}

/* A loop this method may act for: of loop_cls, open, not in debug mode. */
static inline int plain_loop(LoopMethod *self, PyObject *loop) {
    return PyObject_TypeCheck(loop, self->loop_cls) && loop_get(self, loop, L_CLOSED) == Py_False &&
           loop_get(self, loop, L_DEBUG) == Py_False;
}

static PyObject *loop_slow(LoopMethod *self, PyObject *const *args, size_t nargsf,
                           PyObject *kwnames) {
    return PyObject_Vectorcall(self->slow, args, nargsf, kwnames);
}

/* The keyword arguments of call_soon/call_at/call_later: none, or context
 * (*context set, NULL for None). 0: taken; -1: others, for the slow path. */
static int context_keyword(PyObject *kwnames, PyObject *const *values, PyObject **context) {
    *context = NULL;
    if (kwnames == NULL || PyTuple_GET_SIZE(kwnames) == 0)
        return 0;
    /* A task's step passes the interned name: compared by identity first. */
    PyObject *key = PyTuple_GET_ITEM(kwnames, 0);
    if (PyTuple_GET_SIZE(kwnames) != 1 ||
        (key != PyTuple_GET_ITEM(task_kwnames[2], 1) &&
         PyUnicode_CompareWithASCIIString(key, "context") != 0))
        return -1;
    *context = values[0] == Py_None ? NULL : values[0];
    return 0;
}

/* What Handle(callback, args, loop, context) makes outside debug mode (a
 * TimerHandle without its _when and _scheduled when type is the timer class). */
static PyObject *new_handle(LoopMethod *self, PyTypeObject *type, PyObject *loop,
                            PyObject *callback, PyObject *const *args, Py_ssize_t nargs,
                            PyObject *context) {
    PyObject *tuple = PyTuple_New(nargs);
    if (tuple == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < nargs; i++)
        PyTuple_SET_ITEM(tuple, i, Py_NewRef(args[i]));
    PyObject *ctx = context != NULL ? Py_NewRef(context) : PyContext_CopyCurrent();
    PyObject *handle = ctx != NULL ? type->tp_alloc(type, 0) : NULL;
    if (handle == NULL) {
        Py_XDECREF(ctx);
        Py_DECREF(tuple);
        return NULL;
    }
    const Py_ssize_t *at = self->handle_at;
    slot_set(handle, at[H_CALLBACK], Py_NewRef(callback));
    slot_set(handle, at[H_ARGS], tuple);
    slot_set(handle, at[H_CANCELLED], Py_NewRef(Py_False));
    slot_set(handle, at[H_LOOP], Py_NewRef(loop));
    slot_set(handle, at[H_TRACEBACK], Py_NewRef(Py_None));
    slot_set(handle, at[H_REPR], Py_NewRef(Py_None));
    slot_set(handle, at[H_CONTEXT], ctx);
    return handle;
}

/* loop.call_soon(callback, *args, context=None) */
static PyObject *call_soon_call(LoopMethod *self, PyObject *const *args, size_t nargsf,
                                PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *context, *ready;
    if (nargs < 2 || !plain_loop(self, args[0]) ||
        context_keyword(kwnames, args + nargs, &context) < 0 ||
        (ready = loop_get(self, args[0], L_READY)) == NULL)
        return loop_slow(self, args, nargsf, kwnames);
    PyObject *handle =
        new_handle(self, self->handle_cls, args[0], args[1], args + 2, nargs - 2, context);
    if (handle == NULL)
        return NULL;
    PyObject *append[2] = {ready, handle};
    PyObject *result = PyObject_Vectorcall(self->helper, append, 2, NULL);
    if (result == NULL) {
        Py_DECREF(handle);
        return NULL;
    }
    Py_DECREF(result);
    return handle;
}

/* time.monotonic(), computed as it does. */
static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    int64_t ns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
    return ns % 1000000000 == 0 ? (double)(ns / 1000000000) : (double)ns / 1e9;
}

/* loop.call_at(when, callback, *args, context=None) and
 * loop.call_later(delay, callback, *args, context=None) */
static PyObject *timer_call(LoopMethod *self, PyObject *const *args, size_t nargsf,
                            PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *context, *scheduled, *number_of;
    if (nargs < 3 || !plain_loop(self, args[0]) ||
        context_keyword(kwnames, args + nargs, &context) < 0 ||
        !(PyFloat_CheckExact(args[1]) || PyLong_CheckExact(args[1])) ||
        (scheduled = loop_get(self, args[0], L_SCHEDULED)) == NULL ||
        (number_of = loop_get(self, args[0], L_TIMER_NUMBER)) == NULL)
        return loop_slow(self, args, nargsf, kwnames);
    PyObject *when;
    if (self->kind == K_CALL_LATER) {
        double delay = PyFloat_CheckExact(args[1]) ? PyFloat_AS_DOUBLE(args[1])
                                                   : PyLong_AsDouble(args[1]);
        if (delay == -1.0 && PyErr_Occurred()) {
            PyErr_Clear(); /* an int too large for a float: as Python says it */
            return loop_slow(self, args, nargsf, kwnames);
        }
        when = PyFloat_FromDouble(monotonic() + delay);
    } else {
        when = Py_NewRef(args[1]);
    }
    PyObject *number = when != NULL ? PyObject_CallNoArgs(number_of) : NULL;
    PyObject *timer =
        number != NULL
            ? new_handle(self, self->timer_cls, args[0], args[2], args + 3, nargs - 3, context)
            : NULL;
    PyObject *entry = timer != NULL ? PyTuple_Pack(3, when, number, timer) : NULL;
    PyObject *result = NULL;
    if (entry != NULL) {
        slot_set(timer, self->handle_at[H_WHEN], Py_NewRef(when));
        PyObject *push[2] = {scheduled, entry};
        result = PyObject_Vectorcall(self->helper, push, 2, NULL);
    }
    Py_XDECREF(entry);
    Py_XDECREF(number);
    Py_XDECREF(when);
    if (result == NULL) {
        Py_XDECREF(timer);
        return NULL;
    }
    Py_DECREF(result);
    slot_set(timer, self->handle_at[H_SCHEDULED], Py_NewRef(Py_True));
    return timer;
}

/* timer.cancel(): the loop drops it from its heap lazily. */
static PyObject *cancel_call(LoopMethod *self, PyObject *const *args, size_t nargsf,
                             PyObject *kwnames) {
    PyObject *timer, *loop, *scheduled, *count;
    long long cancelled_count;
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames)) ||
        !PyObject_TypeCheck((timer = args[0]), self->timer_cls))
        return loop_slow(self, args, nargsf, kwnames);
    PyObject *cancelled = handle_get(self, timer, H_CANCELLED);
    if (cancelled == Py_True)
        Py_RETURN_NONE;
    if (cancelled != Py_False || (loop = handle_get(self, timer, H_LOOP)) == NULL ||
        !PyObject_TypeCheck(loop, self->loop_cls) || loop_get(self, loop, L_DEBUG) != Py_False ||
        (scheduled = handle_get(self, timer, H_SCHEDULED)) == NULL ||
        (scheduled == Py_True &&
         small_int(loop_get(self, loop, L_CANCELLED), &cancelled_count)))
        return loop_slow(self, args, nargsf, kwnames);
    if (scheduled == Py_True) {
        if ((count = PyLong_FromLongLong(cancelled_count + 1)) == NULL)
            return NULL;
        slot_set(loop, self->loop_at[L_CANCELLED], count);
    }
    slot_set(timer, self->handle_at[H_CANCELLED], Py_NewRef(Py_True));
    slot_set(timer, self->handle_at[H_CALLBACK], Py_NewRef(Py_None));
    slot_set(timer, self->handle_at[H_ARGS], Py_NewRef(Py_None));
    Py_RETURN_NONE;
}

/* A callback raised: what the Python loop does, loop._callback_failed(handle,
 * exc), except for SystemExit and KeyboardInterrupt, which go on up (-1). */
static int callback_failed(PyObject *loop, PyObject *handle) {
    if (exiting())
        return -1;
    PyObject *type, *value, *tb; /* put aside while the method is looked up */
    PyErr_Fetch(&type, &value, &tb);
    PyObject *failed = PyObject_GetAttrString(loop, "_callback_failed");
    if (failed == NULL) {
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return -1;
    }
    PyErr_Restore(type, value, tb);
    int rc = report_failure(failed, handle);
    Py_DECREF(failed);
    return rc;
}

/* Run one handle as Handle._run does: 0, or -1 for an exception to propagate. */
static int run_handle(PyObject *loop, PyObject *handle, PyObject *cancelled, PyObject *context,
                      PyObject *callback, PyObject *args) {
    int skip = cancelled == Py_True ? 1 : cancelled == Py_False ? 0 : PyObject_IsTrue(cancelled);
    if (skip != 0)
        return skip < 0 ? -1 : 0;
    PyObject *result = NULL;
    PyObject *tuple = PyTuple_CheckExact(args) ? Py_NewRef(args) : PySequence_Tuple(args);
    if (tuple != NULL && PyContext_Enter(context) == 0) {
        result = PyObject_Call(callback, tuple, NULL);
        if (PyContext_Exit(context) != 0)
            Py_CLEAR(result);
    }
    Py_XDECREF(tuple);
    if (result != NULL) {
        Py_DECREF(result);
        return 0;
    }
    return callback_failed(loop, handle);
}

/* loop._run_ready(): run the callbacks ready now (not those they schedule), in order. */
static PyObject *run_ready_call(LoopMethod *self, PyObject *const *args, size_t nargsf,
                                PyObject *kwnames) {
    PyObject *loop, *ready;
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames)) ||
        !PyObject_TypeCheck((loop = args[0]), self->loop_cls) ||
        (ready = loop_get(self, loop, L_READY)) == NULL)
        return loop_slow(self, args, nargsf, kwnames);
    Py_INCREF(ready); /* a callback may replace loop._ready */
    Py_ssize_t n = PyObject_Size(ready);
    int rc = n < 0 ? -1 : 0;
    for (Py_ssize_t i = 0; i < n && rc == 0; i++) {
        PyObject *handle = PyObject_Vectorcall(self->helper, &ready, 1, NULL);
        if (handle == NULL) {
            rc = -1;
            break;
        }
        /* Held across the call: the callback may cancel its own handle. */
        PyObject *f[4];
        if (PyObject_TypeCheck(handle, self->handle_cls)) {
            static const int fields[4] = {H_CANCELLED, H_CONTEXT, H_CALLBACK, H_ARGS};
            for (int j = 0; j < 4; j++)
                f[j] = Py_XNewRef(handle_get(self, handle, fields[j]));
            if (!(f[0] && f[1] && f[2] && f[3]))
                PyErr_SetString(PyExc_AttributeError, "a ready handle lacks its fields");
        } else {
            static const char *const names[4] = {"_cancelled", "_context", "_callback", "_args"};
            for (int j = 0; j < 4; j++)
                f[j] = j == 0 || f[j - 1] != NULL ? PyObject_GetAttrString(handle, names[j])
                                                  : NULL;
        }
        if (f[0] && f[1] && f[2] && f[3])
            rc = run_handle(loop, handle, f[0], f[1], f[2], f[3]);
        else
            rc = callback_failed(loop, handle);
        for (int j = 0; j < 4; j++)
            Py_XDECREF(f[j]);
        Py_DECREF(handle);
    }
    Py_DECREF(ready);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* loop.create_task(coro, *, name=None, context=None) */
static PyObject *create_task_call(LoopMethod *self, PyObject *const *args, size_t nargsf,
                                  PyObject *kwnames) {
    Py_ssize_t nkw = kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0;
    PyObject *name = NULL, *context = NULL;
    if (PyVectorcall_NARGS(nargsf) != 2 || !plain_loop(self, args[0]) ||
        loop_get(self, args[0], L_TASK_FACTORY) != Py_None)
        return loop_slow(self, args, nargsf, kwnames);
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, i), *value = args[2 + i];
        if (PyUnicode_CompareWithASCIIString(key, "name") == 0)
            name = value;
        else if (PyUnicode_CompareWithASCIIString(key, "context") == 0)
            context = value == Py_None ? NULL : value;
        else
            return loop_slow(self, args, nargsf, kwnames);
    }
    /* Task(coro, loop=loop[, name=name][, context=context]) */
    PyObject *call[5] = {NULL, args[1], args[0]};
    int which = 0, n = 3;
    if (name != NULL) {
        call[n++] = name;
        which |= 1;
    }
    if (context != NULL) {
        call[n++] = context;
        which |= 2;
    }
    return PyObject_Vectorcall(self->helper, call + 1, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                               task_kwnames[which]);
}

/* loop.get_debug() */
static PyObject *get_debug_call(LoopMethod *self, PyObject *const *args, size_t nargsf,
                                PyObject *kwnames) {
    PyObject *debug;
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames)) ||
        !PyObject_TypeCheck(args[0], self->loop_cls) ||
        (debug = loop_get(self, args[0], L_DEBUG)) == NULL)
        return loop_slow(self, args, nargsf, kwnames);
    return Py_NewRef(debug);
}

static const vectorcallfunc loop_calls[K_COUNT] = {
    (vectorcallfunc)call_soon_call,   (vectorcallfunc)timer_call,
    (vectorcallfunc)timer_call,       (vectorcallfunc)cancel_call,
    (vectorcallfunc)run_ready_call,   (vectorcallfunc)create_task_call,
    (vectorcallfunc)get_debug_call,
};

static int loop_method_init(LoopMethod *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"kind", "loop_cls", "handle_cls", "timer_cls", "slow", "helper", NULL};
    const char *kind;
    PyObject *loop_cls, *handle_cls, *timer_cls, *slow, *helper;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "sO!O!O!OO:LoopMethod", kwlist, &kind,
                                     &PyType_Type, &loop_cls, &PyType_Type, &handle_cls,
                                     &PyType_Type, &timer_cls, &slow, &helper))
        return -1;
    int k = 0;
    while (k < K_COUNT && strcmp(kinds[k], kind) != 0)
        k++;
    if (k == K_COUNT) {
        PyErr_Format(PyExc_ValueError,
                     "LoopMethod: unknown kind '%s' (call_soon, call_at, call_later, cancel, "
                     "_run_ready, create_task or get_debug)",
                     kind);
        return -1;
    }
    int needs_helper = k != K_CANCEL && k != K_GET_DEBUG;
    if (!PyCallable_Check(slow) || (needs_helper && !PyCallable_Check(helper))) {
        PyErr_Format(PyExc_TypeError, "LoopMethod: %R is not callable",
                     PyCallable_Check(slow) ? helper : slow);
        return -1;
    }
    if (!PyType_IsSubtype((PyTypeObject *)timer_cls, (PyTypeObject *)handle_cls)) {
        PyErr_Format(PyExc_TypeError, "LoopMethod: %R is not a subclass of %R", timer_cls,
                     handle_cls);
        return -1;
    }
    Py_ssize_t handle_at[HANDLE_FIELDS];
    if (slot_offsets(loop_cls, loop_attrs, L_COUNT, self->loop_at, "LoopMethod") < 0 ||
        slot_offsets(timer_cls, handle_attrs, H_COUNT, self->handle_at, "LoopMethod") < 0 ||
        slot_offsets(handle_cls, handle_attrs, HANDLE_FIELDS, handle_at, "LoopMethod") < 0)
        return -1;
    self->kind = k;
    self->vectorcall = loop_calls[k];
    PyObject *refs[M_COUNT] = {loop_cls, handle_cls, timer_cls, slow, helper};
    for (int i = 0; i < M_COUNT; i++)
        Py_XSETREF(self->refs[i], Py_NewRef(refs[i]));
    return 0;
}

/* Not initialised: every call raises. */
static PyObject *loop_method_unset(PyObject *self, PyObject *const *args, size_t nargsf,
                                   PyObject *kwnames) {
    PyErr_SetString(PyExc_RuntimeError, "LoopMethod: not initialised");
    return NULL;
}

static PyObject *loop_method_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    LoopMethod *self = (LoopMethod *)PyType_GenericNew(type, args, kwds);
    if (self != NULL)
        self->vectorcall = loop_method_unset;
    return (PyObject *)self;
}

static int loop_method_traverse(LoopMethod *self, visitproc visit, void *arg) {
    for (int i = 0; i < M_COUNT; i++)
        Py_VISIT(self->refs[i]);
    return 0;
}

static int loop_method_clear(LoopMethod *self) {
    self->vectorcall = loop_method_unset;
    for (int i = 0; i < M_COUNT; i++)
        Py_CLEAR(self->refs[i]);
    return 0;
}

static PyObject *loop_method_doc(LoopMethod *self, void *closure) {
    if (self->slow == NULL)
        Py_RETURN_NONE;
    return PyObject_GetAttrString(self->slow, "__doc__");
}

static PyGetSetDef loop_method_getset[] = {
    {"__doc__", (getter)loop_method_doc, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LoopMethodType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "iomux.reactor._speedups.LoopMethod",
    .tp_doc = PyDoc_STR("LoopMethod(kind, loop_cls, handle_cls, timer_cls, slow, helper): one of "
                        "the loop's scheduling methods (see iomux.reactor.base)."),
    .tp_basicsize = sizeof(LoopMethod),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_new = loop_method_new,
    .tp_init = (initproc)loop_method_init,
    .tp_dealloc = gc_dealloc,
    .tp_free = PyObject_GC_Del,
    .tp_traverse = (traverseproc)loop_method_traverse,
    .tp_clear = (inquiry)loop_method_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(LoopMethod, vectorcall),
    .tp_descr_get = write_get,
    .tp_getset = loop_method_getset,
};

/* -- the types and the module ------------------------------------------------------ */

/* The two types differ in their name, doc and __init__ (and their call). */
#define DISPATCHER_TYPE(NAME, DOC, INIT)                                                  \
    {                                                                                     \
        PyVarObject_HEAD_INIT(NULL, 0).tp_name = "iomux.reactor._speedups." NAME,         \
        .tp_doc = PyDoc_STR(DOC), .tp_basicsize = sizeof(Dispatcher),                     \
        .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL, \
        .tp_new = dispatcher_new, .tp_init = (initproc)(INIT),                            \
        .tp_dealloc = gc_dealloc, .tp_free = PyObject_GC_Del,         \
        .tp_traverse = (traverseproc)dispatcher_traverse,                                 \
        .tp_clear = (inquiry)dispatcher_clear, .tp_call = PyVectorcall_Call,              \
        .tp_vectorcall_offset = offsetof(Dispatcher, vectorcall),                         \
    }

static PyTypeObject DispatcherType = DISPATCHER_TYPE(
    "Dispatcher",
    "Dispatcher(cls, slots, handle, failed): call it with (records, data) to dispatch one "
    "iteration's completion events in order.",
    completion_init);

static PyTypeObject ReadyDispatcherType = DISPATCHER_TYPE(
    "ReadyDispatcher",
    "ReadyDispatcher(cls, handle, read_failed, failed, read_size): call it with a "
    "Multiplexer.ready() list to dispatch one iteration's readiness events in order.",
    ready_init);

static PyTypeObject WriteMethodType = DISPATCHER_TYPE(
    "WriteMethod",
    "WriteMethod(cls, slow, rest, failed): a readiness stream transport's write() as a method "
    "of cls (see iomux.reactor.readiness).",
    write_init);

static PyTypeObject StageWriteMethodType = DISPATCHER_TYPE(
    "StageWriteMethod",
    "StageWriteMethod(cls, slow, check_pause): a completion stream transport's write() as a "
    "method of cls (see iomux.reactor.completion).",
    stage_init);

static PyObject *dispatcher_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Dispatcher *self = (Dispatcher *)PyType_GenericNew(type, args, kwds);
    if (self != NULL)
        self->vectorcall =
            (vectorcallfunc)(type == &ReadyDispatcherType ? ready_call
                             : type == &WriteMethodType || type == &StageWriteMethodType
                                 ? write_method_call
                                 : completion_call);
    return (PyObject *)self;
}

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "iomux.reactor._speedups",
    .m_doc = "The loop's event dispatch and scheduling in C (see iomux.reactor.speedups).",
    .m_size = -1,
};

static int add_type(PyObject *m, const char *name, PyTypeObject *type) {
    if (PyType_Ready(type) < 0)
        return -1;
    Py_INCREF(type);
    if (PyModule_AddObject(m, name, (PyObject *)type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}

static int make_task_kwnames(void) {
    static const char *const names[4][3] = {
        {"loop"}, {"loop", "name"}, {"loop", "context"}, {"loop", "name", "context"}};
    for (int i = 0; i < 4; i++) {
        int n = 1 + (i & 1) + (i >> 1);
        PyObject *tuple = PyTuple_New(n);
        if (tuple == NULL)
            return -1;
        for (int j = 0; j < n; j++) {
            PyObject *name = PyUnicode_InternFromString(names[i][j]);
            if (name == NULL) {
                Py_DECREF(tuple);
                return -1;
            }
            PyTuple_SET_ITEM(tuple, j, name);
        }
        Py_XSETREF(task_kwnames[i], tuple);
    }
    return 0;
}

PyMODINIT_FUNC PyInit__speedups(void) {
    WriteMethodType.tp_flags |= Py_TPFLAGS_METHOD_DESCRIPTOR;
    WriteMethodType.tp_descr_get = write_get;
    WriteMethodType.tp_getset = write_getset;
    StageWriteMethodType.tp_flags |= Py_TPFLAGS_METHOD_DESCRIPTOR;
    StageWriteMethodType.tp_descr_get = write_get;
    StageWriteMethodType.tp_getset = write_getset;
    PyObject *m = PyModule_Create(&speedups_module);
    if (m == NULL)
        return NULL;
    if (add_type(m, "Dispatcher", &DispatcherType) < 0 ||
        add_type(m, "ReadyDispatcher", &ReadyDispatcherType) < 0 ||
        add_type(m, "WriteMethod", &WriteMethodType) < 0 ||
        add_type(m, "StageWriteMethod", &StageWriteMethodType) < 0 ||
        add_type(m, "LoopMethod", &LoopMethodType) < 0 || make_task_kwnames() < 0 ||
        PyModule_AddIntConstant(m, "RECORD_SIZE", (long)sizeof(struct event_record)) < 0 ||
        PyModule_AddIntConstant(m, "SEND_PAIR_SIZE", (long)sizeof(struct send_pair)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
