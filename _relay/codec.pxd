# The map of codec.pyx: its one class's fields (the wire constants are in proto.pxd).

cdef class FrameReader:
    cdef bytearray buf           # bytes of a frame not yet whole
    cdef Py_ssize_t max_frame    # the largest payload accepted (FrameError beyond it)
