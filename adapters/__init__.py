"""Everything outside the pure core, in four layers; imports run one way (``tests/test_layers.py``).

- ``ports``: implementations of the core's ports (block buffers in SGLang's layout, the owning allocator,
  the payload arena, clocks, the gloo rank group, the in-process sender link, the Mooncake transport).
- ``integrations``: the controller dropped into a serving system (SGLang); ports only.
- ``kit``: the verification kit (the simulated world, faults, the judge, fuzzer, explorer, walk,
  variants, scenarios, the Quint model's runner); ports only.
- ``tools``: the command line, the simulations, the bench and our own Encode process; anything below.
"""
