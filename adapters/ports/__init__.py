"""Implementations of the core's ports: what a serving system plugs into ``epd_receiver.fsm``."""
