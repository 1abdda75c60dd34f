"""The relay as the control plane builds it: the Cython data plane, handshake, admission, DERP client, DERP map."""
