"""Models: loading (the embedded GGUF default, hub names, local folders), the architecture facts
the engine needs per family, rotary tables, and the size guard checked before weights load."""
