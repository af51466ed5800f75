/*
 * iomux.reactor._speedups: the loop's event dispatch in C.
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
    for (int i = 0; i < n; i++) {
        PyObject *descr = PyObject_GetAttrString(cls, names[i]);
        if (descr == NULL)
            return -1;
        int ok = Py_IS_TYPE(descr, &PyMemberDescr_Type) &&
                 ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX;
        if (ok)
            self->offset[i] = ((PyMemberDescrObject *)descr)->d_member->offset;
        Py_DECREF(descr);
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "%s: %s.%s is not a __slots__ attribute", what,
                         ((PyTypeObject *)cls)->tp_name, names[i]);
            return -1;
        }
    }
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
    Py_CLEAR(self->cls);
    for (int i = 0; i < MAX_REFS; i++)
        Py_CLEAR(self->refs[i]);
    return 0;
}

static void dispatcher_dealloc(Dispatcher *self) {
    PyObject_GC_UnTrack(self);
    dispatcher_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* A call raised: SystemExit and KeyboardInterrupt go on up (-1); anything
 * else goes to failed(transport, exc) (0, or -1 if that raised). */
static int report_failure(PyObject *failed, PyObject *owner) {
    if (PyErr_ExceptionMatches(PyExc_SystemExit) ||
        PyErr_ExceptionMatches(PyExc_KeyboardInterrupt))
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
    int rc = setup(self, cls, ready_attrs, R_COUNT, refs, 3, R_HANDLE, "ReadyDispatcher");
    if (rc == 0) {
        Py_XSETREF(self->refs[R_NAME], refs[R_NAME]);
        self->read_size = read_size;
    } else {
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
    PyObject *data = PyBytes_FromStringAndSize(NULL, self->read_size);
    if (data == NULL) {
        release(&h);
        return -1;
    }
    ssize_t n = read((int)fd, PyBytes_AS_STRING(data), (size_t)self->read_size);
    if (n <= 0) {
        int err = errno;
        Py_DECREF(data);
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
    if (n < self->read_size && _PyBytes_Resize(&data, n) < 0) {
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

/* -- the types and the module ------------------------------------------------------ */

/* The two types differ in their name, doc and __init__ (and their call). */
#define DISPATCHER_TYPE(NAME, DOC, INIT)                                                  \
    {                                                                                     \
        PyVarObject_HEAD_INIT(NULL, 0).tp_name = "iomux.reactor._speedups." NAME,         \
        .tp_doc = PyDoc_STR(DOC), .tp_basicsize = sizeof(Dispatcher),                     \
        .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL, \
        .tp_new = dispatcher_new, .tp_init = (initproc)(INIT),                            \
        .tp_dealloc = (destructor)dispatcher_dealloc, .tp_free = PyObject_GC_Del,         \
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
    .m_doc = "The loop's event dispatch in C (see iomux.reactor.speedups).",
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
        PyModule_AddIntConstant(m, "RECORD_SIZE", (long)sizeof(struct event_record)) < 0 ||
        PyModule_AddIntConstant(m, "SEND_PAIR_SIZE", (long)sizeof(struct send_pair)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
