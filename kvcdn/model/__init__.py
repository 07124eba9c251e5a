"""The model runtime, the only part of the core that imports torch and transformers: loading a model
and its fingerprint (`loading`), the one adapter to transformers' cache API (`adapter`), how text
becomes token ids (`prompt`), KV tensors to and from block payloads (`tensors`), and the model flags
every command shares (`options`). Origins and clients use it; edges never do."""
