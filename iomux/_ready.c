/*
 * iomux._ready: the per-event loop of Multiplexer.ready() in C.
 *
 * A driver's _wait() returns the kernel's (fd, event) pairs; ready() turns
 * each into (fd, mask, data) for the fds that are registered and want one
 * of the reported directions. That loop runs once per ready fd per wait,
 * so it is here; Multiplexer._collect in iomux/multiplexer.py does the
 * same in Python where this module is not built, and for poll() (Event
 * tuples) and drivers that emulate one-shot triggering.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Registration(fileobj, fd, interest, data, trigger): data is item 3. */
#define REGISTRATION_DATA 3

/* One (fd, event) pair: 0 with *fd and *ev borrowed from pair (or from
 * *held, a tuple made of it), -1 with an exception set. */
static int unpack_pair(PyObject *pair, PyObject **held, PyObject **fd, PyObject **ev) {
    *held = NULL;
    if (!PyTuple_CheckExact(pair)) {
        pair = *held = PySequence_Tuple(pair);
        if (pair == NULL)
            return -1;
    }
    if (PyTuple_GET_SIZE(pair) != 2) {
        PyErr_Format(PyExc_ValueError, "a driver's _wait() gives (fd, event) pairs, not %R",
                     pair);
        Py_CLEAR(*held);
        return -1;
    }
    *fd = PyTuple_GET_ITEM(pair, 0);
    *ev = PyTuple_GET_ITEM(pair, 1);
    return 0;
}

/* The interest bits of a kernel event: masks[ev], else translate(ev),
 * remembered in masks. A new reference, or NULL with an exception. */
static PyObject *event_mask(PyObject *masks, PyObject *translate, PyObject *ev) {
    PyObject *mask = PyDict_GetItemWithError(masks, ev);
    if (mask != NULL)
        return Py_NewRef(mask);
    if (PyErr_Occurred())
        return NULL;
    mask = PyObject_CallOneArg(translate, ev);
    if (mask != NULL && PyDict_SetItem(masks, ev, mask) < 0)
        Py_CLEAR(mask);
    return mask;
}

/* One pair: append (fd, mask & want, data) to events if it is for a
 * registered fd that wants it; *woken set if it is the waker's. 0, or -1
 * with an exception set. */
static int collect_one(PyObject *const *args, PyObject *fd, PyObject *ev, long waker_fd,
                       int *woken) {
    PyObject *want_of = args[1], *masks = args[2], *registrations = args[3];
    PyObject *translate = args[4], *events = args[6];
    PyObject *want = PyDict_GetItemWithError(want_of, fd);
    if (want == NULL) {
        if (PyErr_Occurred())
            return -1;
        long number = PyLong_AsLong(fd);
        if (number == -1 && PyErr_Occurred())
            return -1;
        if (number == waker_fd)
            *woken = 1;
        return 0;
    }
    PyObject *mask = event_mask(masks, translate, ev);
    if (mask == NULL)
        return -1;
    long bits = PyLong_AsLong(mask), wanted = PyLong_AsLong(want);
    Py_DECREF(mask);
    if ((bits == -1 || wanted == -1) && PyErr_Occurred())
        return -1;
    if ((bits &= wanted) == 0)
        return 0;
    PyObject *reg = PyDict_GetItemWithError(registrations, fd);
    if (reg == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetObject(PyExc_KeyError, fd);
        return -1;
    }
    PyObject *data = PyTuple_Check(reg) && PyTuple_GET_SIZE(reg) > REGISTRATION_DATA
                         ? Py_NewRef(PyTuple_GET_ITEM(reg, REGISTRATION_DATA))
                         : PyObject_GetAttrString(reg, "data");
    PyObject *bits_obj = data != NULL ? PyLong_FromLong(bits) : NULL;
    PyObject *event = bits_obj != NULL ? PyTuple_Pack(3, fd, bits_obj, data) : NULL;
    Py_XDECREF(bits_obj);
    Py_XDECREF(data);
    if (event == NULL)
        return -1;
    int rc = PyList_Append(events, event);
    Py_DECREF(event);
    return rc;
}

PyDoc_STRVAR(collect_doc,
             "collect(pairs, want, masks, registrations, translate, waker_fd, events) -> bool\n\n"
             "Append (fd, mask, data) to events for each (fd, event) pair of a registered fd\n"
             "whose wanted interest bits (want[fd]) meet the event's (masks[event], else\n"
             "translate(event), remembered in masks); data is registrations[fd].data.\n"
             "Return whether the waker's fd was among the pairs (the caller drains it).");

static PyObject *collect(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_Format(PyExc_TypeError, "collect() takes 7 arguments (%zd given)", nargs);
        return NULL;
    }
    for (int i = 1; i <= 3; i++) {
        if (!PyDict_Check(args[i])) {
            PyErr_Format(PyExc_TypeError, "collect(): argument %d must be a dict, not %.100s",
                         i + 1, Py_TYPE(args[i])->tp_name);
            return NULL;
        }
    }
    if (!PyList_Check(args[6])) {
        PyErr_Format(PyExc_TypeError, "collect(): events must be a list, not %.100s",
                     Py_TYPE(args[6])->tp_name);
        return NULL;
    }
    long waker_fd = PyLong_AsLong(args[5]);
    if (waker_fd == -1 && PyErr_Occurred())
        return NULL;
    PyObject *iter = PyObject_GetIter(args[0]);
    if (iter == NULL)
        return NULL;
    int woken = 0, rc = 0;
    PyObject *pair;
    while (rc == 0 && (pair = PyIter_Next(iter)) != NULL) {
        PyObject *held, *fd, *ev;
        rc = unpack_pair(pair, &held, &fd, &ev);
        if (rc == 0)
            rc = collect_one(args, fd, ev, waker_fd, &woken);
        Py_XDECREF(held);
        Py_DECREF(pair);
    }
    Py_DECREF(iter);
    if (rc < 0 || PyErr_Occurred())
        return NULL;
    return PyBool_FromLong(woken);
}

static PyMethodDef ready_methods[] = {
    {"collect", (PyCFunction)(void (*)(void))collect, METH_FASTCALL, collect_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef ready_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "iomux._ready",
    .m_doc = "The per-event loop of Multiplexer.ready() in C (see iomux.multiplexer).",
    .m_size = 0,
    .m_methods = ready_methods,
};

PyMODINIT_FUNC PyInit__ready(void) {
    return PyModuleDef_Init(&ready_module);
}
