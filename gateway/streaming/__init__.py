"""Streams: SSE framing, the watcher that keeps a relayed stream honest (complete, finalised or
reported broken), and the recording a flight's followers read a leader's answer from."""
