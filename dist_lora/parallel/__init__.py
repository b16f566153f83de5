"""Process groups, collectives and the CPU compatibility layer for megatron-core."""
