"""Merge the chosen abliteration edit into full-precision weights, shard by shard, and re-export.

The model is never built in memory: each safetensors shard of the source is
read, the tensors the edit touches are rewritten, the shard is written and
freed (the llm-compressor ``model_free`` pattern). Peak memory is one shard
plus one module's tensors, whatever the model's size.
"""
