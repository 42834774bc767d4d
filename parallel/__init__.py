"""Data and ZeRO-style parallel training through jit + Mesh/NamedSharding and shard_map."""
