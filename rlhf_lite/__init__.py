"""rlhf_lite: a small reproduction of Secrets of RLHF in LLMs Part I: PPO."""

import logging as _logging

# On CPUs with AVX512-BF16, importing bitsandbytes (peft does) tries an optional kernel package and logs
# a warning when it is absent; its own fallback is what the 4-bit path uses (seen with bitsandbytes 0.50.2).
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage())
