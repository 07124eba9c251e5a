"""kvcdn inside other engines: `kvcdn.integrations.vllm` is a vLLM KV connector (the optional extra
`vllm`, installed in vLLM's own environment)."""
