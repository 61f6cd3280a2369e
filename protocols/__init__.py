"""What goes on the wire: signed envelopes, model payloads, and (later) codecs.

This package never imports ``p2pnode``: it works on bytes, tensors and peer ids only.
"""
