"""Typed payloads, requests, callbacks and settings. No I/O, no torch."""
