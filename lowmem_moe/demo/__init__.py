"""End-to-end demo: build a 4-expert MoE from SmolLM2-135M-Instruct and run it.

Run it with ``make demo`` or ``python -m lowmem_moe.demo``.
"""
