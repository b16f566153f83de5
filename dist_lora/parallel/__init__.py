"""Process groups, collectives, per-step gradient sums (by parameter attribute), ZeRO-3 helpers
and the CPU compatibility layer for megatron-core. Imports no layer or model class."""
