"""What the tests share: fakes of the core's ports and of the SGLang fork's peers, benches built on them,
the spec as editable text, and the command line run in-process."""
